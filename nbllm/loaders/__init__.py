"""Loader registry: a loader name → the class that implements it (imported only when used)."""

from __future__ import annotations

import importlib

from ..errors import OptionError
from ..source import ModelSource
from ..options import LLAMACPP, TRANSFORMERS, LoadOptions, loader_refusals
from .base import Loader, Placement

# Adding a loader: one module with a Loader subclass, one line here.
REGISTRY: dict[str, str] = {
    TRANSFORMERS: "nbllm.loaders.transformers:TransformersLoader",
    LLAMACPP: "nbllm.loaders.llamacpp:LlamaCppLoader",
}

# The loader each on-disk format goes to with --loader auto.
_BY_FORMAT = {"transformers": TRANSFORMERS, "gguf": LLAMACPP}


def loader_class(name: str) -> type[Loader]:
    """The class registered for ``name`` (its module is imported now, not before)."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown loader {name!r}", f"use one of: {', '.join(REGISTRY)}") from None
    module, _, cls = target.partition(":")
    loader: type[Loader] = getattr(importlib.import_module(module), cls)
    return loader


def choose_loader(source: ModelSource, options: LoadOptions) -> str:
    """The loader for this model and these options; refuses options the loader does not understand."""
    name = _BY_FORMAT[source.format] if options.loader == "auto" else options.loader
    if name == TRANSFORMERS and source.format == "gguf":
        raise OptionError(
            f"{source.name} is a GGUF file, which the Transformers loader cannot load here",
            "use --loader llama.cpp (or --loader auto)",
        )
    if name == LLAMACPP and source.format != "gguf":
        raise OptionError(
            f"{source.name} is not a GGUF file; llama.cpp loads only .gguf models",
            "use --loader transformers (or --loader auto)",
        )
    refused = loader_refusals(options, name)
    if refused:
        raise OptionError(refused[0], "remove it, or choose a model that this option applies to")
    return name


__all__ = ["REGISTRY", "Loader", "Placement", "choose_loader", "loader_class"]
