"""The result of one generation: streamed text, counts, timings, the seed and the run record."""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import functools
import html
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .identity import record_identity

GRACE_SECONDS = 1.0
"""How long a reader on another thread may spend between two pieces before its result counts as
left half read (and another request may stop it) rather than being read."""


@functools.cache
def _installed_versions(dists: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Looked up once per process and set of libraries: reading package metadata costs milliseconds,
    and the libraries a process has imported do not change under it."""
    import importlib.metadata  # here, not at import (nor platform): %load_ext imports this module
    import platform

    from ._version import __version__

    out = {"python": platform.python_version(), "nbllm": __version__}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(out.items())


def library_versions(libraries: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of Python, nbllm and ``libraries`` (a loader's :attr:`Loader.libraries`)."""
    return dict(_installed_versions(tuple(libraries)))


@dataclass
class Record:
    """Everything needed to reproduce an output: model, options, seed, prompt and versions."""

    model: dict[str, Any]
    """name, path, format, revision (hub commit) and/or sha256 of the weights."""
    loader: str
    load_options: dict[str, Any]
    generation_options: dict[str, Any]
    seed: int
    prompt: str
    mode: str = "raw"
    """``raw`` (text as is) or ``chat`` (rendered through the model's chat template)."""
    messages: list[dict[str, str]] | None = None
    conversation: dict[str, Any] | None = None
    """For chat replies: the conversation's name and the turn number."""
    reused_prefix_tokens: int = 0
    """Prompt tokens taken from the previous turn's computed state (chat prefix reuse), not computed.
    0 means the whole prompt was computed, as a re-run with the recorded seed computes it."""
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    """Names this record in the run log, in sweep tables and in replays."""
    seed_drawn: bool | None = None
    """True when the request gave no seed and this one was drawn (a request without a seed replays it);
    None in records written before nbllm said."""
    batch: dict[str, Any] | None = None
    """For a row generated in a padded batch: the batch's ``id``, its ``size`` and this ``row``."""
    replayed: dict[str, Any] | None = None
    """For a result answered from a recording instead of a model: the ``source`` and the ``run`` in it."""
    model_name: str | None = None
    """The name the model was loaded as (``%llm_load MODEL --as NAME``, ``nbllm.load(..., name=)``), so each
    output of a comparison says whose it is; ``None`` for the unnamed model. Not part of the request's identity."""
    logprobs: list[dict[str, Any]] | None = None
    """What came out, with ``--logprobs K``: one entry per new token (``id``, ``token``, ``logprob`` and the
    ``top`` K alternatives as ``[token, id, logprob]``), so the run log and a replay keep them
    (:mod:`nbllm.tokens`). Not part of the request's identity."""
    tools: list[dict[str, Any]] | None = None
    """In a chat with tools: the JSON schemas of the functions the model could call (part of the identity)."""
    tool_choice: Any = None
    """In a chat with tools at a server: the ``tool_choice`` passed on (part of the identity). A local
    model's forced call is its ``grammar`` generation option instead."""
    tool_calling: dict[str, Any] | None = None
    """In a chat with tools: how the model took them (:class:`nbllm.tools.ToolCalling`: the call format, and
    whether a server held them), so a replay sends the same requests. Not part of the identity."""

    def __post_init__(self) -> None:
        self._later: dict[str, concurrent.futures.Future[Any]] = {}
        self._completing = threading.Lock()  # the run log's writer and a cell's output complete it at once

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """A record as :meth:`to_dict` wrote it (keys this version does not know are left out; JSON's
        lists of options become tuples again: stop, choice, logit_bias, sampler_priority, every option that is a
        tuple). A missing required field raises ``KeyError``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        options = values.get("generation_options")
        if isinstance(options, Mapping) and any(isinstance(v, list) for v in options.values()):
            values["generation_options"] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(**values)

    def complete_later(self, key: str, value: concurrent.futures.Future[Any]) -> None:
        """``model[key]`` is being computed in the background (the weights' sha256): it is filled in
        when first asked for (:meth:`complete`, :meth:`to_dict`), so no generation waits for it."""
        self._later[key] = value

    def complete(self) -> Record:
        """Fill in what was being computed in the background (waits for it if needed)."""
        with self._completing:
            while self._later:
                key, future = next(iter(self._later.items()))
                try:
                    self.model[key] = future.result()
                except Exception as exc:  # a file that vanished or cannot be read: say so, keep the record
                    self.model[key] = f"unavailable ({type(exc).__name__})"
                del self._later[key]
        return self

    def identity(self) -> dict[str, Any]:
        """The identity of the request this record answered: what a replay matches on, and the run
        log's ``identity`` column hashes (:mod:`nbllm.identity`)."""
        return record_identity(self)

    def to_dict(self) -> dict[str, Any]:
        self.complete()
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)


@dataclass
class Timings:
    """Seconds and rates of one generation."""

    time_to_first_token: float | None = None
    total_seconds: float = 0.0
    decode_tokens_per_second: float | None = None
    """Tokens per second after the first one (the decode speed)."""
    compile_seconds: float | None = None
    """Seconds spent compiling before the first token (``--compile``'s first generation of a cache size);
    included in ``time_to_first_token``."""
    grammar_seconds: float | None = None
    """Seconds spent compiling the output's constraint (structured output) for this model's tokenizer; 0
    when it came from the cache, ``None`` without a constraint. Included in ``time_to_first_token``."""
    draft_tokens: int | None = None
    """Speculative decoding (``--prompt-lookup``, ``--draft-model``): tokens drafted for the model to check;
    ``None`` without it."""
    accepted_tokens: int | None = None
    """Of :attr:`draft_tokens`, the ones the model accepted (it would have produced them itself)."""
    speculative: str | None = None
    """How the tokens were drafted: ``prompt lookup`` or ``draft model``."""

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted tokens (``None`` when nothing was drafted)."""
        return (self.accepted_tokens or 0) / self.draft_tokens if self.draft_tokens else None


class Result:
    """One generation. Iterating streams the text as it is produced; ``.text`` waits for all of it.

    A result can be iterated again after it finished (it replays the chunks). ``cancel()`` stops the
    generation from another thread (the chat panel's Stop); a KeyboardInterrupt while iterating stops
    it too, keeps the partial text, sets ``interrupted`` and propagates.
    """

    def __init__(self, prompt: str, seed: int, record: Record | None = None) -> None:
        self.prompt = prompt
        self.seed = seed
        self.chunks: list[str] = []
        self.token_ids: list[int] = []
        self.prompt_tokens: int | None = 0
        """Tokens of the prompt (``None``: an engine that gives text did not say)."""
        self.counted_tokens: int | None = None
        """New tokens as counted by an engine that gives text, not token ids (a server)."""
        self.counts_unknown = False
        """True when the engine behind gave text without saying how many tokens it was (then
        :attr:`completion_tokens` is ``None``, never a guess)."""
        self.reasoning = ""
        """The reasoning (thinking) text a server sent beside the reply, kept apart from :attr:`text`."""
        self.finish_reason: str | None = None
        """``eos`` (the model ended), ``stop`` (a stop string), ``length`` (max_new_tokens),
        ``context`` (the model's context is full), ``cancelled`` (cancel()), ``interrupted``
        (KeyboardInterrupt), ``superseded`` (another request needed the model while this result was
        left unfinished) or ``error``."""
        self.timings = Timings()
        self.pending_record = record if record is not None else Record({}, "", {}, {}, seed, prompt)
        """The record, before the result finishes (then it is :attr:`record`)."""
        self.cancel_event = threading.Event()
        self.superseded = False
        self._source: Iterator[str] | None = None
        self._filled = False
        self._running: Iterator[str] | None = None
        self._done = threading.Event()
        self._on_done: list[Callable[[Result], None]] = []
        self._callbacks_lock = threading.Lock()
        self._reader: threading.Thread | None = threading.current_thread()
        self._reading = False
        self._touched = time.monotonic()

    # -- streaming -------------------------------------------------------------------------------
    def attach(self, source: Iterator[str], *, filled: bool = False) -> Result:
        """Take the text from ``source`` as it is read. ``filled``: the source's producer (the scheduler's
        worker, on another thread) adds each piece to :attr:`chunks` as it makes it, and the source then
        yields it to the reader: the text is whole when the result finishes, read or not (the run log and a
        chat's turn take it then)."""
        self._source, self._filled = source, filled
        return self

    def __iter__(self) -> Iterator[str]:
        replayed = list(self.chunks)
        yield from replayed
        if self._source is None:
            return
        source, self._source = self._source, None
        skip = len(replayed) if self._filled else 0  # a filled source yields those again
        self._running = source
        self._reader = threading.current_thread()
        try:
            while True:
                self._reading, self._touched = True, time.monotonic()
                try:
                    chunk = next(source)
                except StopIteration:
                    return
                finally:
                    self._reading, self._touched = False, time.monotonic()
                if skip:
                    skip -= 1
                    continue
                if not self._filled:
                    self.chunks.append(chunk)
                yield chunk
        finally:
            self._running = None

    @property
    def reader(self) -> threading.Thread | None:
        """The thread reading this result (or to read it): whose reply it is."""
        return self._reader

    def read_by(self, thread: threading.Thread) -> None:
        """Say that ``thread`` (not the one that created the result) will read it, e.g. a panel's worker
        started right after: until it starts, a request from the creating thread waits instead of
        taking the model from it."""
        self._reader, self._touched = thread, time.monotonic()

    def read_elsewhere(self) -> bool:
        """Whether another thread is reading this result now (waiting for its next piece, or between
        two pieces for less than :data:`GRACE_SECONDS`), so a request for the model should wait."""
        reader = self._reader
        if self.done or reader is None or reader is threading.current_thread():
            return False
        if not reader.is_alive():
            return reader.ident is None and time.monotonic() - self._touched < GRACE_SECONDS  # about to start

        return self._reading or time.monotonic() - self._touched < GRACE_SECONDS

    def supersede(self) -> None:
        """Stop this unfinished result because another request needs the model: it finishes with
        ``superseded``, keeps its partial text, and reading it on ends at once."""
        if self.done:
            return
        self.superseded = True
        self.cancel_event.set()
        source, running = self._source, self._running
        self._source = self._running = None
        if running is not None:
            running.close()  # type: ignore[attr-defined]  # runs the generation's cleanup, which finishes
        elif source is not None:
            source.close()  # type: ignore[attr-defined]
        if not self.done:  # never started: nothing ran, nothing to clean up
            self.finish("superseded", Timings())

    def close(self) -> None:
        """Stop the generation where it is (e.g. after an interrupt that landed outside it, between
        two chunks); the result finishes with what it has."""
        source = self._source or self._running
        self._source = self._running = None
        if source is not None:
            source.close()  # type: ignore[attr-defined]
        if not self.done:  # closed before it started: nothing ran
            self.finish("interrupted", Timings())

    def cancel(self) -> None:
        """Ask the generation to stop at the next token (safe from any thread)."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation finished (when another thread is consuming it)."""
        return self._done.wait(timeout)

    def on_done(self, callback: Callable[[Result], None]) -> None:
        """Call ``callback(result)`` when the generation finishes (at once if it already has)."""
        with self._callbacks_lock:
            if not self.done:
                self._on_done.append(callback)
                return
        callback(self)

    def finish(self, reason: str, timings: Timings) -> None:
        """Called once by the engine when generation ends, however it ends."""
        if self.done:
            return
        self.finish_reason, self.timings = reason, timings
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback(self)

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The whole text (consumes the stream if it is still running)."""
        for _ in self:
            pass
        return "".join(self.chunks)

    @property
    def record(self) -> Record | None:
        """How this output was made (once finished): model, options, seed, prompt, versions. The
        weights' sha256, hashed in the background after a load, is filled in now if it was not yet."""
        return self.pending_record.complete() if self.done else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def interrupted(self) -> bool:
        """Whether the generation was stopped before its own end (Stop, an interrupt, another request)."""
        return self.finish_reason in ("interrupted", "cancelled", "superseded")

    @property
    def replayed(self) -> bool:
        """Whether this result was answered from a recording (``nbllm.replay``) rather than generated."""
        return self.pending_record.replayed is not None

    @property
    def parsed(self) -> Any:
        """The output as data, for a request with a constraint (structured output): the JSON value,
        validated against the schema (an instance of the pydantic model it came from), or the choice,
        or the text that matched the regex or grammar. An output cut off at ``max_new_tokens`` (its
        text is kept) or that does not fit raises :class:`nbllm.constraints.ParseError` in one line."""
        from .constraints import parsed

        return parsed(self)

    @property
    def tokens(self) -> Any:
        """With ``logprobs=K``: the new tokens as a :class:`~nbllm.tokens.TokenLogprobs` (one row per token,
        ``.frame()`` a DataFrame, shown coloured by probability); ``None`` without it."""
        from .tokens import TokenLogprobs

        entries = self.pending_record.logprobs
        return TokenLogprobs(entries) if entries is not None else None

    @property
    def completion_tokens(self) -> int | None:
        """New tokens (``None``: a server that gave text did not say how many, see :attr:`counts_unknown`)."""
        if self.counted_tokens is not None:
            return self.counted_tokens
        return None if self.counts_unknown else len(self.token_ids)

    def outcome(self, *, text: bool = False) -> dict[str, Any]:
        """How it ended, as a saved output keeps it for replay: the finish reason, token counts and
        timings (and the ``text``, for an output that does not show it whole)."""
        out: dict[str, Any] = {
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "timings": asdict(self.timings),
        }
        if text:
            out["text"] = "".join(self.chunks)
        if self.reasoning:
            out["reasoning"] = self.reasoning
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": "".join(self.chunks),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seed": self.seed,
            "timings": asdict(self.timings),
            "record": self.record.to_dict() if self.record else None,
            **({"reasoning": self.reasoning} if self.reasoning else {}),
        }

    def summary(self) -> str:
        """One line: tokens, speed, seed, why it ended."""
        t = self.timings
        n = self.completion_tokens
        parts = [f"{n} tokens" if n is not None else "tokens: unknown (the server did not count them)"]
        if t.decode_tokens_per_second:
            parts.append(f"{t.decode_tokens_per_second:.1f} tok/s")
        if t.time_to_first_token is not None:
            parts.append(f"first token {t.time_to_first_token * 1000:.0f} ms")
        if t.compile_seconds is not None:
            parts.append(f"compiled in {t.compile_seconds:.1f} s")
        if t.draft_tokens is not None:
            parts.append(f"{t.speculative}: accepted {t.accepted_tokens} of {t.draft_tokens} drafted")
        parts.append(f"seed {self.seed}")
        parts.append(f"ended: {self.finish_reason or 'running'}")
        if self.replayed:
            parts.append("replayed")
        return " · ".join(parts)

    def __str__(self) -> str:
        return "".join(self.chunks)

    def __repr__(self) -> str:
        text = "".join(self.chunks)
        short = text if len(text) <= 60 else text[:57] + "..."
        return f"<nbllm.Result {short!r} ({self.summary()})>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, str], dict[str, Any]]:
        """Shown as a cell's value, a finished result carries its record and outcome in the output's
        metadata, as ``%%llm`` outputs do, so a saved notebook can replay it."""
        data = {"text/plain": repr(self), "text/html": self._repr_html_()}
        if not self.done or self.record is None:
            return data, {}
        return data, {"nbllm": self.record.to_dict(), "nbllm_result": self.outcome(text=True)}

    def _repr_html_(self) -> str:
        return (
            f"<pre style='white-space: pre-wrap'>{html.escape(''.join(self.chunks))}</pre>"
            f"<small>{html.escape(self.summary())}</small>"
        )


def clock() -> float:
    return time.perf_counter()
