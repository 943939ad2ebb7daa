"""The models folder: its location, listing a text-generation-webui-style folder, resolving names.

No network here: every test runs with HF_HUB_OFFLINE=1 (see conftest.py).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need

from nbllm import models
from nbllm.errors import DownloadError, ModelNotFoundError, OptionError
from nbllm.frontend import command
from nbllm.gguf_file import file_type_name, quantization_from_name, read_gguf_header
from nbllm.models import ModelsFolder
from nbllm.resolve import resolve
from nbllm.source import ModelSource
from nbllm.store import read_revision

try:
    from watch import watched
except ImportError:  # tests/ imported as a package
    from tests.watch import watched


@pytest.fixture(autouse=True)
def models_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty models folder named by NBLLM_MODELS_DIR; no override left behind."""
    folder = tmp_path / "models"
    monkeypatch.setenv(models.ENV_VAR, str(folder))
    models.set_models_dir(None)
    yield folder
    models.set_models_dir(None)


def _write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# The smallest whole GGUF file: version 3, no tensors, no metadata, padded to the 32-byte alignment.
GGUF_HEADER_ONLY = b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(8)


def _nbllm_download(folder: Path, repo_id: str, *, complete: bool, revision: str = "a" * 40) -> None:
    """Write the bookkeeping download.py leaves in a model folder."""
    meta = folder / ".nbllm"
    _write(
        meta / "manifest.json",
        json.dumps({"repo_id": repo_id, "ref": "main", "revision": revision, "files": {}}),
    )
    if complete:
        _write(meta / "revision", revision + "\n")
        _write(meta / "complete", "2026-01-01T00:00:00\n")


