"""Library messages name the command of the front end in use: a magic in a notebook, a call in Python,
``nbllm ...`` in a shell (nbllm.frontend.command). Real messages, raised by the real library."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from nbllm import cli, models
from nbllm.engine import Engine
from nbllm.errors import ModelNotFoundError, NoModelLoadedError
from nbllm.frontend import command, commands, front_end, using
from nbllm.resolve import resolve


def test_every_command_has_a_form_in_each_front_end() -> None:
    for name, forms in commands().items():
        args = ["org/m", "FILE"]
        with using("notebook"):
            notebook = command(name, *args)
        with using("python"):
            python = command(name, *args)
        with using("cli"):
            shell = command(name, *args)
        assert notebook.startswith(("%llm_", "%%llm")), name
        assert "%" not in python and "{" not in python and "{" not in notebook, (name, python)
        assert shell == (python if forms.cli is None else shell) and not shell.startswith("%"), name
    with using("python"):
        assert command("download", "org/m") == "nbllm.download.download('org/m')"
        assert command("load", "MODEL") == "nbllm.load(MODEL)"  # a placeholder stays unquoted
        assert command("models") == "nbllm.models.ModelsFolder().list()"
    with using("cli"):
        assert command("download file", "org/m-GGUF", "*Q4_K_M*") == "nbllm download org/m-GGUF --file '*Q4_K_M*'"


def test_a_python_user_is_told_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path))
    with using("python"):
        with pytest.raises(NoModelLoadedError) as err:
            Engine().generate("hi")
        assert err.value.message == "no model is loaded. Load one first: nbllm.load(MODEL)."
        with pytest.raises(ModelNotFoundError, match=re.escape("Run nbllm.models.ModelsFolder().list() to see")):
            resolve("no_such_model")
        assert "Download one with nbllm.download.download('organization/model')" in models.ModelsFolder().list().text()


def test_a_shell_user_is_told_the_console_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--dir", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "Download one with nbllm download organization/model" in out and "%llm" not in out
    assert front_end() != "cli"  # the CLI names its commands only while it runs


def test_a_notebook_user_is_told_the_magic(shell: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path))
    assert front_end() == "notebook"  # %load_ext nbllm is done in this shell
    with pytest.raises(UsageError, match=re.escape("Run %llm_models to see what is there")):
        shell.run_line_magic("llm_load", "no_such_model")  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match=re.escape("Load one first: %llm_load MODEL")):
        shell.run_cell_magic("llm", "", "hi")  # type: ignore[attr-defined]
    with using("python"):  # the Python API in the same notebook, told the call where it asks for it
        assert front_end() == "python"
