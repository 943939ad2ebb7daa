"""The registry of loaders, and the one place that says which format a path is and which loader reads it.

Below every other module that needs to know (the models folder, the fit estimate, the loaders' own
package), so that none of them hard-codes a suffix, a marker file or a loader's name: each loader class
declares its :attr:`~nbllm.loaders.base.Loader.model_files` and :attr:`~nbllm.loaders.base.Loader.model_markers`,
and these functions ask them. A new loader is one module and one line here (or ``register(MyLoader)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import OptionError

Loader = Any
"""A :class:`nbllm.loaders.base.Loader` subclass, as this module sees it: it reads only the declarations
(``name``, ``formats``, ``model_files``, ``model_markers``, ``format_words``) and imports no loader's base,
so that the models folder can ask it without importing the loaders' contract and all that comes with it
(:mod:`nbllm.loaders` gives the same functions typed)."""

TRANSFORMERS = "transformers"
LLAMACPP = "llama.cpp"
TRANSFORMERS_FORMAT = "transformers"
"""The format of a Transformers model folder (:attr:`ModelSource.format`), which the Transformers loader is made for."""
GGUF_FORMAT = "gguf"
"""The format of a GGUF file, which the llama.cpp loader is made for."""

_REGISTRY: dict[str, Any] = {
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
        assert isinstance(target, type) and hasattr(target, "formats"), f"{target} is not a loader class"
        _REGISTRY[name] = target
    return target


def loader_classes() -> list[type[Loader]]:
    return [loader_class(name) for name in _REGISTRY]


def format_words(fmt: str) -> str:
    """What a model of format ``fmt`` is, in a user's words, as its loader declares (``a GGUF file``)."""
    cls = _made_for(fmt)
    return cls.format_words if cls is not None and cls.format_words else f"a {fmt} model"


# ------------------------------------------------------------------ which format a path is, which loader


def _made_for(fmt: str) -> type[Loader] | None:
    return next((cls for cls in loader_classes() if fmt in cls.formats), None)


def _own_format(cls: type[Loader]) -> str:
    return min(cls.formats)


def auto_loader(fmt: str) -> type[Loader]:
    """The loader ``--loader auto`` gives a model of format ``fmt``: the first registered one made for it."""
    cls = _made_for(fmt)
    if cls is None:
        raise OptionError(f"no loader loads models of format {fmt!r}",
                          f"register a loader for it, or choose one of: {', '.join(_REGISTRY)}")
    return cls


def model_file_endings() -> tuple[str, ...]:
    """How the names of model files end (``.gguf``), over every registered loader."""
    return tuple(end for cls in loader_classes() for end in cls.model_files)


def file_format(path: str | Path) -> str | None:
    """The format of the file named ``path`` (by how its name ends, as the loaders declare), or ``None``."""
    name = Path(path).name.lower()
    return next((_own_format(cls) for cls in loader_classes() if cls.model_files and name.endswith(cls.model_files)),
                None)


def model_files(folder: Path) -> list[Path]:
    """The model files directly inside ``folder`` (every part of a split file), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and file_format(p) is not None)


def folder_format(folder: Path, names: Iterable[str] | None = None) -> str | None:
    """The format of the model folder ``folder`` (or of the file ``names`` given for it: a planned
    download), or ``None``: model files inside win over a folder's markers (a folder holding a GGUF file
    and a config.json is a GGUF model)."""
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    listed = [n.rsplit("/", 1)[-1] for n in names]
    for name in sorted(listed):
        fmt = file_format(name)
        if fmt is not None:
            return fmt
    found = {n.lower() for n in listed}
    return next((_own_format(cls) for cls in loader_classes()
                 if any(m.lower() in found for m in cls.model_markers)), None)


def path_format(path: Path) -> str | None:
    """The format of the local model at ``path`` (a file or a folder), or ``None`` when no loader reads it."""
    return folder_format(path) if path.is_dir() else file_format(path)


def path_kinds() -> str:
    """What a local model path may be, in a user's words: ``a GGUF file or a Transformers model folder (...)``."""
    words = [cls.format_words for cls in loader_classes() if (cls.model_files or cls.model_markers) and cls.format_words]
    return " or ".join(sorted(words))
