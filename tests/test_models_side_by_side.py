"""Several models side by side (issue 26): named models, memory first, comparisons, records and replay
naming the model, and the bad input. Real tiny models through the real loaders, a real IPython shell,
a real llama-cpp-python server behind a counting proxy."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from servers import CountingProxy, LlamaCppServer

import nbllm
from nbllm.fit.estimate import RAM_USABLE, estimate
from nbllm.fit.machine import Machine
from nbllm.frontend import using
from nbllm.registry import NotEnoughMemoryError, UnknownModelError, models
from nbllm.runlog import flush

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(autouse=True)
def _empty_registry(engine: Any) -> Iterator[None]:
    yield
    nbllm.replay(None)
    models().unload_all()
    models().machine = None


def test_named_models_answer_by_name_and_their_records_say_which(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    assert not nbllm.get_engine().loaded  # the unnamed model is untouched
    assert list(nbllm.loaded_models()) == ["base", "quant"]
    a = nbllm.generate("Hello", model="base", **GREEDY)
    b = nbllm.generate("Hello", model="quant", **GREEDY)
    assert a.record.model_name == "base" and a.record.loader == "transformers"
    assert b.record.model_name == "quant" and b.record.loader == "llama.cpp"
    assert a.record.to_dict()["model_name"] == "base"
    # each answers as it does alone, unnamed
    nbllm.load(tiny_model)
    alone = nbllm.generate("Hello", **GREEDY)
    assert alone.text == a.text and alone.record.model_name is None and "model_name" not in alone.record.to_dict()
    assert nbllm.status("base").model == nbllm.status().model
    assert nbllm.unload("base") and list(nbllm.loaded_models()) == ["default", "quant"]


def test_unknown_bad_and_busy_names_are_one_line(tiny_model: Path) -> None:
    nbllm.load(tiny_model, name="base")
    with using("notebook"), pytest.raises(UnknownModelError, match=r"no model is loaded as 'tuned' \(loaded: base\)\. Load it first: "
                                                r"%llm_load MODEL --as tuned"):
        nbllm.generate("Hi", model="tuned")
    with pytest.raises(nbllm.NbllmError, match="'no good' is not a model name"):
        nbllm.load(tiny_model, name="no good")
    with pytest.raises(UnknownModelError, match="no model is loaded as 'gone'"):
        nbllm.load(tiny_model, name="other", replace="gone")
    assert list(nbllm.loaded_models()) == ["base"]  # nothing was loaded or unloaded
    with pytest.raises(nbllm.NbllmError, match="at least two models"):
        nbllm.compare("Hi", models=["base"])
    with pytest.raises(nbllm.NbllmError, match="names base twice"):
        nbllm.compare("Hi", models="base,base")


def test_a_model_that_does_not_fit_beside_the_others_is_refused_before_loading(tiny_model: Path,
                                                                                tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    used = sum(nbllm.status("base").placement.memory_bytes.values())
    needed = estimate(tiny_gguf).on("cpu")
    # room for either alone, not for both
    models().machine = Machine(ram_bytes=int((used + needed - 1) / RAM_USABLE))
    with using("notebook"), pytest.raises(NotEnoughMemoryError) as caught:
        nbllm.load(tiny_gguf, name="quant")
    message = caught.value.message
    assert "does not fit beside base" in message and "%llm_unload base" in message and "--replace base" in message
    assert "\n" not in message
    assert list(nbllm.loaded_models()) == ["base"]  # the loaded one stays
    nbllm.load(tiny_gguf, name="quant", replace="base")
    assert list(nbllm.loaded_models()) == ["quant"]
    # alone, a model loads as today: no budget check at all
    models().machine = Machine(ram_bytes=1)
    nbllm.load(tiny_model, name="quant")
    assert nbllm.status("quant").loader == "transformers"


def test_compare_returns_one_column_per_model_equal_to_each_alone(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    runs: list[Any] = []
    frame = nbllm.compare(["Hello", "The sea"], models="base,quant", results=runs, **GREEDY)
    assert list(frame.columns) == ["base", "quant"] and list(frame.index) == ["Hello", "The sea"]
    for prompt in ("Hello", "The sea"):
        for name in ("base", "quant"):
            assert frame.loc[prompt, name] == nbllm.generate(prompt, model=name, **GREEDY).text
    assert {n: r.record.model_name for n, r in runs[0].results.items()} == {"base": "base", "quant": "quant"}
    # a model not loaded yet is loaded for the comparison and unloaded after
    frame = nbllm.compare("Hello", models=["base", str(tiny_gguf)], **GREEDY)
    assert frame.loc["Hello", str(tiny_gguf)] == nbllm.generate("Hello", model="quant", **GREEDY).text
    assert list(nbllm.loaded_models()) == ["base", "quant"]


def test_a_comparison_where_one_model_fails_keeps_the_others(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="short", n_ctx=16)
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen"
    frame = nbllm.compare(prompt, models="base,short", **GREEDY)
    assert frame.loc[prompt, "base"] == nbllm.generate(prompt, model="base", **GREEDY).text
    failure = frame.loc[prompt, "short"]
    assert failure.startswith("[error: the prompt is ") and "context holds 16" in failure and "\n" not in failure


def test_models_that_do_not_fit_together_are_compared_in_turn(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    used = sum(nbllm.status("base").placement.memory_bytes.values())
    needed = estimate(tiny_gguf).on("cpu")
    nbllm.load(tiny_gguf, name="probe")
    loaded = sum(nbllm.status("probe").placement.memory_bytes.values())
    nbllm.unload("probe")
    models().machine = Machine(ram_bytes=int((used + needed + loaded - 1) / RAM_USABLE))  # base + one gguf, not two
    copy = tiny_gguf.parent / "copy" / tiny_gguf.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(tiny_gguf, copy)
    frame = nbllm.compare("Hello", models=["base", str(tiny_gguf), str(copy)], **GREEDY)
    assert frame.loc["Hello", str(tiny_gguf)] == frame.loc["Hello", str(copy)]  # the same weights
    assert any("do not fit together, so they ran in turn" in n for n in frame.attrs["notes"])
    assert list(nbllm.loaded_models()) == ["base"]


def test_compare_magic_shows_columns_and_keeps_the_comparison(shell: Any, tiny_model: Path, tiny_gguf: Path,
                                                              capsys: Any) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --as base")
    shell.run_line_magic("llm_load", f"{tiny_gguf} --as quant")
    out = capsys.readouterr().out
    assert "as base with transformers" in out and "as quant with llama.cpp" in out
    shell.run_cell_magic("llm", "--compare base,quant --temperature 0 --max-new-tokens 8 -o cmp", "Hello")
    shown = capsys.readouterr().out
    cmp = shell.user_ns["cmp"]
    assert shown == f"[base]\n{cmp.text('base')}\n\n[quant]\n{cmp.text('quant')}\n"
    assert cmp.text("quant") == nbllm.generate("Hello", model="quant", **GREEDY).text
    shell.run_cell_magic("llm", "--model quant --temperature 0 --max-new-tokens 8 -o r", "Hello")
    assert shell.user_ns["r"].text == cmp.text("quant") and shell.user_ns["r"].record.model_name == "quant"
    with pytest.raises(UsageError, match="no model is loaded as 'nope'"):
        shell.run_cell_magic("llm", "--model nope", "Hello")
    shell.run_cell_magic("llm", "--sweep 'model=base,quant seed=1' --max-new-tokens 4 -o t", "Hello")
    assert list(shell.user_ns["t"].model) == ["base", "quant"]
    with pytest.raises(UsageError, match="does not go with --model"):
        shell.run_cell_magic("llm", "--compare base,quant --model base", "Hello")
    listing = str(shell.run_line_magic("llm_status", ""))
    assert listing.startswith("2 models loaded:") and "base " in listing and "memory: cpu" in listing
    shell.run_line_magic("llm_unload", "quant")
    assert list(nbllm.loaded_models()) == ["base"]
    capsys.readouterr()
    shell.run_line_magic("llm_unload", "")
    assert capsys.readouterr().out == "No unnamed model was loaded (loaded: base: %llm_unload NAME, or --all).\n"
    with pytest.raises(UsageError, match="no model is loaded as 'quant'"):
        shell.run_line_magic("llm_unload", "quant")
    shell.run_line_magic("llm_unload", "--all")
    assert nbllm.loaded_models() == {}


def test_chat_picks_its_model_and_keeps_it(shell: Any, tiny_model: Path, tiny_gguf: Path) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --as base")
    shell.run_line_magic("llm_load", f"{tiny_gguf} --as quant")
    shell.run_cell_magic("llm_chat", "tutor --model quant --temperature 0 --max-new-tokens 6 -o r1", "Hello")
    shell.run_cell_magic("llm_chat", "tutor --temperature 0 --max-new-tokens 6 -o r2", "And then?")
    assert shell.user_ns["r1"].record.model_name == "quant" and shell.user_ns["r2"].record.model_name == "quant"
    chat = nbllm.Conversation("api", model="base")
    reply = chat.send("Hello", **GREEDY)
    assert reply.text and reply.record.model_name == "base"
    with pytest.raises(UsageError, match="no model is loaded as 'nope'"):
        shell.run_cell_magic("llm_chat", "tutor --model nope", "Hi")


def test_a_sweep_over_models_has_a_row_block_per_model(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    table = nbllm.sweep("Hello", model=["base", "quant"], seed=[1, 2], max_new_tokens=6, progress=False)
    assert [(r.model, r.seed) for r in table.itertuples()] == [("base", 1), ("base", 2), ("quant", 1), ("quant", 2)]
    for row in table.itertuples():
        assert row.text == nbllm.generate("Hello", model=row.model, seed=row.seed, max_new_tokens=6).text
    with pytest.raises(UnknownModelError):
        nbllm.sweep("Hello", model="base,nope", seed=[1])


def test_scores_per_model(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    scores = {name: nbllm.score("The sea is", [" blue", " red"], model=name) for name in ("base", "quant")}
    assert scores["base"].record.model_name == "base" and scores["quant"].record.model_name == "quant"


def test_unloading_a_model_a_stream_reads_ends_the_stream_with_its_text(tiny_model: Path, tiny_gguf: Path) -> None:
    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    result = nbllm.stream("Hello", model="quant", temperature=0, max_new_tokens=200)
    pieces = iter(result)
    first = next(pieces)
    assert nbllm.unload("quant")
    rest = "".join(pieces)
    assert result.finish_reason == "superseded" and result.text == first + rest
    assert nbllm.generate("Hello", model="base", **GREEDY).text  # the other model is untouched


def test_a_comparison_replays_without_any_of_its_models(tiny_model: Path, tiny_gguf: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, quant = tmp_path / "base", tmp_path / "quant.gguf"
    shutil.copytree(tiny_model, base)
    shutil.copyfile(tiny_gguf, quant)
    flush()
    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    nbllm.load(base, name="base")
    nbllm.load(quant, name="quant")
    first: list[Any] = []
    before = nbllm.compare("Hello", models="base,quant", results=first, **GREEDY)
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    models().unload_all()
    shutil.rmtree(base)
    quant.unlink()  # none of its models is here any more
    nbllm.replay(log)
    nbllm.load(base, name="base")
    nbllm.load(quant, name="quant")
    again: list[Any] = []
    after = nbllm.compare("Hello", models="base,quant", results=again, **GREEDY)
    assert after.equals(before)
    for name in ("base", "quant"):
        replayed = again[0].results[name].record
        assert replayed.replayed is not None and replayed.model_name == name
        assert replayed.id == first[0].results[name].record.id
    nbllm.replay(None)
    assert nbllm.loaded_models() == {}  # the stand-ins went with the replay


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[LlamaCppServer]:
    srv = LlamaCppServer(tiny_gguf)
    yield srv
    srv.stop()


def test_servers_are_compared_at_the_same_time(server: LlamaCppServer) -> None:
    proxy = CountingProxy(server.url.removesuffix("/v1"), hold_until=2)
    try:
        nbllm.load(proxy.url + "/v1", name="left")
        nbllm.load(proxy.url + "/v1", name="right")
        frame = nbllm.compare("Hello", models="left,right", **GREEDY)
        assert proxy.peak == 2  # both requests in flight at once
        assert frame.loc["Hello", "left"] == frame.loc["Hello", "right"] == nbllm.generate(
            "Hello", model="left", **GREEDY).text
    finally:
        proxy.stop()


def test_models_on_one_cpu_are_compared_in_turn(tiny_model: Path, tiny_gguf: Path) -> None:
    from nbllm.compare import lanes

    nbllm.load(tiny_model, name="base")
    nbllm.load(tiny_gguf, name="quant")
    assert lanes({n: models().engine(n) for n in ("base", "quant")}) == [["base", "quant"]]
    seen: list[str] = []
    lock = threading.Lock()

    def update(name: str, text: str) -> None:
        with lock:
            if not seen or seen[-1] != name:
                seen.append(name)

    from nbllm.compare import run_comparison

    run_comparison("Hello", ["base", "quant"], GREEDY, update=update)
    assert seen == ["base", "quant"]  # one after the other, never interleaved


def test_the_settings_panel_loads_into_a_name_and_the_chat_panel_picks_it(tiny_model: Path, tmp_path: Path,
                                                                         engine: Any) -> None:
    pytest.importorskip("ipywidgets")
    from nbllm.chat import forget
    from nbllm.widgets.chat import ChatPanel
    from nbllm.widgets.settings import SettingsPanel

    root = tmp_path / "models"
    root.mkdir()
    (root / "org_tiny").symlink_to(tiny_model, target_is_directory=True)
    panel = SettingsPanel(models_dir=root)
    try:
        panel.model.value = next(v for label, v in panel.model.options if label.startswith("org_tiny "))
        panel.load_as.value = "no good"
        panel.load_button.click()
        assert "'no good' is not a model name" in panel.messages.error_text and nbllm.loaded_models() == {}
        panel.load_as.value = "side"
        panel.load_button.click()
        assert panel.wait(600) and panel.messages.error_text == ""
        assert not engine.loaded and list(nbllm.loaded_models()) == ["side"]
    finally:
        panel.close()
    forget("pick")
    chat = ChatPanel("pick")
    try:
        assert list(chat.model.options) == ["default", "side"] and chat.model.value == "default"
        chat.model.value = "side"
        chat.input.value = "Hello"
        chat.send_button.click()
        assert chat.wait(600) and chat.messages.error_text == ""
        assert chat.chat.model == "side" and chat.chat.turns[-1].reply is not None
    finally:
        chat.close()
        forget("pick")
