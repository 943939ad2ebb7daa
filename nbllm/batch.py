"""Many prompts at once: :func:`generate_many`.

A loader says how many requests its loaded model serves side by side (:attr:`Loader.parallel_requests`:
a server, up to ``--max-concurrency``). Up to that many prompts then run at once, each on its own
thread and its own :class:`~nbllm.result.Result` (own seed, own record) — the server batches them;
a local model (1) runs them one after another. A loader that batches prompts itself declares it the
same way.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .engine import Engine, Prompt, get_engine
from .options import GenerationOptions
from .result import Result


def generate_many(
    prompts: Iterable[str | Sequence[Mapping[str, str]]],
    options: GenerationOptions | Mapping[str, Any] | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    engine: Engine | None = None,
    **kwargs: Any,
) -> list[Result]:
    """Generate a reply to every prompt; the finished results come back in the prompts' order.

    Options are as for :func:`nbllm.generate` (keyword arguments are :class:`GenerationOptions`
    fields), the same for every prompt; without a ``seed`` each prompt draws and records its own. On a
    loader that serves several requests at once, up to that many run side by side; elsewhere one after
    another. The first error is raised once the prompts running beside it have ended; an interrupt
    cancels every prompt (their partial texts kept) and propagates.
    """
    eng = engine if engine is not None else get_engine()
    opts = eng.generation_options(options, **kwargs)
    ready = [eng.prompt_for(p, chat=chat or system is not None, system=system) for p in prompts]
    width = min(eng.loader.parallel_requests, len(ready))
    if width <= 1:
        results = []
        for prompt in ready:
            result = eng.stream_prompt(prompt, opts)
            results.append(result)
            _ = result.text
        return results
    return _side_by_side(eng, ready, opts, width)


def _side_by_side(eng: Engine, ready: list[Prompt], opts: GenerationOptions, width: int) -> list[Result]:
    results: list[Result | None] = [None] * len(ready)
    stopping = threading.Event()
    lock = threading.Lock()

    def run(i: int) -> None:
        if stopping.is_set():
            return
        result = eng.stream_prompt(ready[i], opts, beside=True)
        with lock:
            results[i] = result
        if stopping.is_set():
            result.cancel()
        _ = result.text

    def cancel_all() -> None:
        stopping.set()
        with lock:
            for result in results:
                if result is not None:
                    result.cancel()

    pool = concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="nbllm-many")
    futures = [pool.submit(run, i) for i in range(len(ready))]
    first: BaseException | None = None
    try:
        for future in concurrent.futures.as_completed(futures):
            exc = future.exception()
            if exc is not None and first is None:
                first = exc
                cancel_all()
    except BaseException:  # an interrupt while waiting: stop everything, keep what came
        cancel_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if first is not None:
        raise first
    return [r for r in results if r is not None]


__all__ = ["generate_many"]
