"""The loader contract admits any engine: a loader defined in this file alone, registered with one line,
drives %llm_load, %%llm, %%llm_chat, the record and the settings panel — no other nbllm file knows it.

The loader below is a *text* loader (it yields text, as an inference server does, not token ids): a
"server" that answers every prompt with its words reversed, one word per token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from IPython.core.error import UsageError

import nbllm
import nbllm.loaders
from nbllm.loaders import Request, TextLoader
from nbllm.options import LoadOptions
from nbllm.source import ModelSource


class ReverseLoader(TextLoader):
    """Claims ``reverse://NAME``; answers with the words of the last message (or prompt) reversed."""

    name: ClassVar[str] = "reverse"
    formats: ClassVar[frozenset[str]] = frozenset({"reverse"})
    load_options: ClassVar[frozenset[str]] = frozenset()
    libraries: ClassVar[tuple[str, ...]] = ("pytest",)
    renders_chat: ClassVar[bool] = True

    requests: ClassVar[list[Request]] = []
    gate: ClassVar[threading.Event | None] = None
    """When set, each word waits for this event (lets a test interrupt mid-reply)."""

    @classmethod
    def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
        if not spec.startswith("reverse://"):
            return None
        return ModelSource(format="reverse", name=spec.removeprefix("reverse://"), url=spec, model_id="rev-1")

    def load(self, source: ModelSource, options: LoadOptions) -> None:
        self.source, self.options = source, options
        self.placement.notes.append("reversing words since 1970")

    def unload(self) -> None:
        self.source = None

    def describe(self) -> dict[str, Any]:
        return {"server": "in this test file"}

    def generate_text(self, request: Request) -> Iterator[str]:
        type(self).requests.append(request)
        text = request.messages[-1]["content"] if request.messages else request.prompt
        words = text.split()[::-1]
        n = 0
        for n, word in enumerate(words[: request.options.max_new_tokens], 1):
            if self.gate is not None:
                self.gate.wait()
            if request.cancel.is_set():
                return
            yield ("" if n == 1 else " ") + word
        self.finish_reason = "eos" if n == len(words) else "length"
        self.usage = (len(text.split()), n)


@pytest.fixture
def reverse(engine: Any) -> Iterator[type[ReverseLoader]]:
    nbllm.loaders.register(ReverseLoader)  # the one line that adds a loader
    ReverseLoader.requests = []
    yield ReverseLoader
    engine.unload()
    ReverseLoader.gate = None
    nbllm.loaders.unregister("reverse")


def test_load_prompt_and_record_through_a_loader_defined_here(shell: Any, reverse: Any, capsys: Any) -> None:
    shell.run_line_magic("llm_load", "reverse://mirror")
    assert "Loaded mirror with reverse" in capsys.readouterr().out
    status = nbllm.status()
    assert (status.loader, status.model, status.path, status.format) == ("reverse", "mirror", "reverse://mirror", "reverse")

    shell.run_cell_magic("llm", "--temperature 0 --stop banana -o r", "one two banana three four")
    r = shell.user_ns["r"]
    assert capsys.readouterr().out.startswith("four three")
    assert r.text == "four three " and r.finish_reason == "stop"  # stop strings are the engine's, for every loader
    # the stream was closed before the loader counted: unknown, never the number of pieces (text pieces are not tokens)
    assert r.completion_tokens is None and r.counts_unknown
    whole = nbllm.generate("one two three", temperature=0)
    assert (whole.text, whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == (
        "three two one", "eos", 3, 3)  # the server's own counts
    record = r.record.to_dict()
    assert record["loader"] == "reverse"
    assert record["model"] == {"name": "mirror", "format": "reverse", "url": "reverse://mirror", "model_id": "rev-1"}
    assert record["prompt"] == "one two banana three four" and record["mode"] == "raw"
    assert set(record["versions"]) == {"python", "nbllm", "pytest"}  # the loader's declared libraries
    assert reverse.requests[-1].prompt_ids is None  # a text loader is never asked to tokenize


def test_chat_magic_sends_messages_to_a_loader_that_renders_chats(shell: Any, reverse: Any, capsys: Any) -> None:
    nbllm.load("reverse://mirror")
    shell.run_cell_magic("llm_chat", "c1 --system 'Be kind.' -o a", "hello there")
    shell.run_cell_magic("llm_chat", "c1 -o b", "how are you")
    out = capsys.readouterr().out
    assert "there hello" in out and "you are how" in out
    assert "note:" not in out  # no fallback-template note: the server renders the chat
    b = shell.user_ns["b"]
    assert reverse.requests[-1].messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "there hello"},
        {"role": "user", "content": "how are you"},
    ]
    assert b.record.mode == "chat" and b.record.conversation == {"name": "c1", "turn": 2}
    assert nbllm.chat.conversation("c1").messages()[-1] == {"role": "assistant", "content": "you are how"}


def test_a_load_option_the_loader_does_not_declare_is_refused_in_one_line(shell: Any, reverse: Any) -> None:
    with pytest.raises(UsageError, match="--load-in-4bit is a transformers option and means nothing to the "
                                         "reverse loader"):
        shell.run_line_magic("llm_load", "reverse://mirror --load-in-4bit")
    assert not nbllm.get_engine().loaded


def test_max_new_tokens_and_cancel_reach_a_text_loader(reverse: Any) -> None:
    nbllm.load("reverse://mirror")
    r = nbllm.generate("a b c d e f", max_new_tokens=2)
    assert (r.text, r.finish_reason, r.completion_tokens) == ("f e", "length", 2)
    reverse.gate = threading.Event()
    stream = nbllm.stream("a b c d e f")
    pieces = iter(stream)
    reverse.gate.set()
    assert next(pieces) == "f"
    stream.cancel()
    rest = "".join(pieces)
    assert stream.finish_reason == "cancelled" and stream.text == "f" + rest and len(stream.text.split()) <= 2


def test_settings_panel_lists_the_loader_shows_its_options_and_the_loaded_model(reverse: Any, tmp_path: Any) -> None:
    pytest.importorskip("ipywidgets")
    from nbllm.widgets import SettingsPanel

    nbllm.load("reverse://mirror")
    panel = SettingsPanel(models_dir=tmp_path)
    try:
        assert "reverse" in panel.load_fields["loader"].input.options
        assert "Loaded mirror with reverse" in panel.status.value
        assert panel.model.value == "reverse://mirror" and panel.loader == "reverse"
        shown = [name for name, f in panel.load_fields.items() if f.shown]
        assert shown == ["loader"]  # the loader declares no other load option
        panel.load()  # Load on the selected (loaded) model: already loaded, nothing else happens
        assert panel.wait(30) and panel.messages.error_text == ""
        assert "mirror is already loaded with these options; nothing was done" in panel.messages.note_text
    finally:
        panel.close()