@pytest.fixture
def webui_folder(models_home: Path, tiny_model: Path, tiny_gguf: Path) -> Path:
    """A models folder as text-generation-webui users have it, plus nbllm downloads, whole and not."""
    root = models_home
    _write(root / "place-your-models-here.txt", "")
    _write(root / "config.yaml", "")
    _write(root / "llama-2-7b-chat.Q4_K_M.gguf", GGUF_HEADER_ONLY)  # no file_type: the name tells
    shutil.copy(tiny_gguf, root / "tiny.gguf")  # a real GGUF: quantization from its header (F32)
    _write(root / "big-Q5_K_M-00001-of-00002.gguf", GGUF_HEADER_ONLY)
    _write(root / "big-Q5_K_M-00002-of-00002.gguf", GGUF_HEADER_ONLY + bytes(10))
    _write(root / "lost-Q8_0-00001-of-00003.gguf", GGUF_HEADER_ONLY)  # parts 2 and 3 missing
    shutil.copytree(tiny_model, root / "org_model")
    _nbllm_download(root / "org_model", "org/model", complete=True)
    gptq = root / "TheBloke_Llama-2-7B-GPTQ"
    _write(gptq / "config.json", json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    _write(gptq / "model.safetensors", b"w" * 100)
    _write(root / "facebook_opt-125m" / "config.json", "{}")
    _write(root / "facebook_opt-125m" / "pytorch_model.bin", b"w" * 50)
    sharded = root / "org_sharded"
    _write(sharded / "config.json", "{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    _write(sharded / "model.safetensors.index.json", json.dumps(index))
    _write(sharded / "model-00001-of-00002.safetensors", b"w")
    partial = root / "org_partial"
    _write(partial / "config.json", "{}")
    _nbllm_download(partial, "org/partial", complete=False)
    _write(partial / ".nbllm" / "partial" / ("b" * 64 + ".part"), b"p" * 7)
    _write(root / "notes" / "todo.txt", "not a model")
    return root


def test_lists_a_text_generation_webui_folder(webui_folder: Path) -> None:
    listing = ModelsFolder().list()
    by_name = {e.name: e for e in listing}
    assert sorted(by_name) == sorted(
        [
            "big-Q5_K_M-00001-of-00002.gguf",
            "facebook_opt-125m",
            "llama-2-7b-chat.Q4_K_M.gguf",
            "lost-Q8_0-00001-of-00003.gguf",
            "org_model",
            "org_partial",
            "org_sharded",
            "TheBloke_Llama-2-7B-GPTQ",
            "tiny.gguf",
        ]
    )
    gguf = by_name["llama-2-7b-chat.Q4_K_M.gguf"]
    assert (gguf.loader, gguf.format, gguf.quantization, gguf.complete) == (
        "llama.cpp",
        "GGUF",
        "Q4_K_M",
        True,
    )
    assert by_name["tiny.gguf"].quantization == "F32"  # read from general.file_type, not the name
    split = by_name["big-Q5_K_M-00001-of-00002.gguf"]
    assert (split.size, split.quantization, split.complete) == (2 * len(GGUF_HEADER_ONLY) + 10, "Q5_K_M", True)
    assert not by_name["lost-Q8_0-00001-of-00003.gguf"].complete
    model = by_name["org_model"]
    assert (model.loader, model.format, model.complete) == ("transformers", "safetensors", True)
    assert model.revision == "a" * 40 and model.repo_id == "org/model"
    assert model.size == sum(p.stat().st_size for p in (webui_folder / "org_model").rglob("*") if p.is_file())
    assert by_name["TheBloke_Llama-2-7B-GPTQ"].format_label == "safetensors gptq 4-bit"
    assert by_name["facebook_opt-125m"].format == "bin"
    assert not by_name["org_sharded"].complete and "missing 1 of 2" in (by_name["org_sharded"].problem or "")
    unfinished = by_name["org_partial"]
    assert not unfinished.complete and unfinished.repo_id == "org/partial"
    assert command("download", "org/partial") in unfinished.status
    loadable = {e.name for e in listing.loadable}
    assert not loadable & {"org_partial", "org_sharded", "lost-Q8_0-00001-of-00003.gguf"}


def test_listing_renders_as_text_and_html(webui_folder: Path) -> None:
    listing = ModelsFolder().list()
    text = repr(listing)
    assert text.splitlines()[0] == f"Models in {webui_folder}:"
    assert text.splitlines()[1].split() == ["name", "loader", "format", "size", "revision", "status"]
    assert "org_model" in text and "incomplete (download not finished)" in text
    page = listing._repr_html_()
    assert page.startswith("<table") and page.count("<tr>") == len(listing) + 1
    assert "TheBloke_Llama-2-7B-GPTQ" in page


def test_empty_or_missing_folder_says_what_to_do(models_home: Path) -> None:
    listing = ModelsFolder().list()
    assert len(listing) == 0
    assert "does not exist yet" in listing.text() and command("download", "organization/model") in listing.text()


def test_models_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.ENV_VAR)
    monkeypatch.setattr(models.sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert models.models_dir() == tmp_path / "data" / "nbllm" / "models"
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path / "env"))
    assert models.models_dir() == tmp_path / "env"
    models.set_models_dir(tmp_path / "config")
    assert models.models_dir() == tmp_path / "config" and ModelsFolder().path == tmp_path / "config"
    models.set_models_dir("")
    assert models.models_dir() == tmp_path / "env"


def test_resolve_names_from_the_models_folder(webui_folder: Path) -> None:
    source = resolve("org_model")
    assert source == ModelSource(
        path=(webui_folder / "org_model").resolve(),
        format="transformers",
        name="org_model",
        revision="a" * 40,
        repo_id="org/model",
    )
    assert resolve("llama-2-7b-chat.Q4_K_M.gguf").format == "gguf"
    split = resolve("big-Q5_K_M-00001-of-00002.gguf")
    assert split.path.name == "big-Q5_K_M-00001-of-00002.gguf"
    assert resolve(str(webui_folder / "facebook_opt-125m")).format == "transformers"  # an existing path


