"""Stopping a generation at a chosen step of a real model, to prove "stops within a step".

A hook before each step of a real model — a forward pre-hook on a Transformers model, a wrapper of
``Llama.eval`` on a llama.cpp one (one call per new token in ``Llama.generate``) — counts the steps and,
at the n-th, sends a stop (a kernel interrupt, a cancel from another thread) and holds that step until the
generation was told to stop — as one slow step of a big model would be. No sleeps and no timing
bounds: what a test asserts is how many passes ran, which does not depend on the machine's load.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


class _EvalHook:
    """Calls ``fn()`` before each ``Llama.eval`` of one ``llama_cpp.Llama`` (its step: the prompt first,
    then one call per new token), after the hooks added before it; ``remove()`` takes it away (the
    library's own method comes back with the last one)."""

    def __init__(self, llm: Any, fn: Callable[[], object]) -> None:
        hooks: list[Callable[[], object]] | None = llm.__dict__.get("_step_hooks")
        if hooks is None:
            hooks = llm._step_hooks = []
            real = llm.eval

            def eval_(tokens: Any) -> Any:
                for hook in list(hooks):
                    hook()
                return real(tokens)

            llm.eval = eval_
        hooks.append(fn)
        self._llm, self._hooks, self._fn = llm, hooks, fn

    def remove(self) -> None:
        self._hooks.remove(self._fn)
        if not self._hooks:
            del self._llm.eval, self._llm._step_hooks


def before_each_step(model: Any, fn: Callable[[], object]) -> Any:
    """Call ``fn()`` as each step of ``model`` starts (a Transformers model, or a ``llama_cpp.Llama``);
    returns the hook's handle (``remove()``)."""
    if hasattr(model, "register_forward_pre_hook"):
        return model.register_forward_pre_hook(lambda _m, _a: fn())
    return _EvalHook(model, fn)


def step_model(engine: Any) -> Any:
    """What a step of the engine's loaded model runs in: the Transformers model or the ``Llama``."""
    loader = engine.loader
    return loader.model if hasattr(loader, "model") else loader.llm


def count_steps(model: Any) -> tuple[list[int], Any]:
    """Count ``model``'s steps (forward passes, or llama.cpp evals) as they start: the list's length,
    and the hook's handle."""
    steps: list[int] = []
    return steps, before_each_step(model, lambda: steps.append(1))


def steps_once_the_generation_thread_is_free(steps: list[int]) -> int:
    """The step count seen by the next job of the (one) generation thread: it runs only after whatever
    still runs there, so a generation that had not stopped would have added its steps by then."""
    from nbllm.streaming import _worker

    return int(_worker().submit(lambda: len(steps)).result(timeout=300))


class TokenList(list):  # type: ignore[type-arg]
    """A result's ``token_ids`` that can be waited on (the engine appends each token as it reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def append(self, token: int) -> None:
        with self.changed:
            super().append(token)
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self) >= n, timeout)


def stop_at_step(engine: Any, n: int, stop: Callable[[], object]) -> tuple[dict[str, Any], Any]:
    """At the loaded model's ``n``-th step of the next generation, on the generation thread:
    wait until the reader has read the ``n - 1`` tokens before it, call ``stop()``, and hold that step
    until the generation was told to stop (its cancel event). Returns what was seen at that moment
    (``steps``, ``tokens``, ``told``, ``result``; filled in then) and the hook's handle."""
    seen: dict[str, Any] = {}
    calls = [0]

    def hook() -> None:
        calls[0] += 1
        if calls[0] == 1:  # the engine has made the result; no token was read yet
            seen["result"] = result = engine.last_result
            result.token_ids = TokenList()
        if calls[0] == n:
            result = seen["result"]
            assert result.token_ids.wait_for(n - 1, 120), "the reader did not read the tokens before the stop"
            seen["steps"], seen["tokens"] = calls[0], len(result.token_ids)
            stop()
            seen["told"] = result.cancel_event.wait(120)

    return seen, before_each_step(step_model(engine), hook)


@contextlib.contextmanager
def stopped_at_step(engine: Any, n: int, stop: Callable[[], object]) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """:func:`count_steps` and :func:`stop_at_step` on the engine's model for the block: yields the steps
    counted and what was seen at the stop; both hooks are gone afterwards."""
    steps, counting = count_steps(step_model(engine))
    at, stopping = stop_at_step(engine, n, stop)
    try:
        yield steps, at
    finally:
        stopping.remove()
        counting.remove()
