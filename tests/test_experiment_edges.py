"""Edges of the experiment features a new user hit (issue 22, "Experiments"): replay with LoRA adapters, a
failed fallback load, a sweep whose model goes away, bad run logs, sweep grids and replay sources, the
closest recorded run, config-user.yaml values nbllm cannot use, and the sweep's progress bar. Real tiny
models in a real IPython shell; each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm import models, testing
from nbllm.recordings import active_replay
from nbllm.runlog import flush

GEN = "--temperature 0 --max-new-tokens 12"


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A run log of this test's own; replays turned off afterwards."""
    flush()
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(path))
    yield path
    nbllm.replay(None)


def _stop_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")


def _cell(shell: Any, line: str, text: str, name: str = "r") -> nbllm.Result:
    shell.run_cell_magic("llm", f"{line} -o {name}", text)
    return shell.user_ns[name]  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------- replay and LoRA


@pytest.fixture
def adapter_log(shell: Any, tiny_model: Path, log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A run log of the tiny model: a prompt without an adapter, the same prompt with one, and a prompt
    run only with it. The adapter is a copy that the test may delete."""
    adapter = shutil.copytree(testing.tiny_peft_adapter(), tmp_path / "my-adapter")
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    base = _cell(shell, GEN, "Hello there", "base").text
    shell.run_line_magic("llm_lora", f"add {adapter}")
    tuned_result = _cell(shell, GEN, "Hello there", "tuned")
    tuned = tuned_result.text
    only = _cell(shell, GEN, "Only with the adapter", "only").text
    assert base != tuned  # the adapter changes the text
    _stop_logging(monkeypatch)
    nbllm.unload()
    return {"adapter": adapter, "base": base, "tuned": tuned, "only": only,
            "recorded": tuned_result.record.to_dict()["model"]["adapters"]}


def test_lora_add_under_replay_follows_the_recording_and_adapters_are_part_of_the_match(
        shell: Any, tiny_model: Path, log: Path, adapter_log: dict[str, Any], capsys: Any) -> None:
    shutil.rmtree(adapter_log["adapter"])  # replay needs neither the model's nor the adapter's files
    shell.run_line_magic("llm_replay", str(log))
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    assert _cell(shell, GEN, "Hello there").text == adapter_log["base"]  # no adapter applied: the run without one
    with pytest.raises(UsageError, match=r"the adapters \(my-adapter ×1 there, none here\)"):
        _cell(shell, GEN, "Only with the adapter")
    shell.run_line_magic("llm_lora", f"add {adapter_log['adapter']}")
    assert "Applied to" in capsys.readouterr().out
    again = _cell(shell, GEN, "Hello there")
    assert again.replayed and again.text == adapter_log["tuned"]
    assert _cell(shell, GEN, "Only with the adapter").text == adapter_log["only"]
    shell.run_line_magic("llm_lora", "add my-adapter --scale 0.5")  # by name; another scale is another request
    with pytest.raises(UsageError, match=r"the adapters \(my-adapter ×1 there, my-adapter ×0.5 here\)"):
        _cell(shell, GEN, "Hello there")
    shell.run_line_magic("llm_lora", "clear")
    assert _cell(shell, GEN, "Hello there").text == adapter_log["base"]
    assert [a.label for a in nbllm.lora_restore(adapter_log["recorded"])] == ["my-adapter ×1"]  # a record's, no files
    assert _cell(shell, GEN, "Hello there").text == adapter_log["tuned"]
    nbllm.lora_clear()
    with pytest.raises(UsageError, match=r"no recorded run in .* used an adapter 'someone/else' \(recorded: my-adapter\)"):
        shell.run_line_magic("llm_lora", "add someone/else")


def test_a_fallback_load_applies_the_adapters_the_replay_had(shell: Any, tiny_model: Path, log: Path,
                                                             adapter_log: dict[str, Any]) -> None:
    shell.run_line_magic("llm_replay", f"{log} --fallback run")
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_line_magic("llm_lora", f"add {adapter_log['adapter']}")
    miss = _cell(shell, GEN, "Not recorded")
    assert not miss.replayed and [a["name"] for a in miss.record.to_dict()["model"]["adapters"]] == ["my-adapter"]
    assert _cell(shell, GEN, "Hello there").text == adapter_log["tuned"]  # generated now, with the adapter
    assert not shell.user_ns["r"].replayed and active_replay() is None


# ------------------------------------------------------------------------------ a failed fallback load


def test_a_failed_fallback_load_leaves_the_replay_on_and_every_command_says_so(
        shell: Any, tiny_model: Path, log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "gone-model")
    shell.run_line_magic("llm_load", f"{model} --dtype float32")
    recorded = _cell(shell, GEN, "Recorded").text
    _stop_logging(monkeypatch)
    shutil.rmtree(model)
    shell.run_line_magic("llm_replay", f"{log} --fallback run")
    shell.run_line_magic("llm_load", f"{model} --dtype float32")
    with pytest.raises(UsageError, match="the replay stays on") as failed:
        _cell(shell, GEN, "Not recorded")
    assert "\n" not in str(failed.value)
    capsys.readouterr()
    shell.run_line_magic("llm_replay", "")
    assert capsys.readouterr().out.rstrip().endswith("0 answered, on>")
    assert active_replay() is not None and nbllm.status().loader == "replay"
    assert _cell(shell, GEN, "Recorded").text == recorded  # still replayed, as %llm_replay says


# ----------------------------------------------------------------------------- a sweep losing its model


@pytest.mark.parametrize("change", ["unload", "load another"])
def test_a_model_gone_during_a_sweep_keeps_the_finished_rows_and_sets_o(shell: Any, engine: Any, tiny_model: Path,
                                                                        change: str) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    seen: list[nbllm.Result] = []

    def change_after_the_first_batch(result: nbllm.Result) -> None:
        seen.append(result)
        if len(seen) == 2:  # both rows of the first batch finished: what a panel's unload or load would do now
            if change == "unload":
                engine.unload()
            else:
                engine.load(tiny_model, dtype="bfloat16")

    remove = engine.on_result(change_after_the_first_batch)
    try:
        with pytest.raises(UsageError, match=r"Sweep stopped \((the model was unloaded|another model was loaded)\) "
                                             r"after 2 of 4 runs; the table keeps them"):
            shell.run_cell_magic("llm", "--max-new-tokens 4 --sweep 'temperature=0.5,0.9 seed=1,2' -o t", "Rivers")
    finally:
        remove()
    table = shell.user_ns["t"]
    assert len(table) == 2 and list(table["seed"]) == [1, 2] and set(table["temperature"]) == {0.5}
    assert list(table["text"]) == [r.text for r in seen] and table.attrs["interrupted"]


def test_a_replays_fallback_during_a_sweep_is_no_model_change(shell: Any, tiny_model: Path, log: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 4 --sweep 'seed=1,2' -o recorded", "Rivers")
    _stop_logging(monkeypatch)
    shell.run_line_magic("llm_replay", f"{log} --fallback run")
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 4 --sweep 'seed=1,2,3' -o t", "Rivers")
    table, recorded = shell.user_ns["t"], shell.user_ns["recorded"]
    assert list(table["seed"]) == [1, 2, 3] and list(table["text"][:2]) == list(recorded["text"])
    assert table["text"][2] == nbllm.generate("Rivers", temperature=0.9, max_new_tokens=4, seed=3).text
    assert not table.attrs["interrupted"] and active_replay() is None


# --------------------------------------------------------------------------- bad logs, grids, sources


def test_a_run_log_that_is_not_sqlite_is_one_line(shell: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.sqlite"
    notes.write_text("these are my notes, not a database\n" * 20)
    with pytest.raises(UsageError, match=r"notes.sqlite is not a run log \(not an SQLite file") as err:
        shell.run_line_magic("llm_runs", f"--path {notes}")
    assert "\n" not in str(err.value)
    assert notes.read_text().startswith("these are my notes")  # left as it was


def test_last_must_count_runs(shell: Any, log: Path, tiny_model: Path) -> None:
    nbllm.load(tiny_model, dtype="float32")
    for text in ("one", "two"):
        nbllm.generate(text, max_new_tokens=2)
    assert list(nbllm.runs(last=1)["prompt"]) == ["two"]
    with pytest.raises(UsageError, match=r"last -1 is not a number of runs"):
        shell.run_line_magic("llm_runs", "--last -1")
    with pytest.raises(nbllm.NbllmError, match=r"last -1 is not a number of runs"):
        nbllm.runs(last=-1)


def test_a_sweep_grid_that_names_an_option_twice_or_nothing_is_refused(shell: Any, tiny_model: Path) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    with pytest.raises(UsageError, match=r"--sweep names seed twice \('seed=3' after seed=1,2\)"):
        shell.run_cell_magic("llm", "--max-new-tokens 2 --sweep 'seed=1,2 seed=3' -o t", "x")
    with pytest.raises(UsageError, match=r"--sweep names no option to vary"):
        shell.run_cell_magic("llm", "--max-new-tokens 2 --sweep '' -o t", "x")
    assert "t" not in shell.user_ns  # nothing ran


def test_replay_sources_without_runs_are_one_line(shell: Any, tiny_model: Path, log: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {"theme": "dark"}}))
    with pytest.raises(UsageError, match=r"other.json cannot be read as a notebook \(it has no list of cells\)"):
        shell.run_line_magic("llm_replay", str(other))
    empty = tmp_path / "empty.ipynb"
    empty.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                                 "cells": [{"cell_type": "code", "source": "1 + 1", "metadata": {}, "outputs": [],
                                            "execution_count": None}]}))
    with pytest.raises(UsageError, match=r"the notebook .*empty.ipynb holds no recorded runs"):
        shell.run_line_magic("llm_replay", str(empty))
    nbllm.load(tiny_model, dtype="float32")
    nbllm.generate("logged", max_new_tokens=2)
    _stop_logging(monkeypatch)
    session = nbllm.runlog.SESSION
    with pytest.raises(UsageError, match=rf"has no runs of session 'nosuch' \(its latest sessions: {session}\)"):
        shell.run_line_magic("llm_replay", f"{log} --session nosuch")
    assert active_replay() is None


def test_the_closest_run_is_the_one_that_differs_only_in_the_seed(shell: Any, tiny_model: Path, log: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 4 --sweep 'seed=1,2'", "Sweep this")
    _cell(shell, "--temperature 0.9 --max-new-tokens 4 --seed 3", "Another prompt")  # later, differs in the prompt
    _stop_logging(monkeypatch)
    nbllm.replay(log)
    nbllm.load(tiny_model, dtype="float32")
    with pytest.raises(nbllm.NbllmError, match=r"the closest, run 2, differs in the seed \(2 there, 3 here\)\."):
        nbllm.generate("Sweep this", temperature=0.9, max_new_tokens=4, seed=3)


# ----------------------------------------------------------------------------------- config-user.yaml


def test_config_user_values_nbllm_cannot_use_are_named_once_per_load(shell: Any, engine: Any, tiny_model: Path,
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: Any) -> None:
    folder = tmp_path / "models"
    shutil.copytree(tiny_model, folder / "tiny-webui")
    monkeypatch.setenv(models.ENV_VAR, str(folder))
    models.set_models_dir(None)
    (folder / "config-user.yaml").write_text(
        "tiny.*:\n  loader: ExLlamav2\n  temperature: warm\n"
        "tiny-webui$:\n  max_new_tokens: 7\n  dtype: float32\n  cpu_memory: lots\n")
    try:
        shell.run_line_magic("llm_load", "tiny-webui")
        lines = [line for line in capsys.readouterr().out.splitlines() if "values nbllm ignores" in line]
        assert len(lines) == 1, lines
        line = lines[0]
        assert "entry 'tiny.*' key loader: ExLlamav2 is not a loader nbllm has" in line
        assert "entry 'tiny.*' key temperature: 'warm' ignored" in line
        assert "entry 'tiny-webui$' key cpu_memory: 'lots' ignored" in line
        assert nbllm.status().loader == "transformers" and engine.defaults.max_new_tokens == 7  # the rest applies
        shell.run_line_magic("llm_unload", "")
        shell.run_line_magic("llm_load", "tiny-webui")
        assert sum("values nbllm ignores" in line for line in capsys.readouterr().out.splitlines()) == 1
    finally:
        models.set_models_dir(None)


# ------------------------------------------------------------------------------------- the progress bar


def test_the_sweeps_progress_bar_shows_its_final_line_once(tiny_model: Path, engine: Any, capsys: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    nbllm.sweep("Rivers", seed=[1, 2, 3], temperature=[0.5, 0.9], max_new_tokens=2, progress=True)
    err = capsys.readouterr().err
    finals = [part for part in err.replace("\r", "\n").split("\n") if "6/6" in part]
    assert len(finals) == 1, err

