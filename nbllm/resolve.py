"""From what the user typed after ``%llm_load`` to a :class:`~nbllm.source.ModelSource`.

Its own module because it is the one place that both reads the models folder (:mod:`nbllm.models`)
and may download (:mod:`nbllm.download`, imported only when a download happens): the folder module
never imports the downloader.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError, OptionError
from .frontend import command
from .models import ModelsFolder, parse_hub_id, requested_revision, source_from_path
from .source import ModelSource


def resolve(spec: str | Path, *, revision: str | None = None, file: str | None = None) -> ModelSource:
    """Turn what the user typed after ``%llm_load`` into a :class:`ModelSource`.

    In order: an existing path (``revision`` is ignored there); a name in the models folder
    (``organization_model`` or ``file.gguf``); a hub id ``organization/model[:revision]`` — a complete
    local copy is used as is, otherwise the model is downloaded into the models folder first (with
    progress bars). ``file`` picks one GGUF file (a name or a pattern). An interrupted download is never
    resolved.
    """
    text = str(spec).strip()
    if not text:
        raise OptionError(
            "no model given", f"give a path, a name from {command('models')}, or a hub id organization/model"
        )
    path = Path(text).expanduser()
    if path.exists():
        return source_from_path(path, file=file)
    folder = ModelsFolder()
    if "/" not in text and "\\" not in text:
        entry = folder.get(text)  # raises ModelNotFoundError with suggestions
        if entry.unfinished:  # (a file that cannot load goes on: the loader says why, with the fix)
            raise ModelNotFoundError(f"{entry.name} is not complete ({entry.problem})", entry.fix)
        return source_from_path(entry.path, file=file)
    hub = parse_hub_id(text)
    if hub is None:
        raise ModelNotFoundError(
            f"no model at {text}",
            f"give an existing path, a name from {command('models')}, or a hub id organization/model[:revision]",
        )
    repo_id, rev = hub[0], requested_revision(text, hub[1], revision)
    local = folder.find_download(repo_id, rev, file)
    if local is not None:
        return source_from_path(local.path, file=file if local.path.is_dir() else None)
    from .download import download  # lazy: huggingface_hub is imported only when a download happens

    result = download(repo_id, revision=rev, files=[file] if file else None, models_dir=folder.path)
    return source_from_path(result.path, file=file if result.path.is_dir() else None)
