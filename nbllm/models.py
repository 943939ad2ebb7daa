"""Where models live and how a name given by the user becomes files on disk.

The **models folder** is laid out like text-generation-webui's ``user_data/models``: GGUF files directly
inside, Transformers models (and GGUF models of several files) in subfolders named
``organization_model``. Its location is, in order of precedence: :func:`set_models_dir` (what
``%config ModelMagics.models_dir`` calls), the ``NBLLM_MODELS_DIR`` environment variable, and the default
:func:`default_models_dir` (``~/.local/share/nbllm/models`` on Linux) — outside any notebook's working
tree, so models survive a new project or a fresh checkout.

:func:`source_from_path` turns a local path into a :class:`ModelSource`; :func:`nbllm.resolve.resolve`
adds names in the models folder and hub ids (downloading them first) on top of it and this module.

Downloads by nbllm leave bookkeeping files beside the model (a manifest, a completeness marker, the
hub commit); :mod:`nbllm.store` owns them. A folder whose download started and did not finish is listed
as incomplete and is never resolved.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import html
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from .errors import ModelNotFoundError, OptionError
from .frontend import command
from .gguf_file import (
    gguf_models,
    inspect_gguf,
    is_projector,
    projector_for,
    quantization_from_name,
    split_gguf_parts,
)
from .loaders.registry import (
    GGUF_FORMAT,
    auto_loader,
    file_format,
    folder_format,
    format_words,
    loader_names,
    model_file_endings,
    model_files,
    path_kinds,
)
from .source import ModelSource
from .store import Bookkeeping, pending_downloads, read_record, read_revision

LoaderName = str
"""A registered loader's name (:func:`nbllm.loaders.loader_names`)."""

ENV_VAR = "NBLLM_MODELS_DIR"
"""Environment variable naming the models folder."""

# Which format a file or folder is, and so its loader, is the loaders' to say (nbllm.loaders.path_format).
_SAFETENSORS = (".safetensors",)
_PYTORCH = (".bin", ".pt", ".pth")
_WEIGHT_FORMATS = (("safetensors", _SAFETENSORS), ("bin", _PYTORCH))
# Files text-generation-webui keeps at the root of its models folder; not models.
_NOT_MODELS = {"place-your-models-here.txt", "config.yaml", "config-user.yaml"}

# ------------------------------------------------------------------------------- the folder's location

_models_dir_override: Path | None = None


def default_models_dir() -> Path:
    """The models folder used when nothing overrides it: the user's data folder, not the working tree.

    ``$XDG_DATA_HOME/nbllm/models`` (``~/.local/share/nbllm/models``) on Linux,
    ``~/Library/Application Support/nbllm/models`` on macOS, ``%LOCALAPPDATA%\\nbllm\\models`` on
    Windows — the places ``platformdirs.user_data_dir`` names, where large user data is expected to stay.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "nbllm" / "models"


def set_models_dir(path: str | Path | None) -> None:
    """Use ``path`` as the models folder from now on (``None`` or ``""``: back to the environment/default).

    This is what ``%config ModelMagics.models_dir = "/path"`` calls; it wins over ``NBLLM_MODELS_DIR``.
    """
    global _models_dir_override
    _models_dir_override = Path(path).expanduser() if path else None


def models_dir() -> Path:
    """The models folder in effect: :func:`set_models_dir`, else ``NBLLM_MODELS_DIR``, else the default."""
    if _models_dir_override is not None:
        return _models_dir_override
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return default_models_dir()


def folder_name(repo_id: str, revision: str | None = None) -> str:
    """The subfolder a hub repository downloads to, as text-generation-webui names it.

    ``organization/model`` → ``organization_model``; a revision other than ``main`` is appended
    (``organization_model_v2``) so two revisions can sit side by side.
    """
    name = "_".join(repo_id.split("/")[-2:])
    if revision and revision != "main":
        name += "_" + re.sub(r"[^\w.-]", "_", revision)
    return name


_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<rev>[\w./-]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/model:rev"`` → ``("org/model", "rev")``; ``None`` when ``spec`` is not shaped like a hub id."""
    m = _HUB_ID.match(spec.strip())
    if m is None or m["repo"].lower().endswith((*model_file_endings(), *_SAFETENSORS)):
        return None
    return m["repo"], m["rev"]


