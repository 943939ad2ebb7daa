"""Watch what a call really does, instead of timing it: the connections it opens and the files it hashes.

A test that asserts ``elapsed < 5`` fails on a busy machine and passes a slow path on a fast one; these
prove the property itself ("no network call", "no hashing", "one connection, no retries").
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Watched:
    connections: list[Any] = field(default_factory=list)
    """Every address a socket tried to connect to (or a name looked up), in order."""
    hashed: list[str] = field(default_factory=list)
    """Every content hash nbllm's store started (sha256 of weights, git blob sha1 of small files)."""


class _CountingHashlib:
    """``hashlib`` as :mod:`nbllm.store` sees it, noting each content hash it starts."""

    def __init__(self, real: Any, seen: Watched) -> None:
        self._real, self._seen = real, seen

    def sha256(self, *args: Any, **kwargs: Any) -> Any:
        self._seen.hashed.append("sha256")
        return self._real.sha256(*args, **kwargs)

    def sha1(self, data: bytes = b"", *args: Any, **kwargs: Any) -> Any:
        if data.startswith(b"blob "):  # a file's git blob hash (a path's sha1 is a name, not a hash of content)
            self._seen.hashed.append("git sha1")
        return self._real.sha1(data, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def watched(monkeypatch: pytest.MonkeyPatch, *, allow_network: bool = False) -> Iterator[Watched]:
    """Record connections and hashing inside the block; without ``allow_network`` a connection attempt
    fails at once (recorded all the same, so the test sees it even if the caller swallows the error)."""
    import nbllm.store

    seen = Watched()
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        seen.connections.append(address)
        if not allow_network:
            raise ConnectionRefusedError(f"network call in a test that forbids it: {address}")
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        seen.connections.append(address)
        if not allow_network:
            raise ConnectionRefusedError(f"network call in a test that forbids it: {address}")
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not allow_network and host not in ("127.0.0.1", "localhost", "::1"):
            seen.connections.append(("lookup", host))
            raise socket.gaierror(f"name lookup in a test that forbids it: {host}")
        return getaddrinfo(host, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        patch.setattr(nbllm.store, "hashlib", _CountingHashlib(nbllm.store.hashlib, seen))
        yield seen
