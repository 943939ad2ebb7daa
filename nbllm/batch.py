"""Many prompts at once: :func:`generate_many`.

The engine runs them the way the loaded model serves them best (:meth:`~nbllm.engine.Engine.generate_batch`):
a loader that serves several requests at once (:attr:`Loader.parallel_requests`: a server, up to
``--max-concurrency``) gets that many side by side, each on its own thread and its own
:class:`~nbllm.result.Result` (own seed, own record), and the server batches them; a loader that
batches prompts itself (Transformers) gets padded batches; any other runs them one after another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .engine import Engine, get_engine
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
    server, up to ``--max-concurrency`` requests run side by side; a Transformers model runs them as
    padded batches (each row's text equals its one-by-one text); elsewhere one after another. The first
    error is raised once the prompts running beside it have ended; an interrupt cancels every prompt
    (their partial texts kept) and propagates.
    """
    eng = engine if engine is not None else get_engine()
    opts = eng.generation_options(options, **kwargs)
    ready = [eng.prompt_for(p, chat=chat or system is not None, system=system) for p in prompts]
    return eng.generate_batch(ready, opts)


__all__ = ["generate_many"]