def requested_revision(spec: str, in_spec: str | None, given: str | None) -> str | None:
    """The revision asked for in the hub id ``spec`` (``org/model:rev``) or apart (``--revision``): one, or both the same."""
    if in_spec and given and in_spec != given:
        raise OptionError(f"two revisions given: {in_spec!r} in {spec} and --revision {given!r}", "give one")
    return in_spec or given


# --------------------------------------------------------------------------------- completeness


def incomplete_reason(folder: Path) -> str | None:
    """Why the model folder ``folder`` cannot be loaded yet, or ``None`` if it looks whole.

    An nbllm download is whole once ``.nbllm/complete`` exists. A folder from elsewhere (copied by hand,
    downloaded by text-generation-webui) is whole when it has weights and every shard its index lists.
    """
    books = Bookkeeping.of_folder(folder)
    if books.started:
        return "download not finished" if books.unfinished else None
    names = {p.name for p in folder.iterdir() if p.is_file()}
    files = model_files(folder)
    if files:
        for first in files:
            parts = split_gguf_parts(first)
            if parts and any(not p.is_file() for p in parts):
                return f"missing parts of {first.name}"
        return None
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"unreadable {index}"
            missing = sorted(shards - names)
            if missing:
                return f"missing {len(missing)} of {len(shards)} weight files"
            return None
    if not any(n.endswith(_SAFETENSORS + _PYTORCH) for n in names):
        return "no weight files"
    return None


# ------------------------------------------------------------------------------ resolving local paths


def source_from_path(path: Path, *, file: str | None = None) -> ModelSource:
    """Resolve an existing local path (a model folder or a GGUF file) to a :class:`ModelSource`.

    A folder whose nbllm download did not finish is refused (its files may be from two revisions or
    missing), with the command that finishes it.
    """
    path = path.expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {path}", f"check the path, or run {command('models')} to list the models folder"
        )
    if path.is_file():
        fmt = file_format(path)
        if fmt is None:
            raise ModelNotFoundError(f"{path} is a file but not a model file", f"give {path_kinds()}")
        if file is not None and file != path.name and not fnmatch.fnmatch(path.name, file):
            raise OptionError(
                f"--file {file!r} does not name {path.name}, and {path.name} is a file, not a folder to choose in",
                "drop --file, or give the folder that holds the file you want",
            )
        parts = split_gguf_parts(path)
        if parts is not None:
            if missing := [p.name for p in parts if not p.is_file()]:
                raise ModelNotFoundError(
                    f"{path.name} is part of a split GGUF model and {len(missing)} part(s) are missing "
                    f"({', '.join(missing[:3])})",
                    "download the missing parts into the same folder",
                )
            path = parts[0]
        projector = projector_for(path)
        return ModelSource(path=path.resolve(), format=fmt, name=path.name,
                           projector=projector.resolve() if projector else None, **_provenance(path))
    _refuse_incomplete(path)
    files = model_files(path)
    if file is not None:
        chosen = path / file
        if not chosen.is_file():
            matches = [p for p in files if fnmatch.fnmatch(p.name, file)]
            if len(gguf_models(matches)) != 1:
                names = ", ".join(p.name for p in files) or "none"
                raise ModelNotFoundError(f"no file {file!r} in {path}", f"pick one of: {names}")
            chosen = gguf_models(matches)[0]
        return dataclasses.replace(source_from_path(chosen), **_provenance(path))
    fmt = folder_format(path)
    if fmt is not None and not files:  # a folder that is a model (its markers say so), not a folder of model files
        return ModelSource(path=path.resolve(), format=fmt, name=path.name, **_provenance(path))
    models = gguf_models(files)
    if len(models) == 1:
        return dataclasses.replace(source_from_path(models[0]), **_provenance(path))
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        each = format_words(file_format(models[0]) or "")
        raise OptionError(f"{path} holds {len(models)} models ({names}), each {each}", "choose one with --file NAME")
    raise ModelNotFoundError(f"{path} is not a model folder, nor a folder holding a model file", f"give {path_kinds()}")


class _Provenance(TypedDict):
    revision: str | None
    repo_id: str | None


