"""Downloads from the Hugging Face Hub into the models folder, resumable and verified.

``download("organization/model[:revision]")`` is nbllm's ``download-model.py``: it asks the Hub for the
repository's files and their hashes (``HfApi.model_info(files_metadata=True)``), picks the files a
loader needs (:func:`select_files`), and fetches each one with huggingface_hub's own ``http_get`` — its
headers, token handling, redirects, Range resume and retries — into a partial file under ``.nbllm/partial``.
A file gets its final name only after its sha256 (git sha1 for small files) matches the Hub's; the model
is marked complete only after every file did. huggingface_hub's ``hf_hub_download`` is not used for the
transfer because it deletes its partial file when interrupted (2.x writes a process-unique temporary
file and unlinks it on any error), so a kernel interrupt would restart a 10 GB file from zero.

Where files go (text-generation-webui's layout): one GGUF file → directly in the models folder; anything
else → the subfolder ``organization_model`` (``organization_model_<revision>`` for a revision other
than ``main``). See ``models.py`` for the bookkeeping files read back by ``%llm_models``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from .errors import DownloadError, ModelNotFoundError, OptionError
from .models import (
    META_DIR,
    ModelEntry,
    ModelsFolder,
    folder_name,
    format_size,
    parse_hub_id,
    quantization_from_name,
    read_record,
    requested_revision,
)

if TYPE_CHECKING:  # pragma: no cover
    from tqdm import tqdm as tqdm_type

DEFAULT_QUANTIZATION = "Q4_K_M"
"""The GGUF quantization downloaded when ``--file`` does not choose: a common size/quality balance."""

QUANTIZATION_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q5_K_S", "Q6_K", "Q8_0")
"""Fallback order when a GGUF repository has no Q4_K_M file; after these, the smallest file."""

CONNECT_TIMEOUT = 4.0
"""Seconds to wait for a connection to the Hub: an unreachable network fails fast, not after minutes."""

METADATA_TIMEOUT = 20.0
"""Seconds to wait for the Hub's answer about a repository (huggingface_hub's HTTP client has no limit)."""

# Small files a model needs besides its weights: configs, tokenizers, chat templates, remote code, card.
_SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py", ".md")
_PYTORCH_WEIGHTS = re.compile(r"^(?:(?:pytorch|adapter|gptq)_model.*\.bin|.*\.pt|.*\.pth)$")
_NOT_WEIGHTS = re.compile(r"^(?:training_args|optimizer|scheduler|rng_state).*$")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)", re.IGNORECASE)

Echo = Callable[[str], None]


# ------------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class Selection:
    """Which files of a repository to download, and why."""

    files: tuple[str, ...]
    kind: Literal["transformers", "gguf"]
    note: str | None = None
    """A line for the user: which GGUF file was chosen and what else exists, or what was left out."""


def _matches(path: str, patterns: Sequence[str]) -> bool:
    name = PurePosixPath(path).name
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _gguf_groups(ggufs: Sequence[str]) -> dict[str, list[str]]:
    """GGUF files grouped by model: a split model (``-00001-of-00003``) is one group."""
    groups: dict[str, list[str]] = {}
    for path in sorted(ggufs):
        groups.setdefault(_SPLIT.sub("", path), []).append(path)
    return groups


def select_files(
    files: Mapping[str, int | None] | Sequence[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Selection:
    """Pick the files to download from a repository's file list (path → size, sizes optional).

    Rules: configuration, tokenizer and other small support files at the root are always taken; weights
    are ``*.safetensors`` when the repository has them, else PyTorch ``.bin``/``.pt``; a repository of
    GGUF files gets the ``include`` matches, else the :data:`DEFAULT_QUANTIZATION` file (then
    :data:`QUANTIZATION_PREFERENCE`, then the smallest). ``include`` patterns (``--file``, shell-style,
    matched against the path and the file name) choose the weights; ``exclude`` (``--exclude``) removes
    matches last. Raises :class:`~nbllm.errors.DownloadError` when nothing loadable is left.
    """
    sizes: dict[str, int | None] = dict(files) if isinstance(files, Mapping) else dict.fromkeys(files)
    paths = sorted(sizes)
    root = [p for p in paths if "/" not in p]
    safetensors = [p for p in root if p.endswith(".safetensors")]
    pytorch = [p for p in root if _PYTORCH_WEIGHTS.match(p) and not _NOT_WEIGHTS.match(p)]
    ggufs = [p for p in paths if p.lower().endswith(".gguf")]
    support = [p for p in root if p.endswith(_SUPPORT_SUFFIXES)]
    note: str | None = None

    if include:
        chosen = [p for p in paths if _matches(p, include)]
        if not chosen:
            available = ", ".join(
                PurePosixPath(p).name for p in (ggufs or safetensors or pytorch or paths)[:12]
            )
            raise DownloadError(f"no file matches --file {' '.join(include)}", f"pick from: {available}")
        if all(p.lower().endswith(".gguf") for p in chosen):
            kind: Literal["transformers", "gguf"] = "gguf"
            selected = chosen
        else:
            kind = "transformers"
            selected = sorted(set(chosen) | set(support))
    elif safetensors or pytorch:
        kind = "transformers"
        if safetensors:
            weights = safetensors
            support = [p for p in support if p != "pytorch_model.bin.index.json"]
            if pytorch:
                note = f"Taking the safetensors weights; skipping {len(pytorch)} PyTorch .bin/.pt file(s)."
        else:
            weights = pytorch
        if ggufs:
            extra = f"The repository also has {len(ggufs)} GGUF file(s); get one with --file PATTERN."
            note = f"{note} {extra}" if note else extra
        selected = sorted(set(weights) | set(support))
    elif ggufs:
        kind = "gguf"
        groups = _gguf_groups(ggufs)
        candidates = {
            k: v for k, v in groups.items() if not PurePosixPath(k).name.lower().startswith("mmproj")
        }
        candidates = candidates or groups
        quant = {k: quantization_from_name(PurePosixPath(k).name) for k in candidates}
        pick = None
        for wanted in QUANTIZATION_PREFERENCE:
            pick = next((k for k, q in quant.items() if q == wanted), None)
            if pick:
                break
        if pick is None:
            pick = min(candidates, key=lambda k: (sum(sizes.get(p) or 0 for p in candidates[k]), k))
        selected = candidates[pick]
        others = sorted({quant[k] or PurePosixPath(k).name for k in candidates if k != pick})
        why = (
            f"the default quantization {DEFAULT_QUANTIZATION}"
            if quant[pick] == DEFAULT_QUANTIZATION
            else f"no {DEFAULT_QUANTIZATION} file; {quant[pick] or 'the smallest'} is the closest"
        )
        note = f"Chose {PurePosixPath(pick).name} ({why})."
        if others:
            note += f" Also available: {', '.join(others)}. Choose another with --file '*{others[0]}*'."
    else:
        raise DownloadError(
            "the repository has no model weights (safetensors, bin or GGUF) at its root",
            "choose files with --file PATTERN",
        )

    if exclude:
        selected = [p for p in selected if not _matches(p, exclude)]
        weights_left = [p for p in selected if p.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth"))]
        if not weights_left:
            raise DownloadError(
                f"--exclude {' '.join(exclude)} leaves no weight files", "exclude fewer files"
            )
    return Selection(tuple(sorted(selected)), kind, note)


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository with the hashes the Hub publishes for it."""

    path: str
    size: int | None
    sha256: str | None
    """For Git LFS files (weights): the sha256 of the content."""
    blob_id: str | None
    """For small files: the git blob sha1 (for LFS files it is the pointer's, so unused)."""

    @property
    def key(self) -> str:
        """What identifies this content: its sha256, its git sha1, or (without either) its path."""
        return self.sha256 or self.blob_id or hashlib.sha1(self.path.encode()).hexdigest()

    def as_record(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "git_sha1": None if self.sha256 else self.blob_id}


