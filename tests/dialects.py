"""Small servers on 127.0.0.1 that speak each inference server's dialect, as its own source says it
behaves, for the remote loader's tests (beside the real llama-cpp-python server of ``servers.py``).

What each reproduces, and from where (read in the servers' sources, see docs/remote.md):

- **model list and self-description**: ``GET /v1/models`` (``owned_by``), and the endpoint nbllm asks
  what the server is: vLLM ``/version``; SGLang ``/get_server_info`` (with its
  ``enable_deterministic_inference`` server argument); TGI ``/info``; llama.cpp ``/props``; Ollama
  ``/api/version``; text-generation-webui ``/v1/internal/model/info``.
- **request validation and its error bodies**: vLLM ``sampling_params.py`` (``_verify_args``: temperature
  in [0, 2], top_p in (0, 1], top_k >= -1, min_p in [0, 1], repetition_penalty > 0; 400 with an OpenAI
  ``error`` object); SGLang ``sampling_params.py`` (``verify``: top_p in (0, 1], min_p in [0, 1],
  repetition_penalty in [0, 2], top_k -1 or >= 1; 400 ``{"object": "error", "message": ...}``); TGI
  ``validation.rs`` (top_p in (0, 1) exclusive, top_k > 0, typical_p in (0, 1), repetition_penalty > 0;
  temperature 0 is greedy in its OpenAI layer; 422 ``{"error": ..., "error_type": "validation"}``); the
  others check no ranges.
- **what each reads**: TGI's chat endpoint reads no extra sampler, its ``/v1/completions`` reads
  ``repetition_penalty``; Ollama's OpenAI layer reads temperature, top_p, seed, max_tokens (``openai.go``),
  its own ``/api/generate`` and ``/api/chat`` every sampler in ``options`` (NDJSON lines); SGLang's seed
  has no effect unless deterministic inference is on.
- **stream format**: server-sent events ``data: {...}`` ending with ``data: [DONE]``; usage in a last
  chunk when ``stream_options.include_usage`` asks (text-generation-webui here sends none, to exercise
  unknown counts); reasoning beside ``content`` (vLLM ``reasoning``, SGLang and llama.cpp
  ``reasoning_content``, Ollama ``thinking`` in its own API); Ollama's OpenAI layer reports an error
  after the headers as a plain JSON line and ends the stream.
- **finish reasons**: ``stop``/``length``; TGI ``eos_token``; vLLM ``abort``/``error``, SGLang ``abort``.

The model's "text" is words ``w0 w1 ...`` (greedy) or words drawn from the seed. Markers in the prompt (or
the last message) choose a behaviour: ``[think]`` reasoning first, ``[eos]`` the model ends after 3
words, ``[abort]`` the server aborts after 2, ``[fail]`` it fails after 2, ``[stall]`` one word and then
only keep-alive comments until the client leaves, ``[burst]`` every piece in one write.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

try:
    from servers import ThreadedApp
except ImportError:  # tests/ imported as a package
    from tests.servers import ThreadedApp

DIALECTS = ("vllm", "sglang", "tgi", "llama.cpp", "ollama", "text-generation-webui")

OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llamacpp", "ollama": "library",
            "text-generation-webui": "user"}

REASONING_FIELD = {"vllm": "reasoning", "sglang": "reasoning_content", "llama.cpp": "reasoning_content",
                   "ollama": "reasoning"}


class Refused(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise Refused(field, message)


def validate(dialect: str, body: dict[str, Any], *, chat: bool) -> None:
    """The server's own request validation (its source's checks and messages)."""
    def get(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    temperature, top_p = get("temperature", 1.0), get("top_p", 1.0)
    if dialect == "vllm":
        _check(0.0 <= temperature <= 2.0, "temperature", f"temperature must be in [0, 2], got {temperature}.")
        _check(0.0 < top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {top_p}.")
        _check(get("top_k", 0) >= -1, "top_k", f"top_k must be 0 (disable), or at least 1, got {body.get('top_k')}.")
        _check(0.0 <= get("min_p", 0.0) <= 1.0, "min_p", f"min_p must be in [0, 1], got {body.get('min_p')}.")
        _check(get("repetition_penalty", 1.0) > 0, "repetition_penalty",
               f"repetition_penalty must be greater than zero, got {body.get('repetition_penalty')}.")
        _check(get("max_tokens", 16) >= 1, "max_tokens", "max_tokens must be at least 1")
    elif dialect == "sglang":
        _check(temperature >= 0.0, "temperature", f"temperature must be non-negative, got {temperature}.")
        _check(0.0 < top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {top_p}.")
        _check(0.0 <= get("min_p", 0.0) <= 1.0, "min_p", f"min_p must be in [0, 1], got {body.get('min_p')}.")
        top_k = get("top_k", -1)
        _check(top_k == -1 or top_k >= 1, "top_k", f"top_k must be -1 (disable), or at least 1, got {top_k}.")
        _check(0.0 <= get("repetition_penalty", 1.0) <= 2.0, "repetition_penalty",
               f"repetition_penalty must be in [0, 2], got {body.get('repetition_penalty')}.")
    elif dialect == "tgi":
        _check(temperature >= 0.0, "temperature", "`temperature` must be strictly positive")
        if "top_p" in body and body["top_p"] is not None:
            _check(0.0 < top_p < 1.0, "top_p", "`top_p` must be > 0.0 and < 1.0")
        if not chat and body.get("repetition_penalty") is not None:
            _check(body["repetition_penalty"] > 0, "repetition_penalty", "`repetition_penalty` must be strictly positive")


def error_response(dialect: str, refused: Refused) -> tuple[int, dict[str, Any]]:
    """The status and body each server answers a refused request with."""
    if dialect == "tgi":
        return 422, {"error": str(refused), "error_type": "validation"}
    if dialect == "sglang":
        return 400, {"object": "error", "message": str(refused), "type": "BadRequestError", "param": None, "code": 400}
    return 400, {"error": {"message": str(refused), "type": "BadRequestError", "param": refused.field, "code": 400}}


class DialectServer(ThreadedApp):
    """One dialect's server, with :attr:`requests` holding ``(path, body)`` of every generation asked."""

    def __init__(self, dialect: str, *, model: str = "org/model", deterministic: bool = False,
                 says_what_it_is: bool = True) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        assert dialect in DIALECTS
        self.dialect, self.model = dialect, model
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.deterministic = deterministic

        async def models(request: Request) -> Any:
            entry: dict[str, Any] = {"id": model, "object": "model", "created": 0,
                                     "owned_by": OWNED_BY.get(dialect, model)}  # TGI: the model id
            if dialect == "vllm":
                entry.update(root=model, max_model_len=4096)
            return JSONResponse({"object": "list", "data": [entry]})

        about = {
            "vllm": ("version", {"version": "0.11.0"}),
            "sglang": ("get_server_info", {"version": "0.5.2", "enable_deterministic_inference": deterministic}),
            "tgi": ("info", {"model_id": model, "version": "3.3.4"}),
            "llama.cpp": ("props", {"build_info": "b6500-0123abc"}),
            "ollama": ("api/version", {"version": "0.12.3"}),
            "text-generation-webui": ("v1/internal/model/info", {"model_name": model, "lora_names": []}),
        }[dialect]

        async def describe(request: Request) -> Any:
            if not says_what_it_is:
                return Response(status_code=404)
            return JSONResponse(about[1])

        async def openai(request: Request) -> Any:
            chat = request.url.path.endswith("chat/completions")
            body = await request.json()
            self.requests.append((request.url.path, body))
            try:
                validate(dialect, body, chat=chat)
            except Refused as refused:
                status, payload = error_response(dialect, refused)
                return JSONResponse(payload, status_code=status)
            if body.get("model") != model:
                return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                               "type": "NotFoundError", "code": 404}}, status_code=404)
            return StreamingResponse(self._events(body, chat), media_type="text/event-stream")

        async def native(request: Request) -> Any:  # Ollama's own /api/generate and /api/chat
            chat = request.url.path.endswith("chat")
            body = await request.json()
            self.requests.append((request.url.path, body))
            if body.get("model") != model:
                return JSONResponse({"error": f"model '{body.get('model')}' not found"}, status_code=404)
            return StreamingResponse(self._lines(body, chat), media_type="application/x-ndjson")

        routes = [Route("/v1/models", models), Route(f"/{about[0]}", describe),
                  Route("/v1/completions", openai, methods=["POST"]),
                  Route("/v1/chat/completions", openai, methods=["POST"])]
        if dialect == "ollama":
            routes += [Route("/api/generate", native, methods=["POST"]), Route("/api/chat", native, methods=["POST"])]
        super().__init__(Starlette(routes=routes))
        self.url += "/v1"

    # -- the "model" -------------------------------------------------------------------------------
    def words(self, prompt: str, *, n: int, temperature: float, seed: int | None) -> list[str]:
        if temperature == 0:
            return [f"w{i} " for i in range(n)]
        if self.dialect == "sglang" and not self.deterministic:
            seed = None  # its sampler does not follow the request's seed
        draw = random.Random(seed)
        return [f"{draw.choice('abcdefghij')}{draw.randrange(100)} " for _ in range(n)]

    def _plan(self, body: dict[str, Any], chat: bool, limit: int) -> tuple[str, list[str], str]:
        """The last message or the prompt, the words of the reply, and its finish reason."""
        text = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        options = body.get("options") or body
        temperature = options.get("temperature")
        words = self.words(text, n=limit, temperature=1.0 if temperature is None else temperature,
                           seed=options.get("seed"))
        reason = "length"
        if "[eos]" in text:
            words, reason = words[:3], ("eos_token" if self.dialect == "tgi" and not chat else "stop")
        elif "[abort]" in text and self.dialect in ("vllm", "sglang"):
            words, reason = words[:2], "abort"
        elif "[fail]" in text:
            words, reason = words[:2], "error"
        return text, words, reason

    async def _events(self, body: dict[str, Any], chat: bool) -> Any:
        limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        text, words, reason = self._plan(body, chat, limit)
        base = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "model": self.model}

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps({**base, **payload})}\n\n"

        def choice(content: str | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"content": content} if content is not None else {}
                return {"choices": [{"index": 0, "delta": {**delta, **extra}, "finish_reason": finish}]}
            return {"choices": [{"index": 0, "text": content or "", "finish_reason": finish}]}

        if "[think]" in text and chat and self.dialect in REASONING_FIELD:
            for _ in range(3):
                yield event(choice(None, **{REASONING_FIELD[self.dialect]: "hmm "}))
        if "[burst]" in text:  # every piece in one write, as a server (or a proxy) that buffers sends them
            yield "".join(event(choice(word, reason if i == len(words) - 1 else None)) for i, word in enumerate(words))
        for i, word in enumerate(words if "[burst]" not in text else ()):
            last = i == len(words) - 1
            if "[stall]" in text:
                yield event(choice(word))
                while True:  # keep-alive comments, as TGI and text-generation-webui send them, and nothing else
                    yield ": ping\n\n"
                    await asyncio.sleep(0.05)
            if last and reason == "error" and self.dialect == "ollama":
                yield event(choice(word))
                # middleware/openai.go: an error after the headers is a plain JSON line, then the end
                yield json.dumps({"error": {"message": "llama runner process has terminated", "type": "api_error",
                                            "param": None, "code": None}}) + "\n"
                return
            yield event(choice(word, reason if last else None))
            await asyncio.sleep(0)
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words) + (3 if "[think]" in text else 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        if (asked or self.dialect == "llama.cpp") and self.dialect != "text-generation-webui":
            yield event({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    async def _lines(self, body: dict[str, Any], chat: bool) -> Any:
        options = body.get("options") or {}
        text, words, reason = self._plan(body, chat, int(options.get("num_predict") or 128))

        def line(content: str = "", thinking: str = "", **extra: Any) -> str:
            if chat:
                message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
                return json.dumps({"model": self.model, "message": message, **extra}) + "\n"
            return json.dumps({"model": self.model, "response": content,
                               **({"thinking": thinking} if thinking else {}), **extra}) + "\n"

        if "[think]" in text:
            for _ in range(3):
                yield line(thinking="hmm ", done=False)
        for word in words:
            yield line(word, done=False)
            await asyncio.sleep(0)
        if reason == "error":
            yield json.dumps({"error": "llama runner process has terminated"}) + "\n"
            return
        count = len(words) + (3 if "[think]" in text else 0)
        yield line(done=True, done_reason=reason, prompt_eval_count=len(text.split()), eval_count=count,
                   eval_duration=count * 10_000_000)  # 10 ms a token: 100 tok/s
