"""The loader registry: which loaders exist, which one loads a model, and which options each understands.

Loaders are registered by name with the class's import path (imported only when first needed), or
as a class. Adding a loader is one module and one line::

    nbllm.loaders.register(MyLoader)              # or register("mine", "mypackage.loader:MyLoader")
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from ..errors import OptionError
from ..options import LoadOptions
from ..source import ModelSource
from .base import Loader, LoadInstead, Placement, Request, TextLoader, TokenLoader

TRANSFORMERS = "transformers"
LLAMACPP = "llama.cpp"

_REGISTRY: dict[str, str | type[Loader]] = {
    TRANSFORMERS: "nbllm.loaders.transformers:TransformersLoader",
    LLAMACPP: "nbllm.loaders.llamacpp:LlamaCppLoader",
    "openai": "nbllm.loaders.openai:OpenAILoader",
}


def register(loader: type[Loader] | str, target: str | None = None) -> None:
    """Register a loader: a :class:`Loader` subclass, or a name and ``"module:Class"`` (imported when
    first used). A name registered again is replaced."""
    if isinstance(loader, str):
        if target is None:
            raise TypeError("register(name, 'module:Class') needs the class's import path")
        _REGISTRY[loader] = target
    else:
        _REGISTRY[loader.name] = loader


def unregister(name: str) -> None:
    """Remove a registered loader (tests, plugins that step back)."""
    _REGISTRY.pop(name, None)


def loader_names() -> list[str]:
    """The registered loaders' names, in registration order (the order ``--loader auto`` tries)."""
    return list(_REGISTRY)


def loader_class(name: str) -> type[Loader]:
    """The class registered for ``name`` (its module is imported now, not before)."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown loader {name!r}", f"use one of: auto, {', '.join(_REGISTRY)}") from None
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
        assert isinstance(target, type) and issubclass(target, Loader)
        _REGISTRY[name] = target
    return target


def loader_classes() -> list[type[Loader]]:
    return [loader_class(name) for name in _REGISTRY]


def option_loaders(option: str) -> list[str]:
    """The loaders that understand the load option ``option`` (as they declare it)."""
    return [cls.name for cls in loader_classes() if option in cls.load_options]


def loader_refusals(options: LoadOptions, loader: type[Loader]) -> list[str]:
    """Options set away from their defaults that ``loader`` does not understand (one line each)."""
    refused = []
    for name, value in options.changed().items():
        if name == "loader" or name in loader.load_options or value in (None, False):
            continue
        flag = LoadOptions.spec(name).flag
        others = " and ".join(option_loaders(name)) or "no"
        refused.append(f"{flag} is a {others} option and means nothing to the {loader.name} loader")
    return refused


def resolve_source(spec: str, options: LoadOptions) -> ModelSource:
    """What the user typed after ``%llm_load`` → a :class:`ModelSource`.

    A loader that claims ``spec`` (a server URL...) gets it — the one named by ``--loader`` first;
    anything else is a path, a models-folder name or a hub id (downloaded first).
    """
    from ..resolve import resolve

    text = str(spec).strip()
    names = loader_names()
    if options.loader != "auto":
        loader_class(options.loader)  # an unknown name is refused before anything else
        names = [options.loader] + [n for n in names if n != options.loader]
    for name in names:
        source = loader_class(name).claim(text, options)
        if source is not None:
            return source
    return resolve(spec, revision=options.revision, file=options.file)


def choose_loader(source: ModelSource, options: LoadOptions) -> type[Loader]:
    """The loader for this model and these options; refuses options the loader does not understand."""
    if options.loader == "auto":
        candidates = [cls for cls in loader_classes() if source.format in cls.formats]
        if not candidates:
            raise OptionError(f"no loader loads {source.name} (format {source.format})",
                              f"register a loader for it, or choose one of: {', '.join(_REGISTRY)}")
        cls = candidates[0]
    else:
        cls = loader_class(options.loader)
        if source.format not in cls.formats | cls.formats_when_asked:
            able = [c.name for c in loader_classes() if source.format in c.formats | c.formats_when_asked]
            raise OptionError(
                f"{source.name} is {_format_words(source.format)}, which the {cls.name} loader does not load",
                f"use {_either(able)} (or --loader auto)" if able else "choose another model",
            )
    refused = loader_refusals(options, cls)
    if refused:
        raise OptionError(refused[0], "remove it, or choose a model that this option applies to")
    return cls


def _format_words(fmt: str) -> str:
    return {"gguf": "a GGUF file", "transformers": "a Transformers model folder",
            "openai": "a model at an OpenAI-compatible server"}.get(fmt, f"a {fmt} model")


def _either(names: Iterable[str]) -> str:
    return " or ".join(f"--loader {n}" for n in names)


__all__ = [
    "LLAMACPP", "TRANSFORMERS", "LoadInstead", "Loader", "Placement", "Request", "TextLoader", "TokenLoader", "choose_loader",
    "loader_class", "loader_classes", "loader_names", "loader_refusals", "option_loaders", "register",
    "resolve_source", "unregister",
]