@dataclass(frozen=True)
class DownloadResult:
    """What a download (or a ``--check``) did: where the model is and which files were fetched."""

    repo_id: str | None
    revision: str | None
    """The commit sha the files come from."""
    path: Path
    """The model folder, or the GGUF file at the models folder's root."""
    name: str
    """What to type after ``%llm_load``."""
    files: tuple[str, ...]
    downloaded: tuple[str, ...] = ()
    bytes_downloaded: int = 0
    resumed: tuple[str, ...] = ()
    checked: bool = False
    notes: tuple[str, ...] = ()
    """Lines shown before the download: which GGUF file was chosen, what was skipped."""

    @property
    def summary(self) -> str:
        """The final one-line report."""
        at = f" at {self.revision[:10]}" if self.revision else ""
        what = f"{self.repo_id}{at}" if self.repo_id else self.name
        if self.checked:
            return f"Checked {self.name}: all {len(self.files)} file(s) match the Hub's checksums ({what})."
        if not self.downloaded:
            return f"{what} is already complete in {self.path} ({len(self.files)} file(s)). Load it with %llm_load {self.name}."
        extra = [f"{len(self.resumed)} resumed"] if self.resumed else []
        kept = len(self.files) - len(self.downloaded)
        if kept:
            extra.append(f"{kept} already there")
        detail = f"{len(self.downloaded)} file(s), {format_size(self.bytes_downloaded)}" + (
            f"; {', '.join(extra)}" if extra else ""
        )
        return f"Downloaded {what} ({detail}) into {self.path}. Load it with %llm_load {self.name}."

    def __str__(self) -> str:
        return self.summary


