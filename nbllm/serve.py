"""``%llm_serve`` and :func:`serve`: the kernel's models as an OpenAI-compatible server.

A Starlette app (:func:`create_app`) run by uvicorn on a background thread of the kernel answers
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streamed (server-sent events, as the
OpenAI API streams) or not. Every loaded model is served (:func:`served_models`): the unnamed one by its
model's id, each model loaded as a name (``%llm_load MODEL --as NAME``) by that name; a request's ``model``
picks which answers (none: the unnamed one), an unknown one is 404 ``model_not_found`` naming the served ones.
Each request joins its model's queue (:mod:`nbllm.scheduler`) from a worker
thread: concurrent clients of a model that batches (Transformers) run together in one batch, each reply
its one-by-one text; other models take them in turn, behind the engine (an unfinished result owns the
model), so cells and the chat panel keep working; a client that goes away stops its own reply only.

Requests take the generation options of ``%%llm`` under the API's names (``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``) and the extra ones vLLM and llama.cpp's server read
(``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty`` or ``repeat_penalty``); what a request
leaves out comes from the engine's defaults (the settings panel's). Every field is checked against the
type the OpenAI API gives it (:mod:`nbllm.serve_requests`); a bad one, or a request for something nbllm
cannot do (tools, ``best_of``, penalties), is refused with 400 naming the field, never silently ignored;
``logprobs``, ``echo``, ``n`` > 1 and token-id or listed prompts are answered by :mod:`nbllm.serve_logprobs`.
A reply cut short (``%llm_serve --stop``, a kernel interrupt) never ends as ``stop``:
a streamed one ends with an error event, a whole one with the finish reason ``abort`` (vLLM's word).

Binding anything but loopback needs a key (``--api-key-env NAME``): clients then send
``Authorization: Bearer <the value of $NAME>``. Without a key, requests that a web page may have sent
are refused (:mod:`nbllm.serve_guard`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ._callable import callable_as
from .errors import NbllmError, NoModelLoadedError, OptionError, missing_dependency
from .frontend import command
from .options import GenerationOptions, _Schema, option
from .result import Result
from .serve_guard import Guard, Refused, is_loopback

if TYPE_CHECKING:  # the engine (and pydantic) are imported when a server starts, not by %load_ext
    from .engine import Engine
    from .serve_requests import ChatRequest, CompletionRequest

THREAD_NAME = "nbllm-serve"
"""The prefix of the names of the threads that read served replies (a cell waiting behind one names it)."""

KEEPALIVE_SECONDS = 1.0
"""While a streamed request waits its turn behind the engine, an SSE comment is sent this often, so the
client sees a live connection (and a client that left is noticed)."""

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
"""nbllm's finish reasons in the API's words. Any other (``cancelled``, ``interrupted``, ``superseded``,
``error``) is a reply cut short: ``abort``, as vLLM says, or an error event when streamed."""

ABORTED = "abort"


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
    allow_origin: tuple[str, ...] = option(
        (), "A web page's origin (http://localhost:3000) allowed to use a server without a key, with CORS; "
        "repeat for several, * for any. Unset: requests from web pages are refused.", group="serve",
        metavar="ORIGIN",
    )

    def validate(self) -> None:
        super().validate()
        if not self.api_key_env and not is_loopback(self.host):
            raise OptionError(
                f"--host {self.host} is reachable from other machines and no key protects it",
                "add --api-key-env NAME (a variable holding the key clients must send), or serve on 127.0.0.1",
            )


# ------------------------------------------------------------------------------------- requests → prompts
def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages as nbllm's ``{"role", "content"}`` dicts (text parts joined; the API's
    ``developer`` role is a system prompt; a user message with ``image_url`` parts keeps its parts, each
    image as nbllm's ``{"type": "image", "sha256"}``: :func:`image_message`)."""
    from .serve_requests import RequestError
    from .serve_tools import message_fields

    if not request.messages:
        raise RequestError("messages", "messages must be a non-empty list", 'send [{"role": "user", "content": "..."}]')
    out: list[dict[str, Any]] = []
    for i, m in enumerate(request.messages):
        content: str | None = None
        if m.role == "user" and isinstance(m.content, list) and any(p.type == "image_url" for p in m.content):
            out.append(image_message(m.content, i + 1))
            continue
        if isinstance(m.content, list):
            if all(p.type == "text" and isinstance(p.text, str) for p in m.content):
                content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content
        role = "system" if m.role == "developer" else m.role
        extra = message_fields(m)  # a tool chat's calls and results (nbllm.serve_tools)
        if role == "assistant" and content is None and extra.get("tool_calls"):
            content = ""
        if (role not in ("system", "user", "assistant", "tool") or content is None
                or (role == "tool" and "tool_call_id" not in extra)):
            raise RequestError("messages", f"message {i + 1} needs a role (system, user, assistant, or tool with its "
                               "tool_call_id) and text content", "nbllm's server takes text messages only")
        out.append({"role": role, "content": content, **extra})
    return out


