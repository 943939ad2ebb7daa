"""The loader of a model at an OpenAI-compatible server: vLLM, TGI, llama.cpp's server, Ollama,
text-generation-webui (``--api``), llama-cpp-python's server, or another kernel's ``%llm_serve``.

``%llm_load http://host:8000/v1`` is claimed here (:meth:`OpenAILoader.claim`); loading asks the server
which models it serves (the first one, or ``--remote-model ID``) and what software it runs. Raw prompts
go to ``/completions`` and chats to ``/chat/completions``, both streamed (server-sent events); Ollama is
spoken to through its own ``/api/generate`` and ``/api/chat`` (JSON lines), the only ones that read every
sampler.

- Each server's dialect, from its own source (:data:`SERVERS`): sampling options the OpenAI schema lacks
  (top_k, min_p, typical_p, repetition_penalty) go under the names the server reads, and one it does not
  read is not sent, with a note; they are always sent where read, so a server's own defaults
  (llama-cpp-python's repeat_penalty 1.1) never apply behind the user's back. A value the server refuses
  is refused before sending (:func:`check_limits`); one that means "off" where the server refuses it is
  left out. A seed the server does not follow (SGLang) is said and recorded.
- Stop strings are the engine's, as for local models: the stream is closed where one appears, which
  stops the server; so the server's ``stop`` is the model's end (``eos``). A reply the server aborted or
  failed is an error, never a normal end; reasoning text is kept apart from the reply.
- ``--timeout`` bounds the wait for data (:class:`_Watch`): keep-alive comments are no answer.
- Token counts come from the server's usage, else its tokenizer, else stay unknown (never the number of
  pieces).
- The API key comes from an environment variable (``--api-key-env``, default ``OPENAI_API_KEY``). It
  lives in the HTTP client's headers only, and is scrubbed from anything the server says back.
- Several requests may run side by side (:func:`nbllm.generate_many`), at most ``--max-concurrency``:
  the per-generation facts (finish reason, usage, fingerprint, reasoning, rate, notes) are kept per thread.
  llama-cpp-python's server gets one at a time (it cuts a running stream short for the next).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

from ..errors import GenerationError, LoadError, MissingDependencyError, NbllmError, NbllmWarning, OptionError
from ..frontend import command
from ..options import GenerationOptions, LoadOptions
from ..source import ModelSource
from ._remote_scores import NO_STREAMED_LOGPROBS, SCORING_SERVERS, ServerScorer, entries, logprobs_fields
from ._samplers import SERVER_SAMPLERS, server_sampler_fields
from .base import Request, TextLoader

T = TypeVar("T")

FORMAT = "openai"
"""The :attr:`ModelSource.format` of a model at an OpenAI-compatible server."""

EXTRA_OPTIONS = ("top_k", "min_p", "typical_p", "repetition_penalty")
"""Generation options the OpenAI schema lacks, sent as extra fields where the server reads them."""

SAMPLERS = ("top_p", "top_k", "min_p", "typical_p")
"""Options greedy decoding ignores: left out of a greedy request (some servers check them anyway)."""


@dataclass(frozen=True)
class Range:
    """The values a server accepts for one option, as its own request validation says."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """``low`` itself is refused."""
    high_open: bool = False
    """``high`` itself is refused."""

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True)
class ServerKind:
    """What nbllm knows about one kind of server (from its source): the request fields its extra
    samplers go under, the values it accepts, and how it streams."""

    name: str
    fields: Mapping[str, tuple[str, ...]]
    """:data:`EXTRA_OPTIONS` name → the request fields that carry it (none: not sent)."""
    top_k_off: int = 0
    """The top_k value that disables top-k at this server (vLLM: -1)."""
    label: str = ""
    """The server's name as its users know it."""
    completion_fields: Mapping[str, tuple[str, ...]] | None = None
    """Where ``/completions`` reads more extra fields than the chat endpoint (TGI): those fields."""
    limits: Mapping[str, Range] = field(default_factory=dict)
    """Option name → the values the server accepts; others are refused before sending."""
    left_out: Mapping[str, float] = field(default_factory=dict)
    """Option name → the value that means "off", which the server refuses: not sent (TGI's top_p 1)."""
    continue_fields: Mapping[str, Any] = field(default_factory=dict)
    """The request fields that ask it to extend the final assistant message (empty: it does so by itself)."""
    seed_applies: bool = True
    """False where a sampled reply does not follow the seed (SGLang without deterministic inference)."""
    native: bool = False
    """Generation goes through the server's own API rather than its OpenAI layer (Ollama: only its own
    API reads every sampler)."""
    repetition_window: str | None = None
    """How much of the text the server's repetition penalty covers, when that is not the whole sequence."""
    repetition_unsure: str | None = None
    """Why the server may accept ``repetition_penalty`` and not apply it (SGLang), when it may."""
    tokenizer: str | None = None
    """The server's endpoint that counts tokens (below its root), used when a reply comes without usage."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)


def _kind(name: str, top_k_off: int = 0, **fields: Any) -> ServerKind:
    extra = {k: fields.pop(k) for k in list(fields) if k not in EXTRA_OPTIONS}
    return ServerKind(name, {k: (v,) if isinstance(v, str) else v for k, v in fields.items()}, top_k_off, **extra)


_UNIT_OPEN = Range(0.0, 1.0, low_open=True)  # (0, 1]
_POSITIVE = Range(0.0, None, low_open=True)

SERVERS: dict[str, ServerKind] = {
    "nbllm": _kind("nbllm", top_k="top_k", min_p="min_p", typical_p="typical_p",
                   repetition_penalty="repetition_penalty", continue_fields={"continue_final_message": True,
                                                                             "add_generation_prompt": False}),
    # vllm/sampling_params.py SamplingParams._verify_args
    "vllm": _kind("vllm", -1, top_k="top_k", min_p="min_p", repetition_penalty="repetition_penalty", label="vLLM",
                  limits={"temperature": Range(0.0, 2.0), "top_p": _UNIT_OPEN, "min_p": Range(0.0, 1.0),
                          "repetition_penalty": _POSITIVE},
                  continue_fields={"continue_final_message": True, "add_generation_prompt": False},
                  tokenizer="tokenize"),
    # sglang/srt/sampling/sampling_params.py SamplingParams.verify
    "sglang": _kind("sglang", -1, top_k="top_k", min_p="min_p", repetition_penalty="repetition_penalty",
                    label="SGLang", limits={"top_p": _UNIT_OPEN, "min_p": Range(0.0, 1.0),
                                            "repetition_penalty": Range(0.0, 2.0)},
                    continue_fields={"continue_final_message": True},
                    # sgl-project/sglang#28179: accepted, but not applied where its penalizer is not registered
                    repetition_unsure="SGLang accepts repetition_penalty but some of its versions and modes do not "
                                      "apply it (sglang issue 28179)"),
    # tools/server/server-task.cpp params_from_json_cmpl: no range checks; repeat_last_n -1 = the context
    "llama.cpp": _kind("llama.cpp", top_k="top_k", min_p="min_p", typical_p="typical_p",
                       repetition_penalty="repeat_penalty", label="llama.cpp's llama-server", tokenizer="tokenize"),
    # llama_cpp/server/types.py (pydantic fields)
    "llama-cpp-python": _kind("llama-cpp-python", top_k="top_k", min_p="min_p", repetition_penalty="repeat_penalty",
                              label="llama-cpp-python's server",
                              limits={"top_p": Range(0.0, 1.0), "min_p": Range(0.0, 1.0)},
                              repetition_window="the last last_n_tokens_size tokens (64 unless the server was "
                                                "started with another --last_n_tokens_size)",
                              tokenizer="extras/tokenize/count"),
    # modules/api/typing.py: no range checks; the reply is continued with its own field
    "text-generation-webui": _kind("text-generation-webui", top_k="top_k", min_p="min_p", typical_p="typical_p",
                                   repetition_penalty="repetition_penalty", continue_fields={"continue_": True}),
    # router/src/validation.rs Validation::validate; the OpenAI layer (server.rs, lib.rs) maps temperature 0
    # to greedy; its /v1/completions also reads repetition_penalty, its chat endpoint does not
    "tgi": _kind("tgi", label="TGI", completion_fields={"repetition_penalty": ("repetition_penalty",)},
                 limits={"top_p": Range(0.0, 1.0, low_open=True, high_open=True), "typical_p": Range(0.0, 1.0),
                         "repetition_penalty": _POSITIVE},
                 left_out={"top_p": 1.0}),
    # openai/openai.go reads temperature, top_p, seed, max_tokens, stop and the penalties only; its own
    # /api/generate and /api/chat read every sampler in "options" (api/types.go)
    "ollama": _kind("ollama", top_k="top_k", min_p="min_p", typical_p="typical_p", repetition_penalty="repeat_penalty",
                    label="Ollama", native=True),
    "openai": _kind("openai", limits={"temperature": Range(0.0, 2.0), "top_p": Range(0.0, 1.0)}),
    "unknown": _kind("unknown", top_k="top_k", min_p="min_p", typical_p="typical_p",
                     repetition_penalty=("repetition_penalty", "repeat_penalty"),
                     continue_fields={"continue_final_message": True, "add_generation_prompt": False}),
}
"""The servers nbllm recognizes (see :func:`identify`) and how each reads a request. An unrecognized
server gets every name (servers built on the OpenAI schema ignore fields they lack)."""

_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
          "typical_p": "--typical-p", "repetition_penalty": "--repetition-penalty"}


def check_limits(kind: ServerKind, opts: GenerationOptions) -> None:
    """Refuse, in one line naming the server's limit, a value the server would refuse."""
    for name, limit in kind.limits.items():
        value = getattr(opts, name)
        if kind.left_out.get(name) == value or (opts.greedy and name in SAMPLERS) or limit.holds(value):
            continue
        off = kind.left_out.get(name, GenerationOptions.spec(name).default)
        raise OptionError(
            f"{_FLAGS[name]} {value:g} is outside what {kind.label} accepts ({name} in {limit})",
            f"give a value in that range, or {off:g} to turn it off")


