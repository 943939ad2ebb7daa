"""``--check``: re-verify a downloaded model against the hashes recorded when it was downloaded (offline)."""

from __future__ import annotations

from pathlib import Path

from ..adapters import loras_dir
from ..errors import DownloadError, ModelNotFoundError
from ..frontend import command
from ..models import ModelEntry, ModelsFolder, folder_name, parse_hub_id
from ..store import Bookkeeping, verify
from .result import DownloadResult, Echo


def _local_entry(spec: str, folder: ModelsFolder) -> ModelEntry:
    """The local copy ``spec`` names: a hub id downloaded before, or a name from the models folder."""
    hub = parse_hub_id(spec)
    if hub is not None:
        repo_id, rev = hub
        found = folder.find_download(repo_id, rev)
        if found is None:
            unfinished = folder.path / folder_name(repo_id, rev)
            if unfinished.is_dir():
                return folder.get(unfinished.name)
            raise ModelNotFoundError(
                f"{repo_id} is not in {folder.path}", f"download it first: {command('download', spec)}"
            )
        return found
    return folder.get(spec)


def check_model(
    spec: str, *, models_dir: str | Path | None = None, progress: bool = True, echo: Echo | None = print
) -> DownloadResult:
    """Re-verify a downloaded model against the hashes the Hub published when it was downloaded.

    Works offline. Files that do not match are deleted and the model is marked unfinished, so the next
    ``download`` fetches exactly them; the error says so.
    """
    folder = ModelsFolder(models_dir)
    try:
        entry = _local_entry(spec, folder)
    except ModelNotFoundError as missing:  # an adapter: in the adapters folder beside the models folder
        try:
            entry = _local_entry(spec, ModelsFolder(loras_dir(folder.path)))
        except ModelNotFoundError:
            raise missing from None
    books = Bookkeeping.of(entry.path)
    record = books.record()
    if not record:
        raise DownloadError(
            f"{entry.name} was not downloaded by nbllm, so there are no Hub checksums to compare it with",
            f"download it with {command('download', 'organization/model')}: files already there that match are kept",
        )
    repo = record.get("repo_id")
    if books.unfinished:
        raise DownloadError(
            f"{entry.name} is an unfinished download", f"run {command('download', str(repo))} to finish it first"
        )
    planned = books.files()
    targets = {p: entry.path if books.single else entry.path / p for p in planned}
    from tqdm.auto import tqdm

    bad: list[str] = []
    with tqdm(total=len(planned), desc=f"checking {entry.name}", unit="file", disable=not progress) as bar:
        for p, f in planned.items():
            local = targets[p]
            if not local.is_file() or not verify(local, f):
                bad.append(p)
            bar.update(1)
    if bad:
        for p in bad:
            targets[p].unlink(missing_ok=True)
        books.forget(bad)
        names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise DownloadError(
            f"{len(bad)} of {len(planned)} file(s) of {entry.name} are missing or do not match the Hub's checksums "
            f"({names}); the damaged ones were deleted",
            f"run {command('download', repo)} to download them again" if repo else "download them again",
        )
    result = DownloadResult(
        repo_id=repo,
        revision=record.get("revision"),
        path=entry.path,
        name=entry.name,
        files=tuple(sorted(planned)),
        checked=True,
    )
    if echo:
        echo(result.summary)
    return result
