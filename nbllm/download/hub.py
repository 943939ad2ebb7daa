"""What nbllm asks the Hugging Face Hub, and what its answers (and the network's failures) mean.

Every failure becomes one :class:`~nbllm.errors.DownloadError` line with a fix; a token never appears
in one (:class:`Secrets`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from ..errors import DownloadError, OptionError
from ..frontend import command
from ..models import ModelsFolder, parse_hub_id, requested_revision
from ..store import FileRecord

CONNECT_TIMEOUT = 4.0
"""Seconds to wait for a connection to the Hub: an unreachable network fails fast, not after minutes."""

METADATA_TIMEOUT = 20.0
"""Seconds to wait for the Hub's answer about a repository (huggingface_hub's HTTP client has no limit)."""


def parse_spec(spec: str, revision: str | None) -> tuple[str, str | None]:
    """``org/model[:rev]`` (and ``--revision``) → the repository and the revision asked for."""
    hub = parse_hub_id(spec)
    if hub is None:
        raise OptionError(
            f"{spec!r} is not a hub id", "give organization/model or organization/model:revision"
        )
    return hub[0], requested_revision(spec, hub[1], revision)


def endpoint() -> str:
    """The Hub endpoint in effect now (``HF_ENDPOINT`` is read at call time, not at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
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


class Secrets:
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


def offline_error(repo_id: str, folder: ModelsFolder) -> DownloadError:
    return DownloadError(
        f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded",
        f"unset HF_HUB_OFFLINE to download, or load a model already in {folder.path} (list them with {command('models')})",
    )


def hub_error(
    exc: BaseException,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    secrets: Secrets,
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
        return offline_error(repo_id, folder)
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


def repo_files(
    repo_id: str, revision: str | None, endpoint: str, token: str | bool | None
) -> tuple[str, dict[str, FileRecord]]:
    """The commit sha of ``revision`` and the repository's files with their hashes (one API call)."""
    from huggingface_hub import HfApi

    from .._version import __version__

    api = HfApi(endpoint=endpoint, library_name="nbllm", library_version=__version__)
    info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_timeout(), token=token)
    files = {
        s.rfilename: FileRecord(
            path=s.rfilename,
            size=s.size if s.size is not None else (s.lfs.size if s.lfs else None),
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,  # an LFS file's blob is its pointer's: unused
        )
        for s in info.siblings or []
    }
    return info.sha or revision or "main", files
