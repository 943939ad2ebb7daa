"""Turning a loader's token ids into text that is safe to show, for every loader alike.

- :class:`IncrementalDecoder` decodes only a small window of new tokens at each step (never the
  whole output, which would make long generations quadratic) and holds back text that ends inside
  a multi-byte character.
- :class:`StopHoldback` never lets a stop string (or the start of one) reach the user.
- :func:`threaded_tokens` turns a blocking ``generate(...)`` call into an iterator of token ids
  whose worker exceptions are re-raised in the consumer, so a failed generation never hangs.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas, a small window at a time.

    ``decode`` turns ids into text (the tokenizer's own, with special tokens skipped). ``context``
    primes the window with the last prompt tokens so that tokenizers which change a token's text by
    what precedes it (SentencePiece's leading space) decode the first new token correctly.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token: int) -> str:
        """Add one token; return the text it completes (maybe empty, never a broken character)."""
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


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
        first = min((i for i in (self._buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            out, self._buffer, self.stopped = self._buffer[:first], "", True
            return out
        keep = self._partial_match_length()
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out

    def flush(self) -> str:
        """At the end of generation, held-back text that never became a stop string is shown."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out

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
_EMPTY = _Done()


_WORKER: concurrent.futures.ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread every generation runs on.

    One long-lived thread rather than a new one per generation: torch's OpenMP thread pool belongs
    to the thread that calls into it, and moving the work to a new thread each time (or back and
    forth) costs about 6% of decode speed on a 2-core CPU (measured; each thread alone is as fast).
    """
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbllm-generate")
        return _WORKER


def threaded_tokens(
    run: Callable[[Callable[[int], None]], None],
    cancel: threading.Event,
    *,
    poll_seconds: float = 0.1,
) -> Iterator[int]:
    """Run ``run(emit)`` on the generation thread and yield each token id it emits, as it emits it.

    The worker's exception is raised here, in the consumer. If the consumer stops early (a stop
    string, ``close()``, a KeyboardInterrupt), ``cancel`` is set and the worker is waited for, so it
    never outlives the generation it belongs to; ``run`` must check ``cancel`` at every step.
    """
    q: queue.SimpleQueue[object] = queue.SimpleQueue()

    def worker() -> None:
        try:
            run(q.put)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        finally:
            q.put(_DONE)

    future = _worker().submit(worker)
    finished = False
    try:
        while True:
            # No `continue` in this loop: CPython 3.11 raises a KeyboardInterrupt that lands on a
            # `continue` here outside this try, skipping the finally below (the worker would run on).
            try:
                item = q.get(timeout=poll_seconds)
            except queue.Empty:
                item = _EMPTY
            if item is _DONE:
                finished = True
                return
            if isinstance(item, BaseException):
                finished = True
                raise item
            if item is not _EMPTY:
                yield item  # type: ignore[misc]
    finally:
        if not finished:
            cancel.set()
        while not future.done():
            concurrent.futures.wait([future], timeout=poll_seconds)
