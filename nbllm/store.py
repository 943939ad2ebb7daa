"""The models folder's bookkeeping: the files nbllm keeps beside the models it downloads, and the
sha256 cache of weights.

This module is the only one that reads or writes these files; downloads (:mod:`nbllm.download`) and
the listing (:mod:`nbllm.models`) call it.

A model subfolder keeps them in its own ``.nbllm/`` folder:

- ``manifest.json``: repository, the ref asked for, the commit, and every planned file with the hashes
  the Hub published (``size``, ``sha256`` for Git LFS files, ``git_sha1`` for small ones). Written when
  the download starts.
- ``verified.json``: file → the hash it was verified against, so a resume hashes nothing twice.
- ``complete``: written last, once every file is verified. A manifest without it is an unfinished
  download, never listed as loadable nor resolved.
- ``revision``: the commit sha; ``partial/<hash>.part``: files being downloaded; ``lock``.

A GGUF file at the models folder's root keeps its records in the root's ``.nbllm/``: ``<file>.json``
(its hashes, repository and commit), ``<file>.revision``, ``<file>.lock``; while it downloads, only
``<file>.pending.json`` and its partial file under ``partial/`` exist.

The root's ``.nbllm/what-worked.json`` says, per model, the load options that last worked on this
machine and the memory they took at their peak (:func:`read_worked`, :func:`write_worked`; the fit
tools' record).

The weights cache (``$NBLLM_CACHE_DIR/sha256.json``) maps path, size and modification time to a sha256,
so a model that is not from the Hub is hashed once for its records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

META_DIR = ".nbllm"
"""Bookkeeping folder nbllm writes inside a model folder (and at the models folder's root)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Files that hold a model's weights (the ones hashed for a record)."""


# ------------------------------------------------------------------------------ files and their hashes


@dataclass(frozen=True)
class FileRecord:
    """A file of a hub repository with the hashes the Hub publishes for it (as the manifest keeps it)."""

    path: str
    """Path inside the repository."""
    size: int | None
    sha256: str | None
    """For Git LFS files (weights): the sha256 of the content."""
    git_sha1: str | None
    """For small files: the git blob sha1 (``None`` for LFS files, whose blob is the pointer's)."""

    @property
    def key(self) -> str:
        """What identifies this content: its sha256, its git sha1, or (without either) its path."""
        return self.sha256 or self.git_sha1 or hashlib.sha1(self.path.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "git_sha1": self.git_sha1}

    @classmethod
    def from_json(cls, path: str, data: Mapping[str, Any]) -> FileRecord:
        return cls(path, data.get("size"), data.get("sha256"), data.get("git_sha1"))


def content_hash(path: Path, record: FileRecord) -> str | None:
    """The hash of ``path`` comparable to ``record.key``: sha256 for LFS files, the git blob sha1 otherwise."""
    if record.sha256:
        digest = hashlib.sha256()
    elif record.git_sha1:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, record: FileRecord) -> bool:
    """Whether ``path`` has the size and the hash the Hub published for ``record``."""
    if record.size is not None and path.stat().st_size != record.size:
        return False
    found = content_hash(path, record)
    return found is None or found == record.key


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically, so a record is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # two processes (or threads) never share a temporary file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=list) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _partial_file(meta: Path, key: str) -> Path:
    return meta / "partial" / f"{key}.part"


def _read_line(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------- one model's books


@dataclass(frozen=True)
class Bookkeeping:
    """nbllm's files about one model of the models folder: a subfolder, or one GGUF file at the root."""

    root: Path
    """The folder holding the model's files: the model folder, or the models folder for a root file."""
    name: str
    """The entry's name: the subfolder's, or the root file's."""
    single: bool
    """True for one GGUF file at the models folder's root."""

    @classmethod
    def of_folder(cls, folder: Path) -> Bookkeeping:
        return cls(folder, folder.name, single=False)

    @classmethod
    def of_root_file(cls, file: Path) -> Bookkeeping:
        return cls(file.parent, file.name, single=True)

    @classmethod
    def of(cls, path: Path) -> Bookkeeping:
        """The books of a model folder, or of a GGUF file (kept in its folder's ``.nbllm/``)."""
        return cls.of_folder(path) if path.is_dir() else cls.of_root_file(path)

    @property
    def meta(self) -> Path:
        return self.root / META_DIR

    @property
    def path(self) -> Path:
        """The model: its folder, or the root file."""
        return self.root / self.name if self.single else self.root

    def final(self, repo_path: str) -> Path:
        """Where the repository file ``repo_path`` lands."""
        return self.root / (PurePosixPath(repo_path).name if self.single else repo_path)

    def partial(self, record: FileRecord) -> Path:
        """The partial file of this content: named by its hash, so a resume never mixes two versions."""
        return _partial_file(self.meta, record.key)

    @property
    def lock(self) -> Path:
        return self.meta / (f"{self.name}.lock" if self.single else "lock")

    @property
    def _record_file(self) -> Path:
        return self.meta / (f"{self.name}.json" if self.single else "manifest.json")

    @property
    def _revision_file(self) -> Path:
        return self.meta / (f"{self.name}.revision" if self.single else "revision")

    @property
    def _pending_file(self) -> Path:
        return self.meta / f"{self.name}.pending.json"

    # -- reading ---------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The download record (a folder's manifest, a root file's record); empty if nbllm did not download it."""
        return _read_json(self._record_file)

    def files(self) -> dict[str, FileRecord]:
        """The files the record names, with their hashes (a root file: the one file)."""
        record = self.record()
        if self.single:
            path = str(record.get("path", self.name))
            return {path: FileRecord.from_json(path, record)} if record else {}
        return {p: FileRecord.from_json(p, r) for p, r in (record.get("files") or {}).items()}

    def revision(self) -> str | None:
        """The hub commit sha stored beside the files, if any (a file in a model folder: the folder's)."""
        if self.single and (found := _read_line(self._revision_file)):
            return found
        return _read_line(self.meta / "revision")

    @property
    def started(self) -> bool:
        """Whether nbllm started downloading this model folder (its manifest exists)."""
        return not self.single and self._record_file.is_file()

    @property
    def complete(self) -> bool:
        """Whether a model folder's nbllm download finished (every file verified)."""
        return not self.single and (self.meta / "complete").is_file()

    @property
    def unfinished(self) -> bool:
        """A model folder whose nbllm download started and did not finish."""
        return self.started and not self.complete

    def verified(self) -> dict[str, str]:
        """File → the hash key it was verified against (model folders)."""
        return _read_json(self.meta / "verified.json")

    # -- writing ---------------------------------------------------------------------------------
    def write_record(self, record: Mapping[str, Any]) -> None:
        _write_json(self._record_file, record)

    def write_verified(self, verified: Mapping[str, str]) -> None:
        _write_json(self.meta / "verified.json", verified)

    def write_pending(self, record: Mapping[str, Any]) -> None:
        """A root file's download starts: what it will be, and the key of its partial file."""
        _write_json(self._pending_file, record)

    def mark_unfinished(self) -> None:
        """From now until :meth:`finish`, a model folder is an unfinished download."""
        (self.meta / "complete").unlink(missing_ok=True)

    def finish(self, revision: str, record: Mapping[str, Any] | None = None) -> None:
        """Every file is verified: record the commit and mark the model complete (``record``: a root file's)."""
        if record is not None:
            self.write_record(record)
        self._revision_file.parent.mkdir(parents=True, exist_ok=True)
        self._revision_file.write_text(revision + "\n", encoding="utf-8")
        if self.single:
            self._pending_file.unlink(missing_ok=True)
        else:
            (self.meta / "complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n", encoding="utf-8")
            shutil.rmtree(self.meta / "partial", ignore_errors=True)

    def move_to(self, root: Path) -> Bookkeeping:
        """Move a root file and its records to the root of another folder (a GGUF adapter, found to be one
        once downloaded, goes from the models folder to the adapters folder). Returns its new books."""
        assert self.single
        moved = Bookkeeping.of_root_file(root / self.name)
        moved.meta.mkdir(parents=True, exist_ok=True)
        shutil.move(self.path, moved.path)
        for mine, theirs in ((self._record_file, moved._record_file), (self._revision_file, moved._revision_file)):
            if mine.is_file():
                os.replace(mine, theirs)
        self.lock.unlink(missing_ok=True)  # (released: the download is over)
        return moved

    def forget(self, bad: list[str]) -> None:
        """Files in ``bad`` failed a check (and were deleted): the model is no longer complete."""
        if self.single:
            self._record_file.unlink(missing_ok=True)
            self._revision_file.unlink(missing_ok=True)
            return
        self.mark_unfinished()
        verified = self.verified()
        for p in bad:
            verified.pop(p, None)
        self.write_verified(verified)


def read_record(path: Path) -> dict[str, Any] | None:
    """The download record of a model folder or of a GGUF file, if nbllm downloaded it."""
    return Bookkeeping.of(path).record() or None


def read_revision(path: Path) -> str | None:
    """The hub commit sha stored beside a downloaded model folder or GGUF file, if any."""
    return Bookkeeping.of(path).revision()


@dataclass(frozen=True)
class PendingDownload:
    """A GGUF file being downloaded to the models folder's root (only its partial file exists)."""

    name: str
    record: dict[str, Any]
    size: int
    """Bytes downloaded so far."""


def pending_downloads(root: Path) -> Iterator[PendingDownload]:
    """Root GGUF downloads that started and did not finish, by name."""
    meta = root / META_DIR
    if not meta.is_dir():
        return
    for pending in sorted(meta.glob("*.pending.json")):
        record = _read_json(pending)
        if not record:
            continue
        partial = _partial_file(meta, str(record.get("key") or record.get("sha256")))
        size = partial.stat().st_size if partial.is_file() else 0
        yield PendingDownload(pending.name.removesuffix(".pending.json"), record, size)


# ------------------------------------------------------------------------------ what loaded on this machine

WORKED_FILE = "what-worked.json"
_WORKED_LOCK = threading.Lock()


def worked_file(root: Path) -> Path:
    """Where the models folder ``root`` keeps what loaded on this machine."""
    return root / META_DIR / WORKED_FILE


def read_worked(root: Path) -> dict[str, dict[str, Any]]:
    """Model name → the record of its last load that worked here (empty when there is none yet)."""
    models = _read_json(worked_file(root)).get("models")
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def write_worked(root: Path, name: str, entry: Mapping[str, Any]) -> Path:
    """Keep ``entry`` as ``name``'s record of what worked (one per model: the last)."""
    with _WORKED_LOCK:
        models = read_worked(root)
        models[name] = dict(entry)
        path = worked_file(root)
        _write_json(path, {"version": 1, "models": models})
    return path


# ------------------------------------------------------------------------------ the weights sha256 cache

_LOCK = threading.Lock()


def cache_dir() -> Path:
    """nbllm's cache folder: ``$NBLLM_CACHE_DIR`` or ``~/.cache/nbllm``."""
    return Path(os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm")


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of one file, from the cache when the file has not changed since it was hashed."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    with _LOCK:
        known = _read_json(index)
    if key in known:
        return str(known[key])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    with _LOCK:
        _write_json(index, {**_read_json(index), key: value})
    return value


def weights_sha256(path: Path) -> dict[str, str]:
    """File name → sha256 of every weights file of a model (a GGUF file or a model folder)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {p.name: file_sha256(p) for p in files}
