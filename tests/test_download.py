"""Downloads against a real HTTP server on 127.0.0.1 speaking the Hub's protocol (tests/hubserver.py).

The real huggingface_hub code runs; only HF_ENDPOINT points elsewhere. Tests that need the server use the
``hub`` fixture, which turns offline mode off for that test alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need

from nbllm import models
from nbllm.download import DEFAULT_QUANTIZATION, download, select_files
from nbllm.errors import DownloadError, ModelNotFoundError, OptionError
from nbllm.frontend import command
from nbllm.resolve import resolve
from nbllm.store import read_revision

try:
    from hubserver import HubServer, hub  # noqa: F401 - `hub` is a fixture
    from watch import watched
except ImportError:  # tests/ imported as a package
    from tests.hubserver import HubServer, hub  # noqa: F401
    from tests.watch import watched

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
TOKEN = "hf_TESTtokenDoNotShow0123456789"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh models folder, no token from the real machine, small download chunks (to see resumes)."""
    from huggingface_hub import constants

    folder = tmp_path / "models"
    monkeypatch.setenv(models.ENV_VAR, str(folder))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    # huggingface_hub writes (and resumes from) whole chunks of 10 MB; tiny test files need smaller ones.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    models.set_models_dir(None)
    yield folder
    models.set_models_dir(None)


@pytest.fixture
def tiny_repo(hub: HubServer, tiny_model: Path) -> Path:
    """``org/tiny``: the built-in tiny Transformers model, plus a .bin copy that must not be downloaded."""
    files = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
    hub.add_repo("org/tiny", {**files, "pytorch_model.bin": b"b" * 1000, "training_args.bin": b"t"})
    return tiny_model


def _quiet(**kwargs: object) -> dict[str, object]:
    return {"progress": False, **kwargs}


def _one_line(error: pytest.ExceptionInfo[DownloadError]) -> str:
    message = error.value.message
    assert "\n" not in message and message.endswith(".")
    return message


# ---------------------------------------------------------------------------------------- selection


