"""Fetching the selected files: resumable transfers, verified before they get their final name.

Each file is fetched with huggingface_hub's own ``http_get`` — its headers, token handling, redirects,
Range resume and retries — into a partial file under ``.nbllm/partial``. A file gets its final name only
after its sha256 (git sha1 for small files) matches the Hub's; the model is marked complete only after
every file did. huggingface_hub's ``hf_hub_download`` is not used for the transfer because it deletes its
partial file when interrupted (2.x writes a process-unique temporary file and unlinks it on any error),
so a kernel interrupt would restart a 10 GB file from zero. The records it leaves are written through
:mod:`nbllm.store`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..adapters import is_adapter_repo, is_gguf_adapter, loras_dir
from ..models import ModelsFolder, folder_name, format_size
from ..store import Bookkeeping, FileRecord, verify
from .hub import Secrets, endpoint, hub_error, offline, offline_error, parse_spec, repo_files
from .result import DownloadResult, Echo
from .select import Selection, select_files

if TYPE_CHECKING:  # pragma: no cover
    from tqdm import tqdm as tqdm_type


def download(
    spec: str,
    *,
    revision: str | None = None,
    files: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    check: bool = False,
    models_dir: str | Path | None = None,
    token: str | bool | None = None,
    progress: bool = True,
    echo: Echo | None = print,
) -> DownloadResult:
    """Download hub model ``spec`` (``organization/model[:revision]``) into the models folder.

    ``files``/``exclude`` are ``--file``/``--exclude`` patterns (see :func:`select_files`). An earlier
    interrupted download of the same files continues where it stopped; files already verified are kept.
    ``check=True`` downloads nothing and re-verifies the local copy instead (:func:`check_model`).
    ``token``: huggingface_hub's (``None``: ``HF_TOKEN`` or ``hf auth login``; ``False``: none). ``echo``
    receives the notes and the final line (``None``: silent). Errors are :class:`DownloadError`.
    """
    repo_id, ref = parse_spec(spec, revision)
    folder = ModelsFolder(models_dir)
    say = echo or (lambda _line: None)
    if check:
        from .check import check_model

        again = spec if ":" in spec or not ref else f"{repo_id}:{ref}"
        return check_model(again, models_dir=folder.path, progress=progress, echo=echo)
    secrets = Secrets(token)
    if offline():
        raise offline_error(repo_id, folder)
    hub = endpoint()
    try:
        commit, remote = repo_files(repo_id, ref, hub, token)
    except Exception as exc:  # mapped to one line; anything unexpected is re-raised by hub_error
        raise hub_error(exc, repo_id, ref, hub, secrets, folder) from None
    selection = select_files({p: f.size for p, f in remote.items()}, include=files, exclude=exclude)
    if selection.note:
        say(secrets.redact(selection.note))
    loras = ModelsFolder(loras_dir(folder.path))
    if is_adapter_repo(remote):  # a PEFT adapter: into loras/ beside the models folder
        folder = loras
    books = _books(folder, repo_id, ref, selection)
    if books.single and Bookkeeping.of_root_file(loras.path / books.name).record().get("repo_id") == repo_id:
        books = Bookkeeping.of_root_file(loras.path / books.name)  # a GGUF adapter moved there before
    job = _Job(
        books=books,
        record={"repo_id": repo_id, "ref": ref or "main", "revision": commit},
        endpoint=hub,
        token=token,
        secrets=secrets,
        folder=folder,
        progress=progress,
        say=say,
    )
    chosen = [remote[p] for p in selection.files]
    with _locked(job):
        result = _download_single(job, chosen[0]) if job.books.single else _download_folder(job, chosen)
    if job.books.single and is_gguf_adapter(result.path) and job.books.root != loras.path:
        # a GGUF file says it is an adapter only in its header: it moves, with its records, once verified
        result = dataclasses.replace(result, path=job.books.move_to(loras.path).path)
    if result.path.parent == loras.path:
        result = dataclasses.replace(result, adapter=True)
    if selection.note:
        result = dataclasses.replace(result, notes=(selection.note,))
    say(secrets.redact(result.summary))
    return result


@dataclass(frozen=True)
class _Job:
    """One download: where it goes, what it records, and how it talks to the Hub and the user."""

    books: Bookkeeping
    record: dict[str, Any]
    """repo_id, ref and the commit sha (``revision``), as the records keep them."""
    endpoint: str
    token: str | bool | None
    secrets: Secrets
    folder: ModelsFolder
    progress: bool
    say: Echo

    @property
    def repo_id(self) -> str:
        return str(self.record["repo_id"])

    @property
    def commit(self) -> str:
        return str(self.record["revision"])

    def result(self, files: tuple[str, ...]) -> DownloadResult:
        return DownloadResult(self.repo_id, self.commit, self.books.path, self.books.name, files)


def _books(folder: ModelsFolder, repo_id: str, ref: str | None, selection: Selection) -> Bookkeeping:
    """Where a selection lands: one GGUF file at the models folder's root, or a model subfolder."""
    if selection.kind == "gguf" and len(selection.files) == 1:
        return Bookkeeping.of_root_file(folder.path / PurePosixPath(selection.files[0]).name)
    return Bookkeeping.of_folder(folder.path / folder_name(repo_id, ref))


