"""The run log: every generation, whatever started it, lands in one SQLite file that several kernels
write at once; nbllm.runs / %llm_runs read it back as a DataFrame."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm.identity import identity_key, record_identity
from nbllm.runlog import RunLog, default_path, flush

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunLog]:
    """A run log of this test's own (the kernel's engine writes there)."""
    flush()
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(path))
    yield RunLog(path)
    flush()


def _rows(log: RunLog) -> list[dict[str, Any]]:
    flush()
    return log.rows() if log.path.exists() else []


def test_every_front_end_logs_its_generations(shell: Any, tiny_model: Path, log: RunLog, capsys: Any) -> None:
    pytest.importorskip("ipywidgets")
    from nbllm.widgets import ChatPanel

    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 8 -o a", "Magic prompt")
    shell.run_cell_magic("llm", "--chat --max-new-tokens 8 -o b", "Magic chat")
    shell.run_cell_magic("llm_chat", "logged --temperature 0 --max-new-tokens 8 -o c", "Hello")
    d = nbllm.generate("API prompt", temperature=0, max_new_tokens=8)
    e = nbllm.Chat("api-chat").send("Hi", max_new_tokens=8)
    _ = e.text
    panel = ChatPanel("panel-chat")
    panel.send("From the panel")
    assert panel.wait(60)
    s = nbllm.sweep(["Swept one", "Swept two"], temperature=[0], max_new_tokens=[8])
    rows = _rows(log)
    by_id = {row["record_id"]: row for row in rows}
    results = [shell.user_ns["a"], shell.user_ns["b"], shell.user_ns["c"], d, e]
    for result in results:
        row = by_id[result.record.id]
        assert row["text"] == result.text and row["finish_reason"] == result.finish_reason
        assert row["completion_tokens"] == result.completion_tokens and row["prompt_tokens"] == result.prompt_tokens
        assert row["tokens_per_second"] == result.timings.decode_tokens_per_second
        assert row["record"] == json.loads(json.dumps(result.record.to_dict()))  # complete: with the weights sha256
        assert row["identity"] == identity_key(result.record.identity()) == identity_key(record_identity(row["record"]))
    assert isinstance(by_id[d.record.id]["record"]["model"]["sha256"], dict)
    assert by_id[shell.user_ns["b"].record.id]["mode"] == "chat"
    assert by_id[shell.user_ns["c"].record.id]["conversation"] == {"name": "logged", "turn": 1}
    assert any(row["conversation"] == {"name": "panel-chat", "turn": 1} for row in rows)
    assert {row["prompt"] for row in rows if row["batch"]} == {"Swept one", "Swept two"}
    assert set(s["record_id"]) <= set(by_id)
    assert len(rows) == 8 and len({row["session"] for row in rows}) == 1


def test_a_text_loader_is_logged_too_and_a_replayed_result_is_not(log: RunLog, engine: Any) -> None:
    from test_loader_contract import ReverseLoader

    nbllm.loaders.register(ReverseLoader)
    try:
        nbllm.load("reverse://mirror")
        r = nbllm.generate("one two three", temperature=0)
        (row,) = _rows(log)
        assert (row["text"], row["loader"], row["completion_tokens"]) == ("three two one", "reverse", 3)
        assert row["record"]["model"]["model_id"] == "rev-1"
        with nbllm.replay(log.path):
            nbllm.load("reverse://mirror")
            again = nbllm.generate("one two three", temperature=0)
            assert again.replayed and again.text == r.text
        assert len(_rows(log)) == 1
    finally:
        engine.unload()
        nbllm.loaders.unregister("reverse")


def test_runs_is_a_dataframe_with_a_column_per_option_and_filters(shell: Any, tiny_model: Path, log: RunLog) -> None:
    nbllm.load(tiny_model, dtype="float32")
    for temperature in (0, 0.5, 0.9):
        nbllm.generate("Count", temperature=temperature, max_new_tokens=4, stop=["zz"])
    frame = nbllm.runs()
    assert list(frame["temperature"]) == [0.0, 0.5, 0.9]
    assert set(frame["stop"]) == {("zz",)} and set(frame["max_new_tokens"]) == {4}
    assert list(frame["load_options"]) == [{"dtype": "float32"}] * 3
    assert str(frame["created"].dtype).startswith("datetime64")
    assert list(nbllm.runs(temperature=0.5)["temperature"]) == [0.5]
    assert list(nbllm.runs(last=2)["temperature"]) == [0.5, 0.9]
    assert len(nbllm.runs(model=tiny_model.name[:12].upper())) == 3 and nbllm.runs(model="nope").empty
    shown = shell.run_line_magic("llm_runs", "--last 1")
    assert list(shown["temperature"]) == [0.9]
    with pytest.raises(nbllm.NbllmError, match="the run log has no column 'temprature'"):
        nbllm.runs(temprature=1)
    with pytest.raises(UsageError, match="there is no run log at"):
        shell.run_line_magic("llm_runs", f"--last 1 --path {log.path.parent / 'missing.sqlite'}")


def test_two_processes_write_to_one_log_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    writer = (
        "import sys\n"
        "from nbllm.runlog import RunLog\n"
        "log = RunLog(sys.argv[1])\n"
        "sys.stdin.readline()\n"  # both start writing together
        "for i in range(int(sys.argv[3])):\n"
        "    log.add_run({'id': f'{sys.argv[2]}-{i}', 'model': {'name': 'm'}, 'loader': 'x', 'prompt': str(i),\n"
        "                 'seed': i, 'generation_options': {}, 'load_options': {}}, {'text': sys.argv[2]},\n"
        "                session=sys.argv[2])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), name, "150"], stdin=subprocess.PIPE,
                              cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)}) for name in ("a", "b")]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    assert [p.wait(120) for p in procs] == [0, 0]
    rows = RunLog(path).rows()
    assert len(rows) == 300 and len({r["record_id"] for r in rows}) == 300
    assert {r["session"] for r in rows} == {"a", "b"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_threads_of_one_kernel_and_the_writer_never_lose_a_run(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "threads.sqlite")
    go = threading.Event()

    def write(name: str) -> None:
        go.wait()
        for i in range(50):
            log.add_run({"id": f"{name}{i}", "model": {}, "loader": "x", "prompt": "", "seed": 0}, {"text": ""})

    threads = [threading.Thread(target=write, args=(n,)) for n in "xyz"]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    assert len(log) == 150


def test_where_the_log_lives_and_turning_it_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path,
                                                 engine: Any) -> None:
    import platformdirs

    monkeypatch.delenv("NBLLM_RUN_LOG")
    assert default_path() == Path(platformdirs.user_data_dir("nbllm", appauthor=False)) / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    assert default_path() is None
    nbllm.load(tiny_model, dtype="float32")
    nbllm.generate("Not logged", max_new_tokens=2)
    assert flush(30)
    with pytest.raises(nbllm.NbllmError, match="the run log is off"):
        nbllm.runs()


def test_a_log_that_cannot_be_written_is_one_note_and_never_fails_a_generation(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path, engine: Any, capfd: Any) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NBLLM_RUN_LOG", str(blocked / "runs.sqlite"))
    nbllm.load(tiny_model, dtype="float32")
    for _ in range(2):
        assert nbllm.generate("Still works", max_new_tokens=2).finish_reason == "length"
    assert flush(30)
    err = capfd.readouterr().err
    assert err.count(f"note: the run log {blocked / 'runs.sqlite'} cannot be written") == 1


def test_a_log_from_a_newer_nbllm_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(nbllm.NbllmError, match=r"was written by a newer nbllm \(run log version 99\)"):
        RunLog(path).rows()


def test_a_request_that_never_started_is_not_logged(log: RunLog, tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    unread = nbllm.stream("Never read", max_new_tokens=3)
    nbllm.generate("Next", max_new_tokens=2)  # takes the model: the unread result is superseded unstarted
    assert unread.finish_reason == "superseded"
    assert [row["prompt"] for row in _rows(log)] == ["Next"]


def test_records_are_stored_whole_and_read_back_as_records(log: RunLog, tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    r = nbllm.generate("Whole", max_new_tokens=3, stop=["\n"], seed=9)
    (row,) = _rows(log)
    back = nbllm.Record.from_dict(row["record"])
    assert back.to_dict() == r.record.to_dict() and back.generation_options["stop"] == ("\n",)
    assert row["seed_drawn"] is False and back.seed_drawn is False
    assert json.loads(json.dumps(row["record"])) == row["record"]