def request_body(kind: ServerKind, model_id: str, request: Request) -> tuple[str, dict[str, Any], list[str]]:
    """The endpoint, the JSON body and the options not sent (set by the user, not read by this kind
    of server) for ``request``. A pure function: options in, the request out. A value the server
    would refuse raises :class:`OptionError`; one that means "off" where the server refuses it is left
    out; greedy requests leave out the samplers greedy decoding ignores."""
    opts = request.options
    check_limits(kind, opts)
    if kind.native:
        return _native_body(kind, model_id, request)
    chat = request.messages is not None
    body: dict[str, Any] = {"model": model_id, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        path = "chat/completions"
        body["messages"] = wire_messages(request.messages or (), request.images)
        if request.continue_final:  # llama.cpp's server continues a final assistant message by itself
            body.update(kind.continue_fields)
    else:
        path = "completions"
        body["prompt"] = request.prompt
    body["max_completion_tokens" if kind.name == "openai" and chat else "max_tokens"] = opts.max_new_tokens
    body["temperature"] = opts.temperature
    if not opts.greedy and kind.left_out.get("top_p") != opts.top_p:
        body["top_p"] = opts.top_p
    body["seed"] = request.seed
    fields = dict(kind.fields)
    if not chat and kind.completion_fields:
        fields.update(kind.completion_fields)
    unsent = []
    for name in EXTRA_OPTIONS:
        value = getattr(opts, name)
        carried = fields.get(name, ())
        if not carried:
            if value != GenerationOptions.spec(name).default and not (opts.greedy and name != "repetition_penalty"):
                unsent.append(name)
            continue
        if opts.greedy and name in SAMPLERS:
            continue
        if kind.left_out.get(name) == value:
            continue
        if name == "top_k" and value == 0:
            value = kind.top_k_off
        for f in carried:
            body[f] = value
    if kind.name == "llama.cpp":
        body["repeat_last_n"] = -1  # the whole context, as vLLM's and Transformers' penalties (default: 64)
    body.update(_constraint_fields(kind, request))
    body.update(server_sampler_fields(kind.name, opts))
    if opts.logprobs is not None:
        body.update(logprobs_fields(opts.logprobs, chat=chat))
    if chat and request.tools:
        body.update(_tool_fields(request, body["messages"]))
    return path, body, unsent


def wire_messages(messages: Sequence[Mapping[str, Any]], images: Sequence[Any], *, native: bool = False) -> list[dict[str, Any]]:
    """The messages as a server takes them: nbllm's image parts (by sha256) become OpenAI's ``image_url``
    parts with the image inline (``data:image/png;base64``), or, for Ollama's own API (``native``), the
    message's text with the images in its ``images`` list (base64)."""
    pixels = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(dict(m))
        elif native:
            text = "".join(p["text"] for p in content if p["type"] == "text")
            shown = [next(pixels).data_url().partition(",")[2] for p in content if p["type"] == "image"]
            out.append({"role": m["role"], "content": text, "images": shown})
        else:
            out.append({"role": m["role"], "content": [
                {"type": "text", "text": p["text"]} if p["type"] == "text"
                else {"type": "image_url", "image_url": {"url": next(pixels).data_url()}} for p in content]})
    return out


def _tool_fields(request: Request, wired: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``tools`` / ``tool_choice``, and the ``wired`` messages (:func:`wire_messages`: images already
    inline) with their tool calls' arguments as JSON text (nbllm keeps them as objects, as chat templates
    render them)."""
    messages = []
    for m in wired:
        if m.get("tool_calls"):
            m = {**m, "content": m.get("content") or "", "tool_calls": [  # "" not null: llama-cpp-python's wants text
                {**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                   if isinstance(c["function"].get("arguments"), str)
                                   else json.dumps(c["function"].get("arguments"), ensure_ascii=False)}}
                for c in m["tool_calls"]]}
        messages.append(m)
    choice = request.tool_choice or "auto"
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    return {"messages": messages, "tools": list(request.tools or ()), "tool_choice": choice}


def _constraint_fields(kind: ServerKind, request: Request) -> dict[str, Any]:
    """Structured output in this server's dialect (:func:`nbllm.constraints.request_fields`)."""
    from ..constraints import request_fields

    return request_fields(kind.name, request.options, chat=request.messages is not None)


def _native_body(kind: ServerKind, model_id: str, request: Request) -> tuple[str, dict[str, Any], list[str]]:
    """Ollama's own API: every sampler in ``options``; a raw prompt as it is (``raw``: no template)."""
    opts = request.options
    options: dict[str, Any] = {
        "num_predict": opts.max_new_tokens, "temperature": opts.temperature, "seed": request.seed,
        "top_p": opts.top_p, "top_k": opts.top_k, "min_p": opts.min_p, "typical_p": opts.typical_p,
        "repeat_penalty": opts.repetition_penalty, "repeat_last_n": -1,
        **server_sampler_fields(kind.name, opts),
    }
    body: dict[str, Any] = {"model": model_id, "stream": True, "options": options, **_constraint_fields(kind, request)}
    if request.messages is not None:  # a final assistant message is continued by Ollama itself
        body["messages"] = wire_messages(request.messages, request.images, native=True)
        return "api/chat", body, []
    body["prompt"], body["raw"] = request.prompt, True
    return "api/generate", body, []


def identify(owned_by: str, probe: Any, host: str) -> tuple[str, str | None]:
    """The kind of server and its version, from what ``/models`` says it is (``owned_by``) and, when
    that does not tell, from the endpoints each kind has: ``probe(path)`` GETs a path below the
    server's root and returns its JSON object, or ``None``."""
    if host == "api.openai.com":
        return "openai", None
    if owned_by == "nbllm" or owned_by == "vllm":
        said = probe("version") or {}
        if owned_by == "vllm" or said.get("server") == "nbllm":
            return owned_by, said.get("version")
        return "unknown", None
    if owned_by == "sglang":
        said = probe("get_server_info") or probe("server_info") or {}
        return "sglang", str(said["version"]) if said.get("version") else None
    if owned_by == "llamacpp":
        said = probe("props") or {}
        return "llama.cpp", said.get("build_info")
    if owned_by == "me":  # llama-cpp-python's server: no version endpoint
        return "llama-cpp-python", None
    said = probe("version")  # nbllm's own server; many others answer /version too, so it must say so
    if said is not None and said.get("server") == "nbllm" and "version" in said:
        return "nbllm", str(said["version"])
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


FINISH_REASONS = {"stop": "eos", "eos": "eos", "eos_token": "eos", "stop_sequence": "eos", "length": "length",
                  "max_tokens": "length"}
"""Servers' finish reasons for a normal end, in the engine's words (nbllm sends no stop strings, so the
server's "stop" is the model's end). Any other reason is kept as the server said it."""

FAILED = frozenset({"abort", "error", "cancelled", "canceled", "unload"})
"""Finish reasons of a reply the server cut short or failed (vLLM: abort, error; SGLang: abort; Ollama:
unload): never a normal end."""


def _finish(reason: str) -> str:
    """The server's finish reason in the engine's words."""
    return FINISH_REASONS.get(reason, reason)


class _Facts(threading.local):
    """The last generation's facts, as the thread that ran it sees them."""

    finish_reason: str | None = None
    usage: tuple[int | None, int | None] = (None, None)
    fingerprint: str | None = None
    reasoning: str = ""
    decode_rate: float | None = None

    def __init__(self) -> None:
        self.notes: dict[str, Any] = {}


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
    format_words: ClassVar[str] = "a model at an OpenAI-compatible server"
    load_options: ClassVar[frozenset[str]] = frozenset({"remote_model", "api_key_env", "max_concurrency", "timeout"})
    libraries: ClassVar[tuple[str, ...]] = ("httpx",)
    renders_chat: ClassVar[bool] = True
    tool_calls_as: ClassVar[str | None] = "hermes"  # the server's tool_calls, as text conversations read
    structured_output: ClassVar[bool] = True  # passed on in the server's dialect, or refused by kind

    @property
    def sampler_options(self) -> frozenset[str]:  # type: ignore[override]
        """The text-generation-webui samplers this server reads (:data:`SERVER_SAMPLERS`)."""
        return SERVER_SAMPLERS.get(self.kind.name, frozenset())

    @property
    def sampler_refusal(self) -> str:  # type: ignore[override]
        return f"serve the model from text-generation-webui or llama.cpp's server ({self.kind.label} does not read them)"

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
        self._said_seed = False
        self._said_repetition = False
        self.scorer: ServerScorer | None = None
        """The server's tokenizer and prompt log-probabilities (scoring), where nbllm uses them."""
        self.logprobs_why: str | None = None
        """Why the server gives no ``--logprobs`` (``None``: it gives them)."""

    # per-generation facts, per thread (several requests may run side by side)
    finish_reason = _PerThread[str | None]()
    usage = _PerThread[tuple[int | None, int | None]]()
    fingerprint = _PerThread[str | None]()
    reasoning = _PerThread[str]()
    decode_rate = _PerThread[float | None]()
    notes = _PerThread[dict[str, Any]]()

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
            if kind == "sglang":  # its seed applies only with deterministic inference (server_args)
                info = self._probe("get_server_info") or self._probe("server_info") or {}
                if not info.get("enable_deterministic_inference"):
                    self.kind = replace(self.kind, seed_applies=False)
            self.logprobs_why = NO_STREAMED_LOGPROBS.get(kind)
            self.gives_logprobs = self.logprobs_why is None
            self.scores_tokens = kind in SCORING_SERVERS
            self.scorer = ServerScorer(self.client, self.url, self._root(), model_id) if self.scores_tokens else None
            if kind == "llama-cpp-python":
                # it runs one request at a time, and by default a new request cuts the running stream short
                self.parallel_requests = 1
                self._slots = threading.BoundedSemaphore(1)
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

    @property
    def takes_images(self) -> bool:
        return True  # passed on as image_url parts: the server says whether its model takes them

    def unload(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def describe(self) -> dict[str, Any]:
        sent = sorted({f for fields in self.kind.fields.values() for f in fields})
        env = self.options.api_key_env if self.options is not None else "OPENAI_API_KEY"
        facts = {
            "server": self.kind.name + (f" {self.version}" if self.version else ""),
            "models": ", ".join(self.models),
            "samplers": ", ".join(sent) if sent else "temperature, top_p and seed only",
            "api key": f"from ${env}" if self._key else f"none (${env} is not set)",
            "requests": (f"up to {self.parallel_requests} at once" if self.parallel_requests > 1 else
                         "one at a time" + (" (the server runs one, and by default cuts a running reply short for "
                                            "the next)" if self.kind.name == "llama-cpp-python" else ""))
            + f", timeout {self.options.timeout:g} s without data" if self.options is not None else None,
            "seed": None if self.kind.seed_applies else
            "ignored for sampled replies (the server was not started with --enable-deterministic-inference)",
            "repetition penalty": f"covers {self.kind.repetition_window}" if self.kind.repetition_window else
            "sent, but may not apply (sglang issue 28179)" if self.kind.repetition_unsure else None,
            "generation": "through Ollama's own /api/generate and /api/chat (its OpenAI layer reads no top_k, "
            "min_p, typical_p or repeat_penalty)" if self.kind.native else None,
        }
        return {k: v for k, v in facts.items() if v is not None}

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
        raise LoadError(f"{self.url}/models did not answer with a list of models",
                        "check that the URL is an OpenAI-compatible API's base URL")

    def _root(self) -> str:
        """The server's root: the base URL without ``/v1``."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def _probe(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` below the server's root (the base URL without ``/v1``): its JSON object or None."""
        root = self._root()
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
                         f"(404: {said})", f"load it again: {command('load', 'URL')} with the server's URL")
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

    # -- token log-probabilities of given tokens (scoring), where the server gives them -------------------
    @property
    def scores_why(self) -> str | None:
        """Why the server gives no log-probabilities of given tokens (``None``: it gives them)."""
        if self.scorer is not None:
            return None
        return (f"{self.kind.label} gives nbllm no log-probabilities of given tokens (nbllm scores at "
                "llama-cpp-python's server only: its echo of a prompt's logprobs and its tokenizer)")

    def _scoring(self) -> ServerScorer:
        if self.scorer is None:
            raise GenerationError(self.scores_why or "", "load the model with the transformers or llama.cpp loader to score it")
        return self.scorer

    @property
    def first_scored(self) -> int:
        """The first position of a row the server can score (:attr:`ServerScorer.first_scored`)."""
        return self._scoring().first_scored

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text`` by the server's own tokenizer."""
        return self._scoring().tokenize(text, add_special=add_special)

    def decode(self, ids: Any) -> str:
        return self._scoring().decode(ids)

    def token_scores(self, rows: Any, starts: Any, top: int = 0) -> list[Any]:
        """:meth:`TokenLoader.token_scores`, from the server's echo of each row's text."""
        with self._slots:
            return self._scoring().token_scores(rows, starts, top)

    # -- generation ------------------------------------------------------------------------------
    def generate_text(self, request: Request) -> Iterator[str]:
        import httpx

        self.finish_reason, self.usage, self.fingerprint = None, (None, None), None
        self.reasoning, self.decode_rate, self.notes = "", None, {}
        assert self.source is not None and self.source.model_id is not None
        path, body, unsent = request_body(self.kind, self.source.model_id, request)
        for name in unsent:
            warnings.warn(f"the {self.kind.name} server does not read {name}; it is not sent",
                          NbllmWarning, stacklevel=2)
        self._note_what_does_not_apply(request)
        reply = _Reply(native=self.kind.native, chat=request.messages is not None)
        if request.options.logprobs is not None:
            if request.options.logprobs_after_samplers:
                raise OptionError("a server gives the model's own log-probabilities, not those after the samplers",
                                  "drop --logprobs-after-samplers")
            reply.logprobs, reply.top = request.logprobs, request.options.logprobs
        watch: _Watch | None = None
        timeout = self.options.timeout if self.options is not None else 60.0
        with self._slots:
            try:
                target = f"{self._root()}/{path}" if self.kind.native else path  # Ollama's own API: below the root
                with self.client.stream("POST", target, json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise self._status_error(response, GenerationError)
                    watch = _Watch(request.cancel, response, timeout)
                    try:
                        for line, at in _lines(response):
                            if request.cancel.is_set():
                                return
                            yield from self._line(line, reply, at, watch)
                            if reply.failed:
                                raise GenerationError(
                                    f"the server at {self.url} ended the reply with finish reason {reply.failed!r} "
                                    f"after {reply.pieces} pieces: it was aborted or failed there",
                                    "the partial text is kept; check the server's log, then run the prompt again")
                            if reply.done:
                                break
                    finally:
                        watch.finished.set()
                    if request.cancel.is_set():
                        return
                    if watch.timed_out:
                        raise self._silence_error(reply)
                    if self.finish_reason is None:
                        raise GenerationError(  # llama-cpp-python's server does this to a reply another request interrupts
                            f"the server at {self.url} ended the reply after {reply.pieces} pieces without saying why "
                            f"({'[DONE] came first' if reply.done else 'the stream just ended'})",
                            "the partial text is kept; the server may have cut it short for another request: "
                            "check the server's log, then run the prompt again")
                if reply.logprobs is not None and reply.pieces and not reply.logprobs:
                    warnings.warn(f"the server at {self.url} sent no token log-probabilities with the reply",
                                  NbllmWarning, stacklevel=2)
                self._count(request, reply)  # once the reply's connection is back (a server may hold its model till then)
            except httpx.HTTPError as exc:
                if request.cancel.is_set():
                    return  # the connection was shut down to stop the reply: cancelled, not failed
                if watch is not None and watch.timed_out:
                    raise self._silence_error(reply) from None
                raise self._transport_error(exc, GenerationError, reply.pieces) from None
            finally:
                self.reasoning = "".join(reply.reasoning)

    def _note_what_does_not_apply(self, request: Request) -> None:
        """Say (once per load) and record what the server will not do as asked."""
        opts = request.options
        if not self.kind.seed_applies and not opts.greedy:
            self.notes["seed_reproducible"] = False
            if not self._said_seed:
                self._said_seed = True
                warnings.warn(f"{self.kind.label} ignores the seed unless it was started with "
                              "--enable-deterministic-inference: this sampled reply cannot be replayed from its seed",
                              NbllmWarning, stacklevel=3)
        if self.kind.repetition_window and opts.repetition_penalty != 1.0:
            self.notes["repetition_penalty_covers"] = self.kind.repetition_window
        if self.kind.repetition_unsure and opts.repetition_penalty != 1.0:
            self.notes["repetition_penalty_applied"] = "unverified"
            if not self._said_repetition:
                self._said_repetition = True
                warnings.warn(f"{self.kind.repetition_unsure}: the record marks --repetition-penalty "
                              f"{opts.repetition_penalty:g} as unverified", NbllmWarning, stacklevel=3)

    def _line(self, line: str, reply: _Reply, at: float, watch: _Watch) -> list[str]:
        """The text pieces of one line of the stream (server-sent events, or Ollama's JSON lines)."""
        if not line.strip() or line.startswith(":"):
            return []  # blank lines end events; a comment is a keep-alive ping, not an answer
        if reply.native or not line.startswith("data:"):
            if line.startswith(("event:", "id:", "retry:")):
                return []
            try:
                payload = json.loads(line)
            except ValueError:
                return []
            if isinstance(payload, dict) and payload.get("error"):  # Ollama's OpenAI layer, after the headers
                raise self._stopped(payload["error"], reply)
            if not reply.native or not isinstance(payload, dict):
                return []
            watch.answered()
            return self._native(payload, reply, at)
        data = line[5:].strip()
        watch.answered()
        if data == "[DONE]":
            reply.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise GenerationError(f"the server at {self.url} sent a piece of the reply that is not JSON",
                                  "check that the URL is an OpenAI-compatible API") from None
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error"):
            raise self._stopped(chunk["error"], reply)
        if chunk.get("system_fingerprint"):
            self.fingerprint = str(chunk["system_fingerprint"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
        texts: list[str] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = (choice.get("delta") or {}) if reply.chat else choice
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            texts += reply.take(thought, delta.get("content") if reply.chat else choice.get("text"), at)
            if reply.logprobs is not None:
                reply.logprobs.extend(entries(choice, reply.top, chat=reply.chat))
            if reply.chat and isinstance(delta.get("tool_calls"), list):
                reply.add_calls(delta["tool_calls"])
            if choice.get("finish_reason") and reply.calls:
                texts += reply.take(None, reply.calls_text(), at)
            if choice.get("finish_reason"):
                self._finished(str(choice["finish_reason"]), reply)
        return texts

    def _native(self, payload: dict[str, Any], reply: _Reply, at: float) -> list[str]:
        """One of Ollama's JSON lines (``/api/generate``: ``response``; ``/api/chat``: ``message``)."""
        message = payload.get("message") if reply.chat else payload
        message = message if isinstance(message, dict) else {}
        texts = reply.take(message.get("thinking"), message.get("content") if reply.chat else message.get("response"), at)
        if payload.get("done"):
            reply.done = True
            count, seconds = payload.get("eval_count"), payload.get("eval_duration")
            self.usage = (payload.get("prompt_eval_count"), count)
            if isinstance(count, int) and isinstance(seconds, (int, float)) and seconds > 0:
                self.decode_rate = count / (seconds / 1e9)  # the server's own measure (nanoseconds)
            self._finished(str(payload.get("done_reason") or "stop"), reply)
        return texts

    def _finished(self, reason: str, reply: _Reply) -> None:
        """Note the server's finish reason; a reply the server aborted or failed is never a normal end
        (:attr:`_Reply.failed`, raised by the reader)."""
        self.notes["finish_reason"] = reason
        if reason in FAILED:
            reply.failed = reason  # raised once this chunk's text is out
            return
        self.finish_reason = _finish(reason)

    def _stopped(self, err: Any, reply: _Reply) -> GenerationError:
        said = err.get("message") if isinstance(err, dict) else err
        return GenerationError(f"the server at {self.url} stopped the reply: {_first_line(self._scrub(str(said)))}",
                               "the partial text is kept; check the server's log")

    def _silence_error(self, reply: _Reply) -> GenerationError:
        timeout = self.options.timeout if self.options is not None else 0
        during = f" after {reply.pieces} pieces of the reply" if reply.pieces else ""
        return GenerationError(
            f"the server at {self.url} sent nothing of the reply for {timeout:g} s{during} (keep-alive pings "
            "are no answer)",
            "check that it is running and not stuck (llama-cpp-python's server hangs after a client left "
            "mid-reply: restart it), or allow more time with --timeout" + (" (the partial text is kept)"
                                                                           if reply.pieces else ""))

    def _count(self, request: Request, reply: _Reply) -> None:
        """Token counts the server did not send: the server's tokenizer counts the reply when it has one;
        otherwise they stay unknown (``None``), never guessed from the pieces. Then the decode rate."""
        prompt_tokens, completion = self.usage
        if completion is None and self.finish_reason == "length":  # it stopped at the limit nbllm set
            completion = request.options.max_new_tokens
            self.notes["completion_tokens_counted"] = "max_tokens (the server ended the reply at that limit)"
        if completion is None and self.kind.tokenizer is not None:
            completion = self._tokens_in("".join(reply.reasoning) + "".join(reply.text))
            if completion is not None and self.finish_reason == "eos":
                completion += 1  # the end token the model made (never shown), as a local model counts it
            if completion is not None:
                self.notes["completion_tokens_counted"] = f"by the server's tokenizer ({self.kind.tokenizer})"
        self.usage = (prompt_tokens, completion)
        if self.decode_rate is None and completion is not None:
            self.decode_rate = reply.rate(completion)

    def _tokens_in(self, text: str) -> int | None:
        """How many tokens the server's own tokenizer makes of ``text`` (``None`` if it cannot say)."""
        root = self._root()
        model = self.source.model_id if self.source is not None else None

        def count(part: str) -> int:
            endpoint = f"{root}/{self.kind.tokenizer}"
            if self.kind.name == "llama.cpp":  # {"tokens": [...]}; no BOS unless asked
                said = self.client.post(endpoint, json={"content": part, "add_special": False}).json()
                return len(said["tokens"])
            if self.kind.name == "vllm":
                said = self.client.post(endpoint, json={"model": model, "prompt": part, "add_special_tokens": False})
                return int(said.json()["count"])
            said = self.client.post(endpoint, json={"input": part, "model": model}).json()  # llama-cpp-python
            return int(said["count"])

        try:
            n = count(text)
            if self.kind.name == "llama-cpp-python":  # it adds the model's BOS, if it has one: count it out
                n -= count("")
        except Exception:
            return None
        return n if n >= 0 else None


class _Reply:
    """What one streamed reply brought so far: pieces, reasoning, when they arrived, how it ended."""

    def __init__(self, *, native: bool, chat: bool) -> None:
        self.native, self.chat = native, chat
        self.done = False
        self.failed: str | None = None
        self.pieces = 0
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.logprobs: list[dict[str, Any]] | None = None
        """With ``--logprobs``: where each token's entry goes (:attr:`Request.logprobs`)."""
        self.top = 0
        self.calls: dict[int, dict[str, Any]] = {}
        """The server's tool calls, put together from their streamed pieces, by index."""

    def add_calls(self, pieces: list[Any]) -> None:
        """One event's ``tool_calls`` deltas (the id and name come once, the arguments' text in pieces)."""
        for piece in pieces:
            if not isinstance(piece, dict):
                continue
            call = self.calls.setdefault(int(piece.get("index") or 0), {"id": None, "name": "", "arguments": ""})
            function = piece.get("function") or {}
            call["id"] = piece.get("id") or call["id"]
            call["name"] = call["name"] or function.get("name") or ""  # llama-cpp-python's repeats it
            call["arguments"] += function.get("arguments") or ""

    def calls_text(self) -> str:
        """The tool calls as Hermes text (:attr:`OpenAILoader.tool_calls_as`), which conversations read."""
        out = []
        for _, call in sorted(self.calls.items()):
            try:
                arguments: Any = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = call["arguments"]
            body = {"name": call["name"], "arguments": arguments, **({"id": call["id"]} if call["id"] else {})}
            out.append("<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>")
        self.calls = {}
        return "".join(out)

    def stamp(self, at: float) -> None:
        if self.first_at is None:
            self.first_at = at
        self.last_at = at

    def take(self, thought: Any, text: Any, at: float) -> list[str]:
        """Keep what one event brought (reasoning apart from the reply's text); the new text pieces."""
        if isinstance(thought, str) and thought:
            self.reasoning.append(thought)
            self.stamp(at)
        if not (isinstance(text, str) and text):
            return []
        self.stamp(at)
        self.pieces += 1
        self.text.append(text)
        return [text]

    def rate(self, tokens: int) -> float | None:
        """Tokens per second after the first, from when the pieces arrived (``None`` when they all came
        in one read: nothing to measure)."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at or tokens < 2:
            return None
        return (tokens - 1) / (self.last_at - self.first_at)


class _Watch:
    """Shuts a reply's connection down as soon as its cancel event is set (the read then returns at once,
    and the server sees the client leave and stops generating), or when the server sent no data for
    ``timeout`` seconds: a keep-alive comment brings bytes, which keep the HTTP client's read timeout
    from firing, but no answer. Set :attr:`finished` when the reply has been read."""

    def __init__(self, cancel: threading.Event, response: Any, timeout: float) -> None:
        self.finished = threading.Event()
        self.timed_out = False
        self._cancel, self._response, self._timeout = cancel, response, timeout
        self._last = time.monotonic()
        try:
            self._sock = response.extensions["network_stream"].get_extra_info("socket")
        except Exception:  # another transport: closing the response is the best it can do
            self._sock = None
        threading.Thread(target=self._watch, daemon=True, name="nbllm-remote-watch").start()

    def answered(self) -> None:
        """The server sent data (not a keep-alive)."""
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self.finished.is_set():
            if self._cancel.wait(0.05) or time.monotonic() - self._last > self._timeout:
                if self.finished.is_set():
                    return
                self.timed_out = not self._cancel.is_set()
                try:
                    if self._sock is not None:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    else:
                        self._response.close()
                except Exception:
                    pass
                return


def _lines(response: Any) -> Iterator[tuple[str, float]]:
    """The lines of a streamed reply, each with the time its bytes arrived (lines that came in one read
    share it, so a reader that fell behind does not make pieces look faster than they came)."""
    pending = b""
    for data in response.iter_bytes():
        at = time.perf_counter()
        lines = _NEWLINE.split(pending + data)
        pending = lines.pop()
        for raw in lines:
            yield raw.decode("utf-8", errors="replace"), at
    if pending:
        yield pending.decode("utf-8", errors="replace"), time.perf_counter()


_NEWLINE = re.compile(rb"\r\n|\r|\n")


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("httpx is not installed", "install it with: pip install httpx") from None
    return httpx


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


__all__ = ["EXTRA_OPTIONS", "FAILED", "FINISH_REASONS", "FORMAT", "SERVERS", "OpenAILoader", "Range", "ServerKind",
           "check_limits", "identify", "request_body"]
