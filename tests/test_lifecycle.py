"""An unfinished result owns the model: what happens to a stream left half read when something else
needs the model (unload, load, another generation, a chat message, a reader on another thread).

Before the ownership rule: llama.cpp crashed the process (a segmentation fault) when a half-read
stream was read on after an unload, and interleaved two generations on one context (wrong text, a
wrong ``length`` reason); Transformers raised "'NoneType' object has no attribute 'decode'. The model is
still loaded" although it was not. Each test runs on both loaders.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import need

import nbllm
from nbllm.chat import Conversation

PROMPT = "def fibonacci(n):"
LONG = {"temperature": 0, "max_new_tokens": 60}


@pytest.fixture(params=["transformers", "llama.cpp"])
def model(request: pytest.FixtureRequest) -> Path:
    if request.param == "llama.cpp":
        need("llama_cpp")
        return Path(request.getfixturevalue("tiny_gguf"))
    return Path(request.getfixturevalue("tiny_model"))


def _alone(engine: Any, prompt: str = PROMPT, **options: Any) -> str:
    return str(engine.generate(prompt, **{**LONG, **options}).text)


def _half_read(engine: Any, prompt: str = PROMPT) -> tuple[Any, Any, str]:
    result = engine.stream(prompt, **LONG)
    chunks = iter(result)
    first = next(chunks) + next(chunks)
    return result, chunks, first


def test_unload_under_a_half_read_stream_supersedes_it_cleanly(engine: Any, model: Path) -> None:
    engine.load(model)
    alone = _alone(engine)
    result, chunks, first = _half_read(engine)
    assert engine.unload()
    assert result.done and result.finish_reason == "superseded" and result.interrupted
    assert "".join(chunks) == ""  # reading on ends at once, touching nothing freed
    assert result.text == first and alone.startswith(first)  # the partial text is kept
    assert result.record.model["name"] == model.name


def test_another_generation_supersedes_a_half_read_stream_and_never_interleaves(engine: Any, model: Path) -> None:
    engine.load(model)
    alone = _alone(engine)
    other_alone = _alone(engine, "class Counter:")
    result, chunks, first = _half_read(engine)
    other = engine.generate("class Counter:", **LONG)
    assert other.text == other_alone  # the new request runs as if alone
    assert result.finish_reason == "superseded" and "".join(chunks) == ""
    assert result.text == first and alone.startswith(first)


def test_loading_again_under_a_half_read_stream_supersedes_it(engine: Any, model: Path, tiny_model_64: Path) -> None:
    engine.load(model)
    result, chunks, first = _half_read(engine)
    engine.load(tiny_model_64)
    assert result.finish_reason == "superseded" and "".join(chunks) == "" and result.text == first
    assert engine.status().model == tiny_model_64.name


def test_a_result_never_read_is_superseded_without_running(engine: Any, model: Path) -> None:
    engine.load(model)
    unread = engine.stream(PROMPT, **LONG)
    done = engine.generate("class Counter:", **LONG)
    assert done.finish_reason in ("length", "eos")
    assert unread.done and unread.finish_reason == "superseded" and unread.text == "" and unread.completion_tokens == 0


def test_a_chat_message_supersedes_a_half_read_stream(engine: Any, model: Path) -> None:
    engine.load(model)
    result, _chunks, first = _half_read(engine)
    reply = Conversation("lifecycle").send("Hello!", **LONG)
    assert reply.text and reply.finish_reason in ("length", "eos")
    assert result.finish_reason == "superseded" and result.text == first


def test_a_result_read_on_another_thread_is_waited_for(engine: Any, model: Path) -> None:
    engine.load(model)
    alone = _alone(engine)
    other_alone = _alone(engine, "class Counter:")
    started, texts = threading.Event(), []
    result = None

    def reader() -> None:
        nonlocal result
        result = engine.stream(PROMPT, **LONG)
        for chunk in result:
            texts.append(chunk)
            started.set()
        started.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert started.wait(60)
    other = engine.generate("class Counter:", **LONG)  # waits for the reader's result to finish
    thread.join(60)
    assert result is not None and result.finish_reason in ("length", "eos")
    assert "".join(texts) == alone and other.text == other_alone


def test_half_read_chat_reply_then_unload_keeps_a_partial_turn(engine: Any, model: Path) -> None:
    engine.load(model)
    chat = Conversation("partial")
    reply = chat.send("Hello!", **LONG)
    chunks = iter(reply)
    first = next(chunks)
    engine.unload()
    assert reply.finish_reason == "superseded" and not chat.generating
    assert len(chat) == 1 and chat.turns[0].reply.partial and chat.turns[0].reply.content == first


def test_the_engine_stays_usable_after_superseding(engine: Any, model: Path) -> None:
    engine.load(model)
    alone = _alone(engine)
    for _ in range(3):
        _half_read(engine)
    assert _alone(engine) == alone
    assert nbllm.generate(PROMPT, **LONG).text == alone


def test_chat_panel_send_right_after_stop_waits_for_the_stopped_reply(engine: Any, tiny_model: Path) -> None:
    """Stop racing a new Send: the stopped reply joins the conversation first, then the new one is written."""
    need("ipywidgets")
    from nbllm.widgets import ChatPanel

    engine.load(tiny_model)
    engine.defaults = nbllm.GenerationOptions(temperature=0, max_new_tokens=2000)
    panel = ChatPanel("stop-then-send")
    try:
        first_chunk = threading.Event()
        panel.input.value = "Write a long story."
        panel.send_button.click()
        result = panel._result
        assert result is not None
        result.on_done(lambda _r: first_chunk.set())
        while not result.chunks and not result.done:  # the worker is streaming: wait for its first text
            first_chunk.wait(0.05)
        panel.stop_button.click()
        engine.defaults = nbllm.GenerationOptions(temperature=0, max_new_tokens=20)
        panel.input.value = "And then?"
        panel.send_button.click()  # at once: no "still being written", no race
        assert panel.messages.error_text == ""
        assert panel.wait(60)
        chat = panel.chat
        assert [t.user for t in chat.turns] == ["Write a long story.", "And then?"]
        assert chat.turns[0].reply.partial and chat.turns[0].reply.finish_reason == "cancelled"
        assert not chat.turns[1].reply.partial
    finally:
        panel.close()