@contextmanager
def _locked(job: _Job) -> Iterator[None]:
    """One download per target at a time (two kernels appending to one partial file would corrupt it)."""
    from filelock import FileLock, Timeout

    job.books.meta.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(job.books.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise job.secrets.error(
            f"another download into {job.books.path} is running", "wait for it to finish, or stop it first"
        ) from None
    try:
        yield
    finally:
        lock.release()


class _Progress:
    """An overall bar plus one bar per file (tqdm.auto: widgets in a notebook, text in a terminal)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.overall: tqdm_type = tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True
        )
        overall = self.overall

        class FileBar(tqdm):
            """A per-file bar that also advances the overall one; huggingface_hub creates it."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("leave", False)
                kwargs["disable"] = not enabled
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                overall.update(n)
                return super().update(n)

        self.file_bar = FileBar

    def advance(self, n: int) -> None:
        self.overall.update(n)

    def close(self) -> None:
        self.overall.close()


def _check_space(job: _Job, todo: Sequence[FileRecord]) -> None:
    need = 0
    for f in todo:
        part = job.books.partial(f)
        need += max((f.size or 0) - (part.stat().st_size if part.is_file() else 0), 0)
    free = shutil.disk_usage(job.books.meta).free
    if need > free:
        raise job.secrets.error(
            f"not enough disk space in {job.books.root}: {format_size(need)} needed, {format_size(free)} free",
            "free some space, or choose another models folder with NBLLM_MODELS_DIR",
        )


def _fetch(job: _Job, file: FileRecord, bars: _Progress) -> tuple[int, bool]:
    """Download ``file`` to its partial file (resuming), verify it, move it to its final name.

    Returns (bytes fetched now, whether it resumed an earlier partial file).
    """
    from huggingface_hub.file_download import hf_hub_url, http_get
    from huggingface_hub.utils import build_hf_headers

    from .._version import __version__

    secrets = job.secrets
    partial = job.books.partial(file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.is_file() else 0
    if file.size is not None and have > file.size:
        partial.unlink()
        have = 0
    bars.advance(have)
    url = hf_hub_url(job.repo_id, file.path, revision=job.commit, endpoint=job.endpoint)
    headers = build_hf_headers(token=job.token, library_name="nbllm", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # byte offsets must be those of the file for Range resume
    try:
        with partial.open("ab") as out:
            http_get(
                url,
                out,
                resume_size=have,
                headers=headers,
                expected_size=file.size,
                displayed_filename=file.path,
                tqdm_class=bars.file_bar,
            )
    except KeyboardInterrupt:
        kept = partial.stat().st_size if partial.is_file() else 0
        job.say(
            f"Interrupted: {format_size(kept)} of {file.path} kept. Run the same command again to continue "
            "where it stopped."
        )
        raise
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the network
            raise secrets.error(
                f"cannot write {partial}: {exc.strerror}",
                "free some space or fix the folder's permissions, or choose another models folder with NBLLM_MODELS_DIR",
            ) from None
        kept = partial.stat().st_size if partial.is_file() else 0
        raise secrets.error(
            f"the download of {file.path} stopped early ({format_size(kept)} of {format_size(file.size or 0)})",
            "run the same command again; it resumes where it stopped",
        ) from None
    except Exception as exc:
        kept = partial.stat().st_size if partial.is_file() else 0
        error = hub_error(exc, job.repo_id, job.commit, job.endpoint, secrets, job.folder)
        if kept:
            error = secrets.error(error.cause + f" ({format_size(kept)} of {file.path} kept)", error.fix)
        raise error from None
    if not verify(partial, file):
        partial.unlink(missing_ok=True)
        raise secrets.error(
            f"{file.path} from {job.repo_id} failed its integrity check (its {'sha256' if file.sha256 else 'size or sha1'} "
            "differs from the Hub's); the damaged copy was deleted",
            "run the same command again to download it afresh; if it fails again, something on the network alters the data",
        )
    final = job.books.final(file.path)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    return (file.size or final.stat().st_size) - have, have > 0


def _download_folder(job: _Job, chosen: Sequence[FileRecord]) -> DownloadResult:
    books = job.books
    previous = books.record()
    wanted = {f.path: f.to_json() for f in chosen}
    paths = tuple(sorted(wanted))
    base = job.result(paths)
    if (
        books.complete
        and previous.get("revision") == job.commit
        and all(p in previous.get("files", {}) and books.final(p).is_file() for p in paths)
    ):
        return base

    verified = books.verified()
    books.mark_unfinished()  # from here until the end the folder is an unfinished download
    files = dict(wanted)
    if previous.get("revision") == job.commit:
        files = {**previous.get("files", {}), **wanted}  # an earlier --file choice at this commit stays valid
    else:
        for stale in set(previous.get("files", {})) - set(wanted):  # files of another revision
            books.final(stale).unlink(missing_ok=True)
            verified.pop(stale, None)
    books.write_record({**job.record, "files": files})

    todo = []
    for f in chosen:
        final = books.final(f.path)
        if final.is_file() and verified.get(f.path) == f.key and (f.size is None or final.stat().st_size == f.size):
            continue
        if final.is_file() and verify(final, f):  # e.g. a folder text-generation-webui downloaded
            verified[f.path] = f.key
            continue
        todo.append(f)
    books.write_verified(verified)
    if todo:
        _check_space(job, todo)

    done: list[str] = []
    resumed: list[str] = []
    fetched = 0
    bars = _Progress(sum(f.size or 0 for f in todo), job.repo_id, job.progress and bool(todo))
    try:
        for f in todo:
            n, was_resumed = _fetch(job, f, bars)
            fetched += n
            done.append(f.path)
            if was_resumed:
                resumed.append(f.path)
            verified[f.path] = f.key
            books.write_verified(verified)
    finally:
        bars.close()
    books.finish(job.commit)
    return dataclasses.replace(base, downloaded=tuple(done), bytes_downloaded=fetched, resumed=tuple(resumed))


def _download_single(job: _Job, file: FileRecord) -> DownloadResult:
    books = job.books
    final = books.final(file.path)
    entry = {**job.record, "path": file.path, **file.to_json()}
    base = job.result((file.path,))
    existing = books.record()
    if final.is_file() and existing.get("revision") == job.commit and existing.get("sha256") == file.sha256:
        return base
    if final.is_file() and verify(final, file):  # same content under another revision, or copied by hand
        books.finish(job.commit, entry)
        return base
    books.write_pending({**entry, "key": file.key})
    _check_space(job, [file])
    bars = _Progress(file.size or 0, job.repo_id, job.progress)
    try:
        fetched, was_resumed = _fetch(job, file, bars)
    finally:
        bars.close()
    books.finish(job.commit, entry)
    return dataclasses.replace(
        base, downloaded=(file.path,), bytes_downloaded=fetched, resumed=(file.path,) if was_resumed else ()
    )