# ------------------------------------------------------------------------------------ huggingface_hub


def _endpoint() -> str:
    """The Hub endpoint in effect now (``HF_ENDPOINT`` is read at call time, not at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning 'the network failed', for whichever HTTP library huggingface_hub uses."""
    found: list[type[BaseException]] = []
    try:
        import httpx2

        found.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:  # pragma: no cover - older huggingface_hub
        import requests

        found.extend([requests.ConnectionError, requests.Timeout])
    except ImportError:
        pass
    return tuple(found)


class _Secrets:
    """Removes the token from every text nbllm shows, whatever a library put in it."""

    def __init__(self, token: str | bool | None) -> None:
        values: list[str] = []
        if isinstance(token, str) and token:
            values.append(token)
        try:
            from huggingface_hub import get_token

            if (found := get_token()) is not None:
                values.append(found)
        except Exception:  # noqa: BLE001 - a broken token file must not break error reporting
            pass
        self.values = [v for v in values if len(v) >= 4]
        self.sent = token is not False and bool(values)

    def redact(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "***")
        return text

    def error(self, cause: str, fix: str | None = None) -> DownloadError:
        return DownloadError(self.redact(cause), self.redact(fix) if fix else None)


def _offline_error(repo_id: str, folder: ModelsFolder) -> DownloadError:
    return DownloadError(
        f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded",
        f"unset HF_HUB_OFFLINE to download, or load a model already in {folder.path} (list them with %llm_models)",
    )