def image_message(content: list[Any], number: int) -> dict[str, Any]:
    """A user message of text and ``image_url`` parts (OpenAI's form: an inline ``data:image/...;base64``
    URL) as nbllm's content parts; the images go to the image store, named by their sha256."""
    from .errors import ImageError
    from .images import from_data_url
    from .serve_requests import RequestError

    parts: list[dict[str, str]] = []
    for j, part in enumerate(content, 1):
        where = f"message {number}, part {j}"
        if part.type == "text" and isinstance(part.text, str):
            parts.append({"type": "text", "text": part.text})
            continue
        url = getattr(part, "image_url", None)
        url = url.get("url") if isinstance(url, dict) else url
        if part.type != "image_url" or not isinstance(url, str):
            raise RequestError("messages", f"{where} is neither a text part nor an image_url part with a url",
                               'send {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')
        try:
            parts.append(from_data_url(url, where).part())
        except ImageError as exc:
            raise RequestError("messages", exc.cause, exc.fix or "") from None
    return {"role": "user", "content": parts}


def completion_prompt(request: CompletionRequest) -> str:
    from .serve_requests import RequestError

    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt", "prompt must be one text",
                           "send one prompt per request (token ids are not taken)")
    return prompt


# ------------------------------------------------------------------------------------- the app
def served_models(engine: Engine | None = None) -> dict[str, Engine]:
    """The loaded models a server answers for, by the id a request's ``model`` gives: ``engine``'s alone
    (by its model's id) when given; else every model of the kernel (:mod:`nbllm.registry`): the unnamed one
    by its model's id, each model loaded as a name by that name."""
    if engine is not None:
        return {engine.status().model or "": engine} if engine.loaded else {}
    from .registry import DEFAULT, models

    return {(e.status().model or "") if name == DEFAULT else name: e for name, e in models().engines().items()}


