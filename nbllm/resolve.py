"""From what the user typed (after ``%llm_load``, ``%llm_lora add``, ``%llm_doctor``...) to files on disk.

:func:`locate` is the one place that turns a path, a name in a folder or a hub id into a local path, for
models (:func:`resolve`), adapters (:func:`nbllm.lora.resolve_adapter`) and the shapes the fit estimate
reads (:func:`nbllm.fit.shape.locate`). Which format the files are, and so which loader reads them, is
the loaders' to say (:func:`nbllm.loaders.path_format`).

Its own module because it is the one place that both reads the models folder (:mod:`nbllm.models`)
and may download (:mod:`nbllm.download`, imported only when a download happens): the folder module
never imports the downloader.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import LoadError, ModelNotFoundError, OptionError
from .frontend import command
from .models import ModelsFolder, folder_name, parse_hub_id, requested_revision, source_from_path
from .source import ModelSource

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import LorasFolder

Kind = Literal["model", "adapter"]


class NotDownloaded(ModelNotFoundError):
    """A hub id with no local copy, where nothing may be downloaded (:func:`locate` with ``download=False``)."""

    def __init__(self, repo_id: str, revision: str | None, cause: str, fix: str) -> None:
        super().__init__(cause, fix)
        self.repo_id = repo_id
        self.revision = revision


def locate(spec: str | Path, *, kind: Kind = "model", revision: str | None = None, file: str | None = None,
           download: bool = True, whole: bool = True, models: str | Path | None = None) -> Path:
    """The local path of what the user typed: a model (``kind="model"``) or a LoRA adapter (``"adapter"``).

    In order: an existing path (``revision`` is ignored there); a name in the models folder
    (``organization_model`` or ``file.gguf``), or in the adapters folder for an adapter; a hub id
    ``organization/name[:revision]`` — a complete local copy is used as is, otherwise it is downloaded
    into that folder first (with progress bars), or, with ``download=False``, :class:`NotDownloaded` is
    raised. ``file`` narrows a hub model's GGUF files (a name or a pattern). ``models`` is the models
    folder (default: :func:`nbllm.models.models_dir`). An interrupted download is never located, except
    with ``whole=False`` (an estimate, for which a folder with a config.json is enough).
    """
    text = str(spec).strip()
    listing = command("models") if kind == "model" else command("lora list")
    if not text:
        raise OptionError(f"no {kind} given", f"give a path, a name from {listing}, or a hub id organization/{kind}")
    path = Path(text).expanduser()
    if path.exists():
        return path
    folder = ModelsFolder(models)
    if "/" not in text and "\\" not in text:
        return _in_folder(text, kind, folder, whole)
    hub = parse_hub_id(text)
    if hub is None:
        raise ModelNotFoundError(
            f"no {kind} at {text}",
            f"give an existing path, a name from {listing}, or a hub id organization/{kind}[:revision]",
        )
    repo_id, rev = hub[0], requested_revision(text, hub[1], revision)
    local = _local_copy(repo_id, rev, file, kind, folder, whole)
    if local is not None:
        return local
    target = folder.path if kind == "model" else _loras(folder).path
    if not download:
        raise NotDownloaded(repo_id, rev, f"{text} is not in {target}", f"download it first: {command('download', text)}")
    from .download import download as fetch  # lazy: huggingface_hub is imported only when a download happens

    result = fetch(repo_id, revision=rev, files=[file] if file else None, models_dir=folder.path)
    if kind == "adapter" and result.path.parent != target:
        raise LoadError(f"{repo_id} is a model, not a LoRA adapter (it was downloaded into the models folder)",
                        f"load it with {command('load', result.name)}")
    return result.path


def resolve(spec: str | Path, *, revision: str | None = None, file: str | None = None) -> ModelSource:
    """Turn what the user typed after ``%llm_load`` into a :class:`ModelSource` (:func:`locate`, then the
    format the loaders see in those files). ``file`` picks one GGUF file (a name or a pattern)."""
    return source_from_path(locate(spec, revision=revision, file=file), file=file)


def _loras(folder: ModelsFolder) -> LorasFolder:
    from .adapters import LorasFolder  # imported when an adapter is asked for

    return LorasFolder(folder.path)


def _in_folder(name: str, kind: Kind, folder: ModelsFolder, whole: bool) -> Path:
    if kind == "adapter":
        return Path(_loras(folder).get(name).path)  # raises ModelNotFoundError with suggestions
    if not whole and (folder.path / name).exists():
        return folder.path / name
    entry = folder.get(name)  # raises ModelNotFoundError with suggestions
    if entry.unfinished:  # (a file that cannot load goes on: the loader says why, with the fix)
        raise ModelNotFoundError(f"{entry.name} is not complete ({entry.problem})", entry.fix)
    return entry.path


def _local_copy(repo_id: str, revision: str | None, file: str | None, kind: Kind, folder: ModelsFolder,
                whole: bool) -> Path | None:
    if kind == "adapter":
        found = _loras(folder).find_download(repo_id, revision)
        return Path(found) if found is not None else None
    if not whole:  # an estimate reads whatever is there: a config.json alone will do
        from .loaders.registry import path_format

        local = folder.path / folder_name(repo_id, revision)
        if local.is_dir() and path_format(local) is not None:
            return local
        try:
            entry = folder.find_download(repo_id, revision, file)
        except OptionError:  # several GGUF files: the estimate picks its own
            entry = None
        return entry.path if entry is not None else None
    entry = folder.find_download(repo_id, revision, file)
    return entry.path if entry is not None else None