def _hub_error(
    exc: BaseException,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    secrets: _Secrets,
    folder: ModelsFolder,
) -> DownloadError:
    """One line saying what the Hub (or the network) answered and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    host = urlsplit(endpoint).netloc or endpoint
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, OfflineModeIsEnabled):
        return _offline_error(repo_id, folder)
    if isinstance(exc, HFValidationError):
        return secrets.error(
            f"{repo_id!r} is not a valid repository id",
            "write it as organization/model, as on the model's page",
        )
    if isinstance(exc, _network_errors()):
        return secrets.error(
            f"cannot reach {host} to download {repo_id} ({type(exc).__name__})",
            "check the network connection (or HF_ENDPOINT) and run the same command again; it resumes where it "
            f"stopped. Models already in {folder.path} load without the network",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return secrets.error(
            f"{repo_id} is a gated model: its conditions must be accepted before downloading (HTTP {status})",
            f"accept them on {endpoint}/{repo_id} while logged in, then {login} here",
        )
    if isinstance(exc, RevisionNotFoundError):
        return secrets.error(
            f"{repo_id} has no revision {revision!r}",
            "give a branch, tag or commit sha that exists (default: main)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401 and not secrets.sent:
            return secrets.error(
                f"{repo_id} was not found on {host}, or it is private and needs a login (HTTP 401)",
                f"check the name (organization/model); for a private or gated model {login}",
            )
        return secrets.error(
            f"{repo_id} was not found on {host} (HTTP {status})",
            "check the name (organization/model)"
            + (
                "; if it is private, check that your token can read it"
                if secrets.sent
                else f"; if it is private, {login}"
            ),
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return secrets.error(
            f"{repo_id} lists a file the Hub does not serve (HTTP 404)",
            "run the same command again; if it persists, the repository changed: give a revision",
        )
    if isinstance(exc, HfHubHTTPError):
        if status == 401:
            return secrets.error(
                f"{host} refused the token (HTTP 401)",
                "log in again with `hf auth login`, or set HF_TOKEN to a valid token",
            )
        if status == 403:
            return secrets.error(
                f"access to {repo_id} is forbidden (HTTP 403)",
                "check that your token has read access; for a gated model accept its conditions on its page",
            )
        if status == 429:
            return secrets.error(
                f"{host} is rate-limiting downloads (HTTP 429)",
                "wait a few minutes and run the same command again; it resumes where it stopped",
            )
        if status is not None and status < 500:
            return secrets.error(
                f"{host} answered HTTP {status} for {repo_id}",
                "check the name; if HF_ENDPOINT is set, check that it points to a Hugging Face Hub or mirror",
            )
        return secrets.error(
            f"{host} answered HTTP {status} for {repo_id}",
            "try again later; the download resumes where it stopped",
        )
    raise exc


def _timeout() -> Any:
    """A connect timeout shorter than the read timeout, in the HTTP library's own type when it has one."""
    try:
        import httpx2

        return httpx2.Timeout(METADATA_TIMEOUT, connect=CONNECT_TIMEOUT)
    except ImportError:  # pragma: no cover - older huggingface_hub (requests): (connect, read)
        return (CONNECT_TIMEOUT, METADATA_TIMEOUT)


def _repo_files(
    repo_id: str, revision: str | None, endpoint: str, token: str | bool | None
) -> tuple[str, dict[str, RemoteFile]]:
    """The commit sha of ``revision`` and the repository's files with their hashes (one API call)."""
    from huggingface_hub import HfApi

    from ._version import __version__

    api = HfApi(endpoint=endpoint, library_name="nbllm", library_version=__version__)
    info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_timeout(), token=token)
    files = {
        s.rfilename: RemoteFile(
            path=s.rfilename,
            size=s.size if s.size is not None else (s.lfs.size if s.lfs else None),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    }
    return info.sha or revision or "main", files


# ----------------------------------------------------------------------------------------- hashing


def content_hash(path: Path, file: RemoteFile) -> str | None:
    """The hash of ``path`` comparable to ``file.key``: sha256 for LFS files, the git blob sha1 otherwise."""
    if file.sha256:
        digest = hashlib.sha256()
    elif file.blob_id:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, file: RemoteFile) -> bool:
    if file.size is not None and path.stat().st_size != file.size:
        return False
    found = content_hash(path, file)
    return found is None or found == file.key


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically, so a record is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------- where files go


@dataclass(frozen=True)
class _Target:
    """Where a selection lands: a model subfolder, or one GGUF file at the models folder's root."""

    root: Path
    """Folder receiving the final files."""
    name: str
    """The entry name (subfolder or root file name)."""
    single: bool
    """True for one GGUF file at the root."""

    @property
    def meta(self) -> Path:
        return self.root / META_DIR

    @property
    def path(self) -> Path:
        return self.root / self.name if self.single else self.root

    def final(self, repo_path: str) -> Path:
        return self.root / (PurePosixPath(repo_path).name if self.single else repo_path)

    def partial(self, file: RemoteFile) -> Path:
        """The partial file of this content: named by its hash, so a resume never mixes two versions."""
        return self.meta / "partial" / f"{file.key}.part"

    @property
    def lock(self) -> Path:
        return self.meta / (f"{self.name}.lock" if self.single else "lock")