def test_incomplete_models_are_never_resolved(webui_folder: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve("org_partial")
    assert command("download", "org/partial") in err.value.message and "\n" not in err.value.message
    with pytest.raises(ModelNotFoundError, match="unfinished download"):
        resolve(str(webui_folder / "org_partial"))  # not even by path
    with pytest.raises(ModelNotFoundError, match="missing 1 of 2"):
        resolve("org_sharded")
    with pytest.raises(ModelNotFoundError, match="part"):
        resolve("lost-Q8_0-00001-of-00003.gguf")


def test_file_given_with_a_gguf_path_must_name_that_file(models_home: Path) -> None:
    """`%llm_load model.gguf --file foo.gguf` loaded model.gguf without a word (issue 16, item 15)."""
    model = _write(models_home / "model.Q4_K_M.gguf", GGUF_HEADER_ONLY)
    with pytest.raises(OptionError) as err:
        resolve(str(model), file="foo.gguf")
    message = err.value.message
    assert "\n" not in message and "--file 'foo.gguf'" in message and "model.Q4_K_M.gguf" in message
    with pytest.raises(OptionError):
        resolve("model.Q4_K_M.gguf", file="*Q8_0*")  # by name from the models folder, the same
    assert resolve(str(model), file="model.Q4_K_M.gguf").path == model.resolve()
    assert resolve(str(model), file="*Q4_K_M*").path == model.resolve()  # a pattern that matches it


def test_unknown_name_suggests_close_ones(webui_folder: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve("org_modle")
    assert "did you mean org_model" in err.value.message


def test_hub_id_with_a_complete_local_copy_needs_no_network(webui_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online: a complete local copy is used as it is
    with watched(monkeypatch) as seen:
        source = resolve("org/model")
    assert source.path == (webui_folder / "org_model").resolve() and source.repo_id == "org/model"
    assert seen.connections == [] and seen.hashed == []  # no network call, no hashing of the weights


def test_hub_id_without_local_copy_offline_is_one_line(webui_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with watched(monkeypatch) as seen, pytest.raises(DownloadError) as err:
        resolve("org/absent")  # HF_HUB_OFFLINE=1 (conftest): it says so at once
    assert seen.connections == []
    assert "HF_HUB_OFFLINE" in err.value.message and "\n" not in err.value.message


def test_conflicting_revisions_are_refused(models_home: Path) -> None:
    with pytest.raises(OptionError, match="two revisions"):
        resolve("org/model:v1", revision="v2")


def test_root_gguf_revision_and_record(models_home: Path) -> None:
    file = _write(models_home / "m.Q4_K_M.gguf", GGUF_HEADER_ONLY)
    _write(models_home / ".nbllm" / "m.Q4_K_M.gguf.revision", "c" * 40 + "\n")
    _write(
        models_home / ".nbllm" / "m.Q4_K_M.gguf.json", json.dumps({"repo_id": "org/m-GGUF", "ref": "main"})
    )
    assert read_revision(file) == "c" * 40
    source = resolve("org/m-GGUF")  # found by its record, offline
    assert (source.name, source.revision, source.repo_id) == ("m.Q4_K_M.gguf", "c" * 40, "org/m-GGUF")


def test_pending_root_download_is_listed_incomplete(models_home: Path) -> None:
    pending = {"repo_id": "org/x-GGUF", "revision": "d" * 40, "sha256": "e" * 64, "path": "x.Q4_K_M.gguf"}
    _write(models_home / ".nbllm" / "x.Q4_K_M.gguf.pending.json", json.dumps(pending))
    _write(models_home / ".nbllm" / "partial" / ("e" * 64 + ".part"), b"p" * 11)
    (entry,) = ModelsFolder().list()
    assert (entry.name, entry.complete, entry.size, entry.repo_id) == (
        "x.Q4_K_M.gguf",
        False,
        11,
        "org/x-GGUF",
    )
    with pytest.raises(ModelNotFoundError, match="not complete"):
        resolve("x.Q4_K_M.gguf")


def test_listing_says_what_is_wrong_with_files_that_cannot_load(models_home: Path, tiny_gguf: Path) -> None:
    """The header checks %llm_load runs, run by the listing too: a bad file is never shown as ready."""
    _write(models_home / "good.gguf", tiny_gguf.read_bytes())
    bad = {
        "notes.gguf": ("just some notes\n", "not a GGUF file (it is a text file)"),
        "page.gguf": ("<!DOCTYPE html><html><body>404</body></html>", "it is an HTML page"),
        "pointer.gguf": (
            "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 1000\n",
            "it is a Git LFS pointer",
        ),
        "empty.gguf": (b"", "not a GGUF file (it is empty)"),
        "cut.gguf": (tiny_gguf.read_bytes()[:-1000], "truncated or damaged (the file is"),
    }
    for name, (data, _) in bad.items():
        _write(models_home / name, data)
    _write(models_home / "org_noweights" / "config.json", "{}")
    _write(models_home / "org_badgguf" / "model.Q4_K_M.gguf", "<html>rate limited</html>")
    listing = ModelsFolder().list()
    by_name = {e.name: e for e in listing}
    assert by_name["good.gguf"].status == "ready"
    for name, (_, words) in bad.items():
        entry = by_name[name]
        assert not entry.complete and entry not in listing.loadable, name
        assert entry.status.startswith("not loadable: ") and words in entry.status, entry.status
    assert "model.Q4_K_M.gguf: not a GGUF file (it is an HTML page" in by_name["org_badgguf"].status
    folder = by_name["org_noweights"]
    assert folder.format == "none" and folder.status == "incomplete (no weight files)"
    table = listing.text().splitlines()
    assert len(table) == 3 + len(listing)  # one line per model, whatever its problem
    assert any(line.startswith("cut.gguf") and "truncated" in line for line in table)


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("llama-2-7b-chat.Q4_K_M.gguf", "Q4_K_M"),
        ("model-q4_k_m.gguf", "Q4_K_M"),
        ("Qwen2.5-7B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("mistral-7b.Q8_0-00001-of-00002.gguf", "Q8_0"),
        ("model-f16.gguf", "F16"),
        ("model-BF16.gguf", "BF16"),
        ("Qwen2-7B.gguf", None),
        ("plain.gguf", None),
    ],
)
def test_quantization_from_file_name(name: str, quant: str | None) -> None:
    assert quantization_from_name(name) == quant


def test_quantization_from_gguf_header(models_home: Path) -> None:
    from nbllm.testing import tiny_gguf_model

    f16 = tiny_gguf_model(models_home / "tiny-Q4_K_M.gguf", file_type="f16")
    header = read_gguf_header(f16)
    assert header.metadata["general.file_type"] == 1 and header.file_type == "F16"
    (entry,) = ModelsFolder().list()
    assert entry.quantization == "F16"  # the header wins over a misleading name
    assert [file_type_name(c) for c in (0, 15, 38, 1024, 9999, None)] == ["F32", "Q4_K_M", "MXFP4_MOE", None, None, None]


def test_our_header_reader_agrees_with_gguf_s_own(tiny_gguf: Path) -> None:
    """The hand-written reader (kept for speed, see nbllm/gguf_file.py) reads what gguf.GGUFReader reads."""
    gguf = need("gguf")
    theirs = gguf.GGUFReader(tiny_gguf)
    ours = read_gguf_header(tiny_gguf)
    assert ours.version == int(theirs.fields["GGUF.version"].contents())
    assert ours.tensor_count == len(theirs.tensors) and not ours.unknown_types
    assert ours.data_end == max(t.data_offset + t.n_bytes for t in theirs.tensors)
    scalars = {
        name: f.contents()
        for name, f in theirs.fields.items()
        if not name.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert scalars and ours.metadata.keys() == scalars.keys()
    for name, value in scalars.items():
        assert ours.metadata[name] == pytest.approx(value), name


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("org/model", ("org/model", None)),
        ("TheBloke/Llama-2-7B-GGUF:main", ("TheBloke/Llama-2-7B-GGUF", "main")),
        ("org/model:refs/pr/1", ("org/model", "refs/pr/1")),
        ("org_model", None),
        ("model.gguf", None),
        ("./a/b", None),
        ("a/b/c", None),
    ],
)
def test_parse_hub_id(spec: str, parsed: tuple[str, str | None] | None) -> None:
    assert models.parse_hub_id(spec) == parsed


def test_folder_names_follow_text_generation_webui() -> None:
    assert models.folder_name("TheBloke/Llama-2-7B-GPTQ") == "TheBloke_Llama-2-7B-GPTQ"
    assert models.folder_name("org/model", "main") == "org_model"
    assert models.folder_name("org/model", "gptq-4bit") == "org_model_gptq-4bit"
