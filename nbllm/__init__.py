"""nbllm: run local language models from Jupyter.

Load a model once, prompt it from any cell, reproducibly::

    import nbllm
    nbllm.load("path/to/model", load_in_4bit=True)
    print(nbllm.generate("Hello", temperature=0).text)

In IPython: ``%load_ext nbllm``, then ``%llm_load MODEL [options]`` and ``%%llm``.
Importing this package imports no torch, transformers or llama_cpp; the loaders do, when they load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__ as __version__
from .batch import generate_many
from .chat import Conversation
from .chat import Conversation as Chat
from .engine import Engine, Status, get_engine
from .errors import NbllmError
from .evaluate import (  # the functions (the module stays importable: nbllm.evaluate.Evaluation)
    evaluate,
    evaluate_tasks,
)
from .lora import lora_add, lora_clear, lora_list, lora_remove, lora_restore
from .options import GenerationOptions, LoadOptions
from .recordings import Replay, replay
from .result import Record, Result
from .runlog import runs
from .scoring import perplexity, score, tokenize
from .serve import serve  # the function (the module stays importable: from nbllm.serve import ServeOptions)
from .sweeps import sweep


def load(model: str | Path, options: LoadOptions | Mapping[str, Any] | None = None, *, fit: bool = False,
         save_settings: bool = False, **kwargs: Any) -> Status:
    """Load ``model`` into this process's engine (see :meth:`Engine.load`); keyword arguments are
    :class:`LoadOptions` fields, e.g. ``load_in_4bit=True``. ``fit=True`` loads with the options
    recommended for this machine (:func:`nbllm.fit.recommend`); ``save_settings=True`` stores the options
    as the model's settings (``config-user.yaml``), applied whenever it is loaded by name."""
    return get_engine().load(model, options, fit=fit, save_settings=save_settings, **kwargs)


def unload() -> bool:
    """Release the loaded model and its memory."""
    return get_engine().unload()


def status() -> Status:
    """What is loaded, with which options, where its layers are and the memory it uses."""
    return get_engine().status()


def generate(prompt: str | Sequence[Mapping[str, str]], options: GenerationOptions | Mapping[str, Any] | None = None,
             **kwargs: Any) -> Result:
    """Generate to the end; keyword arguments are :class:`GenerationOptions` fields (and ``chat``,
    ``system``)."""
    return get_engine().generate(prompt, options, **kwargs)


def stream(prompt: str | Sequence[Mapping[str, str]], options: GenerationOptions | Mapping[str, Any] | None = None,
           **kwargs: Any) -> Result:
    """Start generating; iterate the result to get text as it is produced."""
    return get_engine().stream(prompt, options, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbllm``."""
    from .magics import load_ipython_extension as load_magics

    load_magics(ipython)


__all__ = [
    "Chat", "Conversation", "Engine", "GenerationOptions", "LoadOptions", "NbllmError", "Record", "Replay", "Result",
    "Status", "evaluate", "evaluate_tasks", "generate", "generate_many", "get_engine", "load", "load_ipython_extension", "lora_add", "lora_clear",
    "lora_list", "lora_remove", "lora_restore", "perplexity", "replay", "runs", "score", "serve", "status", "stream", "sweep",
    "tokenize", "unload",
]
