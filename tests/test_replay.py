"""Replay: a notebook's outputs shown again from its saved outputs or from a run log, with no model
files and no torch; each request matched on its identity; a miss is one line naming the closest run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from IPython.core.error import UsageError
from nbclient import NotebookClient

import nbllm
from nbllm.recordings import Recording, active_replay
from nbllm.runlog import RunLog, flush

STUDY = [
    "%%llm --temperature 0 --max-new-tokens 16 -o greedy\nThe greedy prompt",
    "%%llm --temperature 0.9 --max-new-tokens 16 -o drawn1\nA sampled prompt",
    "%%llm --temperature 0.9 --max-new-tokens 16 -o drawn2\nA sampled prompt",
    "%%llm --temperature 0.9 --max-new-tokens 16 --seed 7 -o seeded\nA seeded prompt",
    "%%llm --system 'Be brief.' --temperature 0 --max-new-tokens 16\nA chat prompt",
    "%%llm_chat tutor --temperature 0 --max-new-tokens 12\nHello tutor",
    "%%llm_chat tutor --temperature 0 --max-new-tokens 12\nAnd then?",
    "%%llm --max-new-tokens 6 --sweep 'temperature=0,0.8 seed=1,2'\nSweep this",
    "import nbllm\nnbllm.generate('From the API', temperature=0, max_new_tokens=8)",
]


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def _run(nb: nbformat.NotebookNode, where: Path) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(where)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    return nb


def _shown(cell: nbformat.NotebookNode) -> list[str]:
    """What a cell shows: its text outputs, in order (stdout, and the text of displays)."""
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream" and o["name"] == "stdout":
            out.append(o["text"])
        elif "text" in o.get("metadata", {}).get("nbllm_result", {}):  # a result shown as a cell's value
            out.append(o["metadata"]["nbllm_result"]["text"])
        elif o["output_type"] in ("display_data", "execute_result"):
            out.append(o["data"].get("text/plain", ""))
    return out


@pytest.fixture(scope="module")
def recorded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The study run once in a real kernel, on a copy of the tiny model that is deleted afterwards;
    its saved notebook and its run log."""
    where = tmp_path_factory.mktemp("recorded")
    model = where / "study-model"
    shutil.copytree(tiny_model, model)
    log = where / "runs.sqlite"
    setup = [f"import os\nos.environ['NBLLM_RUN_LOG'] = {str(log)!r}\n%load_ext nbllm",
             f"%llm_load {model} --dtype float32"]
    nb = _run(_notebook(setup + STUDY), where)
    saved = where / "study.ipynb"
    nbformat.write(nb, saved)
    shutil.rmtree(model)  # no model files from here on
    yield {"notebook": nb, "saved": saved, "log": log, "model": model, "where": where}


def _replayed(recorded: dict[str, Any], source: Path) -> nbformat.NotebookNode:
    setup = ["import os, sys\nos.environ['NBLLM_RUN_LOG'] = 'off'\n%load_ext nbllm",
             f"%llm_replay {source}\n%llm_load {recorded['model']} --dtype float32"]
    nb = _run(_notebook(setup + STUDY + ["print('torch' in sys.modules, 'transformers' in sys.modules)"]),
              recorded["where"])
    return nb


@pytest.mark.parametrize("source", ["saved", "log"])
def test_replay_shows_every_output_again_without_model_files_or_torch(recorded: dict[str, Any], source: str) -> None:
    nb = _replayed(recorded, recorded[source])
    first = recorded["notebook"].cells[2:]
    again = nb.cells[2:-1]
    for cell, before, after in zip(STUDY, first, again):
        assert _shown(after) == _shown(before), cell
    assert _shown(nb.cells[-1]) == ["False False\n"]
    for before, after in zip(first, again):
        for o1, o2 in zip(before.outputs, after.outputs):
            if "nbllm" in o1.get("metadata", {}):
                replayed = o2["metadata"]["nbllm"]
                assert replayed.pop("replayed")["source"] == str(recorded[source])
                assert replayed == o1["metadata"]["nbllm"]  # the original record, id and all
                assert o2["metadata"]["nbllm_result"] == o1["metadata"]["nbllm_result"]
            if "nbllm_runs" in o1.get("metadata", {}):
                assert [r["outcome"] for r in o2["metadata"]["nbllm_runs"]] == [
                    r["outcome"] for r in o1["metadata"]["nbllm_runs"]]