def _provenance(path: Path) -> _Provenance:
    """The hub commit and repository recorded beside a downloaded model (``None`` where unknown)."""
    return {"revision": read_revision(path), "repo_id": (read_record(path) or {}).get("repo_id")}


def _refuse_incomplete(folder: Path) -> None:
    books = Bookkeeping.of_folder(folder)
    if books.unfinished:
        repo = books.record().get("repo_id")
        fix = f"run {command('download', repo)} to finish it" if repo else "download it again"
        raise ModelNotFoundError(f"{folder.name} is an unfinished download", fix)


# -------------------------------------------------------------------------------------- the listing


@dataclass(frozen=True)
class ModelEntry:
    """One model in the models folder, as ``%llm_models`` shows it."""

    name: str
    """What to type after ``%llm_load``: a subfolder name or a ``.gguf`` file name."""
    path: Path
    loader: LoaderName
    """The loader ``%llm_load`` would use with ``--loader auto``."""
    format: str
    """``safetensors``, ``bin``, ``GGUF``, or ``none`` (a model folder without weights)."""
    quantization: str | None
    """GGUF quantization (``Q4_K_M``...) or a Transformers checkpoint's ``quantization_config`` method."""
    size: int
    """Bytes on disk (partial files included, so the number is the space it takes)."""
    revision: str | None
    """Hub commit sha recorded at download, if nbllm downloaded it."""
    repo_id: str | None
    complete: bool
    """Whether ``%llm_load`` can load it: False for an interrupted download or a file that cannot load."""
    problem: str | None = None
    """Why it is not complete."""
    damaged: bool = False
    """The files are all there but cannot load (not a GGUF file, truncated...): ``problem`` says why."""
    projector: str | None = None
    """A GGUF model's multimodal projector file (``mmproj*.gguf`` beside it), loaded with it: images."""

    @property
    def format_label(self) -> str:
        """Format and quantization in one cell: ``GGUF Q4_K_M``, ``safetensors``; ``+ mmproj`` with a projector."""
        label = f"{self.format} {self.quantization}" if self.quantization else self.format
        return f"{label} + mmproj" if self.projector else label

    @property
    def unfinished(self) -> bool:
        """Files are missing (an interrupted download, a missing part or shard)."""
        return not self.complete and not self.damaged

    @property
    def status(self) -> str:
        """``ready``, or what is wrong: ``incomplete (...)`` with the command that resumes it,
        ``not loadable: ...`` with what the header checks found."""
        if self.complete:
            return "ready"
        if self.damaged:
            return f"not loadable: {self.problem}"
        resume = f"; resume: {command('download', self.repo_id)}" if self.repo_id else ""
        return f"incomplete ({self.problem}){resume}"

    @property
    def fix(self) -> str:
        """What makes an incomplete entry loadable."""
        if self.repo_id:
            return f"run {command('download', self.repo_id)} to finish it"
        return "copy or download the missing files"


def format_size(n: int) -> str:
    """Bytes as the Hub shows them (decimal units): ``1.2 GB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ModelList:
    """The models of a folder: iterable, a text table as its repr, an HTML table in a notebook."""

    folder: Path
    entries: tuple[ModelEntry, ...]

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> ModelEntry:
        return self.entries[index]

    @property
    def loadable(self) -> tuple[ModelEntry, ...]:
        """The entries ``%llm_load`` accepts."""
        return tuple(e for e in self.entries if e.complete)

    def _rows(self) -> list[tuple[str, ...]]:
        return [
            (e.name, e.loader, e.format_label, format_size(e.size), (e.revision or "")[:10], e.status)
            for e in self.entries
        ]

    _HEADER = ("name", "loader", "format", "size", "revision", "status")

    def _empty_message(self) -> str:
        where = f"{self.folder}" + ("" if self.folder.is_dir() else " (does not exist yet)")
        return (
            f"No models in {where}. Download one with {command('download', 'organization/model')}, "
            f"or point {ENV_VAR} at an existing models folder."
        )

    def text(self) -> str:
        """A plain-text table."""
        if not self.entries:
            return self._empty_message()
        rows = [self._HEADER, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"Models in {self.folder}:\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        if not self.entries:
            return f"<p>{html.escape(self._empty_message())}</p>"
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in self._HEADER)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._rows()
        )
        caption = f"<caption style='text-align:left'>Models in <code>{html.escape(str(self.folder))}</code></caption>"
        return f"<table class='nbllm-models'>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _file_facts(model: Path) -> tuple[str | None, str | None]:
    """A model file's quantization and what makes it unloadable. For a GGUF file: its header's
    ``general.file_type`` (else its name) and the same header checks the llama.cpp loader runs (cheap:
    headers only); a file of another loader's format is left to that loader's own check at load."""
    if file_format(model) != GGUF_FORMAT:
        return quantization_from_name(model.name), None
    header, problem = inspect_gguf(model)
    return (header.file_type if header else None) or quantization_from_name(model.name), problem


def _dir_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _checkpoint_quantization(folder: Path) -> str | None:
    """``quantization_config.quant_method`` (and bits) from a Transformers ``config.json``, if any."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        quant = config.get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(quant, dict) or not quant.get("quant_method"):
        return None
    method = str(quant["quant_method"])
    bits = quant.get("bits") or (4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None)
    return f"{method} {bits}-bit" if bits else method