def create_app(engine: Engine | None = None, *, api_key: str | None = None, workers: int = 32,
               host: str = "127.0.0.1", port: int = 0, allow_origins: tuple[str, ...] = ()) -> Any:
    """The ASGI app serving ``engine``'s model, or (``None``) every model of the kernel by its name
    (:func:`served_models`). ``api_key``: the key clients
    must send as a bearer token (``None``: none; then requests a web page may have sent are refused,
    except from ``allow_origins``, for a server bound to ``host``:``port``)."""
    try:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        from .serve_requests import ChatRequest, RequestError, generation_options, param_of, parse_request
    except ImportError as exc:
        raise missing_dependency(exc.name or "starlette", "serve") from None
    import asyncio

    from ._version import __version__
    from .engine import get_engine

    pool = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_NAME)
    live: set[Result] = set()
    guard = Guard(host, port, allow_origins) if api_key is None else None
    stopping = threading.Event()

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
              param: str | None = None) -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    def refused(request: Request) -> Any:
        if guard is not None:
            try:
                guard.check(request.method, request.headers)
            except Refused as exc:
                return error(exc.status, exc.message, code="refused")
            return None
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        return error(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def fingerprint_of(eng: Engine) -> str:
        """A fingerprint of what serves a model (model, loader, load options)."""
        status = eng.status()
        facts = json.dumps([status.model, status.path, status.loader, status.options], sort_keys=True, default=str)
        return f"nbllm-{__version__}-{hashlib.sha256(facts.encode()).hexdigest()[:10]}"

    def pick(wanted: str | None) -> tuple[str, Engine] | Any:
        """The served model a request names (``None`` or empty: the unnamed one), or the error to answer."""
        from .registry import DEFAULT

        served = served_models(engine)
        if not served:
            return error(503, f"no model is loaded in the kernel; load one with {command('load', 'MODEL')}",
                         "server_error")
        ids = ", ".join(repr(m) for m in served)
        if wanted in served:
            return wanted, served[wanted]
        default = engine if engine is not None else get_engine()
        if wanted in (None, "", DEFAULT) and default.loaded:
            return next(m for m, e in served.items() if e is default), default
        if wanted in (None, ""):
            return error(400, f"no unnamed model is loaded here: name one of the served models ({ids}) in the "
                              "request's model field", param="model", code="model_not_found")
        return error(404, f"the model {wanted!r} is not served here; it serves {ids}", code="model_not_found",
                     param="model")

    async def models(request: Request) -> Any:
        if (no := refused(request)) is not None:
            return no
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "nbllm"} for model in served_models(engine)]
        wanted = request.path_params.get("model")
        if wanted is not None:
            entry = next((d for d in data if d["id"] == wanted), None)
            return JSONResponse(entry) if entry is not None else error(404, f"the model {wanted!r} is not served here",
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
            body = parse_request(await request.body(), chat)
        except RequestError as exc:
            return error(400, exc.message, param=exc.param)
        picked = pick(body.model)
        if not isinstance(picked, tuple):
            return picked
        model, eng = picked
        fingerprint = fingerprint_of(eng)
        try:
            options = generation_options(body, eng.defaults)
            prompt: str | list[dict[str, Any]] = (chat_messages(body) if isinstance(body, ChatRequest) else
                                                  "" if _extends(body.model_dump(exclude_none=True), chat)
                                                  else completion_prompt(body))
        except NbllmError as exc:
            return error(400, exc.message, param=param_of(exc))
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": model, "system_fingerprint": fingerprint}
        given = body.model_dump(exclude_none=True)
        if _extends(given, chat):  # logprobs, echo, n > 1, token-id or listed prompts
            return await _extended(eng, given, options, meta, chat, prompt if chat else None, bool(body.stream))
        continue_final = bool(getattr(body, "continue_final_message", False))
        if chat and isinstance(body, ChatRequest) and body.tools:
            return await _with_tools(eng, body, prompt, options, meta)
        start = _starter(eng, prompt, options, continue_final)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return StreamingResponse(_events(start, meta, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, _read, start, live)
        except NbllmError as exc:
            return _nbllm_error(exc, error)
        text = "".join(result.chunks)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish(result)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": _usage(result)})

    async def _with_tools(eng: Engine, body: ChatRequest, messages: Any, options: GenerationOptions,
                          meta: dict[str, Any]) -> Any:
        """A chat completion with tools (:mod:`nbllm.serve_tools`): whole, or streamed once whole."""
        from .serve_tools import reply_message, request_tools, tool_starter

        try:
            tools, choice = request_tools(body) or ([], "auto")
            start, fmt = tool_starter(eng, messages, options, tools, choice)
        except NbllmError as exc:
            return error(400, exc.message, param=param_of(exc))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, _read, start, live)
        except NbllmError as exc:
            return _nbllm_error(exc, error)
        message, finish = reply_message("".join(result.chunks), fmt, choice, messages)
        finish = finish or _finish(result)
        if not body.stream:
            return JSONResponse({**meta, "object": "chat.completion", "usage": _usage(result),
                                 "choices": [{"index": 0, "logprobs": None, "finish_reason": finish, "message": message}]})
        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
        chunks = [{"role": "assistant", "content": ""}, delta]

        async def events() -> AsyncIterator[str]:
            for i, d in enumerate([*chunks, {}]):
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish if i == len(chunks) else None}
                yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [choice]}, ensure_ascii=False)}\n\n"
            if body.stream_options and body.stream_options.include_usage:
                yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(result)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _extended(eng: Engine, body: dict[str, Any], options: GenerationOptions, meta: dict[str, Any], chat: bool,
                        messages: Any, stream: bool) -> Any:
        if stream:
            return error(400, "logprobs, echo, n > 1 and token-id or listed prompts are answered whole: leave "
                              "stream out", param="stream")
        from .serve_logprobs import respond
        from .serve_requests import RequestError

        loop = asyncio.get_running_loop()
        try:
            payload = await loop.run_in_executor(pool, respond, eng, body, options, meta, chat, messages)
        except RequestError as exc:
            return error(400, exc.message, param=exc.param)
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
                    if _finish(result) == ABORTED:  # cut short: the client must not take it for a whole reply
                        why = (f"the server was stopped ({command('serve stop')})" if stopping.is_set()
                               else f"the generation ended early ({result.finish_reason})")
                        message = f"the reply was cut short after {len(result.chunks)} pieces: {why}"
                        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': ABORTED}})}\n\n"
                        return
                    yield event(piece(None, _finish(result)))
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
    middleware = [Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                             allow_headers=["*"])] if allow_origins else []
    app = Starlette(routes=routes, middleware=middleware)
    app.state.live = live
    app.state.pool = pool
    app.state.stopping = stopping
    return app