def test_a_notebook_recording_holds_its_magics_outputs_and_sweep_rows(recorded: dict[str, Any]) -> None:
    runs = Recording.read(recorded["saved"]).runs
    assert len(runs) == 7 + 4 + 1  # seven magic outputs, four sweep rows, one result shown as a cell's value
    assert [r.where for r in runs[:3]] == ["cell 3", "cell 4", "cell 5"]
    assert runs[0].text == _shown(recorded["notebook"].cells[2])[0]
    logged = Recording.read(recorded["log"]).runs
    assert [r.text for r in logged] == [r.text for r in runs]
    assert [r.record for r in logged] == [r.record for r in runs]


@pytest.fixture
def replay_log(shell: Any, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A few runs of the tiny model in a run log of this test's own; the model loaded."""
    flush()
    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o g", "Greedy")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 10 -o s1", "Sampled")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 10 -o s2", "Sampled")
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    yield log
    nbllm.replay(None)


def test_requests_match_on_identity_and_unseeded_ones_take_runs_in_order(shell: Any, tiny_model: Path,
                                                                          replay_log: Path, capsys: Any) -> None:
    before = {k: shell.user_ns[k] for k in ("g", "s1", "s2")}
    assert before["s1"].text != before["s2"].text
    shell.run_line_magic("llm_replay", str(replay_log))
    assert "Replaying 3 recorded runs" in capsys.readouterr().out
    assert nbllm.status().loader == "replay"  # the loaded model was released; the replay stands in for it
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 10 -o a", "Sampled")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 10 -o b", "Sampled")
    shell.run_cell_magic("llm", "--temperature 0.9 --max-new-tokens 10 -o c", "Sampled")  # all taken: the last again
    g = nbllm.generate("Greedy", temperature=0, max_new_tokens=10)
    ns = shell.user_ns
    assert [ns["a"].text, ns["b"].text, ns["c"].text] == [before["s1"].text, before["s2"].text, before["s2"].text]
    assert g.text == before["g"].text and g.replayed and "replayed" in g.summary()
    assert g.record.id == before["g"].record.id and g.record.replayed == {"source": str(replay_log), "run": "run 1"}
    assert (g.finish_reason, g.completion_tokens, g.timings) == (
        before["g"].finish_reason, before["g"].completion_tokens, before["g"].timings)
    assert "".join(g) == before["g"].text  # iterating again streams it again
    assert active_replay() is not None and active_replay().answered == 4


def test_a_miss_is_one_line_naming_the_closest_run_and_what_differs(shell: Any, tiny_model: Path,
                                                                     replay_log: Path) -> None:
    nbllm.replay(replay_log)
    nbllm.load(tiny_model, dtype="float32")
    with pytest.raises(UsageError) as miss:
        shell.run_cell_magic("llm", "--temperature 0.5 --max-new-tokens 10", "Greedy")
    message = str(miss.value)
    assert "\n" not in message
    assert message.startswith(f"no recorded run in {replay_log} matches this request; the closest, run 1, differs "
                              "in temperature (0.0 there, 0.5 here)")
    with pytest.raises(nbllm.NbllmError, match=r"differs in the seed \(drawn there, 5 here\)"):
        nbllm.generate("Sampled", temperature=0.9, max_new_tokens=10, seed=5)
    with pytest.raises(nbllm.NbllmError, match=r"run 1, differs in max_new_tokens \(10 there, 11 here\) and the "
                                               r"prompt"):
        nbllm.generate("Greedy!", temperature=0, max_new_tokens=11)
    nbllm.load(tiny_model, dtype="float16")
    with pytest.raises(nbllm.NbllmError, match=r"differs in dtype \('float32' there, 'float16' here\)"):
        nbllm.generate("Greedy", temperature=0, max_new_tokens=10)


