"""A small Hugging Face Hub–compatible HTTP server for download tests.

It answers the few endpoints huggingface_hub uses to download a model — ``/api/models/<repo>``
(``/revision/<rev>``), ``/api/models/<repo>/tree/<rev>`` and HEAD/GET ``/<repo>/resolve/<rev>/<file>``
with the Hub's headers and Range support — on 127.0.0.1 in a thread, so the real huggingface_hub code runs
against it through ``HF_ENDPOINT``. Switches make it misbehave the ways a real network does: drop a
connection mid-file, interrupt the client mid-file, flip a byte, answer 401/404, require a token. Every
request is logged so tests can assert on byte ranges and headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
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


class HubServer:
    """The server and its switches; use as a context manager or through the ``hub`` fixture."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.token: str | None = None
        """When set, private/gated repos need ``Authorization: Bearer <token>``; a wrong token gets 401."""
        self.drop_once: dict[str, int] = {}
        """file path → bytes sent before the connection is cut (once)."""
        self.interrupt_once: dict[str, int] = {}
        """file path → bytes sent before SIGINT is sent to this process (a kernel interrupt), once."""
        self.corrupt: set[str] = set()
        """file paths served with one byte flipped (the metadata keeps the true hashes)."""
        self.status_override: int | None = None
        """Answer every request with this status (e.g. 500)."""
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
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
        self._httpd.shutdown()
        self._httpd.server_close()

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
                Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
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
                time.sleep(0.2)  # let the client write what it received
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
                self.close_connection = True
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