def _target(folder: ModelsFolder, repo_id: str, ref: str | None, selection: Selection) -> _Target:
    if selection.kind == "gguf" and len(selection.files) == 1:
        return _Target(folder.path, PurePosixPath(selection.files[0]).name, single=True)
    name = folder_name(repo_id, ref)
    return _Target(folder.path / name, name, single=False)


@contextmanager
def _locked(target: _Target, secrets: _Secrets) -> Iterator[None]:
    """One download per target at a time (two kernels appending to one partial file would corrupt it)."""
    from filelock import FileLock, Timeout

    target.meta.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise secrets.error(
            f"another download into {target.path} is running", "wait for it to finish, or stop it first"
        ) from None
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ progress


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


# ------------------------------------------------------------------------------------------ download


def _parse_spec(spec: str, revision: str | None) -> tuple[str, str | None]:
    hub = parse_hub_id(spec)
    if hub is None:
        raise OptionError(
            f"{spec!r} is not a hub id", "give organization/model or organization/model:revision"
        )
    return hub[0], requested_revision(spec, hub[1], revision)


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
    repo_id, ref = _parse_spec(spec, revision)
    folder = ModelsFolder(models_dir)
    say = echo or (lambda _line: None)
    if check:
        again = spec if ":" in spec or not ref else f"{repo_id}:{ref}"
        return check_model(again, models_dir=folder.path, progress=progress, echo=echo)
    secrets = _Secrets(token)
    if _offline():
        raise _offline_error(repo_id, folder)
    endpoint = _endpoint()
    try:
        commit, remote = _repo_files(repo_id, ref, endpoint, token)
    except Exception as exc:  # mapped to one line; anything unexpected is re-raised by _hub_error
        raise _hub_error(exc, repo_id, ref, endpoint, secrets, folder) from None
    selection = select_files({p: f.size for p, f in remote.items()}, include=files, exclude=exclude)
    if selection.note:
        say(secrets.redact(selection.note))
    target = _target(folder, repo_id, ref, selection)
    chosen = [remote[p] for p in selection.files]
    record = {"repo_id": repo_id, "ref": ref or "main", "revision": commit}
    with _locked(target, secrets):
        if target.single:
            result = _download_single(
                target, chosen[0], record, endpoint, token, secrets, folder, progress, say
            )
        else:
            result = _download_folder(target, chosen, record, endpoint, token, secrets, folder, progress, say)
    if selection.note:
        result = dataclasses.replace(result, notes=(selection.note,))
    say(secrets.redact(result.summary))
    return result


def _check_space(target: _Target, todo: Sequence[RemoteFile], secrets: _Secrets) -> None:
    need = 0
    for f in todo:
        part = target.partial(f)
        need += max((f.size or 0) - (part.stat().st_size if part.is_file() else 0), 0)
    free = shutil.disk_usage(target.meta).free
    if need > free:
        raise secrets.error(
            f"not enough disk space in {target.root}: {format_size(need)} needed, {format_size(free)} free",
            "free some space, or choose another models folder with NBLLM_MODELS_DIR",
        )