def test_fallback_run_loads_the_model_at_the_first_miss(shell: Any, tiny_model: Path, replay_log: Path,
                                                         capsys: Any) -> None:
    shell.run_line_magic("llm_replay", f"{replay_log} --fallback run")
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o hit", "Greedy")
    assert shell.user_ns["hit"].replayed
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o miss", "Something new")
    out = capsys.readouterr().out
    assert "note: no recorded run in" in out and f"loading {tiny_model} to run it" in out
    miss = shell.user_ns["miss"]
    assert not miss.replayed and miss.record.loader == "transformers" and miss.completion_tokens == 10
    assert miss.text == nbllm.generate("Something new", temperature=0, max_new_tokens=10).text
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o after", "Greedy")
    assert not shell.user_ns["after"].replayed  # the replay is off since the miss
    assert active_replay() is None


def test_fallback_runs_a_chat_turn_through_the_models_template(shell: Any, tiny_model: Path, replay_log: Path) -> None:
    nbllm.replay(replay_log, fallback="run")
    nbllm.load(tiny_model, dtype="float32")
    chat = nbllm.Chat("fell-back", system="Short.")
    reply = chat.send("Not recorded", temperature=0, max_new_tokens=6)
    _ = reply.text
    assert not reply.replayed and reply.record.prompt.startswith("<s><|system|>\nShort.")
    assert chat.messages()[-1] == {"role": "assistant", "content": reply.text}


def test_replay_off_and_the_context_manager_unload_the_stand_in(shell: Any, tiny_model: Path, replay_log: Path,
                                                                capsys: Any) -> None:
    with nbllm.replay(replay_log) as replay:
        assert repr(replay).endswith("3 runs, 0 answered, on>")
        nbllm.load(tiny_model, dtype="float32")
        assert "replay: nothing was loaded" in " ".join(nbllm.status().placement.notes)
    assert not nbllm.get_engine().loaded and active_replay() is None
    shell.run_line_magic("llm_replay", str(replay_log))
    shell.run_line_magic("llm_replay", "")
    shell.run_line_magic("llm_replay", "off")
    shell.run_line_magic("llm_replay", "off")
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith(f"<nbllm.Replay of {replay_log}: 3 runs")
    assert out[-2:] == ["Replay off (0 outputs were replayed).", "No replay was on."]
    nbllm.load(tiny_model, dtype="float32")
    assert nbllm.status().loader == "transformers"


def test_a_model_the_recording_does_not_hold_misses_with_the_model_named(tiny_model: Path, replay_log: Path) -> None:
    nbllm.replay(replay_log)
    status = nbllm.load("some/other-model")
    assert "has no recorded run" in " ".join(status.placement.notes)
    with pytest.raises(nbllm.NbllmError, match=r"differs in the model"):
        nbllm.generate("Greedy", temperature=0, max_new_tokens=10)


def test_a_bad_source_is_one_line(shell: Any, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="there is no file"):
        shell.run_line_magic("llm_replay", str(tmp_path / "missing.ipynb"))
    (tmp_path / "bad.ipynb").write_text("{not json")
    with pytest.raises(UsageError, match="cannot be read as a notebook"):
        shell.run_line_magic("llm_replay", str(tmp_path / "bad.ipynb"))
    with pytest.raises(UsageError, match="--fallback"):
        shell.run_line_magic("llm_replay", f"{tmp_path / 'bad.ipynb'} --fallback maybe")


def test_records_without_seed_drawn_answer_both_kinds_of_request(tmp_path: Path, tiny_model: Path, engine: Any) -> None:
    log = RunLog(tmp_path / "old.sqlite")
    record = {"model": {"name": "old-model", "format": "transformers"}, "loader": "transformers",
              "load_options": {}, "generation_options": {"temperature": 0.9, "max_new_tokens": 4}, "seed": 42,
              "prompt": "Old", "mode": "raw"}
    log.add_run(record, {"text": "recorded long ago", "finish_reason": "length"})
    nbllm.replay(log.path)
    try:
        nbllm.load("old-model")
        assert nbllm.generate("Old", temperature=0.9, max_new_tokens=4).text == "recorded long ago"
        assert nbllm.generate("Old", temperature=0.9, max_new_tokens=4, seed=42).text == "recorded long ago"
        assert json.loads(nbllm.get_engine().last_result.record.to_json())["replayed"]["run"] == "run 1"
    finally:
        nbllm.replay(None)


# -- a chat with tools ----------------------------------------------------------------------------------


