"""Conversations: multi-turn chats with the loaded model, rendered through the model's own template.

A :class:`Conversation` keeps a system prompt and the turns (a user message and the reply to it, with
the earlier versions of a regenerated reply). Each call renders the whole history through the
model's chat template (the same rendering as ``%%llm --chat``), so a reply is exactly what the
model would give to that conversation; the loaders keep the computed state of the previous prompt
and reply (``Engine.stream_prompt(..., reuse_prefix=True)``), so turn N only computes what is new. A reply
asked while other callers' requests run (``%llm_serve``'s clients) joins their batch instead
(:mod:`nbllm.scheduler`): it computes its whole prompt, and its text is the same.

Conversations live in a registry by name (:func:`conversation`), shared by the magics and the chat
panel. ``nbllm.Chat`` is :class:`Conversation`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .chat_template import FALLBACK_NOTE, ChatNote, render_chat, starts_with_bos
from .engine import Engine, Prompt, get_engine
from .errors import ChatError, GenerationError
from .frontend import command
from .options import GenerationOptions
from .result import Record, Result
from .tools import (
    INTERRUPTED,
    NOT_RUN,
    Tool,
    ToolCall,
    check_choice,
    parse_tool_calls,
    run_call,
    tools_from,
)

FORMAT = "nbllm.conversation"
"""The ``format`` field of a saved conversation."""
FORMAT_VERSION = 1

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""Marks where the last message ends in a render (transformers' ``continue_final_message`` uses the same)."""

def render_continuation(
    template: str | None, messages: Sequence[Mapping[str, str]], *, special_tokens: dict[str, str]
) -> str:
    """The prompt that lets the model continue the last message (an assistant reply) where it ends.

    Done as transformers' ``apply_chat_template(..., continue_final_message=True)`` does it: the last
    message gets a marker at its end, the chat is rendered without a generation prompt, and the text
    is cut at the marker (with trailing spaces removed when the template trims them).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatError("only an assistant reply can be continued", "send a message first")
    last = dict(messages[-1])
    tagged = [dict(m) for m in messages[:-1]] + [{**last, "content": last["content"] + _CONTINUE_TAG}]
    text = render_chat(template, tagged, special_tokens=special_tokens, add_generation_prompt=False)
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0 or last["content"].strip() not in text:
        raise ChatError(
            "the model's chat template changes the end of the last reply, so it cannot be continued",
            "regenerate the reply instead",
        )
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


@dataclass
class Reply:
    """One version of the model's reply to a user message."""

    content: str
    partial: bool = False
    """The generation was interrupted or cancelled before the model ended it (``--continue`` goes on)."""
    finish_reason: str | None = None
    """Why its last generation ended: ``eos``, ``stop``, ``length``, ``cancelled`` or ``interrupted``."""
    records: list[Record] = field(default_factory=list)
    """The record of each generation that wrote it: the first, then one per continuation."""

    @property
    def record(self) -> Record | None:
        """The record of the generation that wrote it (the latest, for a continued reply)."""
        return self.records[-1] if self.records else None

    @property
    def seed(self) -> int | None:
        return self.records[0].seed if self.records else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "partial": self.partial,
            "finish_reason": self.finish_reason,
            "seeds": [r.seed for r in self.records],
            "records": [r.to_dict() for r in self.records],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "reply") -> Reply:
        """A reply as :meth:`to_dict` writes it; a wrong field raises :class:`ChatError` naming ``where``."""
        data = _object(data, where)
        records = _field(data, "records", where, list, default=[])
        return cls(
            content=_field(data, "content", where, str),
            partial=_field(data, "partial", where, bool, default=False),
            finish_reason=_field(data, "finish_reason", where, str, default=None),
            records=[_record(_object(r, f"{where}, record {i}"), f"{where}, record {i}") for i, r in enumerate(records, 1)],
        )


