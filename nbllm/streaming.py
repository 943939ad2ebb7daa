"""Turning a loader's token ids into text that is safe to show, for every loader alike.

- :class:`IncrementalDecoder` decodes only a small window of new tokens at each step (never the
  whole output, which would make long generations quadratic) and holds back text that ends inside
  a multi-byte character.
- :class:`StopHoldback` never lets a stop string (or the start of one) reach the user.
- :func:`threaded_tokens` turns a blocking ``generate(...)`` call into an iterator of token ids
  whose worker exceptions are re-raised in the consumer, so a failed generation never hangs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas, a small window at a time.

    ``decode`` turns ids into text (the tokenizer's own, with special tokens skipped). ``context``
    primes the window with the last prompt tokens so that tokenizers which change a token's text by
    what precedes it (SentencePiece's leading space) decode the first new token correctly.
    """

    KEEP = 2
    """Tokens of context the window keeps when it slides."""
    SLIDE_AT = 6
    """The window slides once it holds this many decoded tokens: at most ``SLIDE_AT + 1`` tokens are
    decoded at once, and one token in ``SLIDE_AT - KEEP`` costs a second decode."""

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context[-4:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = decode(self._ids) if self._ids else ""
        """The text of ``ids[prefix:read]``: the last window's whole text, so one decode per token."""

    def add(self, token: int) -> str:
        """Add one token; return the text it completes (maybe empty, never a broken character)."""
        self._ids.append(token)
        full_text = self._decode(self._ids[self._prefix :])
        prefix_text = self._prefix_text
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self._read = len(self._ids)
            if self._read - self._prefix >= self.SLIDE_AT:
                self._prefix = self._read - self.KEEP
                self._prefix_text = self._decode(self._ids[self._prefix :])
            else:
                self._prefix_text = full_text
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character shows as U+FFFD)."""
        full_text = self._decode(self._ids[self._prefix :])
        out = full_text[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        return out


class StopHoldback:
    """Hold back text that could be the start of a stop string; cut the text at the first stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what can be shown now. After a stop, ``stopped`` is True."""
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        self._buffer += text
        first = self._first_stop()
        keep = self._partial_match_length()
        start = len(self._buffer) - keep  # where the earliest stop that may still complete would begin
        if first >= 0 and first <= start:  # no stop can begin before the one found
            out, self._buffer, self.stopped = self._buffer[:first], "", True
            return out
        # (a stop found after the start of a longer one still being written waits: stops '<' and '><<',
        # text '><' then '<' is cut at '><<', before the '<' inside it)
        out, self._buffer = self._buffer[:start], self._buffer[start:]
        return out

    def flush(self) -> str:
        """At the end of generation, held-back text is shown up to the first stop string it holds (it
        ends ``stopped`` then), or whole."""
        if self.stopped:
            self._buffer = ""
            return ""
        first = self._first_stop()
        out, self._buffer = (self._buffer[:first] if first >= 0 else self._buffer), ""
        self.stopped = first >= 0
        return out

    def _first_stop(self) -> int:
        return min((i for i in (self._buffer.find(s) for s in self._stops) if i >= 0), default=-1)

    def _partial_match_length(self) -> int:
        """Length of the longest end of the buffer that is the beginning of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._buffer)), best, -1):
                if self._buffer.endswith(stop[:n]):
                    best = n
                    break
        return best


class _Done:
    pass


_DONE = _Done()


_WORKER: concurrent.futures.ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()
_WORKER_NAME = "nbllm-generate"


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread every generation runs on.

    One long-lived thread rather than a new one per generation: torch's OpenMP thread pool belongs
    to the thread that calls into it, and moving the work to a new thread each time (or back and
    forth) makes decoding slower.
    """
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=_WORKER_NAME)
        return _WORKER


def run_on_generation_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` on the generation thread and wait for it (for state torch keeps per thread, such as the
    CUDA graphs ``--compile`` records). Called on the generation thread itself, it runs ``fn`` at once."""
    if threading.current_thread().name.startswith(_WORKER_NAME):
        fn()
        return
    _worker().submit(fn).result()


