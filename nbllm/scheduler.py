"""One scheduler per model: concurrent requests queue, and run the way the loaded model serves them best.

Callers on several threads at once (``%llm_serve``'s clients, threads of a notebook) hand their requests to
:meth:`Scheduler.stream` / :meth:`Scheduler.stream_prompt` and each gets its own
:class:`~nbllm.result.Result`, streaming its own text. What happens next is decided by what the loaded
loader declares, never by its name:

- a loader that generates several prompts at once (:attr:`~nbllm.loaders.base.Loader.batch_size` above 1:
  Transformers) gets the requests that are waiting together as one padded batch, up to that many rows: one
  worker thread takes them from the queue, the requests with the same generation options (all but the seed)
  in one batch, the others in batches of their own. Each row's text is its one-by-one text (greedy; a
  seeded sampled row draws from its own seed), and reaches its own caller as it comes;
- a loader that serves several requests at once (:attr:`~nbllm.loaders.base.Loader.parallel_requests`
  above 1: a server) runs up to that many side by side, each on its caller's thread;
- any other loader (llama.cpp) runs them one at a time, each waiting its turn behind the model.

A request the batch cannot take (logprobs, images, a continued reply, a prompt that leaves less room in the context
than it asks for, a loader that does not tokenize) runs alone on its caller's thread.

The front ends (a cell's ``%%llm``, :func:`nbllm.generate` / :func:`nbllm.stream`, the chat magics and the chat
panel) send their requests here too, with ``direct_when_idle``: while nothing else is queued, running through
the queue or held, such a request runs exactly as :meth:`nbllm.engine.Engine.stream_prompt` runs it (on its
caller's thread, once read; a chat reusing the computed state of its history), so one user alone sees no
change; while others are (``%llm_serve``'s clients, other threads), it joins them: queued, and batched with
those of the same options. A chat that joins a batch computes its whole prompt (the batch keeps no history's
state): its text is the same. The batches wait their
turn behind the model like any request (see :mod:`nbllm.engine`): a cell's reply being read is waited for,
and a cell waits while a batch is read. Cancelling one request (its client left, its reader was interrupted,
``Result.cancel()``) ends that row, with its reason, while the others go on; an error in a batch reaches the
callers of that batch only.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .loaders import Loader, Request, TokenLoader
from .options import GenerationOptions
from .result import Result, Timings


class Engine(Protocol):
    """What the scheduler uses of :class:`nbllm.engine.Engine` (named here: the engine imports the scheduler)."""

    last_result: Result | None

    @property
    def loader(self) -> Loader: ...
    def generation_options(self, options: Any = None, **kwargs: Any) -> GenerationOptions: ...
    def prompt_for(self, prompt: Any, *, chat: bool = False, system: str | None = None) -> Any: ...
    def stream_prompt(self, prompt: Any, options: Any = None, *, conversation: dict[str, Any] | None = None,
                      reuse_prefix: bool = False, continue_final: bool = False, beside: bool = False) -> Result: ...
    def queued(self, loader: Loader, prompt: Any, opts: GenerationOptions, *,
               conversation: dict[str, Any] | None = None) -> tuple[Result, Request]: ...
    def take_turn(self, loader: Loader, results: Sequence[Result]) -> None: ...
    def decode_batch(self, loader: TokenLoader, requests: Sequence[Request], results: Sequence[Result],
                     deliver: Callable[[int, str], None], *, fix: str,
                     cancelled: Callable[[int], str] | None = None, ended: Callable[[int], None] | None = None) -> None: ...


@dataclass(eq=False)
class _Ticket:
    """A request waiting in the queue, or running in a batch: its result, and where its pieces go."""

    loader: Loader
    result: Result
    request: Request
    key: GenerationOptions
    """The options that must be equal for two requests to share a batch (all but the seed)."""
    pieces: _Pieces = field(init=False)
    why: str = "cancelled"
    """Why the request stops if it is cancelled: ``cancelled``, or ``interrupted`` / ``superseded`` when
    its reader stopped reading."""

    def __post_init__(self) -> None:
        self.pieces = _Pieces(self.result)


class _Pieces:
    """A queued request's pieces on their way to its reader (``("piece", text)``, then ``("end", None)`` or
    ``("error", exc)``). Each piece joins the result's text as it is delivered (its result is
    :meth:`~nbllm.result.Result.attach`-ed ``filled``): the text is whole when the row finishes, before
    its reader has read it all, so what hears of the end (the run log, a chat's turn) gets all of it."""

    def __init__(self, result: Result) -> None:
        self._result = result
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def put(self, item: tuple[str, Any]) -> None:
        if item[0] == "piece":
            self._result.chunks.append(item[1])
        self._queue.put(item)

    def get(self) -> tuple[str, Any]:
        return self._queue.get()


class Scheduler:
    """The queue of one model's requests and the worker that batches them (see the module)."""

    GATHER_SECONDS = 0.05
    """After batches of several rows, the worker waits for as many requests as the largest of them to queue
    again before starting the next batch (their clients send them as their replies end): up to this long, or
    :attr:`GATHER_SHARE` of the last batch's time when that is longer (at most :attr:`GATHER_MAX_SECONDS`);
    when fewer come in time it expects that many from then on, so one client alone never waits for others
    that are not coming (it waits once, after they left)."""
    GATHER_SHARE = 0.1
    """A server's replies go out, and its next requests come in, on threads that wait for the interpreter
    while a batch computes: a long batch delays them more (on 2 cores, 4 of 6 clients came back 2 s late
    after 50 ms), so the wait grows with the batch, costing at most this share of the throughput."""
    GATHER_MAX_SECONDS = 0.5

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._queue: list[_Ticket] = []
        self._held = 0
        self._worker: threading.Thread | None = None
        self._side: tuple[int, threading.BoundedSemaphore] | None = None
        self._expected = 1
        self._taken: set[Result] = set()
        """The unfinished results of requests taken here: queued, in a batch, or running beside others."""
        self._last_seconds = 0.0
        """How long the last batch took."""
        self.batch_sizes: list[int] = []
        """The size of every batch the worker ran, in order (1: a request that ran alone in the queue's turn)."""

    # -- requests ----------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        chat: bool = False,
        system: str | None = None,
        **kwargs: Any,
    ) -> Result:
        """Like :meth:`nbllm.engine.Engine.stream`, for a caller that may run beside others: the request
        joins the model's queue (see the module). Safe from any thread."""
        eng = self._engine
        opts = eng.generation_options(options, **kwargs)
        return self.stream_prompt(eng.prompt_for(prompt, chat=chat or system is not None, system=system), opts)

    def stream_prompt(self, prompt: Any, options: GenerationOptions | Mapping[str, Any] | None = None, *,
                      continue_final: bool = False, conversation: dict[str, Any] | None = None,
                      reuse_prefix: bool = False, direct_when_idle: bool = False) -> Result:
        """Like :meth:`nbllm.engine.Engine.stream_prompt`, through the queue (see the module).

        ``direct_when_idle`` (the front ends): while :attr:`idle`, the request runs as
        :meth:`~nbllm.engine.Engine.stream_prompt` runs it, ``reuse_prefix`` included; else it joins the
        others. ``conversation``: the chat's name and turn, for the record."""
        eng = self._engine
        opts = eng.generation_options(options)
        if direct_when_idle and self.idle:
            return eng.stream_prompt(prompt, opts, conversation=conversation, reuse_prefix=reuse_prefix,
                                     continue_final=continue_final)
        loader = eng.loader
        if not self._batchable(loader, prompt, opts, continue_final):
            if loader.parallel_requests > 1:
                return self._beside(loader, prompt, opts, continue_final, conversation)
            return eng.stream_prompt(prompt, opts, conversation=conversation, reuse_prefix=reuse_prefix,
                                     continue_final=continue_final)
        result, request = eng.queued(loader, prompt, opts, conversation=conversation)
        ticket = _Ticket(loader, result, request, opts.with_valid(seed=None))
        result.attach(self._read(ticket), filled=True)
        with self._cond:
            self._taken.add(result)
            self._queue.append(ticket)
            # as many clients as requests in flight at once (queued or in the batch): expect them back together
            self._expected = max(self._expected, len(self._taken))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, daemon=True, name="nbllm-scheduler")
                self._worker.start()
            self._cond.notify_all()
        result.on_done(self._given_back)
        return result

    @property
    def idle(self) -> bool:
        """Whether no request taken here is unfinished (queued, in a batch, beside others) and the queue
        is not held: a front end's request then runs directly (see the module)."""
        with self._cond:
            return not self._held and not self._taken

    def _given_back(self, result: Result) -> None:
        with self._cond:
            self._taken.discard(result)

    def takes(self, loader: Loader, prompt: Any, opts: GenerationOptions) -> bool:
        """Whether a request of ``prompt`` with ``opts`` would join a batch here (see the module)."""
        return self._batchable(loader, prompt, opts, False)

    @staticmethod
    def _batchable(loader: Loader, prompt: Any, opts: GenerationOptions, continue_final: bool) -> bool:
        if not isinstance(loader, TokenLoader) or loader.batch_size <= 1 or prompt.ids is None or continue_final:
            return False
        limit = loader.context_length
        speculative = bool(getattr(opts, "prompt_lookup", None) or getattr(opts, "draft_model", None))
        alone = (opts.logprobs is not None or speculative or bool(opts.active_samplers())
                 or bool(getattr(prompt, "images", None)))  # a batch row carries no pixels
        return not alone and (limit is None or len(prompt.ids) + opts.max_new_tokens <= limit)

    def _beside(self, loader: Loader, prompt: Any, opts: GenerationOptions, continue_final: bool,
                conversation: dict[str, Any] | None = None) -> Result:
        """A request for a loader that serves several at once: up to ``parallel_requests`` run side by side."""
        with self._cond:
            if self._side is None or self._side[0] != loader.parallel_requests:
                self._side = (loader.parallel_requests, threading.BoundedSemaphore(loader.parallel_requests))
            slots = self._side[1]
        slots.acquire()
        try:
            result = self._engine.stream_prompt(prompt, opts, conversation=conversation, continue_final=continue_final,
                                                beside=True)
        except BaseException:
            slots.release()
            raise
        with self._cond:
            self._taken.add(result)
        result.on_done(self._given_back)
        result.on_done(lambda _: slots.release())
        return result

    def _read(self, ticket: _Ticket) -> Iterator[str]:
        """The caller's side of a queued request: its pieces as the worker delivers them. A reader that
        stops (an interrupt, a client gone, another request superseding it) stops its row only."""
        ended = False
        try:
            while True:
                kind, value = ticket.pieces.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    ended = True
                    raise value
                else:
                    ended = True
                    return
        finally:
            if not ended:
                self._abandon(ticket, "superseded" if ticket.result.superseded else "interrupted")

    def _abandon(self, ticket: _Ticket, why: str) -> None:
        """Stop one request: taken out of the queue if it has not started, else its row ends at the next step."""
        ticket.why = why
        ticket.result.cancel_event.set()
        with self._cond:
            queued = ticket in self._queue
            if queued:
                self._queue.remove(ticket)
        if queued:
            ticket.result.finish(why, Timings())
        else:
            ticket.result.wait()

    # -- for tests and front ends that want to see it work ------------------------------------------
    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While in the block, the worker starts no batch: requests queue (then they go together)."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def wait_queued(self, count: int, timeout: float | None = None) -> bool:
        """Wait until at least ``count`` requests are queued (not started); whether they are."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout)

    @property
    def queued(self) -> int:
        """Requests waiting for their batch."""
        with self._cond:
            return len(self._queue)

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) and not self._held)
                group = self._take()
            if group:
                self._run(group)

    def _take(self) -> list[_Ticket]:
        """The next batch: the oldest request and those waiting with the same options, up to the batch size.
        Called holding the queue's lock."""
        size = max(getattr(self._queue[0].loader, "batch_size", 1), 1)
        patience = max(self.GATHER_SECONDS, min(self.GATHER_MAX_SECONDS, self.GATHER_SHARE * self._last_seconds))
        deadline = time.monotonic() + patience
        while len(self._queue) < min(self._expected, size) and not self._held:
            left = deadline - time.monotonic()
            if left <= 0 or not self._cond.wait(left):
                self._expected = len(self._queue)  # fewer came back: expect as many as came
                break
        if not self._queue or self._held:
            return []
        first = self._queue[0]
        group = [t for t in self._queue if t.loader is first.loader and t.key == first.key][:size]
        self._queue = [t for t in self._queue if t not in group]
        self._cond.notify_all()
        return [t for t in group if not t.result.done]

    def _run(self, group: list[_Ticket]) -> None:
        eng = self._engine
        loader = group[0].loader
        try:
            for ticket in group:
                if ticket.result.cancel_event.is_set() and not ticket.result.done:  # cancelled while queued
                    ticket.result.finish(ticket.why, Timings())
                    ticket.pieces.put(("end", None))
            group = [t for t in group if not t.result.done]
            if not group:
                return
            eng.take_turn(loader, [t.result for t in group])  # waits for a reply read elsewhere (a cell)
            self.batch_sizes.append(len(group))
            self._expected = max(self._expected, len(group))
            assert isinstance(loader, TokenLoader)
            batch = {"id": uuid.uuid4().hex[:12], "size": len(group)}
            if len(group) > 1:
                cancel = threading.Event()
                requests = [replace(t.request, cancel=cancel) for t in group]
                for row, ticket in enumerate(group):
                    ticket.result.pending_record.batch = {**batch, "row": row}
            else:
                requests = [group[0].request]

            def deliver(row: int, piece: str) -> None:
                group[row].pieces.put(("piece", piece))

            def ended(row: int) -> None:
                self._ended(group[row])

            started = time.monotonic()
            try:
                eng.decode_batch(loader, requests, [t.result for t in group], deliver,
                                 fix="the model is still loaded; send the request again, or alone, if this repeats",
                                 cancelled=lambda row: group[row].why,
                                 ended=ended)
            finally:
                self._last_seconds = time.monotonic() - started
        except BaseException as exc:  # to each caller of the batch, never to the worker
            for ticket in group:
                if not ticket.result.done:
                    ticket.result.finish("error", Timings())
                if ticket.result.finish_reason == "error":  # the rows that ended before it have had their end
                    ticket.pieces.put(("error", exc))

    @staticmethod
    def _ended(ticket: _Ticket) -> None:
        """A row finished: its reader's stream ends (one that failed gets its error from the worker instead)."""
        if ticket.result.finish_reason != "error":
            ticket.pieces.put(("end", None))
