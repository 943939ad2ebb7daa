"""What ``%llm_serve`` answers beyond one text: token log-probabilities, prompt log-probabilities (``echo``),
prompts given as token ids or as lists, several choices (``n``), as OpenAI's legacy completions and vLLM
return them, and ``logprobs``/``top_logprobs`` in chat completions.

Kept apart from :mod:`nbllm.serve`'s request handling: the app hands a request here when :func:`asks` says
it needs it (non-streamed), and returns the body :func:`respond` builds. That is what lm-eval's
``local-completions`` model sends for loglikelihood tasks (``echo: true``, ``logprobs: 1``, ``max_tokens: 1``,
prompts as token ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .engine import Engine, Prompt
from .errors import GenerationError
from .loaders import TokenLoader
from .options import GenerationOptions
from .result import Result
from .serve_requests import RequestError

MAX_TOP = 20
"""The most alternatives per token a request may ask for (as ``--logprobs``)."""


def asks(body: Mapping[str, Any], chat: bool) -> bool:
    """Whether the request needs this module: logprobs, echo, n > 1, or (completions) a prompt that is token
    ids or a list of prompts."""
    if body.get("logprobs") not in (None, False, 0) and not (chat and body.get("logprobs") is False):
        return True
    if body.get("echo") or (body.get("n") not in (None, 1)) or body.get("top_logprobs"):
        return True
    prompt = body.get("prompt")
    return not chat and isinstance(prompt, list) and not (len(prompt) == 1 and isinstance(prompt[0], str))


def top_count(body: Mapping[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request asks for (``None``: no logprobs)."""
    if chat:
        if not body.get("logprobs"):
            if body.get("top_logprobs"):
                raise RequestError("top_logprobs", "top_logprobs needs logprobs: true", "add \"logprobs\": true to the request")
            return None
        k = body.get("top_logprobs") or 0
    else:
        k = body.get("logprobs")
        if k is None or k is False:
            return None
        k = 0 if k is True else k
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP:
        raise RequestError("top_logprobs" if chat else "logprobs", f"{'top_logprobs' if chat else 'logprobs'} {k!r} is out of range",
                          f"ask for 0 to {MAX_TOP} alternatives per token")
    return k


def prompts_of(body: Mapping[str, Any]) -> list[str | list[int]]:
    """The completion request's prompts: one text, token ids, a list of texts or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise RequestError("prompt", "prompt must be a text, token ids, or a list of either (none empty)",
                      'send e.g. "prompt": "Hello" or "prompt": [[15496, 11]]')


def respond(engine: Engine, body: Mapping[str, Any], options: GenerationOptions, meta: dict[str, Any],
            chat: bool, messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response body for a request :func:`asks` about. Runs on a worker thread."""
    k = top_count(body, chat)
    n = body.get("n", 1) or 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise RequestError("n", f"n {n!r} is out of range", "ask for 1 to 16 choices")
    echo = bool(body.get("echo")) and not chat
    run_options = options.with_valid(logprobs=k) if k is not None else options
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    inputs: list[Any] = [messages] if chat else prompts_of(body)
    for prompt in inputs:
        ready = _prompt(engine, prompt, chat)
        prompt_tokens += len(ready.ids or ())
        echoed = _prompt_logprobs(engine, ready, k or 0) if echo else None
        for i in range(n):
            seeded = run_options if n == 1 or options.seed is None else run_options.with_valid(seed=options.seed + i)
            result = engine.stream_prompt(ready, seeded)
            _ = result.text
            completion_tokens += result.completion_tokens or 0
            choices.append(_choice(len(choices), ready, result, echoed, k, chat, echo))
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _prompt(engine: Engine, prompt: str | list[int] | list[dict[str, str]], chat: bool) -> Prompt:
    if chat:
        return engine.prompt_for(prompt, chat=True)  # type: ignore[arg-type]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt", "a prompt is empty", "send text to continue")
        return engine.prompt_for(prompt)
    loader = engine.loader
    if not isinstance(loader, TokenLoader):
        raise RequestError("prompt", f"the {loader.name} loader takes no token ids", "send the prompt as text")
    ids = [int(t) for t in prompt]  # type: ignore[arg-type]  # token ids (prompts_of checked them)
    return Prompt(loader.decode(ids), ids)


def _prompt_logprobs(engine: Engine, ready: Prompt, k: int) -> list[tuple[str, float | None, dict[str, float] | None]]:
    """``echo``: each prompt token with its log-probability given the ones before it (the first has none)."""
    with engine.model_held() as loader:
        if not isinstance(loader, TokenLoader) or not loader.scores_tokens:
            raise GenerationError(f"the {loader.name} loader gives no prompt log-probabilities",
                                  "leave echo out of the request")
        ids = ready.ids or []
        out: list[tuple[str, float | None, dict[str, float] | None]] = [(_piece(loader, ids[0]), None, None)]
        if len(ids) > 1:
            got = loader.token_scores([ids], [1], top=max(k, 1))[0]
            for token, lp, top in zip(ids[1:], got.logprobs, got.top or [], strict=True):
                out.append((_piece(loader, token), lp, {_piece(loader, i): v for i, v in top[: max(k, 1)]}))
        return out


def _piece(loader: TokenLoader, token: int) -> str:
    return loader.decode([token])


def _choice(index: int, ready: Prompt, result: Result, echoed: Sequence[tuple[str, float | None, Any]] | None,
            k: int | None, chat: bool, echo: bool) -> dict[str, Any]:
    text = "".join(result.chunks)
    finish = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(result.finish_reason or "", "stop")
    entries = result.tokens or []
    if chat:
        logprobs = None
        if k is not None:
            logprobs = {"content": [
                {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, _i, lp in e["top"][:k]]}
                for e in entries]}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}
    out_text = (ready.text + text) if echo else text
    legacy = None
    if k is not None or echo:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for token, lp, top in echoed or []:
            tokens.append(token)
            token_logprobs.append(lp)
            tops.append(top)
        for e in entries:
            tokens.append(e["token"])
            token_logprobs.append(e["logprob"])
            alternatives = {t: lp for t, _i, lp in e["top"][: max(k or 0, 1)]}
            alternatives.setdefault(e["token"], e["logprob"])
            tops.append(alternatives)
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        legacy = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
    return {"index": index, "text": out_text, "logprobs": legacy, "finish_reason": finish}