class TokenStream:
    """The iterator :func:`threaded_tokens` returns: token ids from the generation thread, as they come.

    Handing a token from one thread to another costs a wake-up of the reader (a system call, a
    context switch, the GIL changing hands): more CPU than the rest of nbllm's per-token work
    together (benchmarks/bench_overhead.py measures both). When tokens come faster than one every
    :data:`FAST_SECONDS`, the reader lets about :data:`LINGER_TOKENS` of them gather (at most
    :data:`LINGER_MAX_SECONDS`) and takes them all in one wake-up; a display updated every 50 ms shows
    no difference. The first token is never held, and :attr:`emitted_at` says when each token was
    made, so timings stay exact.
    """

    FAST_SECONDS = 0.005
    LINGER_TOKENS = 32
    LINGER_MAX_SECONDS = 0.02

    def __init__(self, run: Callable[[Callable[[int], None]], None], cancel: threading.Event,
                 poll_seconds: float) -> None:
        self.emitted_at: float | None = None
        """``time.perf_counter()`` in the generation thread when the token last returned was made."""
        self._tokens = self._generate(run, cancel, poll_seconds)

    def __iter__(self) -> Iterator[Any]:
        return self._tokens

    def __next__(self) -> Any:
        return next(self._tokens)

    def close(self) -> None:
        """Stop early: ``cancel`` is set and the generation thread waited for."""
        self._tokens.close()

    def _generate(self, run: Callable[[Callable[[int], None]], None], cancel: threading.Event,
                  poll: float) -> Generator[Any, None, None]:
        # A generator, not __next__ on this object: closing it (or dropping it) runs the finally below,
        # the way a generator is finalized, with no __del__ that an interrupt could land in and be lost.
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        put, clock = q.put, time.perf_counter

        def worker() -> None:
            try:
                run(lambda token: put((token, clock())))
            except BaseException as exc:  # re-raised in the consumer
                put(exc)
            finally:
                put(_DONE)

        future = _worker().submit(worker)
        finished = False
        interval = 1.0
        pending: collections.deque[object] = collections.deque()
        try:
            while True:
                if not pending:
                    if interval < self.FAST_SECONDS:
                        time.sleep(min(self.LINGER_TOKENS * interval, self.LINGER_MAX_SECONDS))
                    while True:  # wait for the next token (or the end), then take what else is there
                        try:  # no `continue` here: CPython 3.11 lets a KeyboardInterrupt landing on one skip finally blocks
                            pending.append(q.get(timeout=poll))
                        except queue.Empty:
                            pass
                        else:
                            break
                    try:
                        while True:
                            pending.append(q.get(block=False))
                    except queue.Empty:
                        pass
                item = pending.popleft()
                if isinstance(item, tuple):
                    token, at = item
                    if self.emitted_at is not None:
                        interval = at - self.emitted_at
                    self.emitted_at = at
                    yield token  # a token id (a batch emits one list of ids per step)
                else:
                    finished = True
                    if isinstance(item, BaseException):
                        raise item
                    return
        finally:
            if not finished:
                cancel.set()
            while not future.done():
                concurrent.futures.wait([future], timeout=poll)


def threaded_tokens(
    run: Callable[[Callable[[int], None]], None],
    cancel: threading.Event,
    *,
    poll_seconds: float = 0.1,
) -> TokenStream:
    """Run ``run(emit)`` on the generation thread and yield each token id it emits, as it emits it.

    The worker's exception is raised here, in the consumer. If the consumer stops early (a stop
    string, ``close()``, a KeyboardInterrupt), ``cancel`` is set and the worker is waited for, so it
    never outlives the generation it belongs to; ``run`` must check ``cancel`` at every step.
    """
    return TokenStream(run, cancel, poll_seconds)