def _finish(result: Result) -> str:
    """The API's finish reason for ``result``: ``abort`` for a reply cut short."""
    return _FINISH.get(result.finish_reason or "", ABORTED)


def _starter(engine: Engine, prompt: str | list[dict[str, Any]], options: GenerationOptions,
             continue_final: bool) -> Callable[[], Result]:
    """The call that starts the generation on a worker thread: the request joins the model's queue
    (:mod:`nbllm.scheduler`), where concurrent clients are batched if the loader can."""
    if isinstance(prompt, str) or not continue_final:
        return lambda: engine.scheduler.stream(prompt, options)

    def start() -> Result:  # go on with the last (assistant) message, as vLLM's continue_final_message does
        from .chat import render_continuation
        from .chat_template import starts_with_bos
        from .engine import Prompt

        loader = engine.loader
        if loader.renders_chat:
            ready = Prompt("", None, prompt)
        else:
            text = render_continuation(loader.chat_template, prompt, special_tokens=loader.special_tokens)
            ready = Prompt(text, engine.tokenize(text, add_special=not starts_with_bos(text, loader.special_tokens)), prompt)
        return engine.scheduler.stream_prompt(ready, options, continue_final=True)

    return start


def _extends(body: Mapping[str, Any], chat: bool) -> bool:
    """Whether :mod:`nbllm.serve_logprobs` answers the request (logprobs, echo, n > 1, token-id or listed prompts)."""
    from .serve_logprobs import asks

    return asks(body, chat)


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


def _usage(result: Result) -> dict[str, int] | None:
    """The API's usage; ``None`` when a count is unknown (a model at a server that did not say): never a guess."""
    prompt, completion = result.prompt_tokens, result.completion_tokens
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
        try:
            self.app = create_app(engine, api_key=key, host=host, port=self.port, allow_origins=options.allow_origin)
        except BaseException:
            sock.close()
            raise
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
        """Stop answering: running replies are cancelled (their partial text kept; a client is told its
        reply was cut short), then the thread ends."""
        self.app.state.stopping.set()
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
    """Serve the kernel's models (whichever are loaded, by any loader: the unnamed one, and each loaded as a
    name by that name, :func:`served_models`) as an OpenAI-compatible API at ``http://HOST:PORT/v1`` from a
    background thread; ``engine``: serve that engine's model alone. Keyword arguments are
    :class:`ServeOptions` fields (``host``, ``port``, ``api_key_env``). One server per kernel: stop it with
    :func:`stop`."""
    global _SERVER
    if isinstance(options, ServeOptions):
        opts = options.replace(**kwargs) if kwargs else options
    else:
        opts = ServeOptions.from_dict({**dict(options or {}), **kwargs})
    with _SERVER_LOCK:
        if _SERVER is not None and _SERVER.running:
            raise OptionError(f"the kernel's model is already served at {_SERVER.url}",
                              f"stop it first: {command('serve stop')}")
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


def generation_options(body: Mapping[str, Any], defaults: GenerationOptions, *, chat: bool = False) -> GenerationOptions:
    """The :class:`GenerationOptions` a request's JSON ``body`` asks for, over ``defaults`` (checked as the
    server checks it: :mod:`nbllm.serve_requests`)."""
    from .serve_requests import generation_options as options_of
    from .serve_requests import parse_request

    return options_of(parse_request(json.dumps(body).encode(), chat), defaults)


__all__ = ["ABORTED", "ServeOptions", "Server", "chat_messages", "create_app", "current", "generation_options",
           "is_loopback", "serve", "served_models", "stop"]


callable_as(__name__, serve)  # nbllm.serve(...) whether the attribute is this function or this module
