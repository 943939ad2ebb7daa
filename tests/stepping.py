"""Stopping a generation at a chosen step of a real model, to prove "stops within a step".

A forward pre-hook on a Transformers model counts its forward passes (one per new token) and, at the
n-th, sends a stop (a kernel interrupt, a cancel from another thread) and holds that step until the
generation was told to stop — as one slow step of a big model would be. No sleeps and no timing
bounds: what a test asserts is how many passes ran, which does not depend on the machine's load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def count_steps(model: Any) -> tuple[list[int], Any]:
    """Count ``model``'s forward passes as they start: the list's length, and the hook's handle."""
    steps: list[int] = []
    return steps, model.register_forward_pre_hook(lambda _m, _a: steps.append(1))


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
    """At the loaded model's ``n``-th forward pass of the next generation, on the generation thread:
    wait until the reader has read the ``n - 1`` tokens before it, call ``stop()``, and hold that step
    until the generation was told to stop (its cancel event). Returns what was seen at that moment
    (``steps``, ``tokens``, ``told``, ``result``; filled in then) and the hook's handle."""
    seen: dict[str, Any] = {}
    calls = [0]

    def hook(_module: Any, _args: Any) -> None:
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

    return seen, engine.loader.model.register_forward_pre_hook(hook)