class ModelsFolder:
    """A folder of models laid out like text-generation-webui's: what is there, and where a download goes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else models_dir()

    def __repr__(self) -> str:
        return f"ModelsFolder({str(self.path)!r})"

    def list(self) -> ModelList:
        """Every model in the folder, sorted by name; interrupted downloads and files that cannot load
        (the loader's header checks, run here too) included, with what is wrong in their status."""
        entries: list[ModelEntry] = []
        if self.path.is_dir():
            for child in sorted(self.path.iterdir(), key=lambda p: p.name.lower()):
                if child.name.startswith(".") or child.name in _NOT_MODELS:
                    continue
                entry = self._entry(child)
                if entry is not None:
                    entries.append(entry)
            entries.extend(self._pending_root_downloads({e.name for e in entries}))
        entries.sort(key=lambda e: e.name.lower())
        return ModelList(self.path, tuple(entries))

    def get(self, name: str) -> ModelEntry:
        """The entry called ``name`` (a subfolder or a root ``.gguf`` file); :class:`ModelNotFoundError` if none."""
        listing = self.list()
        for entry in listing:
            if entry.name == name:
                return entry
        names = [e.name for e in listing]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelNotFoundError(
            f"no model {name!r} in {self.path}{hint}",
            f"run {command('models')} to see what is there, or give a hub id organization/model to download it",
        )

    def find_download(
        self, repo_id: str, revision: str | None = None, file: str | None = None
    ) -> ModelEntry | None:
        """A complete local copy of hub repository ``repo_id`` (at ``revision`` if given), if there is one.

        Looks at the subfolder text-generation-webui would use and at root GGUF files recorded as coming
        from that repository. ``file`` (a name or pattern) narrows the choice among GGUF files.
        """
        folder = self.path / folder_name(repo_id, revision)
        if folder.is_dir():
            entry = self._entry(folder)
            record = read_record(folder) or {}
            same_repo = record.get("repo_id", repo_id) == repo_id
            if entry is not None and not entry.unfinished and same_repo and _revision_matches(record, revision):
                files = model_files(folder)
                if file is None or not files or any(fnmatch.fnmatch(p.name, file) for p in files):
                    return entry
        candidates: list[ModelEntry] = []
        for gguf in model_files(self.path):
            record = read_record(gguf) or {}
            if record.get("repo_id") != repo_id or not _revision_matches(record, revision):
                continue
            if file is not None and not fnmatch.fnmatch(gguf.name, file) and gguf.name != file:
                continue
            entry = self._entry(gguf)
            if entry is not None and not entry.unfinished:
                candidates.append(entry)
        if len(candidates) > 1:  # several quantizations of one repo: the default one, as a download picks
            preferred = [
                c for c in candidates if "Q4_K_M" in (c.quantization, quantization_from_name(c.name))
            ]
            candidates = preferred or candidates
            if len(candidates) > 1:
                names = ", ".join(c.name for c in candidates)
                raise OptionError(
                    f"{self.path} holds {len(candidates)} GGUF files of {repo_id} ({names})",
                    "choose one with --file NAME",
                )
        return candidates[0] if candidates else None

    # -- one entry ---------------------------------------------------------------------------------
    def _entry(self, path: Path) -> ModelEntry | None:
        if path.is_file():
            return self._file_entry(path)
        if path.is_dir():
            return self._folder_entry(path)
        return None

    def _file_entry(self, path: Path) -> ModelEntry | None:
        fmt = file_format(path)
        if fmt is None or is_projector(path.name):
            return None
        parts = split_gguf_parts(path)
        if parts is not None and path != parts[0]:
            return None  # listed once, by its first part
        files = parts or [path]
        present = [p for p in files if p.is_file()]
        missing = len(files) - len(present)
        record = read_record(path) or {}
        quant, damage = _file_facts(path) if not missing else (quantization_from_name(path.name), None)
        return ModelEntry(
            name=path.name,
            path=path,
            loader=auto_loader(fmt).name,
            format=fmt.upper(),
            quantization=quant,
            size=sum(p.stat().st_size for p in present),
            revision=read_revision(path),
            repo_id=record.get("repo_id"),
            complete=not missing and damage is None,
            problem=f"missing {missing} of {len(files)} parts" if missing else damage,
            damaged=damage is not None,
            projector=_projector_name(path),
        )

    def _folder_entry(self, folder: Path) -> ModelEntry | None:
        names = {p.name for p in folder.iterdir() if p.is_file()}
        record = read_record(folder) or {}
        files = [folder / n for n in sorted(names) if file_format(n) is not None]
        is_download = Bookkeeping.of_folder(folder).started
        planned = [str(f) for f in record.get("files") or {}] if is_download else []
        found = folder_format(folder, names) or folder_format(folder, planned)
        if found is None and not is_download:
            return None  # not a model (a LoRA folder, notes, ...)
        problem = incomplete_reason(folder)
        damage = None
        if files or any(file_format(f) is not None for f in planned):  # a folder of model files
            loader: LoaderName = auto_loader(found).name if found else loader_names()[0]
            fmt = (found or "").upper()
            facts = {m.name: _file_facts(m) for m in gguf_models(files)}
            quant = ", ".join(sorted({q for q, _ in facts.values() if q})) or None
            if problem is None:
                damage = next((f"{name}: {bad}" for name, (_, bad) in facts.items() if bad), None)
        else:  # a model folder (its markers say which), or a download that has no file yet
            loader = auto_loader(found).name if found else loader_names()[0]
            listed = [*names, *planned]
            fmt = next((f for f, s in _WEIGHT_FORMATS if any(n.endswith(s) for n in listed)), "none")
            quant = _checkpoint_quantization(folder)
        return ModelEntry(
            name=folder.name,
            path=folder,
            loader=loader,
            format=fmt,
            quantization=quant,
            size=_dir_size(folder),
            revision=read_revision(folder) if problem is None else record.get("revision"),
            repo_id=record.get("repo_id"),
            complete=problem is None and damage is None,
            problem=problem or damage,
            damaged=damage is not None,
            projector=next((name for m in gguf_models(files) if (name := _projector_name(m))),
                           None),
        )

    def _pending_root_downloads(self, listed: set[str]) -> Iterator[ModelEntry]:
        """Root GGUF downloads that were interrupted: their file does not exist yet under its name."""
        for pending in pending_downloads(self.path):
            if pending.name in listed or (self.path / pending.name).exists():
                continue
            fmt = file_format(pending.name) or ""
            yield ModelEntry(
                name=pending.name,
                path=self.path / pending.name,
                loader=auto_loader(fmt).name if fmt else loader_names()[0],
                format=fmt.upper(),
                quantization=quantization_from_name(pending.name),
                size=pending.size,
                revision=pending.record.get("revision"),
                repo_id=pending.record.get("repo_id"),
                complete=False,
                problem="download not finished",
            )


def _projector_name(model: Path) -> str | None:
    projector = projector_for(model)
    return projector.name if projector is not None else None


def _revision_matches(record: dict[str, Any], revision: str | None) -> bool:
    """Whether a download record is of ``revision`` (a branch/tag it was asked as, or a commit sha prefix)."""
    if not record:
        return True  # not downloaded by nbllm: the folder's name is all there is
    if revision is None:
        return record.get("ref", "main") == "main"
    sha = str(record.get("revision") or "")
    return record.get("ref") == revision or (len(revision) >= 7 and sha.startswith(revision))
