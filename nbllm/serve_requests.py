"""What a request to ``%llm_serve`` may hold: the OpenAI API's fields with the types its reference gives
them, as pydantic models, and the :class:`~nbllm.options.GenerationOptions` a valid request asks for.

Every field a request sends is checked before anything runs: its JSON type (``"max_tokens": true`` and
``"stream": "yes"`` are refused; a number is never read from a string), then its bounds. A bad field is
one 400 naming it in the API's own words (``max_tokens``, not ``--max-new-tokens``), with ``param`` set
as OpenAI's errors do. Fields the API has and nbllm cannot honour are typed here too, and refused when a
request asks for them (:data:`UNSUPPORTED`); fields the API does not have are ignored, as OpenAI's
server ignores them.

To take a new field: declare it on :class:`CompletionRequest`, :class:`ChatRequest` or both (their
shared ones on :class:`_Request`), drop it from :data:`UNSUPPORTED`, and read it where the reply is made.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import OptionError
from .options import GenerationOptions, _bounds_fix, _out_of_bounds


class RequestError(OptionError):
    """A request the server cannot take (a 400): :attr:`param` is the field at fault, in the API's name
    (``None`` for the request as a whole)."""

    def __init__(self, param: str | None, cause: str, fix: str | None = None) -> None:
        self.param = param
        super().__init__(cause, fix)


# --------------------------------------------------------------------------------------- the API's types
class _Model(BaseModel):
    # strict: JSON's own types only (no "1" for 1, no true for 1); unknown fields are ignored, as OpenAI does
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = None


class ContentPart(_Model):
    """One part of a message's content (``{"type": "text", "text": "..."}``; other types are refused
    when the messages are read)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Model):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls...: read (or refused) later
    role: str
    content: str | list[ContentPart] | None = None


class _Request(_Model):
    """The fields both endpoints take."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # what vLLM and llama.cpp's server take besides (and text-generation-webui's names for them)
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None
    # llama.cpp's server's samplers (text-generation-webui's; docs/samplers.md): the loaded model's loader
    # refuses those it cannot apply
    repeat_last_n: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    top_n_sigma: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    ignore_eos: bool | None = None
    # structured output (nbllm/constraints.py): OpenAI's response_format; nbllm's (and vLLM's) grammar,
    # regex and choice
    response_format: dict[str, Any] | None = None
    grammar: str | None = None
    regex: str | None = None
    choice: list[str] | None = None


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    continue_final_message: bool | None = None
    """vLLM's: go on with the last (assistant) message instead of starting a new one."""


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {  # n, echo, logprobs, top_logprobs: nbllm.serve_logprobs
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "functions": bool,
    "function_call": lambda v: v not in (None, "none"),
}
"""Fields the API has that nbllm cannot honour, and when a value asks for them (``n: 1`` does not)."""

OPTION_NAMES = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty", "repeat_penalty": "repetition_penalty", "seed": "seed",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repeat_last_n": "repetition_penalty_range", "dry_multiplier": "dry_multiplier", "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length", "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold",
    "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "top_n_sigma": "top_n_sigma", "dynatemp_exponent": "dynatemp_exponent", "ignore_eos": "ban_eos_token",
}
"""A request field → the :class:`GenerationOptions` field it sets."""


