"""The loader of a model at an OpenAI-compatible server: vLLM, TGI, llama.cpp's server, Ollama,
text-generation-webui (``--api``), llama-cpp-python's server, or another kernel's ``%llm_serve``.

``%llm_load http://host:8000/v1`` is claimed here (:meth:`OpenAILoader.claim`); loading asks the server
which models it serves (the first one, or ``--remote-model ID``) and what software it runs. Raw prompts
go to ``/completions`` and chats to ``/chat/completions``, both streamed (server-sent events).

- Sampling options the OpenAI schema lacks (top_k, min_p, typical_p, repetition_penalty) are sent under
  the names the server reads (:data:`SERVERS`); one the server does not read is not sent, with a note.
  They are always sent where read, so a server's own defaults (llama-cpp-python's repeat_penalty 1.1)
  never apply behind the user's back.
- Stop strings are the engine's, as for local models: the stream is closed where one appears, which
  stops the server; so ``eos`` and ``stop`` mean the same for every server.
- The API key comes from an environment variable (``--api-key-env``, default ``OPENAI_API_KEY``). It
  lives in the HTTP client's headers only, and is scrubbed from anything the server says back.
- Several requests may run side by side (:func:`nbllm.generate_many`), at most ``--max-concurrency``:
  the per-generation facts (finish reason, usage, fingerprint) are kept per thread.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

from ..errors import GenerationError, LoadError, MissingDependencyError, NbllmError, NbllmWarning, OptionError
from ..options import GenerationOptions, LoadOptions
from ..source import ModelSource
from .base import Request, TextLoader

T = TypeVar("T")

FORMAT = "openai"
"""The :attr:`ModelSource.format` of a model at an OpenAI-compatible server."""

EXTRA_OPTIONS = ("top_k", "min_p", "typical_p", "repetition_penalty")
"""Generation options the OpenAI schema lacks, sent as extra fields where the server reads them."""


@dataclass(frozen=True)
class ServerKind:
    """What nbllm knows about one kind of server: the request fields its extra samplers go under."""

    name: str
    fields: Mapping[str, tuple[str, ...]]
    """:data:`EXTRA_OPTIONS` name → the request fields that carry it (none: not sent)."""
    top_k_off: int = 0
    """The top_k value that disables top-k at this server (vLLM: -1)."""


def _kind(name: str, top_k_off: int = 0, **fields: str | tuple[str, ...]) -> ServerKind:
    return ServerKind(name, {k: (v,) if isinstance(v, str) else v for k, v in fields.items()}, top_k_off)


SERVERS: dict[str, ServerKind] = {
    "nbllm": _kind("nbllm", top_k="top_k", min_p="min_p", typical_p="typical_p",
                   repetition_penalty="repetition_penalty"),
    "vllm": _kind("vllm", -1, top_k="top_k", min_p="min_p", repetition_penalty="repetition_penalty"),
    "sglang": _kind("sglang", -1, top_k="top_k", min_p="min_p", repetition_penalty="repetition_penalty"),
    "llama.cpp": _kind("llama.cpp", top_k="top_k", min_p="min_p", typical_p="typical_p",
                       repetition_penalty="repeat_penalty"),
    "llama-cpp-python": _kind("llama-cpp-python", top_k="top_k", min_p="min_p", repetition_penalty="repeat_penalty"),
    "text-generation-webui": _kind("text-generation-webui", top_k="top_k", min_p="min_p", typical_p="typical_p",
                                   repetition_penalty="repetition_penalty"),
    "tgi": _kind("tgi"),
    "ollama": _kind("ollama"),
    "openai": _kind("openai"),
    "unknown": _kind("unknown", top_k="top_k", min_p="min_p", typical_p="typical_p",
                     repetition_penalty=("repetition_penalty", "repeat_penalty")),
}
"""The servers nbllm recognizes (see :func:`identify`) and the names their extra samplers go under.
An unrecognized server gets every name (servers built on the OpenAI schema ignore fields they lack)."""


def request_body(kind: ServerKind, model_id: str, request: Request) -> tuple[str, dict[str, Any], list[str]]:
    """The endpoint, the JSON body and the options not sent (set by the user, not read by this kind
    of server) for ``request``. A pure function: options in, the request out."""
    opts = request.options
    body: dict[str, Any] = {"model": model_id, "stream": True, "stream_options": {"include_usage": True}}
    if request.messages is not None:
        path = "chat/completions"
        body["messages"] = [dict(m) for m in request.messages]
        if request.continue_final:  # vLLM's (and nbllm's) names; llama.cpp's server continues by itself
            body["continue_final_message"], body["add_generation_prompt"] = True, False
    else:
        path = "completions"
        body["prompt"] = request.prompt
    body["max_completion_tokens" if kind.name == "openai" and request.messages is not None else "max_tokens"] = (
        opts.max_new_tokens)
    body["temperature"] = opts.temperature
    body["top_p"] = opts.top_p
    body["seed"] = request.seed
    unsent = []
    for name in EXTRA_OPTIONS:
        value = getattr(opts, name)
        fields = kind.fields.get(name, ())
        if not fields:
            if value != GenerationOptions.spec(name).default and not (opts.greedy and name != "repetition_penalty"):
                unsent.append(name)
            continue
        if name == "top_k" and value == 0:
            value = kind.top_k_off
        for field in fields:
            body[field] = value
    body.update(_constraint_fields(kind, request))
    return path, body, unsent


def _constraint_fields(kind: ServerKind, request: Request) -> dict[str, Any]:
    """Structured output in this server's dialect (:func:`nbllm.constraints.request_fields`)."""
    from ..constraints import request_fields

    return request_fields(kind.name, request.options, chat=request.messages is not None)