def test_safetensors_preferred_over_bin() -> None:
    repo = [
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "training_args.bin",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "onnx/config.json",
    ]
    chosen = select_files(repo)
    assert chosen.kind == "transformers"
    assert chosen.files == (
        "README.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    )
    assert chosen.note and "skipping 2 PyTorch" in chosen.note


def test_bin_when_there_is_no_safetensors() -> None:
    chosen = select_files(
        ["config.json", "pytorch_model.bin", "training_args.bin", "optimizer.pt", "vocab.txt"]
    )
    assert chosen.files == ("config.json", "pytorch_model.bin", "vocab.txt")


def test_gguf_repo_gets_the_default_quantization_and_says_what_else_exists() -> None:
    repo = {
        "README.md": 10,
        "llama-2-7b.Q2_K.gguf": 100,
        "llama-2-7b.Q4_K_M.gguf": 200,
        "llama-2-7b.Q5_K_M.gguf": 300,
        "llama-2-7b.Q8_0.gguf": 400,
    }
    chosen = select_files(repo)
    assert DEFAULT_QUANTIZATION == "Q4_K_M"
    assert (chosen.kind, chosen.files) == ("gguf", ("llama-2-7b.Q4_K_M.gguf",))
    assert chosen.note == (
        "Chose llama-2-7b.Q4_K_M.gguf (the default quantization Q4_K_M). Also available: Q2_K, Q5_K_M, Q8_0. "
        "Choose another with --file '*Q2_K*'."
    )


def test_gguf_fallbacks_split_files_and_projectors() -> None:
    assert select_files(["m.Q2_K.gguf", "m.Q5_K_M.gguf", "m.Q8_0.gguf"]).files == ("m.Q5_K_M.gguf",)
    smallest = select_files({"m.IQ2_XXS.gguf": 50, "m.IQ3_M.gguf": 70, "mmproj-f16.gguf": 10})
    assert smallest.files == ("m.IQ2_XXS.gguf", "mmproj-f16.gguf") and "no Q4_K_M" in (smallest.note or "")
    assert (smallest.note or "").endswith("With its projector mmproj-f16.gguf (images).")
    split = select_files(
        [
            "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
            "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf",
            "Q8_0/m-Q8_0-00001-of-00002.gguf",
            "Q8_0/m-Q8_0-00002-of-00002.gguf",
        ]
    )
    assert split.files == ("Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf")


def test_file_patterns_choose_and_exclude_patterns_remove() -> None:
    gguf_repo = ["README.md", "m.Q4_K_M.gguf", "m.Q8_0.gguf"]
    assert select_files(gguf_repo, include=["*Q8_0*"]).files == ("m.Q8_0.gguf",)
    assert select_files(gguf_repo, include=["*.gguf"]).files == ("m.Q4_K_M.gguf", "m.Q8_0.gguf")
    sharded = [
        "config.json",
        "tokenizer.json",
        "a-00001-of-00002.safetensors",
        "a-00002-of-00002.safetensors",
    ]
    picked = select_files(sharded, include=["a-00001*"])
    assert picked.files == ("a-00001-of-00002.safetensors", "config.json", "tokenizer.json")
    assert (
        "README.md"
        not in select_files(["README.md", "config.json", "model.safetensors"], exclude=["*.md"]).files
    )
    with pytest.raises(DownloadError) as err:
        select_files(["config.json", "model.safetensors"], exclude=["*.safetensors"])
    assert "leaves no weight files" in _one_line(err)
    with pytest.raises(DownloadError) as err:
        select_files(gguf_repo, include=["*Q3_K*"])
    assert "no file matches --file *Q3_K*" in _one_line(err) and "m.Q4_K_M.gguf" in err.value.message


# ------------------------------------------------------------------------------------- downloading


def test_downloads_a_transformers_model(
    tiny_repo: Path, hub: HubServer, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = download("org/tiny", **_quiet())
    folder = isolated / "org_tiny"
    expected = sorted(p.name for p in tiny_repo.iterdir() if p.suffix in (".json", ".jinja", ".safetensors"))
    assert sorted(result.files) == expected
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == expected  # no .bin, nothing else
    for name in expected:
        assert (folder / name).read_bytes() == (tiny_repo / name).read_bytes()
    commit = hub.repos["org/tiny"].commit
    assert (folder / ".nbllm" / "revision").read_text().strip() == commit
    assert (folder / ".nbllm" / "complete").is_file() and not (folder / ".nbllm" / "partial").exists()
    out = capsys.readouterr().out.splitlines()
    assert "skipping 2 PyTorch" not in out[0] and "skipping 1 PyTorch" in out[0]  # training_args.bin ignored
    assert out[-1] == result.summary and result.summary.startswith(f"Downloaded org/tiny at {commit[:10]} (")
    assert f"Load it with {command('load', 'org_tiny')}." in result.summary

    source = resolve("org_tiny")
    assert (source.format, source.revision, source.repo_id) == ("transformers", commit, "org/tiny")

    before = len(hub.gets())
    again = download("org/tiny", **_quiet())
    assert len(hub.gets()) == before and again.downloaded == ()
    assert "already complete" in again.summary


def test_gguf_repo_downloads_one_file_to_the_models_folder_root(
    hub: HubServer, tiny_gguf: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_gguf.read_bytes()
    hub.add_repo(
        "org/tiny-GGUF",
        {
            "README.md": "card",
            "tiny.Q2_K.gguf": data[:-1],
            "tiny.Q4_K_M.gguf": data,
            "tiny.Q8_0.gguf": data + b"8",
        },
    )
    result = download("org/tiny-GGUF", **_quiet())
    assert result.path == isolated / "tiny.Q4_K_M.gguf" and result.path.read_bytes() == data
    assert sorted(p.name for p in isolated.iterdir()) == [".nbllm", "tiny.Q4_K_M.gguf"]
    assert capsys.readouterr().out.startswith("Chose tiny.Q4_K_M.gguf (the default quantization Q4_K_M).")
    commit = hub.repos["org/tiny-GGUF"].commit
    assert read_revision(result.path) == commit
    (entry,) = models.ModelsFolder().list()
    assert (entry.name, entry.loader, entry.complete, entry.repo_id) == (
        "tiny.Q4_K_M.gguf",
        "llama.cpp",
        True,
        "org/tiny-GGUF",
    )
    q8 = download("org/tiny-GGUF", files=["*Q8_0*"], **_quiet())
    assert q8.path == isolated / "tiny.Q8_0.gguf"
    assert resolve("org/tiny-GGUF").name == "tiny.Q4_K_M.gguf"  # the default among two local copies


def test_dropped_connection_resumes_with_a_range_request(
    tiny_repo: Path, hub: HubServer, isolated: Path
) -> None:
    size = (tiny_repo / "model.safetensors").stat().st_size
    assert size > 5 * CHUNK
    hub.drop_once["model.safetensors"] = 4 * CHUNK + 1000
    download("org/tiny", **_quiet())
    ranges = [r.range for r in hub.gets("model.safetensors")]
    assert ranges == [None, f"bytes={4 * CHUNK}-"]  # the second request asks only for the rest
    assert (isolated / "org_tiny" / "model.safetensors").read_bytes() == (
        tiny_repo / "model.safetensors"
    ).read_bytes()


def test_interrupted_download_continues_on_the_next_call(
    tiny_repo: Path, hub: HubServer, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = isolated / "org_tiny"
    partial = folder / ".nbllm" / "partial"
    hub.interrupt_once["model.safetensors"] = 3 * CHUNK + 500  # SIGINT, as a kernel interrupt sends...
    # ...once the client has written the three whole chunks it received (whatever the machine's load)
    hub.interrupt_when = lambda: any(p.stat().st_size >= 3 * CHUNK for p in partial.glob("*.part"))
    with pytest.raises(KeyboardInterrupt):
        download("org/tiny", **_quiet())
    assert not (folder / "model.safetensors").exists()  # never half-written under its final name
    (part,) = (folder / ".nbllm" / "partial").iterdir()
    kept = part.stat().st_size
    assert kept == 3 * CHUNK
    assert "Run the same command again" in capsys.readouterr().out
    entry = models.ModelsFolder().get("org_tiny")
    assert not entry.complete and command("download", "org/tiny") in entry.status
    with pytest.raises(ModelNotFoundError, match="org/tiny"):
        resolve("org_tiny")

    hub.requests.clear()
    result = download("org/tiny", **_quiet())
    assert [r.range for r in hub.gets("model.safetensors")] == [f"bytes={kept}-"]
    assert result.resumed == ("model.safetensors",)
    size = (tiny_repo / "model.safetensors").stat().st_size
    assert result.bytes_downloaded == size - kept + sum(
        (tiny_repo / f).stat().st_size for f in result.downloaded if f != "model.safetensors"
    )
    assert (folder / "model.safetensors").read_bytes() == (tiny_repo / "model.safetensors").read_bytes()
    assert resolve("org_tiny").format == "transformers"


def test_corrupted_byte_is_caught_and_never_kept(tiny_repo: Path, hub: HubServer, isolated: Path) -> None:
    hub.corrupt.add("model.safetensors")
    with pytest.raises(DownloadError) as err:
        download("org/tiny", **_quiet())
    assert "model.safetensors from org/tiny failed its integrity check (its sha256 differs" in _one_line(err)
    folder = isolated / "org_tiny"
    assert not (folder / "model.safetensors").exists()
    assert not list((folder / ".nbllm" / "partial").glob("*"))
    assert not models.ModelsFolder().get("org_tiny").complete

    fetched_before = {r.path.rsplit("/", 1)[-1] for r in hub.gets()} - {"model.safetensors"}
    hub.corrupt.clear()
    hub.requests.clear()
    download("org/tiny", **_quiet())
    assert [r.range for r in hub.gets("model.safetensors")] == [None]  # the bad file again, from its start
    assert not fetched_before & {r.path.rsplit("/", 1)[-1] for r in hub.gets()}  # verified files are kept
    assert models.ModelsFolder().get("org_tiny").complete


def test_a_damaged_small_file_is_caught_by_its_git_sha1(tiny_repo: Path, hub: HubServer, isolated: Path) -> None:
    """Small files have no sha256 on the Hub, only their git blob sha1: a flipped byte (same size) in
    config.json is caught by it, on download and by --check."""
    original = (tiny_repo / "config.json").read_bytes()
    hub.corrupt.add("config.json")
    with pytest.raises(DownloadError) as err:
        download("org/tiny", **_quiet())
    assert "config.json from org/tiny failed its integrity check (its size or sha1 differs" in _one_line(err)
    folder = isolated / "org_tiny"
    assert not (folder / "config.json").exists() and not list((folder / ".nbllm" / "partial").glob("*"))
    assert not models.ModelsFolder().get("org_tiny").complete

    hub.corrupt.clear()
    hub.requests.clear()
    download("org/tiny", **_quiet())
    assert [r.range for r in hub.gets("config.json")] == [None]
    assert (folder / "config.json").read_bytes() == original and models.ModelsFolder().get("org_tiny").complete

    damaged = bytearray(original)
    damaged[5] ^= 1
    (folder / "config.json").write_bytes(bytes(damaged))
    with pytest.raises(DownloadError) as err:
        download("org/tiny", check=True, **_quiet())
    assert "1 of 7 file(s) of org_tiny" in _one_line(err) and "(config.json)" in err.value.message
    assert not (folder / "config.json").exists()


def test_check_finds_a_damaged_file_and_the_next_download_fetches_only_it(
    tiny_repo: Path, hub: HubServer, isolated: Path
) -> None:
    download("org/tiny", **_quiet())
    assert download("org/tiny", check=True, **_quiet()).checked
    weights = isolated / "org_tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DownloadError) as err:
        download("org/tiny", check=True, **_quiet())
    assert (
        "1 of 7 file(s) of org_tiny" in _one_line(err) and f"Run {command('download', 'org/tiny')}" in err.value.message
    )
    assert not weights.exists() and not models.ModelsFolder().get("org_tiny").complete
    hub.requests.clear()
    download("org/tiny", **_quiet())
    assert [r.path.rsplit("/", 1)[-1] for r in hub.gets()] == ["model.safetensors"]


def test_update_to_a_new_commit_fetches_only_what_changed(hub: HubServer, isolated: Path) -> None:
    hub.add_repo("org/m", {"config.json": "{}", "a.safetensors": b"a" * 100, "b.safetensors": b"b" * 100})
    download("org/m", **_quiet())
    new = hub.add_repo(
        "org/m", {"config.json": "{}", "a.safetensors": b"A" * 100, "c.safetensors": b"c" * 10}
    )
    hub.requests.clear()
    result = download("org/m", **_quiet())
    assert sorted(r.path.rsplit("/", 1)[-1] for r in hub.gets()) == ["a.safetensors", "c.safetensors"]
    folder = isolated / "org_m"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "a.safetensors",
        "c.safetensors",
        "config.json",
    ]
    assert (folder / "a.safetensors").read_bytes() == b"A" * 100
    assert result.revision == new.commit == read_revision(folder)


def test_a_folder_downloaded_elsewhere_is_adopted_without_refetching(
    tiny_repo: Path, hub: HubServer, isolated: Path
) -> None:
    import shutil

    shutil.copytree(tiny_repo, isolated / "org_tiny")  # as text-generation-webui would have left it
    with pytest.raises(DownloadError, match="not downloaded by nbllm"):
        download("org/tiny", check=True, **_quiet())
    result = download("org/tiny", **_quiet())
    assert hub.gets() == [] and result.downloaded == ()
    assert download("org/tiny", check=True, **_quiet()).checked


def test_a_second_download_into_the_same_place_is_refused(
    tiny_repo: Path, hub: HubServer, isolated: Path
) -> None:
    from filelock import FileLock

    (isolated / "org_tiny" / ".nbllm").mkdir(parents=True)
    with FileLock(str(isolated / "org_tiny" / ".nbllm" / "lock")):
        with pytest.raises(DownloadError) as err:
            download("org/tiny", **_quiet())
    assert _one_line(err).startswith("another download into ")


def test_not_enough_disk_space_is_said_before_downloading(
    tiny_repo: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(DownloadError) as err:
        download("org/tiny", **_quiet())
    assert "not enough disk space" in _one_line(err) and "NBLLM_MODELS_DIR" in err.value.message
    assert hub.gets() == []  # refused before any file was fetched


def test_revision_goes_to_its_own_folder(hub: HubServer, isolated: Path) -> None:
    hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": b"w" * 10}, branches=("main", "v2"))
    result = download("org/m:v2", **_quiet())
    assert result.path == isolated / "org_m_v2"
    with pytest.raises(DownloadError) as err:
        download("org/m:nope", **_quiet())
    assert _one_line(err).startswith("org/m has no revision 'nope'.")


# ------------------------------------------------------------------------------------ hub answers


def test_unknown_repository_404_and_401(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DownloadError) as err:  # no token: the Hub answers 401 for "missing or private"
        download("org/missing", **_quiet())
    message = _one_line(err)
    assert message.startswith("org/missing was not found on 127.0.0.1:") and "(HTTP 401)" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(DownloadError) as err:
        download("org/missing", **_quiet())
    assert "(HTTP 404)" in _one_line(err) and "check that your token can read it" in err.value.message


def test_private_repository_needs_the_token(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.token = TOKEN
    hub.add_repo("org/private", {"config.json": "{}", "model.safetensors": b"w" * 10}, private=True)
    with pytest.raises(DownloadError) as err:
        download("org/private", **_quiet())
    assert "needs a login (HTTP 401)" in _one_line(err)
    monkeypatch.setenv("HF_TOKEN", "hf_wrongWRONGwrong")
    with pytest.raises(DownloadError) as err:
        download("org/private", **_quiet())
    assert _one_line(err).startswith("127.0.0.1:") and "refused the token (HTTP 401)" in err.value.message
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download("org/private", **_quiet())
    assert {r.authorization for r in hub.gets()} == {f"Bearer {TOKEN}"}


def test_large_files_come_through_the_hubs_redirect_and_the_token_stays_with_the_hub(
    hub: HubServer, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub answers an LFS download with a redirect to its CDN, on another host: the file comes from
    there (resuming there too), and the token is sent to the Hub only, never to the other host."""
    weights = os.urandom(3 * CHUNK + 123)
    hub.token = TOKEN
    hub.add_repo("org/private", {"config.json": "{}", "model.safetensors": weights}, private=True)
    cdn = hub.redirect_lfs()
    cdn.drop_once["model.safetensors"] = CHUNK + 10
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download("org/private", **_quiet())
    assert (isolated / "org_private" / "model.safetensors").read_bytes() == weights
    assert {r.authorization for r in hub.gets()} == {f"Bearer {TOKEN}"}  # the Hub got the token...
    sent = [r for r in cdn.requests if r.method == "GET"]
    assert [r.range for r in sent] == [None, f"bytes={CHUNK}-"]  # ...the CDN served the file, and its resume
    assert {r.authorization for r in sent} == {None}  # ...and never saw the token
    assert {r.host for r in sent} == {cdn.url.removeprefix("http://")} != {hub.url.removeprefix("http://")}


def test_gated_repository(hub: HubServer) -> None:
    hub.add_repo("org/gated", {"config.json": "{}", "model.safetensors": b"w"}, gated=True)
    with pytest.raises(DownloadError) as err:
        download("org/gated", **_quiet())
    assert "gated" in _one_line(err) and "/org/gated" in err.value.message


def test_token_never_appears_in_output_logs_or_records(
    hub: HubServer,
    isolated: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub's most talkative mode
    caplog.set_level(logging.DEBUG)
    hub.token = TOKEN
    hub.add_repo(
        "org/private", {"config.json": "{}", "model.safetensors": os.urandom(3 * CHUNK)}, private=True
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.drop_once["model.safetensors"] = CHUNK + 10  # a retry logs the URL it retries
    result = download("org/private")  # with progress bars
    messages = [result.summary, repr(result)]
    hub.status_override = 500
    with pytest.raises(DownloadError) as err:
        download("org/private:other")
    messages.append(err.value.message)
    hub.status_override = None
    monkeypatch.setenv("HF_TOKEN", TOKEN[::-1])  # a wrong token: the error is about the token
    with pytest.raises(DownloadError) as err:
        download("org/private", token=TOKEN[::-1])
    messages.append(err.value.message)
    out, errors = capfd.readouterr()
    assert "model.safetensors" in errors  # the bars and the retry warning were really captured
    for text in [out, errors, caplog.text, *messages]:
        assert TOKEN not in text and TOKEN[::-1] not in text
    for file in isolated.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


def test_offline_mode_answers_at_once_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with watched(monkeypatch) as seen, pytest.raises(DownloadError) as err:  # conftest sets HF_HUB_OFFLINE=1
        download("org/tiny", **_quiet())
    assert seen.connections == []  # no network call at all
    assert _one_line(err).startswith("HF_HUB_OFFLINE is set, so org/tiny cannot be downloaded.")


def test_unreachable_server_answers_quickly_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    with watched(monkeypatch, allow_network=True) as seen, pytest.raises(DownloadError) as err:
        download("org/tiny", **_quiet())
    port = int(url.rsplit(":", 1)[1])
    # one try of the repository's metadata, no retries with backoff (huggingface_hub's own would make 5, ~23 s);
    # huggingface_hub 2.x may try one more request of its own first (its agent registry at the endpoint)
    assert 1 <= len([a for a in seen.connections if a[1] == port]) <= 2, seen.connections
    assert _one_line(err).startswith("cannot reach 127.0.0.1:")


def test_resolve_of_a_hub_id_downloads_then_returns_the_source(
    tiny_repo: Path, hub: HubServer, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve("org/tiny")
    assert source.path == (isolated / "org_tiny").resolve()
    assert (source.format, source.repo_id, source.revision) == (
        "transformers",
        "org/tiny",
        hub.repos["org/tiny"].commit,
    )
    assert hub.gets("model.safetensors")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # later loads need no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("org/tiny") == source


def test_llm_load_of_a_hub_id_downloads_then_loads_and_its_record_cites_the_commit(
    shell: object, engine: object, tiny_repo: Path, hub: HubServer, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`%llm_load org/model` in a real IPython shell, end to end: it downloads from the Hub, loads, and the
    outputs' records name the repository and the commit they came from."""
    from IPython.core.interactiveshell import InteractiveShell

    import nbllm

    assert isinstance(shell, InteractiveShell)
    commit = hub.repos["org/tiny"].commit
    shell.run_line_magic("llm_load", "org/tiny --attn sdpa")
    out = capsys.readouterr().out
    assert f"Downloaded org/tiny at {commit[:10]}" in out and "Loaded org_tiny with transformers" in out
    assert hub.gets("model.safetensors") and (isolated / "org_tiny" / ".nbllm" / "complete").is_file()
    status = nbllm.get_engine().status()
    assert status.path == str((isolated / "org_tiny").resolve()) and status.revision == commit

    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 12 -o r", "The capital of France is")
    record = shell.user_ns["r"].record
    assert record.model["repo_id"] == "org/tiny" and record.model["revision"] == commit
    # The downloaded model is the one served: the same greedy text as the folder it was served from.
    served = nbllm.Engine()
    served.load(tiny_repo, attn="sdpa")
    try:
        direct = served.generate("The capital of France is", temperature=0, max_new_tokens=12)
    finally:
        served.unload()
    assert direct.token_ids == shell.user_ns["r"].token_ids

    hub.requests.clear()
    shell.run_line_magic("llm_unload", "")
    shell.run_line_magic("llm_load", "org/tiny --attn sdpa")  # the local copy, nothing fetched again
    assert hub.gets() == [] and nbllm.get_engine().status().revision == commit


def test_llm_load_of_a_gguf_hub_id_downloads_then_loads_with_llama_cpp(
    shell: object, engine: object, hub: HubServer, tiny_gguf: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need("llama_cpp")
    from IPython.core.interactiveshell import InteractiveShell

    assert isinstance(shell, InteractiveShell)
    data = _gguf_repo(hub, tiny_gguf)
    commit = hub.repos["org/tiny-GGUF"].commit
    shell.run_line_magic("llm_load", "org/tiny-GGUF")
    assert "Loaded tiny.Q4_K_M.gguf with llama.cpp" in capsys.readouterr().out
    assert (isolated / "tiny.Q4_K_M.gguf").read_bytes() == data
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 4 -o r", "Hello")
    record = shell.user_ns["r"].record
    assert (record.loader, record.model["repo_id"], record.model["revision"]) == ("llama.cpp", "org/tiny-GGUF", commit)


# ------------------------------------------------------------------------------ CLI and magics


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "nbllm.cli", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_cli(tiny_repo: Path, hub: HubServer, isolated: Path, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
    done = _cli("download", "org/tiny", "--exclude", "*.jinja", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("Downloaded org/tiny at ")
    assert "model.safetensors" in done.stderr  # the text progress bars
    assert not (isolated / "org_tiny" / "chat_template.jinja").exists()
    listing = _cli("models", env=env)
    assert listing.returncode == 0 and "org_tiny" in listing.stdout and "safetensors" in listing.stdout
    assert _cli("download", "org/tiny", "--check", "--quiet", env=env).stdout.startswith("Checked org_tiny")
    missing = _cli("download", "org/missing", "--quiet", env=env)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("nbllm: org/missing was not found")
    offline = _cli("download", "org/tiny", "--quiet", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and offline.stderr.startswith("nbllm: HF_HUB_OFFLINE is set")
    for run in (done, listing, missing, offline):
        assert TOKEN not in run.stdout + run.stderr


@pytest.fixture
def ipython(isolated: Path) -> Iterator[object]:
    from IPython.core.interactiveshell import InteractiveShell

    from nbllm.magics.models import ModelMagics

    shell = InteractiveShell.instance()
    before = list(shell.configurables)
    shell.config.pop("ModelMagics", None)  # a %config of an earlier test would apply to this instance
    shell.register_magics(ModelMagics)
    yield shell
    shell.configurables[:] = before  # the instance registered here leaves with the test
    shell.config.pop("ModelMagics", None)


def test_magics_in_a_real_shell(
    ipython: object, tiny_repo: Path, hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = ipython
    assert isinstance(shell, InteractiveShell)
    folder = tmp_path / "configured"
    shell.run_line_magic("config", f'ModelMagics.models_dir = "{folder}"')
    assert models.models_dir() == folder

    shell.run_line_magic("llm_download", "org/tiny --exclude *.md")
    assert capsys.readouterr().out.splitlines()[-1].startswith("Downloaded org/tiny at ")
    assert (folder / "org_tiny" / ".nbllm" / "complete").is_file()
    shell.run_line_magic("llm_download", "org/tiny --check")
    assert capsys.readouterr().out.startswith("Checked org_tiny")

    listing = shell.run_line_magic("llm_models", "")
    formatted, _ = shell.display_formatter.format(listing)
    assert "<table" in formatted["text/html"] and "org_tiny" in formatted["text/html"]
    assert formatted["text/plain"].startswith(f"Models in {folder}:")

    with pytest.raises(UsageError) as err:
        shell.run_line_magic("llm_download", "org/missing")
    assert "\n" not in str(err.value) and "org/missing was not found" in str(err.value)
    with pytest.raises(UsageError):
        shell.run_line_magic("llm_download", "")  # the model argument is required


def _gguf_repo(hub: HubServer, tiny_gguf: Path) -> bytes:
    data = tiny_gguf.read_bytes()
    hub.add_repo("org/tiny-GGUF", {"tiny.Q4_K_M.gguf": data, "tiny.Q8_0.gguf": data + b"8"})
    return data


def test_the_magic_follows_its_own_advice_with_shell_quotes(
    ipython: object, hub: HubServer, tiny_gguf: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`%llm_download org/m --file '*Q8_0*'`, as nbllm's own note says to type it, matched no file:
    the magic kept the quotes. It now parses its line with shell quoting, as every nbllm magic does."""
    from IPython.core.interactiveshell import InteractiveShell

    assert isinstance(ipython, InteractiveShell)
    data = _gguf_repo(hub, tiny_gguf)
    ipython.run_line_magic("llm_download", "org/tiny-GGUF --quiet")
    note = capsys.readouterr().out.splitlines()[0]
    advice = note.split("Choose another with ")[1].removesuffix(".")
    assert advice == "--file '*Q8_0*'"
    ipython.run_line_magic("llm_download", f"org/tiny-GGUF {advice} --quiet")
    assert (isolated / "tiny.Q8_0.gguf").read_bytes() == data + b"8"
    assert "Downloaded org/tiny-GGUF" in capsys.readouterr().out
    elsewhere = isolated.parent / "elsewhere folder"
    ipython.run_line_magic("llm_download", f"org/tiny-GGUF --exclude \"*Q8_0*\" --dir '{elsewhere}' --quiet")
    assert sorted(p.name for p in elsewhere.glob("*.gguf")) == ["tiny.Q4_K_M.gguf"]


def test_download_flags_come_from_one_schema() -> None:
    """%llm_download, `nbllm download` and the panel's download field take DownloadOptions' flags."""
    from nbllm.cli import _parser
    from nbllm.download import DownloadOptions
    from nbllm.magics._common import magic_parser
    from nbllm.magics.models import ModelMagics

    def flags(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], str | None]]:
        return {a.dest: (a.option_strings, a.help) for a in parser._actions if a.dest != "help"}

    schema = {
        s.name: ([s.flag] if s.flag.startswith("-") else [], s.help.replace("%", "%%"))
        for s in DownloadOptions.specs()
    }
    assert {"model", "file", "exclude", "check", "revision", "models_dir"} <= set(schema)
    assert flags(magic_parser(ModelMagics.llm_download)) == schema
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert flags(commands.choices["download"]) == schema
    options = DownloadOptions.parse("org/m:v2 --file '*Q5_K_M*' 'a b.gguf' --exclude '*.md' --check --dir '/x y'")
    assert options == DownloadOptions(
        model="org/m:v2", file=("*Q5_K_M*", "a b.gguf"), exclude=("*.md",), check=True, models_dir="/x y"
    )
    with pytest.raises(OptionError) as err:
        DownloadOptions.parse("org/m --frobnicate")
    assert "unrecognized arguments: --frobnicate" in err.value.message and "\n" not in err.value.message
    readme = (ROOT / "README.md").read_text()
    for s in DownloadOptions.specs():
        assert s.flag in readme or s.metavar in readme, s.flag


def test_the_panel_download_field_takes_the_magic_s_flags(
    hub: HubServer, tiny_gguf: Path, tmp_path: Path
) -> None:
    need("ipywidgets")
    from nbllm.download import DownloadOptions
    from nbllm.widgets import SettingsPanel

    data = _gguf_repo(hub, tiny_gguf)
    root = tmp_path / "panel models"
    panel = SettingsPanel(models_dir=root)
    assert panel.download_id.placeholder == DownloadOptions.spec("model").metavar
    assert DownloadOptions.usage() in panel.download_id.tooltip
    panel.download_id.value = "org/tiny-GGUF --file '*Q8_0*'"
    panel.download_button.click()
    assert panel.messages.error_text == ""
    assert (root / "tiny.Q8_0.gguf").read_bytes() == data + b"8" and panel.model.value == str(root / "tiny.Q8_0.gguf")
    panel.download_id.value = "org/tiny-GGUF --file '*Q8_0*"
    panel.download_button.click()
    assert "check the quotes" in panel.messages.error_text.lower()
    panel.close()


def test_cli_takes_dir_after_the_command_and_names_its_own_commands(
    tiny_repo: Path, hub: HubServer, tmp_path: Path
) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    elsewhere = tmp_path / "elsewhere"
    done = _cli("download", "org/tiny", "--dir", str(elsewhere), "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "org_tiny" / ".nbllm" / "complete").is_file()
    after = _cli("models", "--dir", str(elsewhere), env=env)
    before = _cli("--dir", str(elsewhere), "models", env=env)
    assert after.returncode == 0 and "org_tiny" in after.stdout and after.stdout == before.stdout

    (elsewhere / "org_tiny" / ".nbllm" / "complete").unlink()  # as if the download had stopped
    runs = [
        _cli("models", "--dir", str(elsewhere), env=env),
        _cli("download", "org/tiny", "--check", "--dir", str(elsewhere), env=env),
        _cli("models", "--dir", str(tmp_path / "empty"), env=env),
    ]
    assert "resume: nbllm download org/tiny" in runs[0].stdout
    assert runs[1].returncode == 1 and "Run nbllm download org/tiny to finish it first." in runs[1].stderr
    assert "Download one with nbllm download organization/model" in runs[2].stdout
    for run in runs:
        assert "%llm" not in run.stdout + run.stderr
