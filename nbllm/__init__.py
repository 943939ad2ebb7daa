"""nbllm: run local language models from Jupyter.

Load a model once, prompt it from any cell, reproducibly::

    import nbllm
    nbllm.load("path/to/model", load_in_4bit=True)
    print(nbllm.generate("Hello", temperature=0).text)

In IPython: ``%load_ext nbllm``, then ``%llm_load MODEL [options]`` and ``%%llm``.
Importing this package imports no torch, transformers or llama_cpp; the loaders do, when they load.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .errors import NbllmError

if TYPE_CHECKING:
    from .batch import generate_many
    from .chat import Conversation
    from .chat import Conversation as Chat
    from .compare import compare
    from .constraints import table
    from .engine import Engine, Status, get_engine
    from .evaluate import evaluate, evaluate_tasks
    from .lora import lora_add, lora_clear, lora_list, lora_remove, lora_restore
    from .options import GenerationOptions, LoadOptions
    from .recordings import Replay, replay
    from .result import Record, Result
    from .runlog import runs
    from .scoring import perplexity, score, tokenize
    from .serve import serve
    from .sweeps import sweep

_LAZY = {
    "generate_many": ("batch", "generate_many"), "Conversation": ("chat", "Conversation"), "Chat": ("chat", "Conversation"),
    "Engine": ("engine", "Engine"), "Status": ("engine", "Status"), "get_engine": ("engine", "get_engine"),
    "lora_add": ("lora", "lora_add"), "lora_clear": ("lora", "lora_clear"), "lora_list": ("lora", "lora_list"),
    "lora_remove": ("lora", "lora_remove"), "lora_restore": ("lora", "lora_restore"), "Replay": ("recordings", "Replay"),
    "replay": ("recordings", "replay"), "runs": ("runlog", "runs"), "sweep": ("sweeps", "sweep"),
    "table": ("constraints", "table"), "compare": ("compare", "compare"),
    "score": ("scoring", "score"), "perplexity": ("scoring", "perplexity"), "tokenize": ("scoring", "tokenize"),
    "GenerationOptions": ("options", "GenerationOptions"), "LoadOptions": ("options", "LoadOptions"),
    "Record": ("result", "Record"), "Result": ("result", "Result"),
    "evaluate": ("evaluate", "evaluate"), "evaluate_tasks": ("evaluate", "evaluate_tasks"), "serve": ("serve", "serve"),
}
"""Names imported at first use: ``%load_ext nbllm`` (which imports this package) stays quick, without the
engine, the loaders' registry, the download package, the options' schemas, results or the server module.
``nbllm.evaluate`` and ``nbllm.serve`` are functions named as their modules: importing such a module makes
the package's attribute the module, so each module is callable as its function (``nbllm.evaluate(...)``
works whichever was imported first)."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nbllm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def load(model: str | Path, options: LoadOptions | Mapping[str, Any] | None = None, *, name: str | None = None,
         replace: str | None = None, fit: bool = False, save_settings: bool = False, **kwargs: Any) -> Status:
    """Load ``model`` into this process's engine (see :meth:`Engine.load`); keyword arguments are
    :class:`LoadOptions` fields, e.g. ``load_in_4bit=True``. ``fit=True`` loads with the options
    recommended for this machine (:func:`nbllm.fit.recommend`); ``save_settings=True`` stores the options
    as the model's settings (``config-user.yaml``), applied whenever it is loaded by name.

    ``name`` loads it beside the models already loaded, under that name (``model=NAME`` elsewhere picks
    it); it must fit beside them in memory, or ``replace=NAME`` unloads that one first
    (:mod:`nbllm.registry`). Without a name it replaces the unnamed model, as always."""
    from .registry import models

    return models().load(model, options, name=name, replace=replace, fit=fit, save_settings=save_settings, **kwargs)


def unload(name: str | None = None, *, all: bool = False) -> bool:  # noqa: A002 (the flag is --all)
    """Release the model loaded as ``name`` (``None``: the unnamed one), or ``all`` of them, and their memory."""
    from .registry import models

    if all:
        return bool(models().unload_all())
    return models().unload(name)


def status(name: str | None = None) -> Status:
    """What is loaded as ``name`` (``None``: the unnamed model), with which options, where its layers are
    and the memory it uses (:func:`loaded_models` gives every model's)."""
    from .registry import models

    return models().engine(name).status()


def loaded_models() -> dict[str, Status]:
    """Every loaded model's status, by name (the unnamed one as ``default``)."""
    from .registry import models

    return models().statuses()


def generate(prompt: str | Sequence[Mapping[str, str]], options: GenerationOptions | Mapping[str, Any] | None = None,
             *, model: str | None = None, **kwargs: Any) -> Result:
    """Generate to the end; keyword arguments are :class:`GenerationOptions` fields (and ``chat``,
    ``system``). ``model``: the name of the model to ask (``None``: the unnamed one)."""
    from .registry import engine_for

    return engine_for(model).generate(prompt, options, **kwargs)


def stream(prompt: str | Sequence[Mapping[str, str]], options: GenerationOptions | Mapping[str, Any] | None = None,
           *, model: str | None = None, **kwargs: Any) -> Result:
    """Start generating; iterate the result to get text as it is produced. ``model``: as in :func:`generate`."""
    from .registry import engine_for

    return engine_for(model).stream(prompt, options, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbllm``."""
    from .magics import load_ipython_extension as load_magics

    load_magics(ipython)


__all__ = [
    "Chat", "Conversation", "Engine", "GenerationOptions", "LoadOptions", "NbllmError", "Record", "Replay", "Result",
    "Status", "compare", "evaluate", "evaluate_tasks", "generate", "generate_many", "get_engine", "load", "load_ipython_extension", "loaded_models",
    "lora_add", "lora_clear", "lora_list", "lora_remove", "lora_restore", "perplexity", "replay", "runs", "score", "serve",
    "status", "stream", "sweep", "table", "tokenize", "unload",
]