def identify(owned_by: str, probe: Any, host: str) -> tuple[str, str | None]:
    """The kind of server and its version, from what ``/models`` says it is (``owned_by``) and, when
    that does not tell, from the endpoints each kind has: ``probe(path)`` GETs a path below the
    server's root and returns its JSON object, or ``None``."""
    if host == "api.openai.com":
        return "openai", None
    if owned_by == "nbllm" or owned_by == "vllm":
        said = probe("version") or {}
        return owned_by, said.get("version")
    if owned_by == "sglang":
        return "sglang", None
    if owned_by == "llamacpp":
        said = probe("props") or {}
        return "llama.cpp", said.get("build_info")
    if owned_by == "me":  # llama-cpp-python's server: no version endpoint
        return "llama-cpp-python", None
    said = probe("version")
    if said is not None and "version" in said:
        return ("nbllm" if said.get("server") == "nbllm" else "vllm"), str(said["version"])
    said = probe("api/version")
    if said is not None and "version" in said:
        return "ollama", str(said["version"])
    said = probe("info")
    if said is not None and "model_id" in said:
        return "tgi", str(said.get("version")) if said.get("version") else None
    said = probe("v1/internal/model/info")
    if said is not None and "model_name" in said:
        return "text-generation-webui", None
    return "unknown", None


def _finish(reason: str) -> str:
    """The server's finish reason in the engine's words (stop strings never reach the server)."""
    return "length" if reason == "length" else "eos"


class _Facts(threading.local):
    """The last generation's facts, as the thread that ran it sees them."""

    finish_reason: str | None = None
    usage: tuple[int | None, int | None] = (None, None)
    fingerprint: str | None = None


