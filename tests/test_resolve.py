"""What the user typed becomes files once (nbllm.resolve.locate), for a load, an adapter and the fit estimate.

The same cases through the three callers: a path, a name in the models (or adapters) folder, a hub id
whose copy is already in that folder (nothing is downloaded: the tests run with HF_HUB_OFFLINE=1), a GGUF
file among several quantizations, an adapter folder. Real files: the built-in tiny models and adapter.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbllm import models, testing
from nbllm.errors import ModelNotFoundError, OptionError
from nbllm.fit.shape import locate as shape_locate
from nbllm.fit.shape import model_shape
from nbllm.frontend import using
from nbllm.loaders import GGUF_FORMAT, TRANSFORMERS_FORMAT, file_format, folder_format, path_format
from nbllm.lora import resolve_adapter
from nbllm.resolve import NotDownloaded, locate, resolve


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tiny_gguf: Path) -> Iterator[Path]:
    """A models folder holding a Transformers model as text-generation-webui names a hub download
    (``org_tiny``), a folder of two GGUF quantizations (``org_tiny-GGUF``), and an adapter in ``loras/``."""
    root = tmp_path / "models"
    shutil.copytree(tiny_model, root / "org_tiny")
    quants = root / "org_tiny-GGUF"
    quants.mkdir()
    for quant in ("Q4_K_M", "Q8_0"):
        shutil.copyfile(tiny_gguf, quants / f"tiny.{quant}.gguf")
    shutil.copytree(testing.tiny_peft_adapter(), tmp_path / "loras" / "org_adapter")
    monkeypatch.setenv(models.ENV_VAR, str(root))
    models.set_models_dir(None)
    yield root


def test_a_path_is_taken_as_it_is_by_every_caller(home: Path) -> None:
    folder = home / "org_tiny"
    assert locate(folder) == folder and shape_locate(str(folder)) == folder
    source = resolve(str(folder))
    assert source.format == TRANSFORMERS_FORMAT and source.path == folder.resolve()
    adapter = home.parent / "loras" / "org_adapter"
    assert resolve_adapter(str(adapter)).path == adapter.resolve()


def test_a_name_is_looked_up_in_its_folder(home: Path) -> None:
    assert locate("org_tiny") == home / "org_tiny"
    assert resolve("org_tiny").path == (home / "org_tiny").resolve()
    assert shape_locate("org_tiny") == home / "org_tiny"
    assert model_shape("org_tiny").format == TRANSFORMERS_FORMAT
    assert resolve_adapter("org_adapter").name == "org_adapter"  # the adapters folder, not the models folder
    with pytest.raises(ModelNotFoundError, match="no adapter 'org_tiny'"):
        resolve_adapter("org_tiny")


def test_a_hub_id_already_in_the_folder_is_not_downloaded(home: Path) -> None:
    assert locate("org/tiny") == home / "org_tiny"
    assert resolve("org/tiny").path == (home / "org_tiny").resolve()
    assert shape_locate("org/tiny") == home / "org_tiny"
    assert resolve_adapter("org/adapter").path == (home.parent / "loras" / "org_adapter").resolve()
    with pytest.raises(NotDownloaded, match="org/absent is not in") as err:
        locate("org/absent", download=False)
    assert err.value.repo_id == "org/absent"
    with using("notebook"), pytest.raises(ModelNotFoundError, match="%llm_download org/absent --file config.json"):
        shape_locate("org/absent")


def test_a_gguf_file_among_several_quantizations(home: Path) -> None:
    with pytest.raises(OptionError, match="holds 2 models .*--file"):
        resolve("org/tiny-GGUF")
    chosen = resolve("org/tiny-GGUF", file="*Q8_0*")
    assert chosen.format == GGUF_FORMAT and chosen.path.name == "tiny.Q8_0.gguf"
    assert resolve("org_tiny-GGUF", file="tiny.Q4_K_M.gguf").path.name == "tiny.Q4_K_M.gguf"
    assert shape_locate("org/tiny-GGUF") == home / "org_tiny-GGUF"  # the estimate picks its file itself
    assert model_shape("org/tiny-GGUF", file="*Q8_0*").format == GGUF_FORMAT


def test_the_loaders_say_which_format_a_path_is(home: Path, tiny_gguf: Path) -> None:
    both = home / "both"
    shutil.copytree(home / "org_tiny", both)
    shutil.copyfile(tiny_gguf, both / "tiny.gguf")
    assert path_format(home / "org_tiny") == TRANSFORMERS_FORMAT
    assert path_format(both) == GGUF_FORMAT  # a model file wins over a folder's config.json, as before
    assert file_format("X.Q4_K_M.GGUF") == GGUF_FORMAT and file_format("notes.txt") is None
    assert folder_format(home, ["sub/config.json"]) == TRANSFORMERS_FORMAT  # a planned download's files
    assert path_format(home.parent / "loras" / "org_adapter") is None  # an adapter is no model
    entry = models.ModelsFolder().get("org_tiny-GGUF")
    assert (entry.loader, entry.format) == ("llama.cpp", "GGUF")


def test_what_nothing_names_is_refused_in_one_line_naming_the_kind(home: Path) -> None:
    with using("python"):
        with pytest.raises(OptionError, match=r"no model given\. Give a path, a name from nbllm\.models"):
            locate("")
        with pytest.raises(OptionError, match=r"no adapter given\. Give a path, a name from nbllm\.lora_list\(\)"):
            resolve_adapter(" ")
        with pytest.raises(ModelNotFoundError, match="no model at ./nowhere/x"):
            locate("./nowhere/x")
