"""A small Hugging Face Hub–compatible HTTP server for download tests.

It answers the few endpoints huggingface_hub uses to download a model — ``/api/models/<repo>``
(``/revision/<rev>``), ``/api/models/<repo>/tree/<rev>`` and HEAD/GET ``/<repo>/resolve/<rev>/<file>``
with the Hub's headers and Range support — on 127.0.0.1 in a thread, so the real huggingface_hub code runs
against it through ``HF_ENDPOINT``. Switches make it misbehave the ways a real network does: drop a
connection mid-file, interrupt the client mid-file, flip a byte (of any file, large or small), answer
401/404, require a token; and, as the Hub does, answer large (LFS) files with a redirect to a second
server on another host (its CDN). Every request is logged so tests can assert on byte ranges and headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

# Extensions the Hub stores with Git LFS (the real rule is .gitattributes; this matches the usual one).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".msgpack", ".h5")


@dataclass
class HubFile:
    """One file of a served repository with the hashes the Hub publishes for it."""

    path: str
    data: bytes

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """The git blob sha1 (what the Hub calls ``oid``/``blobId``)."""
        if self.is_lfs:  # for LFS files the git blob is the pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
            content = pointer.encode()
        else:
            content = self.data
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id


@dataclass
class HubRepo:
    """A served model repository: files at one commit, reachable by branch names and the commit sha."""

    repo_id: str
    files: dict[str, HubFile]
    commit: str
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False


@dataclass
class Request:
    """One request the server saw."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    host: str | None = None
    """The Host header: which server the client meant."""