def parse_request(raw: bytes, chat: bool) -> CompletionRequest | ChatRequest:
    """The request in ``raw`` (a JSON body), typed; raises :class:`RequestError` naming the first field
    whose type is wrong (or the body, when it is not a JSON object)."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError(None, "the request body is not JSON", "send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(None, "the request body must be a JSON object", "send a JSON object") from None
    kind: type[CompletionRequest | ChatRequest] = ChatRequest if chat else CompletionRequest
    try:
        request = kind.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else None
        if name is None or name not in kind.model_fields:
            raise RequestError(None, f"the request is not valid ({error['msg']})", "see the OpenAI API reference") from None
        if error["type"] == "missing":
            raise RequestError(name, f"{name} is missing", f"send {name}: {_words(kind.model_fields[name].annotation)}") from None
        wanted = _words(kind.model_fields[name].annotation)
        required = kind.model_fields[name].is_required()
        raise RequestError(name, f"{name} must be {wanted}, not {_shown(body.get(name))}",
                           f"send {wanted}" if required else f"send {wanted}, or leave {name} out") from None
    for name, asks in UNSUPPORTED.items():
        if asks(getattr(request, name, None)):
            raise RequestError(name, f"{name} is not supported by nbllm's server", "leave it out of the request")
    return request


def generation_options(request: CompletionRequest | ChatRequest, defaults: GenerationOptions) -> GenerationOptions:
    """The :class:`GenerationOptions` ``request`` asks for, over ``defaults``; a value out of bounds is a
    :class:`RequestError` in the API's words (``temperature 9.0 is above 5.0``)."""
    values = defaults.to_dict()
    given = request.model_dump(exclude_none=True)
    for key, name in OPTION_NAMES.items():
        if key not in given:
            continue
        value = given[key]
        if name == "top_k" and value < 0:  # vLLM's "disabled"
            value = 0
        if name == "repetition_penalty_range" and value < 0:  # llama.cpp's -1: the whole context
            value = 0
        spec = GenerationOptions.spec(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(key, f"{key} must be a finite number, not {value}", _bounds_fix(spec))
        problem = _out_of_bounds(spec, value)
        if problem:
            raise RequestError(key, f"{key} {value} {problem}", _bounds_fix(spec))
        values[name] = value
    values.update(_llama_server_samplers(request, float(values["temperature"])))
    if request.stop is not None:
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
        if "" in stop:
            raise RequestError("stop", "stop holds an empty string, which would stop at once",
                               "send non-empty stop strings, or leave stop out")
        values["stop"] = stop
    if float(values["temperature"]) == 0.0:  # greedy decoding ignores the samplers: no note about it in the kernel
        for name in ("top_p", "top_k", "min_p", "typical_p"):
            values[name] = GenerationOptions.spec(name).default
    try:
        return GenerationOptions.from_dict(_with_constraint(values, request))
    except OptionError as exc:  # a combination of values: said in the options' words
        raise RequestError(None, exc.cause, exc.fix) from None


def _llama_server_samplers(request: CompletionRequest | ChatRequest, temperature: float) -> dict[str, Any]:
    """llama.cpp's server's sampler fields that are not one option each: its dynamic temperature (a range
    around temperature), DRY's breakers (a list) and logit_bias (token id → bias)."""
    import json

    out: dict[str, Any] = {}
    if request.dynatemp_range:
        if request.dynatemp_range < 0 or not math.isfinite(request.dynatemp_range):
            raise RequestError("dynatemp_range", f"dynatemp_range {request.dynatemp_range} is below 0",
                               "send a value of at least 0")
        out.update(dynamic_temperature=True, dynatemp_low=max(0.0, temperature - request.dynatemp_range),
                   dynatemp_high=temperature + request.dynatemp_range)
    if request.dry_sequence_breakers is not None:
        out["dry_sequence_breakers"] = ", ".join(json.dumps(b) for b in request.dry_sequence_breakers)
    if request.logit_bias:
        bias = []
        for token, value in request.logit_bias.items():
            if not str(token).isdigit():
                raise RequestError("logit_bias", f"logit_bias key {token!r} is not a token id",
                                   "send token ids as keys: {\"13\": -5}")
            bias.append(f"{token}:{value}")
        out["logit_bias"] = tuple(bias)
    return out


def _words(annotation: Any) -> str:
    """A field's type in words: ``a string or a list of strings``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        parts = [_words(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is list:
        inner = _words(typing.get_args(annotation)[0])
        return "a list of " + _plural(inner)
    if origin is dict or annotation is dict:
        return "an object"
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"ChatMessage": 'a message ({"role": ..., "content": ...})',
                "ContentPart": 'a content part ({"type": "text", "text": ...})'}.get(annotation.__name__, "an object")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "a value")


def _plural(words: str) -> str:
    for one, many in (("a string", "strings"), ("an integer", "integers"), ("a number", "numbers"),
                      ("an object", "objects"), ("a list of", "lists of"), ("a message", "messages"),
                      ("a content part", "content parts")):
        if words.startswith(one):
            return many + words[len(one):]
    return words


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def param_of(exc: BaseException) -> str | None:
    """The request field an error is about (``None``: the request as a whole)."""
    return exc.param if isinstance(exc, RequestError) else None


def _with_constraint(values: dict[str, Any], request: CompletionRequest | ChatRequest) -> dict[str, Any]:
    """``values`` with the request's constraint (structured output), which replaces the defaults' one
    (see :func:`nbllm.constraints.server_options`)."""
    from .constraints import server_options, without_other_constraints

    fields = {k: getattr(request, k) for k in ("response_format", "grammar", "regex", "choice")}
    return without_other_constraints(values, server_options({k: v for k, v in fields.items() if v is not None}))


__all__ = ["UNSUPPORTED", "ChatMessage", "ChatRequest", "CompletionRequest", "ContentPart", "RequestError",
           "StreamOptions", "generation_options", "param_of", "parse_request"]
