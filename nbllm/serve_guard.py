"""What keeps web pages away from a keyless ``%llm_serve``, as Jupyter Server guards its own port.

A server without a key answers anyone who can reach it, and a page open in the user's browser can reach
127.0.0.1: a ``POST`` with ``Content-Type: text/plain`` needs no CORS preflight, and a page on a name the
attacker points at 127.0.0.1 (DNS rebinding) even reads the replies. So, without a key, a request is
refused when

- its ``Host`` is neither the address the server is bound to nor a loopback name (DNS rebinding);
- it comes from a web page of another origin (its ``Origin`` header), unless that origin is allowed
  (``--allow-origin``, which also answers the browser's CORS preflight for it);
- it sends a body that is not ``application/json`` (what a page can send without a preflight).

Clients that are programs (the openai client, curl, nbllm's remote loader) send no ``Origin`` and the
server's own address as ``Host``: nothing changes for them. With a key none of this applies: a page does
not have the key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import NbllmError
from .frontend import command


class Refused(NbllmError):
    """A request the guard turns away: :attr:`status` is the HTTP status to answer with."""

    def __init__(self, status: int, cause: str, fix: str) -> None:
        self.status = status
        super().__init__(cause, fix)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback_name(host: str) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    return is_loopback(name) or name.endswith(".localhost")


def _split_host(value: str) -> tuple[str, int | None]:
    """``Host`` header → (name, port): ``127.0.0.1:8000``, ``[::1]:8000``, ``localhost``."""
    parts = urlsplit("//" + value.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a port: refused below as a foreign host
    return (parts.hostname or "").lower(), port


@dataclass(frozen=True)
class Guard:
    """The checks of one keyless server: bound to ``host``:``port``, allowing ``origins`` (``*``: any)."""

    host: str
    port: int
    origins: Sequence[str] = ()

    def ours(self, name: str) -> bool:
        """Whether ``name`` (a Host's or an Origin's host name) is this server's: its address or loopback."""
        return name == self.host.strip("[]").lower() or _is_loopback_name(name)

    def allows_origin(self, origin: str) -> bool:
        if "*" in self.origins or origin.rstrip("/") in {o.rstrip("/") for o in self.origins}:
            return True
        parts = urlsplit(origin)
        try:
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and self.ours((parts.hostname or "").lower()) and port == self.port

    def check(self, method: str, headers: Mapping[str, str]) -> None:
        """Raise :class:`Refused` for a request a web page may have sent (see the module's text)."""
        host = headers.get("host")
        if host is not None:
            name, port = _split_host(host)
            if not self.ours(name) or port == -1:
                raise Refused(403, f"the request's Host {host!r} is not this server's address (a web page on another "
                              "name may be reaching it: DNS rebinding)",
                              f"send requests to http://127.0.0.1:{self.port} (or localhost), or serve with "
                              "--api-key-env NAME")
        origin = headers.get("origin")
        if origin is not None and not self.allows_origin(origin):
            raise Refused(403, f"requests from web pages of {origin} are refused by a server without a key",
                          f"allow that page with {command('serve allow origin', origin)}, or serve with --api-key-env NAME")
        if method == "POST":
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                raise Refused(415, f"the request body is {kind or 'of no stated type'}, not application/json",
                              "send the JSON body with Content-Type: application/json (curl: -H 'Content-Type: "
                              "application/json')")


__all__ = ["Guard", "Refused", "is_loopback"]
