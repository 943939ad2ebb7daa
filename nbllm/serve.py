"""``%llm_serve`` and :func:`serve`: the kernel's model as an OpenAI-compatible server.

A Starlette app (:func:`create_app`) run by uvicorn on a background thread of the kernel answers
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streamed (server-sent events, as the
OpenAI API streams) or not. Each request becomes the same ``Engine.stream`` call a cell makes, on a
worker thread, so it waits its turn behind the engine (an unfinished result owns the model): cells and
the chat panel keep working, and a client that goes away stops its generation.

Requests take the generation options of ``%%llm`` under the API's names (``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``) and the extra ones vLLM and llama.cpp's server read
(``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty`` or ``repeat_penalty``); what a request
leaves out comes from the engine's defaults (the settings panel's). A request for something nbllm
cannot do (tools, ``best_of``, penalties it has not) is refused with 400, never silently ignored; ``logprobs``,
``echo``, ``n`` and token-id prompts are answered by :mod:`nbllm.serve_logprobs`.

Binding anything but loopback needs a key (``--api-key-env NAME``): clients then send
``Authorization: Bearer <the value of $NAME>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from . import serve_logprobs
from .engine import Engine, Prompt, get_engine
from .errors import NbllmError, NoModelLoadedError, OptionError, missing_dependency
from .options import GenerationOptions, _Schema, option
from .result import Result

KEEPALIVE_SECONDS = 1.0
"""While a streamed request waits its turn behind the engine, an SSE comment is sent this often, so the
client sees a live connection (and a client that left is noticed)."""

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
"""nbllm's finish reasons in the API's words (an interrupted reply is ``stop``)."""

_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {  # n, echo, logprobs, top_logprobs: nbllm.serve_logprobs
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "tools": bool,
    "functions": bool,
    "logit_bias": bool,
    "frequency_penalty": bool,
    "presence_penalty": bool,
    "response_format": lambda v: bool(v) and not (isinstance(v, dict) and v.get("type") == "text"),
}
"""Request fields nbllm cannot honour, and when a value asks for them."""


@dataclass(frozen=True)
class ServeOptions(_Schema):
    """How ``%llm_serve`` listens: the flags, their help and their checks."""

    GROUPS: ClassVar[dict[str, str]] = {"serve": "Serving"}

    host: str = option(
        "127.0.0.1", "The address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) is "
        "reachable from other machines and needs --api-key-env.", group="serve", metavar="HOST",
    )
    port: int = option(8000, "The port to listen on (0: any free port).", group="serve", minimum=0,
                       maximum=65535, metavar="PORT")
    api_key_env: str | None = option(
        None, "The environment variable holding the key clients must send (Authorization: Bearer KEY). "
        "Unset: no key, and only loopback may be served.", group="serve", metavar="NAME",
    )

    def validate(self) -> None:
        super().validate()
        if not self.api_key_env and not is_loopback(self.host):
            raise OptionError(
                f"--host {self.host} is reachable from other machines and no key protects it",
                "add --api-key-env NAME (a variable holding the key clients must send), or serve on 127.0.0.1",
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------- requests → options
def generation_options(body: Mapping[str, Any], defaults: GenerationOptions) -> GenerationOptions:
    """The :class:`GenerationOptions` a request asks for, over ``defaults``; raises ``OptionError``
    (one line) for values out of bounds and for what nbllm cannot do."""
    for name, asks in _UNSUPPORTED.items():
        if name in body and asks(body[name]):
            raise OptionError(f"{name} is not supported by nbllm's server", "leave it out of the request")
    values = defaults.to_dict()
    names = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
             "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
             "repeat_penalty": "repetition_penalty", "repetition_penalty": "repetition_penalty", "seed": "seed"}
    for key, name in names.items():
        if body.get(key) is not None:
            values[name] = body[key]
    stop = body.get("stop")
    if stop is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if isinstance(values["top_k"], (int, float)) and values["top_k"] < 0:  # vLLM's "disabled"
        values["top_k"] = 0
    try:
        greedy = float(values["temperature"]) == 0.0
    except (TypeError, ValueError):
        greedy = False
    if greedy:  # greedy decoding ignores the samplers: no note about it in the kernel
        for name in ("top_p", "top_k", "min_p", "typical_p"):
            values[name] = GenerationOptions.spec(name).default
    return GenerationOptions.from_dict(values)


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The request's messages as nbllm's ``{"role", "content"}`` dicts (text parts joined; the API's
    ``developer`` role is a system prompt)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise OptionError("messages must be a non-empty list", 'send [{"role": "user", "content": "..."}]')
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(p for p in parts if isinstance(p, str)) if len(parts) == len(content) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise OptionError(f"message {i + 1} needs a role (system, user or assistant) and text content",
                              "nbllm's server takes text messages only")
        out.append({"role": str(role), "content": content})
    return out


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OptionError("prompt must be one text", "send one prompt per request (token ids are not taken)")
    return prompt


# ------------------------------------------------------------------------------------- the app
def create_app(engine: Engine | None = None, *, api_key: str | None = None, workers: int = 32) -> Any:
    """The ASGI app serving ``engine``'s model (the kernel's by default). ``api_key``: the key clients
    must send as a bearer token (``None``: none)."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise missing_dependency("starlette", "serve") from None
    from ._version import __version__

    eng = engine if engine is not None else get_engine()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="nbllm-serve")
    live: set[Result] = set()

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                            status_code=status)

    def refused(request: Request) -> Any:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        return error(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def served() -> tuple[str | None, str]:
        """The served model's id, and a fingerprint of what serves it (model, loader, load options)."""
        if not eng.loaded:
            return None, ""
        status = eng.status()
        facts = json.dumps([status.model, status.path, status.loader, status.options], sort_keys=True, default=str)
        return status.model, f"nbllm-{__version__}-{hashlib.sha256(facts.encode()).hexdigest()[:10]}"

    async def models(request: Request) -> Any:
        if (no := refused(request)) is not None:
            return no
        model, _ = served()
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "nbllm"}] if model else []
        wanted = request.path_params.get("model")
        if wanted is not None:
            return JSONResponse(data[0]) if model == wanted else error(404, f"the model {wanted!r} is not served here",
                                                                        code="model_not_found")
        return JSONResponse({"object": "list", "data": data})

    async def version(request: Request) -> Any:
        if (no := refused(request)) is not None:
            return no
        return JSONResponse({"server": "nbllm", "version": __version__})

    async def generate(request: Request, chat: bool) -> Any:
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        model, fingerprint = served()
        if model is None:
            return error(503, "no model is loaded in the kernel; load one with %llm_load", "server_error")
        if body.get("model") not in (None, "", model):
            return error(404, f"the model {body.get('model')!r} is not served here; it serves {model!r}",
                         code="model_not_found")
        extended = serve_logprobs.asks(body, chat)  # logprobs, echo, n, token-id or listed prompts
        try:
            options = generation_options(body, eng.defaults)
            prompt: str | list[dict[str, str]] = chat_messages(body) if chat else (
                "" if extended else completion_prompt(body))
        except NbllmError as exc:
            return error(400, exc.message)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": model, "system_fingerprint": fingerprint}
        if extended:
            return await _extended(body, options, meta, chat, prompt if chat else None)
        continue_final = bool(chat and body.get("continue_final_message"))
        start = _starter(eng, prompt, options, continue_final)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            return StreamingResponse(_events(start, meta, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, _read, start, live)
        except NbllmError as exc:
            return _nbllm_error(exc, error)
        text = "".join(result.chunks)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _FINISH.get(result.finish_reason or "", "stop")}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": _usage(result)})

    async def _extended(body: dict[str, Any], options: GenerationOptions, meta: dict[str, Any], chat: bool,
                        messages: Any) -> Any:
        if body.get("stream"):
            return error(400, "logprobs, echo, n > 1 and token-id or listed prompts are answered whole: leave "
                              "stream out")
        loop = asyncio.get_running_loop()
        try:
            payload = await loop.run_in_executor(pool, serve_logprobs.respond, eng, body, options, meta, chat, messages)
        except NbllmError as exc:
            return _nbllm_error(exc, error)
        return JSONResponse(payload)

    async def _events(start: Callable[[], Result], meta: dict[str, Any], chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        gone = _Leaving()

        def post(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the server stopped: nobody is listening
                gone.leave()

        pool.submit(_stream, start, post, gone, live)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, **extra: Any) -> str:
            payload = {**meta, "object": obj, "choices": [choice] if choice else [], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def piece(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text is not None else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": waiting for the model\n\n"
                    continue
                if kind == "start":
                    if chat:
                        yield event(piece(None, role=True))
                elif kind == "piece":
                    yield event(piece(value))
                elif kind == "error":
                    exc = value
                    message = exc.message if isinstance(exc, NbllmError) else f"{type(exc).__name__}: {exc}"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    return
                else:  # end
                    result: Result = value
                    yield event(piece(None, _FINISH.get(result.finish_reason or "", "stop")))
                    if include_usage:
                        yield event(None, usage=_usage(result))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            gone.leave()  # the client left, or the reply ended: a generation still running stops now

    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    async def health(request: Request) -> Any:
        return Response("ok")

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.live = live
    app.state.pool = pool
    return app


def _starter(engine: Engine, prompt: str | list[dict[str, str]], options: GenerationOptions,
             continue_final: bool) -> Callable[[], Result]:
    """The call that starts the generation on a worker thread (it waits there for the engine)."""
    if isinstance(prompt, str) or not continue_final:
        return lambda: engine.stream(prompt, options)

    def start() -> Result:  # go on with the last (assistant) message, as vLLM's continue_final_message does
        from .chat import render_continuation
        from .chat_template import starts_with_bos

        loader = engine.loader
        if loader.renders_chat:
            ready = Prompt("", None, prompt)
        else:
            text = render_continuation(loader.chat_template, prompt, special_tokens=loader.special_tokens)
            ready = Prompt(text, engine.tokenize(text, add_special=not starts_with_bos(text, loader.special_tokens)), prompt)
        return engine.stream_prompt(ready, options, continue_final=True)

    return start


def _read(start: Callable[[], Result], live: set[Result]) -> Result:
    result = start()
    live.add(result)
    try:
        _ = result.text
    finally:
        live.discard(result)
    return result


class _Leaving:
    """Set when the client of a streamed reply has left: the reply's result, once it exists, is
    cancelled at once (even while its generation waits for the next token)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = False
        self._result: Result | None = None

    def leave(self) -> None:
        with self._lock:
            self._left, result = True, self._result
        if result is not None:
            result.cancel()

    def started(self, result: Result) -> bool:
        """Note the reply's result; whether the client has already left."""
        with self._lock:
            self._result = result
            return self._left


def _stream(start: Callable[[], Result], post: Callable[[tuple[str, Any]], None], gone: _Leaving,
            live: set[Result]) -> None:
    """A worker thread: wait for the engine, then pass the reply's pieces to the event loop."""
    result = None
    try:
        result = start()
        live.add(result)
        if gone.started(result):  # the client left while the request waited for the engine
            result.close()
        post(("start", result))
        for text in result:
            post(("piece", text))
        post(("end", result))
    except BaseException as exc:  # to the client, as an error event
        post(("error", exc))
    finally:
        if result is not None:
            live.discard(result)


def _usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _nbllm_error(exc: NbllmError, error: Callable[..., Any]) -> Any:
    """503 without a model, 500 for a failure inside the loader's library, 400 for the request's own fault."""
    if isinstance(exc, NoModelLoadedError):
        return error(503, exc.message, "server_error")
    if isinstance(exc.__cause__, Exception):
        return error(500, exc.message, "server_error")
    return error(400, exc.message)


# ------------------------------------------------------------------------------------- the server
class Server:
    """An OpenAI-compatible server running on a background thread: :attr:`url`, :meth:`stop`."""

    def __init__(self, options: ServeOptions, engine: Engine | None = None) -> None:
        try:
            import uvicorn
        except ImportError:
            raise missing_dependency("uvicorn", "serve") from None
        key = None
        if options.api_key_env:
            key = os.environ.get(options.api_key_env)
            if not key:
                raise OptionError(f"${options.api_key_env} is not set (or empty)",
                                  f"put the key clients must send in the environment variable {options.api_key_env} "
                                  "before starting Jupyter")
        self.options = options
        self.app = create_app(engine, api_key=key)
        host = "127.0.0.1" if options.host.strip().lower() == "localhost" else options.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, options.port))
        except OSError as exc:
            sock.close()
            raise OptionError(f"cannot listen on {options.host}:{options.port} ({exc.strerror or exc})",
                              "choose another --port (0 picks a free one)") from None
        self.port = int(sock.getsockname()[1])
        self.url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{self.port}/v1"
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="nbllm-serve")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:  # uvicorn says when it listens; a failed start ends the thread
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise OptionError(f"the server on {options.host}:{options.port} did not start",
                                  "see the error above, or try another --port")
            time.sleep(0.005)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop answering: running replies are cancelled (their partial text kept), then the thread ends."""
        for result in list(self.app.state.live):
            result.cancel()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.app.state.pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"<nbllm.serve.Server {self.url} {'running' if self.running else 'stopped'}>"


_SERVER: Server | None = None
_SERVER_LOCK = threading.Lock()


def serve(options: ServeOptions | Mapping[str, Any] | None = None, *, engine: Engine | None = None,
          **kwargs: Any) -> Server:
    """Serve the kernel's model (whichever is loaded, by either loader) as an OpenAI-compatible API at
    ``http://HOST:PORT/v1`` from a background thread; keyword arguments are :class:`ServeOptions`
    fields (``host``, ``port``, ``api_key_env``). One server per kernel: stop it with :func:`stop`."""
    global _SERVER
    if isinstance(options, ServeOptions):
        opts = options.replace(**kwargs) if kwargs else options
    else:
        opts = ServeOptions.from_dict({**dict(options or {}), **kwargs})
    with _SERVER_LOCK:
        if _SERVER is not None and _SERVER.running:
            raise OptionError(f"the kernel's model is already served at {_SERVER.url}",
                              "stop it first: %llm_serve --stop (or .stop() on the server nbllm.serve returned)")
        _SERVER = Server(opts, engine)
        return _SERVER


def stop() -> str | None:
    """Stop the server :func:`serve` started; returns its URL, or ``None`` when none was running."""
    global _SERVER
    with _SERVER_LOCK:
        server, _SERVER = _SERVER, None
    if server is None or not server.running:
        return None
    server.stop()
    return server.url


def current() -> Server | None:
    """The running server, if any."""
    return _SERVER if _SERVER is not None and _SERVER.running else None


__all__ = ["ServeOptions", "Server", "chat_messages", "create_app", "current", "generation_options", "is_loopback",
           "serve", "stop"]