def _fetch(
    target: _Target,
    file: RemoteFile,
    commit: str,
    repo_id: str,
    endpoint: str,
    token: str | bool | None,
    secrets: _Secrets,
    folder: ModelsFolder,
    bars: _Progress,
    say: Echo,
) -> tuple[int, bool]:
    """Download ``file`` to its partial file (resuming), verify it, move it to its final name.

    Returns (bytes fetched now, whether it resumed an earlier partial file).
    """
    from huggingface_hub.file_download import hf_hub_url, http_get
    from huggingface_hub.utils import build_hf_headers

    from ._version import __version__

    partial = target.partial(file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.is_file() else 0
    if file.size is not None and have > file.size:
        partial.unlink()
        have = 0
    bars.advance(have)
    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token, library_name="nbllm", library_version=__version__)
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
        say(
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
        error = _hub_error(exc, repo_id, commit, endpoint, secrets, folder)
        if kept:
            error = secrets.error(error.cause + f" ({format_size(kept)} of {file.path} kept)", error.fix)
        raise error from None
    if not _verified(partial, file):
        partial.unlink(missing_ok=True)
        raise secrets.error(
            f"{file.path} from {repo_id} failed its integrity check (its {'sha256' if file.sha256 else 'size or sha1'} "
            "differs from the Hub's); the damaged copy was deleted",
            "run the same command again to download it afresh; if it fails again, something on the network alters the data",
        )
    final = target.final(file.path)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    return (file.size or final.stat().st_size) - have, have > 0


def _download_folder(
    target: _Target,
    chosen: Sequence[RemoteFile],
    record: dict[str, Any],
    endpoint: str,
    token: str | bool | None,
    secrets: _Secrets,
    folder: ModelsFolder,
    progress: bool,
    say: Echo,
) -> DownloadResult:
    meta = target.meta
    manifest_path, complete, verified_path = meta / "manifest.json", meta / "complete", meta / "verified.json"
    previous = _read_json(manifest_path)
    wanted = {f.path: f.as_record() for f in chosen}
    paths = tuple(sorted(wanted))
    base = DownloadResult(
        repo_id=record["repo_id"],
        revision=record["revision"],
        path=target.path,
        name=target.name,
        files=paths,
    )
    if (
        complete.is_file()
        and previous.get("revision") == record["revision"]
        and all(p in previous.get("files", {}) and target.final(p).is_file() for p in paths)
    ):
        return base

    verified: dict[str, str] = _read_json(verified_path)
    complete.unlink(missing_ok=True)  # from here until the end the folder is an unfinished download
    files = dict(wanted)
    if previous.get("revision") == record["revision"]:
        files = {**previous.get("files", {}), **wanted}  # an earlier --file choice at this commit stays valid
    else:
        for stale in set(previous.get("files", {})) - set(wanted):  # files of another revision
            target.final(stale).unlink(missing_ok=True)
            verified.pop(stale, None)
    _write_json(manifest_path, {**record, "files": files})

    todo = []
    for f in chosen:
        final = target.final(f.path)
        if (
            final.is_file()
            and verified.get(f.path) == f.key
            and (f.size is None or final.stat().st_size == f.size)
        ):
            continue
        if final.is_file() and _verified(final, f):  # e.g. a folder text-generation-webui downloaded
            verified[f.path] = f.key
            continue
        todo.append(f)
    _write_json(verified_path, verified)
    if todo:
        _check_space(target, todo, secrets)

    done: list[str] = []
    resumed: list[str] = []
    fetched = 0
    bars = _Progress(sum(f.size or 0 for f in todo), record["repo_id"], progress and bool(todo))
    try:
        for f in todo:
            n, was_resumed = _fetch(
                target, f, record["revision"], record["repo_id"], endpoint, token, secrets, folder, bars, say
            )
            fetched += n
            done.append(f.path)
            if was_resumed:
                resumed.append(f.path)
            verified[f.path] = f.key
            _write_json(verified_path, verified)
    finally:
        bars.close()
    (meta / "revision").write_text(record["revision"] + "\n", encoding="utf-8")
    complete.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n", encoding="utf-8")
    shutil.rmtree(meta / "partial", ignore_errors=True)
    return dataclasses.replace(base, downloaded=tuple(done), bytes_downloaded=fetched, resumed=tuple(resumed))


def _download_single(
    target: _Target,
    file: RemoteFile,
    record: dict[str, Any],
    endpoint: str,
    token: str | bool | None,
    secrets: _Secrets,
    folder: ModelsFolder,
    progress: bool,
    say: Echo,
) -> DownloadResult:
    meta = target.meta
    final = target.final(file.path)
    record_path = meta / f"{target.name}.json"
    pending = meta / f"{target.name}.pending.json"
    entry = {**record, "path": file.path, **file.as_record()}
    base = DownloadResult(
        repo_id=record["repo_id"],
        revision=record["revision"],
        path=final,
        name=target.name,
        files=(file.path,),
    )
    existing = _read_json(record_path)
    if (
        final.is_file()
        and existing.get("revision") == record["revision"]
        and existing.get("sha256") == file.sha256
    ):
        return base
    if final.is_file() and _verified(final, file):  # same content under another revision, or copied by hand
        _write_json(record_path, entry)
        (meta / f"{target.name}.revision").write_text(record["revision"] + "\n", encoding="utf-8")
        return base
    _write_json(pending, {**entry, "key": file.key})
    _check_space(target, [file], secrets)
    bars = _Progress(file.size or 0, record["repo_id"], progress)
    try:
        fetched, was_resumed = _fetch(
            target, file, record["revision"], record["repo_id"], endpoint, token, secrets, folder, bars, say
        )
    finally:
        bars.close()
    _write_json(record_path, entry)
    (meta / f"{target.name}.revision").write_text(record["revision"] + "\n", encoding="utf-8")
    pending.unlink(missing_ok=True)
    return dataclasses.replace(
        base, downloaded=(file.path,), bytes_downloaded=fetched, resumed=(file.path,) if was_resumed else ()
    )


# ------------------------------------------------------------------------------------------- --check


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
                f"{repo_id} is not in {folder.path}", f"download it first: %llm_download {spec}"
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
    entry = _local_entry(spec, folder)
    record = read_record(entry.path)
    if not record:
        raise DownloadError(
            f"{entry.name} was not downloaded by nbllm, so there are no Hub checksums to compare it with",
            "download it with %llm_download organization/model: files already there that match are kept",
        )
    repo = record.get("repo_id")
    if entry.path.is_dir():
        planned: dict[str, dict[str, Any]] = record.get("files", {})
        if not entry.complete:
            raise DownloadError(
                f"{entry.name} is an unfinished download", f"run %llm_download {repo} to finish it first"
            )
        targets = {p: entry.path / p for p in planned}
    else:
        planned = {str(record.get("path", entry.name)): record}
        targets = {p: entry.path for p in planned}
    remote = {p: RemoteFile(p, r.get("size"), r.get("sha256"), r.get("git_sha1")) for p, r in planned.items()}
    from tqdm.auto import tqdm

    bad: list[str] = []
    with tqdm(total=len(remote), desc=f"checking {entry.name}", unit="file", disable=not progress) as bar:
        for p, f in remote.items():
            local = targets[p]
            if not local.is_file() or not _verified(local, f):
                bad.append(p)
            bar.update(1)
    if bad:
        for p in bad:
            targets[p].unlink(missing_ok=True)
        if entry.path.is_dir():
            meta = entry.path / META_DIR
            (meta / "complete").unlink(missing_ok=True)
            verified = _read_json(meta / "verified.json")
            for p in bad:
                verified.pop(p, None)
            _write_json(meta / "verified.json", verified)
        else:
            (entry.path.parent / META_DIR / f"{entry.name}.json").unlink(missing_ok=True)
            (entry.path.parent / META_DIR / f"{entry.name}.revision").unlink(missing_ok=True)
        names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise DownloadError(
            f"{len(bad)} of {len(remote)} file(s) of {entry.name} are missing or do not match the Hub's checksums "
            f"({names}); the damaged ones were deleted",
            f"run %llm_download {repo} to download them again" if repo else "download them again",
        )
    result = DownloadResult(
        repo_id=repo,
        revision=record.get("revision"),
        path=entry.path,
        name=entry.name,
        files=tuple(sorted(remote)),
        checked=True,
    )
    if echo:
        echo(result.summary)
    return result
