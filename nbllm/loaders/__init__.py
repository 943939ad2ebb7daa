"""The loader registry: which loaders exist, which one loads a model, and which options each understands.

Loaders are registered by name with the class's import path (imported only when first needed), or
as a class. Adding a loader is one module and one line::

    nbllm.loaders.register(MyLoader)              # or register("mine", "mypackage.loader:MyLoader")
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import OptionError
from ..options import LoadOptions
from ..source import ModelSource
from . import registry
from .base import Loader, LoadInstead, Placement, Request, TextLoader, TokenLoader
from .registry import (
    _REGISTRY,
    GGUF_FORMAT,
    LLAMACPP,
    TRANSFORMERS,
    TRANSFORMERS_FORMAT,
    _made_for,
    file_format,
    folder_format,
    format_words,
    loader_names,
    model_file_endings,
    model_files,
    path_format,
    path_kinds,
    register,
    unregister,
)


def loader_class(name: str) -> type[Loader]:
    """The class registered for ``name`` (its module is imported now, not before)."""
    cls: type[Loader] = registry.loader_class(name)
    return cls


def loader_classes() -> list[type[Loader]]:
    return list(registry.loader_classes())


def auto_loader(fmt: str) -> type[Loader]:
    """The loader ``--loader auto`` gives a model of format ``fmt``: the first registered one made for it."""
    cls: type[Loader] = registry.auto_loader(fmt)
    return cls


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
        cls = _made_for(source.format)
        if cls is None:
            raise OptionError(f"no loader loads {source.name} (format {source.format})",
                              f"register a loader for it, or choose one of: {', '.join(_REGISTRY)}")
    else:
        cls = loader_class(options.loader)
        if source.format not in cls.formats | cls.formats_when_asked:
            able = [c.name for c in loader_classes() if source.format in c.formats | c.formats_when_asked]
            raise OptionError(
                f"{source.name} is {format_words(source.format)}, which the {cls.name} loader does not load",
                f"use {_either(able)} (or --loader auto)" if able else "choose another model",
            )
    refused = loader_refusals(options, cls)
    if refused:
        raise OptionError(refused[0], "remove it, or choose a model that this option applies to")
    return cls


def _either(names: Iterable[str]) -> str:
    return " or ".join(f"--loader {n}" for n in names)




__all__ = [
    "GGUF_FORMAT", "LLAMACPP", "TRANSFORMERS", "TRANSFORMERS_FORMAT", "LoadInstead", "Loader", "Placement", "Request", "TextLoader", "TokenLoader", "auto_loader",
    "choose_loader", "file_format", "folder_format", "format_words", "loader_class", "loader_classes", "loader_names",
    "loader_refusals", "model_file_endings", "model_files", "option_loaders", "path_format", "path_kinds", "register",
    "resolve_source", "unregister",
]