def test_tools_under_a_replay_that_never_chatted_with_them_is_one_line(tiny_model: Path, replay_log: Path) -> None:
    def add(a: int, b: int) -> int:
        """Add.

        Args:
            a: one
            b: two
        """
        return a + b

    nbllm.replay(replay_log)
    nbllm.load(tiny_model, dtype="float32")
    chat = nbllm.Chat("no-tools")
    with pytest.raises(nbllm.NbllmError, match=rf"^no recorded run of {tiny_model} in {replay_log} chatted with "
                                              "tools, so there is nothing to replay them from") as info:
        chat.send("1+2?", tools=[add])
    assert "\n" not in str(info.value) and chat.turns == [] and not chat.generating
    assert nbllm.generate("Greedy", temperature=0, max_new_tokens=10).replayed  # the replay goes on


TOOLS_STUDY = [
    'from typing import Literal\nSKY = "sunny"\n\n'
    'def weather(city: Literal["Paris", "Lisbon"]) -> dict:\n'
    '    """The weather in a city.\n\n    Args:\n        city: where\n    """\n'
    '    return {"city": city, "sky": SKY}',
    "%%llm_chat trip --tools weather --tool-choice weather --temperature 0 --max-new-tokens 40 -o r\nWeather in Paris?",
    "import nbllm.chat\nprint([str(c) for c in nbllm.chat.conversation('trip').turns[0].tool_calls], r.text == "
    "nbllm.chat.conversation('trip').turns[0].reply.content)",
]


def test_a_notebook_that_chatted_with_tools_replays_its_calls(tmp_path: Path) -> None:
    """Recorded in a real kernel (each reply of the loop is an output with its record), saved, replayed in
    another kernel with the model's files gone: the same streamed step, the tool run again with the same
    result, the same answer; a tool that now returns something else misses, naming its result."""
    from nbllm.testing import tiny_transformers_model

    model = tmp_path / "tools-model"
    shutil.copytree(tiny_transformers_model(chat_template="tools"), model)
    setup = ["import os\nos.environ['NBLLM_RUN_LOG'] = 'off'\n%load_ext nbllm", f"%llm_load {model}"]
    nb = _run(_notebook(setup + TOOLS_STUDY), tmp_path)
    saved = tmp_path / "tools.ipynb"
    nbformat.write(nb, saved)
    shutil.rmtree(model)

    chat = nb.cells[3].outputs
    assert [o["output_type"] for o in chat] == ["display_data", "stream", "display_data"]  # step, call, answer
    step, call, answer = chat
    assert step["data"]["text/plain"].startswith('<tool_call>\n{"name":"weather"') and "nbllm" in step["metadata"]
    assert step["metadata"]["nbllm"]["tool_calling"] == {"format": "hermes", "server": False}
    assert call["text"].startswith("[tool] weather(city=") and '"sky": "sunny"' in call["text"]
    assert "nbllm" in answer["metadata"] and answer["metadata"]["nbllm"]["messages"][-1]["role"] == "tool"
    assert len(Recording.read(saved).runs) == 2

    miss = ('SKY = "rainy"\n%llm_chat_reset trip', TOOLS_STUDY[1])
    again = _notebook([setup[0], f"%llm_replay {saved}\n%llm_load {model}", *TOOLS_STUDY, *miss])
    again.cells[-1].metadata["tags"] = ["raises-exception"]  # the miss
    NotebookClient(again, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in again.cells for o in c.outputs if o["output_type"] == "error"]  # a UsageError: a line
    for before, after in zip(nb.cells[2:], again.cells[2:5]):
        assert _shown(after) == _shown(before)
    for o1, o2 in zip(chat, again.cells[3].outputs):
        if "nbllm" in o1.get("metadata", {}):
            replayed = dict(o2["metadata"]["nbllm"])
            assert replayed.pop("replayed")["source"] == str(saved)
            assert replayed == o1["metadata"]["nbllm"]
    said = "".join(o.get("text", "") for o in again.cells[6].outputs if o.get("name") == "stderr")
    assert said.startswith(f"UsageError: no recorded run in {saved} matches this request; the closest, cell 4, differs in the "
                           "result of tool call weather"), said
    assert """('{"city": "Lisbon", "sky": "sunny"}' there, '{"city": "Lisbon", "sky": "rainy"}' here)""".replace(
        "Lisbon", _city(call["text"])) in said


def _city(line: str) -> str:
    return line.split("city='")[1].split("'")[0]