class HubServer:
    """The server and its switches; use as a context manager or through the ``hub`` fixture."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.token: str | None = None
        """When set, private/gated repos need ``Authorization: Bearer <token>``; a wrong token gets 401."""
        self.drop_once: dict[str, int] = {}
        """file path → bytes sent before the connection is cut (once)."""
        self.interrupt_once: dict[str, int] = {}
        """file path → bytes sent before SIGINT is sent to this process (a kernel interrupt), once."""
        self.interrupt_when: Callable[[], bool] | None = None
        """With ``interrupt_once``: after sending those bytes, wait until this holds (say, the client has
        written what it received) before the SIGINT; unset, it is sent at once."""
        self.corrupt: set[str] = set()
        """file paths served with one byte flipped, same size (the metadata keeps the true hashes)."""
        self.status_override: int | None = None
        """Answer every request with this status (e.g. 500)."""
        self.cdn: HubServer | None = None
        """Set by :meth:`redirect_lfs`: the server LFS downloads are redirected to."""
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self.cdn is not None:
            self.cdn.stop()
        self._httpd.shutdown()
        self._httpd.server_close()

    def redirect_lfs(self) -> HubServer:
        """Answer downloads of LFS files as the Hub does: a 302 to another host (its CDN), which serves the
        file by its sha256 without any login. Returns that second server, started, on 127.0.0.2 (another
        host of the loopback network; another port of 127.0.0.1 where that address is missing); it logs its
        own requests and has its own switches (drop, corrupt)."""
        try:
            cdn = HubServer("127.0.0.2")
        except OSError:  # pragma: no cover - a system without the rest of 127.0.0.0/8
            cdn = HubServer()
        cdn.repos = self.repos  # the same files, found by sha256
        self.cdn = cdn.start()
        return cdn

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120.0) -> bool:
        """Wait (in a handler thread) until ``condition()`` holds, the server stops, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self._stopped.wait(0.005) or time.monotonic() > deadline:
                return False
        return True

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        branches: tuple[str, ...] = ("main",),
        private: bool = False,
        gated: bool = False,
    ) -> HubRepo:
        """Serve ``files`` (path in repo → bytes, text, or a local file to read) as ``repo_id``."""
        served: dict[str, HubFile] = {}
        for name, content in files.items():
            if isinstance(content, Path):
                data = content.read_bytes()
            elif isinstance(content, str):
                data = content.encode()
            else:
                data = content
            served[name] = HubFile(name, data)
        digest = hashlib.sha1(repo_id.encode())
        for f in sorted(served.values(), key=lambda f: f.path):
            digest.update(f.path.encode() + f.sha256.encode())
        commit = digest.hexdigest()
        repo = HubRepo(repo_id, served, commit, {b: commit for b in branches}, private, gated)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kwargs: object) -> HubRepo:
        """Serve every file under ``folder`` as ``repo_id``."""
        files: dict[str, bytes | str | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.add_repo(repo_id, files, **kwargs)  # type: ignore[arg-type]

    def gets(self, file: str | None = None) -> list[Request]:
        """The GET requests for file downloads (optionally of one file), in order."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and "/resolve/" in r.path and (file is None or r.path.endswith("/" + file))
        ]

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    api_re = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?$")
    tree_re = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
    resolve_re = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
    blob_re = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")  # the CDN's URLs (a redirect's target)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        # --- helpers -------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **(headers or {})}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _wait_for_the_client_to_hang_up(self, timeout: float = 120.0) -> None:
            """Keep the connection open until the client closes it (it gave up on the rest of the body)."""
            self.close_connection = True
            self.connection.settimeout(timeout)
            try:
                while self.connection.recv(65536):
                    pass
            except OSError:
                pass

        def _json(self, obj: object) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str | None = None, message: str | None = None) -> None:
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            if message:
                headers["X-Error-Message"] = message
            self._send(status, json.dumps({"error": message or code or str(status)}).encode(), headers)

        def _repo(self, repo_id: str, rev: str | None) -> tuple[HubRepo, str] | None:
            """The repo and commit for a request, or None after answering with the Hub's error."""
            repo = server.repos.get(repo_id)
            auth = self.headers.get("Authorization")
            if server.token is not None and auth is not None and auth != f"Bearer {server.token}":
                self._error(401, message="Invalid credentials in Authorization header")
                return None
            if repo is None:
                self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
                return None
            if (repo.private or repo.gated) and auth != f"Bearer {server.token}":
                if repo.gated:
                    self._error(401, "GatedRepo", "Access to this model is restricted")
                else:
                    self._error(401, "RepoNotFound", "Repository not found")
                return None
            rev = unquote(rev) if rev else "main"
            commit = repo.refs.get(rev, rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo, commit

        # --- endpoints -----------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            query = urlsplit(self.path).query
            server.log(
                Request(
                    self.command,
                    path,
                    self.headers.get("Range"),
                    self.headers.get("Authorization"),
                    self.headers.get("Host"),
                )
            )
            if server.status_override is not None:
                self._error(server.status_override)
                return
            if m := tree_re.match(path):
                found = self._repo(m["repo"], m["rev"])
                if found:
                    self._json([_tree_entry(f) for f in found[0].files.values()])
                return
            if m := api_re.match(path):
                found = self._repo(m["repo"], m["rev"])
                if found:
                    repo, commit = found
                    blobs = "blobs=true" in query.lower()
                    self._json(
                        {
                            "id": repo.repo_id,
                            "modelId": repo.repo_id,
                            "sha": commit,
                            "private": repo.private,
                            "gated": "auto" if repo.gated else False,
                            "siblings": [_sibling(f, blobs) for f in repo.files.values()],
                        }
                    )
                return
            if m := resolve_re.match(path):
                found = self._repo(m["repo"], m["rev"])
                if found:
                    self._file(found[0], found[1], m["path"])
                return
            if m := blob_re.match(path):
                for repo in server.repos.values():
                    for f in repo.files.values():
                        if f.is_lfs and f.sha256 == m["sha256"]:
                            self._file(repo, repo.commit, f.path)
                            return
            self._error(404)

        def _file(self, repo: HubRepo, commit: str, name: str) -> None:
            f = repo.files.get(name)
            if f is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            data = f.data
            if name in server.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{f.blob_id}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if f.is_lfs:
                headers["X-Linked-Etag"] = f'"{f.sha256}"'
                headers["X-Linked-Size"] = str(len(f.data))
                if server.cdn is not None:  # the Hub sends large files from its CDN, on another host
                    headers["Location"] = f"{server.cdn.url}/lfs/{f.sha256}"
                    self._send(302, b"", headers)
                    return
            start = 0
            status = 200
            if (rng := self.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-$", rng)):
                start = int(m[1])
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if self.command == "HEAD":
                self._send(status, b"", {**headers, "Content-Length": str(len(body))})
                return
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server.drop_once.pop(name, None)
            interrupt = server.interrupt_once.pop(name, None)
            if cut is not None:  # send part of the body, then drop the connection
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            if interrupt is not None:  # send part, then interrupt the client as a kernel interrupt would
                self.wfile.write(body[:interrupt])
                self.wfile.flush()
                if server.interrupt_when is not None:
                    server.wait_until(server.interrupt_when)
                os.kill(os.getpid(), signal.SIGINT)
                self._wait_for_the_client_to_hang_up()
                return
            self.wfile.write(body)

    return Handler


def _lfs(f: HubFile) -> dict[str, object] | None:
    return {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134} if f.is_lfs else None


def _sibling(f: HubFile, blobs: bool) -> dict[str, object]:
    if not blobs:
        return {"rfilename": f.path}
    entry: dict[str, object] = {"rfilename": f.path, "size": len(f.data), "blobId": f.blob_id}
    if f.is_lfs:
        entry["lfs"] = _lfs(f)
    return entry


def _tree_entry(f: HubFile) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.path}
    if f.is_lfs:
        entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
    return entry


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running hub server with huggingface_hub pointed at it (online for this test only)."""
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # Also the import-time constants: huggingface_hub's side requests (an agent-harness registry fetched
        # by build_hf_headers) use constants.ENDPOINT, and hf_hub_url swaps the endpoint into its URL
        # template only where the template starts with constants.ENDPOINT, so both move together.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        yield server