class _PerThread(Generic[T]):
    """A loader attribute kept per thread (in the loader's :class:`_Facts`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, loader: Any, owner: Any = None) -> T:
        return getattr(loader._local, self.name)

    def __set__(self, loader: Any, value: T) -> None:
        setattr(loader._local, self.name, value)


class OpenAILoader(TextLoader):
    """A model served by an OpenAI-compatible server (``http://host:port/v1``)."""

    name: ClassVar[str] = "openai"
    formats: ClassVar[frozenset[str]] = frozenset({FORMAT})
    load_options: ClassVar[frozenset[str]] = frozenset({"remote_model", "api_key_env", "max_concurrency", "timeout"})
    libraries: ClassVar[tuple[str, ...]] = ("httpx",)
    renders_chat: ClassVar[bool] = True
    structured_output: ClassVar[bool] = True  # passed on in the server's dialect, or refused by kind

    def __init__(self) -> None:
        self._local = _Facts()
        super().__init__()
        self.client: Any = None
        self.url = ""
        self.kind = SERVERS["unknown"]
        self.version: str | None = None
        self.models: list[str] = []
        self._key: str | None = None
        self._slots = threading.BoundedSemaphore(1)

    # per-generation facts, per thread (several requests may run side by side)
    finish_reason = _PerThread[str | None]()
    usage = _PerThread[tuple[int | None, int | None]]()
    fingerprint = _PerThread[str | None]()

    # -- what the user typed -----------------------------------------------------------------------
    @classmethod
    def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
        """An ``http(s)://`` URL: the API's base URL (``/v1`` is added to a bare ``host:port``)."""
        if not spec.lower().startswith(("http://", "https://")):
            return None
        parts = urlsplit(spec)
        if parts.username or parts.password:
            raise OptionError("the server URL holds a user name or password, which would be shown and recorded",
                              "put the key in an environment variable and name it with --api-key-env")
        if parts.query or parts.fragment:
            raise OptionError(f"the server URL {spec} has a query or a fragment",
                              "give the API's base URL, e.g. http://host:8000/v1")
        if not parts.hostname:
            raise OptionError(f"the server URL {spec} names no host", "give the API's base URL, e.g. http://host:8000/v1")
        path = parts.path.rstrip("/") or "/v1"
        url = f"{parts.scheme.lower()}://{parts.netloc}{path}"
        return ModelSource(format=FORMAT, name=options.remote_model or url, url=url, model_id=options.remote_model)

    @classmethod
    def check(cls, source: ModelSource, options: LoadOptions) -> None:
        _import_httpx()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, source: ModelSource, options: LoadOptions) -> None:
        httpx = _import_httpx()
        assert source.url is not None
        self.options = options
        self._key = os.environ.get(options.api_key_env) or None
        self._slots = threading.BoundedSemaphore(options.max_concurrency)
        self.parallel_requests = options.max_concurrency
        self.client = httpx.Client(
            base_url=source.url + "/",
            headers={"Authorization": f"Bearer {self._key}"} if self._key else {},
            timeout=httpx.Timeout(options.timeout, connect=min(options.timeout, 10.0)),
            limits=httpx.Limits(max_connections=options.max_concurrency + 4,
                                max_keepalive_connections=options.max_concurrency),
        )
        self.url = source.url
        try:
            listed = self._models()
            self.models = [str(m.get("id")) for m in listed if m.get("id") is not None]
            if not self.models:
                raise LoadError(f"the server at {self.url} lists no models", "load a model into the server first")
            model_id = options.remote_model or self.models[0]
            if model_id not in self.models:
                raise LoadError(f"the server at {self.url} has no model {model_id!r}; it serves: {', '.join(self.models)}",
                                "use --remote-model with one of them")
            owned_by = next((str(m.get("owned_by") or "") for m in listed if m.get("id") == model_id), "")
            kind, self.version = identify(owned_by, self._probe, urlsplit(self.url).hostname or "")
            self.kind = SERVERS[kind]
        except BaseException:
            self.unload()
            raise
        server = kind + (f" {self.version}" if self.version else "")
        self.source = ModelSource(format=FORMAT, name=model_id, url=self.url, model_id=model_id,
                                  server=server if kind != "unknown" else None)
        others = [m for m in self.models if m != model_id]
        self.placement.notes.append(
            f"served by {server if kind != 'unknown' else 'an OpenAI-compatible server'} at {self.url}"
            + (f"; it also serves: {', '.join(others)}" if others else ""))

    def unload(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def describe(self) -> dict[str, Any]:
        sent = sorted({f for fields in self.kind.fields.values() for f in fields})
        env = self.options.api_key_env if self.options is not None else "OPENAI_API_KEY"
        return {
            "server": self.kind.name + (f" {self.version}" if self.version else ""),
            "models": ", ".join(self.models),
            "samplers": ", ".join(sent) if sent else "temperature, top_p and seed only",
            "api key": f"from ${env}" if self._key else f"none (${env} is not set)",
            "requests": f"up to {self.parallel_requests} at once, timeout {self.options.timeout:g} s"
            if self.options is not None else None,
        }

    # -- talking to the server -------------------------------------------------------------------
    def _models(self) -> list[dict[str, Any]]:
        response = self._send("GET", "models", LoadError)
        if response.status_code == 404:
            raise LoadError(f"{self.url}/models does not exist (404)",
                            "give the API's base URL, the one ending in /v1 (e.g. http://host:8000/v1)")
        if response.status_code != 200:
            raise self._status_error(response, LoadError)
        payload = self._json(response, LoadError)
        if isinstance(payload, dict) and isinstance(payload.get("data"), list):
            return [m for m in payload["data"] if isinstance(m, dict)]
        if isinstance(payload, dict) and "id" in payload:  # one model, not a list (TGI)
            return [payload]
        raise LoadError(f"{self.url}/models did not answer with a list of models",
                        "check that the URL is an OpenAI-compatible API's base URL")

    def _probe(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` below the server's root (the base URL without ``/v1``): its JSON object or None."""
        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        try:
            response = self.client.get(f"{root}/{path}", timeout=min(self.options.timeout if self.options else 5, 5))
            payload = response.json() if response.status_code == 200 else None
        except Exception:
            return None
        return payload if isinstance(payload, dict) else None

    def _send(self, method: str, path: str, error: type[NbllmError], **kwargs: Any) -> Any:
        import httpx

        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, error) from None

    def _transport_error(self, exc: Exception, error: type[NbllmError], pieces: int | None = None) -> NbllmError:
        import httpx

        timeout = self.options.timeout if self.options is not None else 0
        if isinstance(exc, httpx.TimeoutException):
            during = f" after {pieces} pieces of the reply" if pieces else ""
            return error(f"the server at {self.url} did not answer within {timeout:g} s{during}",
                         "check that it is running and not overloaded, or allow more time with --timeout"
                         + (" (the partial text is kept)" if pieces else ""))
        if isinstance(exc, httpx.ConnectError):
            said = self._scrub(str(exc))
            why = "connection refused" if "refused" in said.lower() else _first_line(said)
            return error(f"cannot reach the server at {self.url} ({why})",
                         "start the server, or check the host and port in the URL")
        if pieces is not None:
            return error(f"the connection to the server at {self.url} broke after {pieces} pieces of the reply "
                         f"({_first_line(self._scrub(str(exc))) or type(exc).__name__})",
                         "the partial text is kept; check that the server is still running, then run the prompt again")
        return error(f"the request to the server at {self.url} failed ({_first_line(self._scrub(str(exc)))})",
                     "check the URL and that the server is running")

    def _status_error(self, response: Any, error: type[NbllmError]) -> NbllmError:
        code = int(response.status_code)
        said = self._server_says(response)
        if code in (401, 403):
            env = self.options.api_key_env if self.options is not None else "OPENAI_API_KEY"
            if self._key is None:
                return error(f"the server at {self.url} needs an API key ({code}) and ${env} is not set",
                             f"put the key in the environment variable {env} before starting Jupyter, or name "
                             "the variable that holds it with --api-key-env")
            return error(f"the server at {self.url} refused the API key in ${env} ({code}"
                         + (f": {said})" if said else ")"),
                         "check the key in that variable, or name another with --api-key-env")
        if code == 404 and "model" in said.lower():
            return error(f"the server at {self.url} no longer serves {self.source.model_id if self.source else 'the model'!r} "
                         f"(404: {said})", "load it again: %llm_load with the server's URL")
        return error(f"the server at {self.url} answered {code}" + (f": {said}" if said else ""),
                     "check the request's options against what the server supports, and the server's log")

    def _server_says(self, response: Any) -> str:
        """The server's error message (OpenAI's ``error.message``, FastAPI's ``detail``...), one line, scrubbed."""
        try:
            payload = response.json()
        except Exception:
            payload = None
        text: Any = None
        if isinstance(payload, dict):
            err = payload.get("error")
            text = err.get("message") if isinstance(err, dict) else err or payload.get("detail") or payload.get("message")
        if text is None:
            text = getattr(response, "text", "") or ""
        return _first_line(self._scrub(str(text)))[:300]

    def _json(self, response: Any, error: type[NbllmError]) -> Any:
        try:
            return response.json()
        except ValueError:
            raise error(f"the server at {self.url} did not answer with JSON",
                        "check that the URL is an OpenAI-compatible API's base URL") from None

    def _scrub(self, text: str) -> str:
        """``text`` without the API key (a server may echo it in an error)."""
        return text.replace(self._key, "***") if self._key else text

    # -- generation ------------------------------------------------------------------------------
    def generate_text(self, request: Request) -> Iterator[str]:
        import httpx

        self.finish_reason, self.usage, self.fingerprint = None, (None, None), None
        assert self.source is not None and self.source.model_id is not None
        path, body, unsent = request_body(self.kind, self.source.model_id, request)
        for name in unsent:
            warnings.warn(f"the {self.kind.name} server does not read {name}; it is not sent",
                          NbllmWarning, stacklevel=2)
        pieces = 0
        with self._slots:
            try:
                with self.client.stream("POST", path, json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise self._status_error(response, GenerationError)
                    done = False
                    finished = _close_on_cancel(request.cancel, response)
                    try:
                        for line in response.iter_lines():
                            if request.cancel.is_set():
                                return
                            if not line.startswith("data:"):
                                continue  # blank lines, comments (keep-alive pings), event names
                            data = line[5:].strip()
                            if data == "[DONE]":
                                done = True
                                break
                            for text in self._chunk(data, chat=request.messages is not None):
                                pieces += 1
                                yield text
                    finally:
                        finished.set()
                    if self.finish_reason is None and not request.cancel.is_set():
                        raise GenerationError(  # llama-cpp-python's server does this to a reply another request interrupts
                            f"the server at {self.url} ended the reply after {pieces} pieces without saying why "
                            f"({'[DONE] came first' if done else 'the stream just ended'})",
                            "the partial text is kept; the server may have cut it short for another request: "
                            "check the server's log, then run the prompt again")
            except httpx.HTTPError as exc:
                if request.cancel.is_set():
                    return  # the connection was shut down to stop the reply: cancelled, not failed
                raise self._transport_error(exc, GenerationError, pieces) from None

    def _chunk(self, data: str, *, chat: bool) -> Iterator[str]:
        """The text pieces of one streamed chunk; notes its finish reason, usage and fingerprint."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise GenerationError(f"the server at {self.url} sent a piece of the reply that is not JSON",
                                  "check that the URL is an OpenAI-compatible API") from None
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            err = chunk["error"]
            said = err.get("message") if isinstance(err, dict) else err
            raise GenerationError(f"the server at {self.url} stopped the reply: {_first_line(self._scrub(str(said)))}",
                                  "the partial text is kept; check the server's log")
        if chunk.get("system_fingerprint"):
            self.fingerprint = str(chunk["system_fingerprint"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                yield text
            if choice.get("finish_reason"):
                self.finish_reason = _finish(str(choice["finish_reason"]))


def _close_on_cancel(cancel: threading.Event, response: Any) -> threading.Event:
    """Shut the reply's connection down as soon as ``cancel`` is set, even while a read waits for the
    server: the read returns at once, and the server sees the client leave and stops generating.
    Returns the event to set when the reply has been read (the watcher then ends)."""
    finished = threading.Event()
    try:
        sock = response.extensions["network_stream"].get_extra_info("socket")
    except Exception:  # another transport: closing the response is the best it can do
        sock = None

    def watch() -> None:
        while not finished.is_set():
            if cancel.wait(0.05):
                if not finished.is_set():
                    try:
                        if sock is not None:
                            sock.shutdown(socket.SHUT_RDWR)
                        else:
                            response.close()
                    except Exception:
                        pass
                return

    threading.Thread(target=watch, daemon=True, name="nbllm-remote-cancel").start()
    return finished


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("httpx is not installed", "install it with: pip install httpx") from None
    return httpx


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


__all__ = ["EXTRA_OPTIONS", "FORMAT", "SERVERS", "OpenAILoader", "ServerKind", "identify", "request_body"]
