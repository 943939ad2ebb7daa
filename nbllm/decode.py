"""The one decode loop: a loader's steps → each request's safe text, end reason and timings.

A single generation is a batch of one. Whatever runs the rows — :meth:`nbllm.engine.Engine.stream_prompt`
for one prompt read by its caller, :meth:`~nbllm.engine.Engine.generate_batch` for a sweep's padded batch,
the :mod:`nbllm.scheduler` for concurrent callers — the same :class:`Row` holds a request's stop-string
hold-back, incremental detokenizer, end reason and clock, and :func:`decode_steps` feeds it the loader's
steps (a list of one item per row: a token id, or a text piece from a loader that gives text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .errors import GenerationError, NbllmError
from .loaders import Loader, Request, TextLoader
from .result import Result, Timings, clock
from .streaming import IncrementalDecoder, StopHoldback, TokenStream


class Row:
    """One request being decoded: what its next item adds to its text, and why it ended.

    ``decode`` (a token loader's detokenizer; ``None`` for text pieces) and ``eos`` turn token ids into
    text; ``limit`` ends the row once it has that many tokens (a batch, where the loader yields filler
    for ended rows; a single stream ends by itself); ``watch_cancel`` ends it as ``cancelled`` when its
    own result is cancelled (a row in a batch, whose loader only sees the batch's cancel event)."""

    __slots__ = ("result", "reason", "first", "last", "produced", "_decoder", "_holdback", "_eos", "_limit",
                 "_cancel")

    def __init__(self, result: Result, request: Request, decode: Callable[[Sequence[int]], str] | None,
                 eos: frozenset[int] = frozenset(), *, limit: int | None = None, watch_cancel: bool = False) -> None:
        self.result = result
        self.reason: str | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.produced = 0
        self._decoder = IncrementalDecoder(decode, context=request.prompt_ids or ()) if decode is not None else None
        self._holdback = StopHoldback(request.options.stop)
        self._eos = eos
        self._limit = limit
        self._cancel = result.cancel_event if watch_cancel else None

    def feed(self, item: Any, now: float) -> str:
        """Take the row's next token id (or text piece) made at ``now``; return the text now safe to show."""
        if self._cancel is not None and (self._cancel.is_set() or self.result.done):  # done: closed by its reader
            self.reason = "cancelled"
            return ""
        self.last = now
        if self.first is None:
            self.first = now
        self.produced += 1
        if self._decoder is not None:
            self.result.token_ids.append(item)
            if item in self._eos:
                self.reason = "eos"
                return ""
            text = self._decoder.add(item)
        else:
            text = item
        piece = self._holdback.feed(text)
        if self._holdback.stopped:
            self.reason = "stop"
        elif self._limit is not None and self.produced >= self._limit:
            self.reason = "length"
        return piece

    def tail(self) -> str:
        """The text held back at the end (an incomplete character, the start of a stop string that never came)."""
        text = self._holdback.feed(self._decoder.flush() if self._decoder is not None else "") + self._holdback.flush()
        if self._holdback.stopped and self.reason in (None, "length", "eos", "context"):  # the held text held a stop
            self.reason = "stop"
        return text

    def timings(self, start: float, end: float | None = None, rate: float | None = None) -> Timings:
        """The row's timings: from ``start`` to ``end`` (its last item when not given); ``rate``: tokens/s
        as a loader measured them (a server's), else counted here."""
        timings = Timings(total_seconds=(end if end is not None else self.last or clock()) - start)
        if self.first is not None:
            timings.time_to_first_token = self.first - start
            n = self.result.completion_tokens
            if rate is not None or self._decoder is None:
                timings.decode_tokens_per_second = rate
            elif self.last is not None and n is not None and n > 1 and self.last > self.first:
                timings.decode_tokens_per_second = (n - 1) / (self.last - self.first)
        return timings


def decode_steps(rows: Sequence[Row], steps: Iterable[Sequence[Any]], stamps: Any = None) -> Iterator[tuple[int, str]]:
    """Feed each step's items to their rows; yield ``(row, piece)`` for every piece of text made, and
    ``(row, piece or "")`` when a row ends (its ``reason`` set), so it can be finished at once. Ends
    when every row has ended, or when the steps end (the rows still running keep no reason: the caller
    says why: length, the loader's own reason, a cancel). Rows that ended get no more items. ``stamps``:
    the loader's stream when it says when each item was made (a :class:`TokenStream`), else the steps'."""
    source = stamps if stamps is not None else steps
    stamped = source if isinstance(source, TokenStream) else None  # stamps each token when it was made
    for step in steps:
        now = stamped.emitted_at if stamped is not None and stamped.emitted_at is not None else clock()
        ended = True
        for i, item in enumerate(step):
            row = rows[i]
            if row.reason is not None:
                continue
            piece = row.feed(item, now)
            if piece or row.reason is not None:
                yield i, piece
            ended = ended and row.reason is not None
        if ended:
            return


def single(stream: Iterator[Any]) -> Iterator[list[Any]]:
    """A loader's stream of one request as steps of one item."""
    for item in stream:
        yield [item]


def generation_error(exc: Exception, loader: Loader, fix: str) -> NbllmError:
    """A loader's failure while generating, as one line: its cause and ``fix``."""
    if isinstance(exc, NbllmError):
        return exc
    return GenerationError(f"generation failed in {loader.name}: {type(exc).__name__}: {exc}".splitlines()[0], fix)


def text_loader_facts(loader: Loader) -> tuple[str | None, float | None]:
    """A text loader's own end reason and decode rate for the last generation (``None``, ``None`` for others)."""
    if isinstance(loader, TextLoader):
        return loader.finish_reason, loader.decode_rate
    return None, None
