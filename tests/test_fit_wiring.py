"""Machine fit wired into loading: --fit, saved settings (config-user.yaml), what worked, failures explained.

Real models in a real models folder (tmp), loaded through the magics and the panel."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import need
from IPython.core.error import UsageError

import nbllm
import nbllm.loaders
from nbllm import fit, models
from nbllm.loaders import TokenLoader
from nbllm.options import LoadOptions
from nbllm.source import ModelSource


@pytest.fixture
def folder(tmp_path: Path, tiny_model: Path, tiny_gguf: Path) -> Iterator[Path]:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(tiny_model, root / "org_tiny")
    shutil.copy(tiny_gguf, root / "tiny.gguf")
    models.set_models_dir(root)
    yield root
    models.set_models_dir(None)


def _notes(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("note: ")]


def test_save_settings_then_loading_by_name_applies_them_and_the_line_wins(shell: Any, engine: Any, folder: Path,
                                                                          capsys: Any) -> None:
    shell.run_line_magic("llm_load", "org_tiny --dtype float32 --attn eager --save-settings")
    out = capsys.readouterr().out
    assert any("settings of org_tiny saved in" in n and "config-user.yaml" in n for n in _notes(out))
    text = (folder / "config-user.yaml").read_text()
    assert "org_tiny$" in text and "eager" in text  # text-generation-webui's layout: a model$ pattern
    engine.unload()

    shell.run_line_magic("llm_load", "org_tiny")
    out = capsys.readouterr().out
    assert any(n.startswith("note: saved settings for org_tiny") for n in _notes(out))
    assert engine.status().options == {"dtype": "float32", "attn": "eager"}

    shell.run_line_magic("llm_load", "org_tiny --attn sdpa")  # the line wins over the saved value
    assert engine.status().options == {"dtype": "float32", "attn": "sdpa"}


def test_saved_settings_apply_to_a_gguf_too(engine: Any, folder: Path) -> None:
    fit.save_settings("tiny.gguf", LoadOptions(n_ctx=512))
    with pytest.warns(nbllm.errors.NbllmWarning, match="saved settings for tiny.gguf"):
        status = nbllm.load("tiny.gguf")
    assert status.options == {"n_ctx": 512} and engine.loader.context_length == 512
    assert nbllm.load("tiny.gguf", n_ctx=256).options == {"n_ctx": 256}


def test_what_worked_is_recorded_after_a_load(engine: Any, folder: Path) -> None:
    nbllm.load("org_tiny", dtype="float32")
    worked = fit.what_worked("org_tiny")
    assert worked is not None and worked.options == {"dtype": "float32"} and worked.loader == "transformers"
    assert worked.peak_memory["cpu"] > 0


def test_fit_prints_the_recommendation_before_loading_with_it(shell: Any, engine: Any, folder: Path,
                                                               capsys: Any) -> None:
    rec = fit.recommend(folder / "org_tiny")
    shell.run_line_magic("llm_load", "org_tiny --fit")
    out = capsys.readouterr().out
    fit_notes = [n for n in _notes(out) if n.startswith("note: fit: ")]
    assert fit_notes and out.index(fit_notes[0]) < out.index("Loaded org_tiny")
    expected = {k: v for k, v in rec.options.items() if v != LoadOptions.spec(k).default}
    assert engine.status().options == expected


def test_panel_save_settings_button_writes_the_models_entry(engine: Any, folder: Path) -> None:
    need("ipywidgets")
    from nbllm.widgets import SettingsPanel

    panel = SettingsPanel(models_dir=folder)
    try:
        panel.model.value = str(folder / "org_tiny")
        panel.load_fields["attn"].value = "eager"
        panel.save_button.click()
        assert panel.messages.error_text == ""
        saved = fit.saved_settings("org_tiny")
        assert saved is not None and saved.load.get("attn") == "eager"
    finally:
        panel.close()


class OutOfMemoryLoader(TokenLoader):
    """Fails to load as CUDA does when a model does not fit (unit test of the engine's error mapping)."""

    name: ClassVar[str] = "oom"
    formats: ClassVar[frozenset[str]] = frozenset({"oom"})

    @classmethod
    def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
        return ModelSource(format="oom", name="big", path=Path(spec)) if spec.endswith("-oom") else None

    def load(self, source: ModelSource, options: LoadOptions) -> None:
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")

    def unload(self) -> None: ...
    def tokenize(self, text: str, *, add_special: bool) -> list[int]: return []
    def decode(self, ids: Any) -> str: return ""
    @property
    def eos_token_ids(self) -> frozenset[int]: return frozenset()
    def generate_tokens(self, request: Any) -> Iterator[int]: return iter(())


def test_a_load_failure_the_fit_module_knows_is_explained_and_the_previous_model_comes_back(
        shell: Any, engine: Any, tiny_model: Path, tmp_path: Path) -> None:
    need("torch")
    engine.load(tiny_model)
    nbllm.loaders.register(OutOfMemoryLoader)
    try:
        with pytest.raises(UsageError) as err:
            shell.run_line_magic("llm_load", str(tmp_path / "model-oom"))
        message = str(err.value)
        assert "out of memory" in message.lower() and "\n" not in message
        assert "loaded again" in message and engine.status().model == tiny_model.name
    finally:
        nbllm.loaders.unregister("oom")
