"""What a loader is given: a model resolved from what the user typed.

Files on disk (a Transformers folder, a ``.gguf`` file) or a model at a server (a base URL and the
server's model id). The ``format`` names what kind of model it is; each loader declares the formats it
takes (see :mod:`nbllm.loaders`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoadError


@dataclass(frozen=True)
class ModelSource:
    """A model as a loader receives it: files on disk, or a model served at a URL."""

    format: str
    """What kind of model: ``transformers`` (a model folder), ``gguf`` (a llama.cpp file), or the
    format a loader claims for sources of its own (e.g. a server's URL)."""
    name: str
    """The name shown to the user (folder or file name, or the server's model id)."""
    path: Path | None = None
    """A Transformers model folder, or a ``.gguf`` file (``None`` for a model at a server)."""
    url: str | None = None
    """The base URL of a server holding the model (``None`` for files on disk)."""
    model_id: str | None = None
    """The model's id at the server."""
    revision: str | None = None
    """The commit sha of the hub revision the files came from, when known."""
    repo_id: str | None = None
    """The hub repository the files came from, when known."""
    server: str | None = None
    """The software (and version) of the server holding the model, as it says (e.g. ``vllm 0.9.2``)."""
    projector: Path | None = None
    """A GGUF model's multimodal projector (``mmproj*.gguf`` beside it: :func:`nbllm.gguf_file.projector_for`),
    which lets llama.cpp take images."""
    dequantized: str | None = None
    """Set by a loader that dequantized the file to load it (Transformers on a GGUF file): from what to
    what, and the memory it took."""

    @property
    def files(self) -> Path:
        """The model's path on disk (a loader of files asks for it; a server model has none)."""
        if self.path is None:
            raise LoadError(f"{self.name} is served at {self.url}, not a model on disk", "load it with a server loader")
        return self.path

    @property
    def location(self) -> str:
        """Where the model is: its path, or its server's URL."""
        return str(self.path) if self.path is not None else str(self.url or "")

    def identity(self) -> dict[str, Any]:
        """What names this model in a record (name, where it is, format, and its hub provenance)."""
        out: dict[str, Any] = {"name": self.name, "format": self.format}
        if self.path is not None:
            out["path"] = str(self.path)
        if self.url is not None:
            out["url"] = self.url
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.server is not None:
            out["server"] = self.server
        if self.repo_id:
            out["repo_id"] = self.repo_id
        if self.revision:
            out["revision"] = self.revision
        if self.dequantized:
            out["dequantized"] = self.dequantized
        if self.projector is not None:
            out["projector"] = str(self.projector)
        return out