@dataclass
class ToolStep:
    """In a chat with tools: a reply that called tools (its text outside the calls, the calls with their
    results, and the record of the generation that wrote it), before the turn's final reply."""

    content: str
    calls: list[ToolCall]
    records: list[Record] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        """The assistant message with its ``tool_calls``, then one ``tool`` message per result."""
        return [{"role": "assistant", "content": self.content, "tool_calls": [c.message() for c in self.calls]},
                *[c.result_message() for c in self.calls]]

    def to_dict(self) -> dict[str, Any]:
        return {"content": self.content, "calls": [c.to_dict() for c in self.calls],
                "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "tool step") -> ToolStep:
        data = _object(data, where)
        calls = _field(data, "calls", where, list, default=[])
        records = _field(data, "records", where, list, default=[])
        return cls(_field(data, "content", where, str, default=""),
                   [ToolCall.from_dict(_object(c, f"{where}, call {i}")) for i, c in enumerate(calls, 1)],
                   [_record(_object(r, f"{where}, record {i}"), f"{where}, record {i}") for i, r in enumerate(records, 1)])


@dataclass
class Turn:
    """A user message and the model's reply to it, with the reply's earlier versions (``regenerate``)."""

    user: str
    reply: Reply | None = None
    earlier: list[Reply] = field(default_factory=list)
    """Replies this one replaced, oldest first."""
    parts: list[dict[str, str]] | None = None
    """A message with images: its content parts (text, and images by sha256: :mod:`nbllm.images`);
    ``user`` then holds its text alone. ``None``: a text message."""
    images: list[Any] = field(default_factory=list, repr=False, compare=False)
    """The pixels of its images (:class:`~nbllm.images.ChatImage`), held while the conversation lives;
    never saved (a loaded conversation has the hashes only)."""
    steps: list[ToolStep] = field(default_factory=list)
    """In a chat with tools: the replies that called tools, with the calls' results, before ``reply``."""

    @property
    def shown(self) -> str:
        """The user message as text, each image as ``[image <first digits of its sha256>]``."""
        if not self.parts:
            return self.user
        return "".join(p["text"] if p["type"] == "text" else f"[image {p['sha256'][:12]}]" for p in self.parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Every tool call of this turn, in order, with its result."""
        return [call for step in self.steps for call in step.calls]

    @property
    def interrupted_call(self) -> ToolCall | None:
        """The call whose function a kernel interrupt stopped (the turn then ends with an empty reply marked
        partial), if any."""
        return next((call for call in self.tool_calls if call.interrupted), None)

    @property
    def versions(self) -> list[Reply]:
        """Every version of the reply, the current one last."""
        return [*self.earlier, *([self.reply] if self.reply is not None else [])]

    @property
    def notes(self) -> list[str]:
        """What to show beside the reply: ``partial: <why it ended>``, ``version N of N``."""
        notes = []
        if self.reply is not None and self.reply.partial:
            notes.append(f"partial: {self.reply.finish_reason}")
        if self.earlier:
            notes.append(f"version {len(self.earlier) + 1} of {len(self.earlier) + 1}")
        return notes

    def messages(self, *, reply: bool = True) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "user", "content": [dict(p) for p in self.parts] if self.parts else self.user}]
        for step in self.steps:
            out.extend(step.messages())
        if reply and self.reply is not None:
            out.append({"role": "assistant", "content": self.reply.content})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            **({"parts": [dict(p) for p in self.parts]} if self.parts else {}),
            "reply": self.reply.to_dict() if self.reply is not None else None,
            "earlier": [r.to_dict() for r in self.earlier],
            **({"steps": [s.to_dict() for s in self.steps]} if self.steps else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "turn") -> Turn:
        """A turn as :meth:`to_dict` writes it; a wrong field raises :class:`ChatError` naming ``where``."""
        data = _object(data, where)
        reply = _field(data, "reply", where, dict, default=None)
        earlier = _field(data, "earlier", where, list, default=[])
        parts = _parts(_field(data, "parts", where, list, default=None), where)
        steps = _field(data, "steps", where, list, default=[])
        return cls(
            steps=[ToolStep.from_dict(s, f"{where}, tool step {i}") for i, s in enumerate(steps, 1)],
            user=_field(data, "user", where, str),
            parts=parts,
            reply=Reply.from_dict(reply, f"{where}, reply") if reply is not None else None,
            earlier=[Reply.from_dict(r, f"{where}, earlier reply {i}") for i, r in enumerate(earlier, 1)],
        )


class ContextFullError(ChatError, GenerationError):
    """Even the shortest prompt (the system prompt and the last message, with the reply when
    continuing) fills the model's context: nothing can be generated. One message that says what to do
    (``continuing``: the reply itself fills it, so it cannot go on)."""

    def __init__(self, name: str, tokens: int, context: int, *, continuing: bool) -> None:
        self.continuing = continuing
        if continuing:
            super().__init__(
                f"the last reply and its message are {tokens} tokens: the model's context ({context} tokens) is full, "
                "so the reply cannot be continued",
                f"regenerate it with a lower max_new_tokens, or start over with {command('chat reset', name)}",
            )
        else:
            super().__init__(
                f"the last message is {tokens} tokens with the system prompt and the model's context holds {context}",
                "shorten the message or the system prompt",
            )


@dataclass
class _Prompt:
    text: str
    ids: list[int] | None
    messages: list[dict[str, Any]]
    left_out: int
    notes: list[str]
    images: list[Any] = field(default_factory=list)


class Conversation:
    """A chat with the loaded model: a system prompt and turns, rendered through the model's template.

    ``send`` adds a user message and streams the reply; ``regenerate`` replaces the last reply (the
    earlier versions are kept); ``continue_reply`` extends it. A turn is added when its reply ends: a
    failed generation adds nothing, an interrupted one is kept and marked ``partial``. When the
    history would not leave ``max_new_tokens`` free in the context, the oldest turns are left out of
    the prompt (never the system prompt), with a note in ``notes`` and a :class:`ChatNote` warning.

    Thread-safe: the chat panel sends from a worker thread; one reply is generated at a time per
    conversation (the engine runs one generation at a time overall).
    """

    def __init__(self, name: str = "chat", system: str | None = None, *, engine: Engine | None = None,
                 model: str | None = None) -> None:
        self.name = name
        self.model = model
        """The name of the model it talks to (``%llm_load MODEL --as NAME``; ``None``: the unnamed model).
        Its turns stay when it changes: the next reply comes from the new model."""
        self.system = system
        """The system prompt ('' or None: none)."""
        self.turns: list[Turn] = []
        self.notes: list[str] = []
        """What the last prompt did that this conversation had not said yet (turns left out, the
        fallback template). Each is said to the user once, as a :class:`ChatNote` warning (the magics
        show it as a ``note:`` line, the chat panel in its note line); this list is for code."""
        self.left_out = 0
        """How many of the oldest turns the last prompt left out to fit the context."""
        self._engine = engine
        self._lock = threading.RLock()
        self._pending: Result | None = None
        self._said: set[str] = set()

    @property
    def engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        if self.model is not None:
            from .registry import engine_for

            return engine_for(self.model)
        return get_engine()

    # -- what it holds ---------------------------------------------------------------------------
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation as ``{"role", "content"}`` messages (system prompt first, if any)."""
        with self._lock:
            return self._messages(self.turns)

    def _messages(self, turns: Sequence[Turn], *, last_reply: bool = True) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for i, turn in enumerate(turns):
            out.extend(turn.messages(reply=last_reply or i < len(turns) - 1))
        return out

    def __len__(self) -> int:
        return len(self.turns)

    @property
    def generating(self) -> bool:
        """Whether a reply of this conversation is being generated (or was started and not read).

        It stays true until the reply is in the turns, so a message sent meanwhile from another
        thread is refused rather than rendered without it."""
        return self._pending is not None

    # -- talking ---------------------------------------------------------------------------------
    def reply(
        self,
        message: str | Sequence[Any] | None = None,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        regenerate: bool = False,
        continue_: bool = False,
        system: str | None = None,
        tools: Sequence[Any] | Mapping[str, Any] | None = None,
        tool_choice: str = "auto",
        max_tool_calls: int = 5,
        on_tool_call: Callable[[ToolCall], None] | None = None,
        on_reply: Callable[[Result], None] | None = None,
        **kwargs: Any,
    ) -> Result:
        """The next reply, as a front end asks for it: to ``message`` (:meth:`send`: text, or text pieces and
        images), or the last reply
        written again (``regenerate``) or extended (``continue_``), which take no message.

        ``system`` sets the system prompt first ('' removes it; None keeps it). The chat magic and the
        chat panel call this, so the rules are the same everywhere. ``tools`` and the arguments after it:
        see :meth:`send`.
        """
        if regenerate and continue_:
            raise ChatError("regenerate and continue cannot be used together", "choose one of them")
        if (regenerate or continue_) and message is not None and _has_content(message):
            what = "regenerate" if regenerate else "continue"
            raise ChatError(f"{what} takes no message (it works on the last reply)", "leave the message out")
        with self._lock:
            if system is not None:
                self._check_idle()
                self.system = system
            if tools and (regenerate or continue_):
                raise ChatError("tools are used with a new message, not with regenerate or continue",
                                "send a new message with the tools")
            if tools:  # a new message: the loop hands each of its replies to on_reply itself
                return self.send(message or "", options, tools=tools, tool_choice=tool_choice,
                                 max_tool_calls=max_tool_calls, on_tool_call=on_tool_call, on_reply=on_reply, **kwargs)
            if regenerate:
                result = self.regenerate(options, **kwargs)
            elif continue_:
                result = self.continue_reply(options, **kwargs)
            else:
                result = self.send(message or "", options, **kwargs)
        return _handed(result, on_reply)

    def send(
        self,
        text: str | Sequence[Any],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        tools: Sequence[Any] | Mapping[str, Any] | None = None,
        tool_choice: str = "auto",
        max_tool_calls: int = 5,
        on_tool_call: Callable[[ToolCall], None] | None = None,
        on_reply: Callable[[Result], None] | None = None,
        **kwargs: Any,
    ) -> Result:
        """Send ``text`` as the user's next message; iterate the returned result to stream the reply.

        A message with images is a list of text pieces and images in order (``["What is in", img, "?"]``;
        an image is a PIL image, a numpy array or a ``pathlib.Path``: :func:`nbllm.images.as_image`); the
        model must take images (a vision model), else :class:`~nbllm.errors.ImageError` says so in one line.

        Keyword arguments are :class:`~nbllm.options.GenerationOptions` fields. The turn is added
        when the reply ends (kept as ``partial`` if interrupted; not added if generation fails). An
        empty message (or only spaces) is refused; so is a message after a user message that has no
        reply yet (a loaded file can end that way: :meth:`regenerate` answers it).

        ``tools`` (functions, or ``{name: function}``) may be called by the model (:mod:`nbllm.tools`):
        its template renders them; each reply that calls tools is read, the functions run here, their
        results go back as ``tool`` messages and the model replies again, until a reply calls nothing or
        ``max_tool_calls`` calls were made. ``on_tool_call`` sees each call with its result as it ends.
        ``tool_choice``: ``auto``, ``none``, ``required`` or a tool's name (the first reply is then held to
        one such call by the structured-output engine; the replies after it are ``auto``). The calls are
        in the turn (``steps``, ``tool_calls``); the returned result is the final reply, already generated.

        ``on_reply`` (a front end's way to stream): each reply is passed to it as it starts, before it is
        read, so it can iterate it as it is generated; the reply is then read to its end. With tools that is
        every reply of the loop: those that call tools (then ``on_tool_call`` sees their calls) and the final
        one. The returned result is then already read. An error or interrupt raised by ``on_reply`` ends the
        loop: what the turn had (its calls, and the reply so far, marked ``partial``) is kept.
        """
        if tools:
            return self._send_with_tools(text, options, kwargs, tools_from(tools), tool_choice, max_tool_calls,
                                         on_tool_call, on_reply)
        with self._lock:
            self._check_idle()
            if not _has_content(text):
                raise ChatError("the message is empty", "write the message to send")
            if self.turns and self.turns[-1].reply is None:
                raise ChatError(
                    f"the last message of conversation {self.name!r} has no reply yet, so a new one would make two "
                    "user messages in a row",
                    f"answer it first with regenerate ({command('chat regenerate', self.name)})",
                )
            turn = _user_turn(text)
            result = self._start([*self.turns, turn], options, kwargs, number=len(self.turns) + 1,
                                 open_reply=False, on_reply=lambda reply: self.turns.append(_with(turn, reply)))
        return _handed(result, on_reply)

    def regenerate(self, options: GenerationOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> Result:
        """Generate the last reply again; it replaces the current one, which is kept in ``earlier``."""
        with self._lock:
            self._check_idle()
            if not self.turns:
                raise ChatError(f"conversation {self.name!r} has no reply to regenerate", "send a message first")
            last = self.turns[-1]

            def replace(reply: Reply) -> None:
                if last.reply is not None:
                    last.earlier.append(last.reply)
                last.reply = reply

            return self._start([*self.turns[:-1], Turn(user=last.user, parts=last.parts, images=last.images)], options, kwargs, number=len(self.turns),
                               open_reply=False, on_reply=replace)

    def continue_reply(self, options: GenerationOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> Result:
        """Extend the last reply: the model goes on from where it ended (e.g. after an interruption or
        ``max_new_tokens``). The returned result holds only the new text; the reply gets all of it."""
        with self._lock:
            self._check_idle()
            if not self.turns or self.turns[-1].reply is None:
                raise ChatError(f"conversation {self.name!r} has no reply to continue", "send a message first")
            reply = self.turns[-1].reply

            def extend(more: Reply) -> None:
                reply.content += more.content
                reply.partial, reply.finish_reason = more.partial, more.finish_reason
                reply.records.extend(more.records)

            return self._start(list(self.turns), options, kwargs, number=len(self.turns), open_reply=True,
                               on_reply=extend)

    continue_ = continue_reply

    def reset(self) -> int:
        """Forget every turn (the system prompt and the name stay). Returns how many were forgotten."""
        with self._lock:
            self._check_idle()
            n = len(self.turns)
            self.turns = []
            self.notes, self.left_out = [], 0
            return n

    def _check_idle(self) -> None:
        if self.generating:
            raise ChatError(
                f"a reply of conversation {self.name!r} is still being generated (or was started and not read)",
                "wait for it, or read it to the end with .text on its result (after .cancel() to stop it early)",
            )

    def _start(
        self,
        turns: list[Turn],
        options: GenerationOptions | Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
        *,
        number: int,
        open_reply: bool,
        on_reply: Callable[[Reply], None],
        tools: Sequence[Tool] | None = None,
        tool_choice: str | None = None,
    ) -> Result:
        """Render ``turns`` (the last one is being answered), start the generation and arrange for
        ``on_reply`` to receive the reply when it ends well or is interrupted."""
        engine = self.engine
        opts = engine.generation_options(options, **kwargs)
        _hold_images(turns)
        prompt = self._prompt(engine, turns, open_reply=open_reply, max_new_tokens=opts.max_new_tokens,
                              tools=[t.schema for t in tools] if tools else None)
        self.notes = [note for note in prompt.notes if note not in self._said]
        self.left_out = prompt.left_out
        self._said.update(self.notes)
        for note in self.notes:
            warnings.warn(note, ChatNote, stacklevel=3)
        result = engine.stream_front(  # alone: as the engine runs it; beside others: batched with them
            Prompt(prompt.text, prompt.ids, prompt.messages, prompt.images,
                   tools=[t.schema for t in tools] if tools else None, tool_choice=tool_choice), opts,
            conversation={"name": self.name, "turn": number}, reuse_prefix=True, continue_final=open_reply,
        )
        self._pending = result

        def finished(res: Result) -> None:
            with self._lock:
                if self._pending is res:
                    self._pending = None
                if res.finish_reason == "error" or (res.superseded and not res.chunks):
                    return  # failed, or never started: no broken turn
                records = [res.pending_record]  # completed when read or saved, not now
                on_reply(Reply("".join(res.chunks), res.interrupted, res.finish_reason, records))

        result.on_done(finished)
        return result

    def _send_with_tools(
        self,
        text: str | Sequence[Any],
        options: GenerationOptions | Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
        tools: list[Tool],
        tool_choice: str,
        max_tool_calls: int,
        on_tool_call: Callable[[ToolCall], None] | None,
        on_reply: Callable[[Result], None] | None = None,
    ) -> Result:
        """:meth:`send` with tools: the loop of replies, calls and results (see there)."""
        with self._lock:
            self._check_idle()
            if not _has_content(text):
                raise ChatError("the message is empty", "write the message to send")
            if self.turns and self.turns[-1].reply is None:
                raise ChatError(f"the last message of conversation {self.name!r} has no reply yet",
                                f"answer it first with regenerate ({command('chat regenerate', self.name)})")
            if isinstance(max_tool_calls, bool) or not isinstance(max_tool_calls, int) or max_tool_calls < 0:
                raise ChatError(f"max_tool_calls is {max_tool_calls!r}", "give a whole number, 0 or more")
            choice = check_choice(tool_choice, tools)
            self.engine.loader.tool_calling()  # a model that cannot take tools: one line, before anything runs
            turn = _user_turn(text)
            number, made = len(self.turns) + 1, 0
            while True:
                # asked each round: a replay that misses with fallback "run" loads the real model midway
                calling = self.engine.loader.tool_calling()
                # a server renders the tools and holds a forced call itself; a local model gets a grammar
                # (only the first reply is forced: the replies after the results are auto)
                grammar, passed = calling.holding(tools, choice if made == 0 else "auto")
                extra = {**kwargs, "grammar": grammar} if grammar is not None else dict(kwargs)
                got: list[Reply] = []
                sent = self._messages([*self.turns, turn], last_reply=False)
                result = self._start([*self.turns, turn], options, extra, number=number, open_reply=False,
                                     on_reply=got.append, tools=None if choice == "none" else tools,
                                     tool_choice=passed)
                try:
                    _ = _handed(result, on_reply).text
                except BaseException:
                    result.close()  # a front end that stopped reading (an interrupt): the reply ends where it is
                    if got:  # kept, marked partial, with the calls before it, as a reply without tools is
                        self.turns.append(_with(turn, got[0]))
                    raise
                if not got:  # failed or never started: no broken turn
                    return result
                reply = got[0]
                content, calls = ((reply.content, []) if choice == "none" or reply.partial
                                  else parse_tool_calls(reply.content, calling.format,
                                                        context=json.dumps(sent, sort_keys=True, default=str)))
                if not calls or made >= max_tool_calls:
                    if calls:
                        note = (f"the reply calls tools after the {max_tool_calls} calls allowed (max_tool_calls): "
                                "they were not run")
                        self.notes.append(note)
                        warnings.warn(note, ChatNote, stacklevel=3)
                    self.turns.append(_with(turn, reply))
                    return result
                running: ToolCall | None = None
                try:
                    for call in calls:
                        running = call
                        run_call(call, tools)
                        running = None
                        made += 1
                        if on_tool_call is not None:
                            on_tool_call(call)
                except BaseException:
                    # an interrupt while a function ran (or a front end's error): the turn is kept, its calls
                    # all answered (the one running marked interrupted, those after it not run) so the next
                    # message, or continue, renders a whole conversation; its reply is empty, marked partial
                    for call in calls:
                        if call.result is None:
                            call.interrupted = call is running
                            call.result, call.error = (INTERRUPTED if call is running else NOT_RUN), True
                    turn.steps.append(ToolStep(content, calls, reply.records))
                    self.turns.append(_with(turn, Reply("", True, "interrupted")))
                    raise
                turn.steps.append(ToolStep(content, calls, reply.records))

    def _prompt(self, engine: Engine, turns: list[Turn], *, open_reply: bool, max_new_tokens: int,
                tools: list[dict[str, Any]] | None = None) -> _Prompt:
        """The prompt for ``turns``, leaving out the oldest ones while it would leave less than
        ``max_new_tokens`` of the context free (the system prompt and the last turn always stay)."""
        loader = engine.loader
        notes = [FALLBACK_NOTE] if loader.chat_template is None and not loader.renders_chat else []

        def render(start: int) -> _Prompt:
            messages = self._messages(turns[start:], last_reply=open_reply)
            if open_reply and not loader.renders_chat:
                text = render_continuation(loader.chat_template, loader.template_messages(messages),
                                           special_tokens=loader.special_tokens)
                images = engine.images_for(messages)
                ids = engine.prompt_ids(text, add_special=not starts_with_bos(text, loader.special_tokens), images=images)
                return _Prompt(text, ids, messages, start, notes, images)
            ready = engine.prompt_for(messages, chat=True, warn_fallback=False, tools=tools)
            return _Prompt(ready.text, ready.ids, messages, start, notes, ready.images)

        context = loader.context_length
        budget = None if context is None else context - max_new_tokens
        prompt = render(0)
        if budget is None or prompt.ids is None or len(prompt.ids) <= budget:
            return prompt
        # Fewer turns, fewer tokens: find the fewest turns to leave out by bisection.
        lo, hi, best = 1, len(turns) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = render(mid)
            if candidate.ids is not None and len(candidate.ids) <= budget:
                best, hi = candidate, mid - 1
            else:
                lo = mid + 1
        if best is None:
            best = render(len(turns) - 1) if len(turns) > 1 else prompt
            assert context is not None and best.ids is not None
            if len(best.ids) >= context:
                raise ContextFullError(self.name, len(best.ids), context, continuing=open_reply)
            notes.append(
                f"the prompt is {len(best.ids)} tokens even with only the system prompt and the last message: "
                f"{max(context - len(best.ids), 0)} of the {max_new_tokens} new tokens asked for fit in the "
                f"model's context ({context} tokens)"
            )
        if best.left_out:
            notes.append(
                f"the conversation does not fit in the model's context ({context} tokens, {max_new_tokens} kept "
                f"for the reply): the {best.left_out} oldest turn{'s are' if best.left_out > 1 else ' is'} left "
                "out of the prompt (the system prompt is kept)"
            )
        return best

    # -- saving ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The conversation as saved: the messages, then every turn with its versions, seeds and records."""
        with self._lock:
            last = next((t.reply.record for t in reversed(self.turns) if t.reply and t.reply.record), None)
            return {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "name": self.name,
                "system": self.system,
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": last.model if last else None,
                "options": last.generation_options if last else None,
                "messages": self._messages(self.turns),
                "turns": [t.to_dict() for t in self.turns],
            }

    def save(self, path: str | Path) -> Path:
        """Write the conversation to ``path`` as JSON (UTF-8); returns the path."""
        target = Path(path).expanduser()
        data = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)
        try:
            target.write_text(data + "\n", encoding="utf-8")
        except OSError as exc:
            raise ChatError(f"cannot write {target}: {exc.strerror or exc}", "check the folder exists and is writable") from None
        return target

    @classmethod
    def from_dict(cls, data: Any, *, name: str | None = None) -> Conversation:
        """A conversation from :meth:`to_dict`'s form, or from a plain list of ``{"role", "content"}``
        messages (as other tools write them): an optional system message first, then user and assistant
        messages alternating; the last user message may have no reply yet.

        Anything else raises :class:`~nbllm.errors.ChatError` in one line naming what is wrong and
        where (``message 3``, ``turn 2, reply``, the field).
        """
        if isinstance(data, list):
            data = {"messages": data}
        data = _object(data, "the file")
        if data.get("format", FORMAT) != FORMAT:
            raise ChatError(f"this is not an nbllm conversation (format {data.get('format')!r})",
                            f"load a file written by {command('history save', 'FILE')}")
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ChatError(f"'version' is {version!r}, not a format version", f"this nbllm writes version {FORMAT_VERSION}")
        if version > FORMAT_VERSION:
            raise ChatError(f"the file is in version {version} of the conversation format; this nbllm reads up to "
                            f"version {FORMAT_VERSION}", "update nbllm to load it")
        if "turns" not in data and "messages" not in data:
            raise ChatError("the file holds neither 'messages' nor 'turns'", _FILE_FIX)
        conv = cls(name or _field(data, "name", "the file", str, default=None) or "chat",
                   _field(data, "system", "the file", str, default=None))
        if "turns" in data:
            turns = _field(data, "turns", "the file", list)
            conv.turns = [Turn.from_dict(t, f"turn {i}") for i, t in enumerate(turns, 1)]
            for i, turn in enumerate(conv.turns[:-1], 1):
                if turn.reply is None:
                    raise ChatError(f"turn {i} has no reply, but turn {i + 1} follows it (two user messages in a row)",
                                    _FILE_FIX)
            if "messages" in data:
                messages = [_message(m, i) for i, m in enumerate(_field(data, "messages", "the file", list), 1)]
                expected = conv._messages(conv.turns)
                if messages != expected:
                    at = next((i for i, (a, b) in enumerate(zip(messages, expected), 1) if a != b),
                              min(len(messages), len(expected)) + 1)
                    raise ChatError(f"'messages' and 'turns' disagree at message {at}",
                                    "edit both the same way, or remove 'messages' (turns holds everything)")
            return conv
        for i, raw in enumerate(_field(data, "messages", "the file", list), 1):
            message = _message(raw, i)
            role, content = message["role"], message["content"]
            last = conv.turns[-1] if conv.turns else None
            if role == "system" and i == 1:
                conv.system = content
            elif role == "user" and (last is None or last.reply is not None):
                if isinstance(content, list):
                    from .images import content_text

                    conv.turns.append(Turn(user=content_text(content), parts=content))
                else:
                    conv.turns.append(Turn(user=content))
            elif role == "assistant" and last is not None and last.reply is None:
                last.reply = Reply(content)
            else:
                what = {"system": "a system message that is not the first message",
                        "user": "a user message right after another user message",
                        "assistant": "an assistant message that answers no user message",
                        "tool": "a tool result outside a saved turn (a chat with tools is read from its 'turns')",
                        }[role]
                raise ChatError(
                    f"message {i} is {what}",
                    "fix the file: an optional system message first, then user and assistant messages alternating",
                )
        return conv

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None) -> Conversation:
        """Read a conversation saved with :meth:`save` (or a JSON list of messages); ``name`` renames it."""
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ChatError(f"cannot read {source}: {exc.strerror or exc}", "check the path") from None
        except ValueError as exc:
            raise ChatError(f"{source} is not valid JSON ({exc})", f"load a file written by {command('history save', 'FILE')}") from None
        try:
            return cls.from_dict(data, name=name)
        except ChatError as exc:
            raise ChatError(f"{source}: {exc.cause}", exc.fix) from None

    # -- showing ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<nbllm.Conversation {self.name!r}: {len(self.turns)} turns>"

    def __str__(self) -> str:
        with self._lock:
            lines = [f"Conversation {self.name!r} ({_count(len(self.turns))})"]
            if self.system:
                lines.append(_block("system", self.system))
            for turn in self.turns:
                lines.append(_block("user", turn.shown))
                if turn.reply is not None:
                    lines.append(_block("assistant", turn.reply.content, _marks(turn)))
            return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        bubble = "white-space: pre-wrap; padding: 6px 10px; margin: 6px 0; border-radius: 8px; "
        styles = {
            "system": "white-space: pre-wrap; padding: 4px 10px; margin: 6px 0; border-left: 3px solid "
                      "rgba(128,128,128,.6); opacity: .85;",
            "user": bubble + "margin-left: 15%; background: rgba(66,133,244,.14);",
            "assistant": bubble + "margin-right: 15%; background: rgba(128,128,128,.12);",
        }

        def box(role: str, content: str, marks: str = "") -> str:
            extra = f" <span style='opacity:.6'>{html.escape(marks)}</span>" if marks else ""
            return (f"<div class='nbllm-chat-{role}' style='{styles[role]}'><small style='opacity:.6'>{role}</small>"
                    f"{extra}<br>{html.escape(content)}</div>")

        with self._lock:
            parts = [f"<div class='nbllm-chat' style='max-width: 52em'><small style='opacity:.6'>Conversation "
                     f"<b>{html.escape(self.name)}</b> · {_count(len(self.turns))}</small>"]
            if self.system:
                parts.append(box("system", self.system))
            for turn in self.turns:
                parts.append(box("user", turn.shown) + _thumbnails(turn))
                if turn.reply is not None:
                    parts.append(box("assistant", turn.reply.content, _marks(turn)))
            parts.append("</div>")
            return "".join(parts)


def _thumbnails(turn: Turn) -> str:
    """The images a turn still holds, small, under its message (HTML)."""
    return "".join(f"<img src='{image.data_url()}' title='sha256 {image.sha256}' style='max-height: 96px; "
                   "margin: 0 0 6px 15%; image-rendering: pixelated'>" for image in turn.images)


def _has_content(message: str | Sequence[Any]) -> bool:
    """Whether a message says anything: text beyond spaces, or an image."""
    if isinstance(message, str):
        return bool(message.strip())
    return any(not isinstance(piece, str) or piece.strip() for piece in message)


def _user_turn(message: str | Sequence[Any]) -> Turn:
    """The turn of a user message: text, or text pieces and images (content parts, the pixels held)."""
    if isinstance(message, str):
        return Turn(user=message)
    from .images import as_image, content_text, parts

    pieces = [piece if isinstance(piece, (str, Mapping)) else as_image(piece, f"image {i}")
              for i, piece in enumerate(message, 1)]
    content = parts(pieces)
    images = [piece for piece in pieces if not isinstance(piece, (str, Mapping))]
    if not images:
        return Turn(user=content_text(content))
    return Turn(user=content_text(content), parts=content, images=images)


def _hold_images(turns: Sequence[Turn]) -> None:
    """Put the pixels the turns hold back in the image store (a long session may have let them go)."""
    from .images import remember

    for turn in turns:
        for image in turn.images:
            remember(image)


def _parts(value: list[Any] | None, where: str) -> list[dict[str, str]] | None:
    if value is None:
        return None
    from .errors import ImageError
    from .images import check_part

    try:
        return [check_part(p, f"{where}, part {i}") for i, p in enumerate(value, 1)]
    except ImageError as exc:
        raise ChatError(exc.cause, _FILE_FIX) from None


def _handed(result: Result, on_reply: Callable[[Result], None] | None) -> Result:
    """``result`` passed to ``on_reply`` (a front end streams it there), then read to its end; as it is
    without ``on_reply``."""
    if on_reply is not None:
        on_reply(result)
        _ = result.text
    return result


def _with(turn: Turn, reply: Reply) -> Turn:
    turn.reply = reply
    return turn


_FILE_FIX = "correct the file (its format is in docs/chat.md), or save the conversation again"
_ROLES = ("system", "user", "assistant", "tool")


def _kind(value: Any) -> str:
    """How a JSON value is called in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {str: "text", list: "a list", dict: "an object", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ChatError(f"{where} is {_kind(value)}, not an object", _FILE_FIX)
    return value


_MISSING = object()


def _field(data: Mapping[str, Any], key: str, where: str, kind: type, default: Any = _MISSING) -> Any:
    """``data[key]`` checked to be a ``kind``; missing (or null, when the default is None) gives ``default``."""
    value = data.get(key, _MISSING)
    if value is _MISSING or (value is None and default is None):
        if default is _MISSING:
            raise ChatError(f"{where} has no {key!r}", _FILE_FIX)
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        words = {str: "text", bool: "true or false", list: "a list", dict: "an object"}[kind]
        raise ChatError(f"{where}: {key!r} is {_kind(value)}, not {words}", _FILE_FIX)
    return value


def _message(value: Any, number: int) -> dict[str, Any]:
    """Message ``number`` of a file: ``{"role", "content"}`` with a known role and text content, or (a user
    message with images) content parts (and a tool chat's ``tool_calls`` / ``tool_call_id`` / ``name``, kept as
    they are)."""
    where = f"message {number}"
    data = _object(value, where)
    role = _field(data, "role", where, str)
    if role not in _ROLES:
        raise ChatError(f"{where}: 'role' is {role!r}, not one of {', '.join(_ROLES)}", _FILE_FIX)
    if role == "user" and isinstance(data.get("content"), list):  # a message with images: content parts
        return {"role": role, "content": _parts(data["content"], where)}
    return {"role": role, "content": _field(data, "content", where, str),
            **{k: data[k] for k in ("tool_calls", "tool_call_id", "name") if k in data}}


def _record(data: Mapping[str, Any], where: str) -> Record:
    known = {f.name for f in fields(Record)}
    values = {k: v for k, v in data.items() if k in known}
    for f in fields(Record):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ChatError(f"{where} has no {f.name!r}", _FILE_FIX)
    return Record.from_dict(values)  # its tuple options (stop, choice) become tuples again


def _count(n: int) -> str:
    return f"{n} turn" + ("" if n == 1 else "s")


def _marks(turn: Turn) -> str:
    return " ".join(f"[{note}]" for note in turn.notes)


def _block(role: str, content: str, marks: str = "") -> str:
    head = f"{role}:" + (f" {marks}" if marks else "")
    body = "\n".join("  " + line for line in (content.splitlines() or [""]))
    return f"{head}\n{body}"


# -- the registry ------------------------------------------------------------------------------------
_CONVERSATIONS: dict[str, Conversation] = {}
_REGISTRY_LOCK = threading.Lock()


def conversation(name: str = "default", *, create: bool = True) -> Conversation:
    """The conversation called ``name``, created empty the first time (shared by magics and panels).

    ``create=False`` raises :class:`~nbllm.errors.ChatError` for a name that does not exist.
    """
    with _REGISTRY_LOCK:
        if name not in _CONVERSATIONS:
            if not create:
                existing = ", ".join(sorted(_CONVERSATIONS)) or "none yet"
                raise ChatError(f"there is no conversation named {name!r} (existing: {existing})",
                                f"start it with {command('chat', name)}, or load it with {command('history load', name, 'FILE')}")
            _CONVERSATIONS[name] = Conversation(name)
        return _CONVERSATIONS[name]


def conversations() -> dict[str, Conversation]:
    """Every registered conversation, by name."""
    with _REGISTRY_LOCK:
        return dict(_CONVERSATIONS)


def load_conversation(path: str | Path, name: str | None = None) -> Conversation:
    """Read a saved conversation and register it under ``name`` (default: the name saved with it),
    replacing any conversation of that name."""
    conv = Conversation.load(path, name=name)
    with _REGISTRY_LOCK:
        old = _CONVERSATIONS.get(conv.name)
        if old is not None and old.generating:
            raise ChatError(f"conversation {conv.name!r} is generating a reply", "wait for it, or load under another name")
        _CONVERSATIONS[conv.name] = conv
    return conv


def forget(name: str) -> bool:
    """Remove a conversation from the registry; returns whether it was there."""
    with _REGISTRY_LOCK:
        return _CONVERSATIONS.pop(name, None) is not None


__all__ = [
    "FORMAT", "ChatNote", "ContextFullError", "Conversation", "Reply", "ToolStep", "Turn", "conversation", "conversations", "forget",
    "load_conversation", "render_continuation",
]
