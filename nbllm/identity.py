"""A request's identity: what two generations must share to be the same request.

One function, :func:`request_identity`, used by the record (``Record`` → :func:`record_identity`), the
run log (its ``identity`` column), replay matching and sweeps alike. It holds

- the **model**: its hub revision, else the sha256 of its weights, else the server's model id (the
  name only when nothing better is known), and its adapters when it has any;
- the **loader** and the **load options** set away from their defaults (those that cannot change the
  text — which loader was asked for, the hub revision and file already named by the model, verbosity
  — are left out);
- the **generation options** set away from their defaults, and the **seed** when the request gave
  one (``None`` when it was drawn: a request without a seed is the same request whatever was drawn);
- the **prompt** (raw text) or the **messages** (chat);
- in a chat with tools, the **tools** (their JSON schemas), the ``tool_choice`` a server was given, and each
  message's tool calls and call ids. A request without tools has none of these keys, so its identity (and
  its hash) is what it was before tools existed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .options import GenerationOptions, LoadOptions, _Schema

NOT_IDENTITY_LOAD_OPTIONS = frozenset({"loader", "revision", "file", "verbose"})
"""Load options that do not change the text (or that the model's identity already says)."""


def request_identity(
    *,
    model: Mapping[str, Any],
    loader: str,
    load_options: Mapping[str, Any],
    generation_options: Mapping[str, Any],
    seed: int | None,
    prompt: str,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> dict[str, Any]:
    """The identity of one request (plain JSON values; equal requests give equal dicts)."""
    out: dict[str, Any] = {
        "model": model_identity(model),
        "loader": loader,
        "load_options": _changed(LoadOptions, load_options, NOT_IDENTITY_LOAD_OPTIONS),
        "generation_options": _changed(GenerationOptions, generation_options, frozenset({"seed"})),
        "seed": seed,
    }
    if messages is not None:
        out["messages"] = [{"role": m["role"], "content": m["content"], **_tool_keys(m)} for m in messages]
    else:
        out["prompt"] = prompt
    if tools:
        out["tools"] = _plain(list(tools))
    if tool_choice is not None:
        out["tool_choice"] = _plain(tool_choice)
    return out


def _tool_keys(message: Mapping[str, Any]) -> dict[str, Any]:
    """What a chat-with-tools message holds besides its role and content: an assistant message's
    ``tool_calls``, a ``tool`` message's ``tool_call_id`` and ``name``. Nothing for any other message (a
    ``name`` on a user message stays out, as it always was)."""
    keys = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}.get(str(message.get("role")), ())
    return {k: _plain(message[k]) for k in keys if message.get(k) is not None}


def _plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples as lists), so an identity read back from a record equals the request's."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def record_identity(record: Any, *, seed_drawn: bool | None = None) -> dict[str, Any]:
    """The identity of the request a record (a :class:`~nbllm.result.Record` or its ``to_dict()``)
    answered. ``seed_drawn`` overrides the record's own flag (for records that do not say)."""
    data = record if isinstance(record, Mapping) else record.to_dict()
    drawn = data.get("seed_drawn") if seed_drawn is None else seed_drawn
    return request_identity(
        model=data.get("model") or {},
        loader=data.get("loader", ""),
        load_options=data.get("load_options") or {},
        generation_options=data.get("generation_options") or {},
        seed=None if drawn else data.get("seed"),
        prompt=data.get("prompt", ""),
        messages=data.get("messages") if data.get("mode") == "chat" else None,
        tools=data.get("tools"),
        tool_choice=data.get("tool_choice"),
    )


def identity_key(identity: Mapping[str, Any]) -> str:
    """A short, stable hash of an identity (the run log's ``identity`` column; replay's index)."""
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """What names a model's weights in a record's ``model`` dict, strongest first: hub revision,
    weights sha256, server model id; the name when none of them is known."""
    out: dict[str, Any] = {"format": model.get("format")}
    sha = model.get("sha256")
    if model.get("revision"):
        out.update(repo_id=model.get("repo_id"), revision=model["revision"])
    elif isinstance(sha, Mapping) and sha:
        out["sha256"] = dict(sha)
    elif model.get("model_id"):
        out["model_id"] = model["model_id"]
    else:
        out["name"] = model.get("name")
    if model.get("adapters"):
        out["adapters"] = model["adapters"]
    return out


def differences(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """What differs between two identities, in words (``temperature 0.7 there, 0.0 here``), for an
    error that names the closest recorded run."""
    out: list[str] = []
    there_model, here_model = dict(recorded.get("model") or {}), dict(requested.get("model") or {})
    there_adapters, here_adapters = there_model.pop("adapters", None), here_model.pop("adapters", None)
    if there_model != here_model:
        out.append("the model")
    if there_adapters != here_adapters:
        listed = _adapters(there_adapters), _adapters(here_adapters)
        out.append(f"the adapters ({listed[0]} there, {listed[1]} here)" if listed[0] != listed[1]
                   else f"the adapters' files or weights ({listed[0]})")
    if recorded.get("loader") != requested.get("loader"):
        out.append(f"the loader ({recorded.get('loader')} there, {requested.get('loader')} here)")
    for group in ("load_options", "generation_options"):
        there, here = recorded.get(group) or {}, requested.get(group) or {}
        for name in sorted(set(there) | set(here)):
            if there.get(name) != here.get(name):
                out.append(f"{name} ({_shown(there, name)} there, {_shown(here, name)} here)")
    if recorded.get("seed") != requested.get("seed"):
        out.append(f"the seed ({_seed(recorded.get('seed'))} there, {_seed(requested.get('seed'))} here)")
    if recorded.get("tools") != requested.get("tools"):
        out.append(_tools_differ(recorded.get("tools"), requested.get("tools")))
    if recorded.get("tool_choice") != requested.get("tool_choice"):
        out.append(f"tool_choice ({_choice(recorded.get('tool_choice'))} there, "
                   f"{_choice(requested.get('tool_choice'))} here)")
    if "messages" in recorded or "messages" in requested:
        if "messages" not in recorded or "messages" not in requested:
            out.append("the mode (chat in one, raw text in the other)")
        elif recorded["messages"] != requested["messages"]:
            out.append(_messages_differ(recorded["messages"], requested["messages"]))
    elif recorded.get("prompt") != requested.get("prompt"):
        out.append("the prompt")
    return out


def _messages_differ(there: Sequence[Mapping[str, Any]], here: Sequence[Mapping[str, Any]]) -> str:
    """``the messages``, or, where the first message that differs is a tool's result or a reply's tool calls,
    which one and how (a tool that returns something else when the notebook runs again)."""
    at = next((i for i, (a, b) in enumerate(zip(there, here)) if a != b), None)
    if at is None:
        return "the messages"
    a, b = there[at], here[at]
    if a.get("role") == b.get("role") == "tool" and a.get("tool_call_id") == b.get("tool_call_id"):
        return (f"the result of tool call {b.get('name') or b.get('tool_call_id')} ({_clipped(a.get('content'))} "
                f"there, {_clipped(b.get('content'))} here)")
    if a.get("tool_calls") != b.get("tool_calls") and (a.get("tool_calls") or b.get("tool_calls")):
        return f"the tool calls of message {at + 1}"
    return "the messages"


def _tools_differ(there: Any, here: Any) -> str:
    names = [_tool_names(there), _tool_names(here)]
    if names[0] == names[1]:
        return f"the tools' schemas ({names[0]})"
    return f"the tools ({names[0]} there, {names[1]} here)"


def _tool_names(tools: Any) -> str:
    listed = [str((t.get("function") or {}).get("name")) for t in tools or () if isinstance(t, Mapping)]
    return ", ".join(listed) or "none"


def _choice(choice: Any) -> str:
    return "none given" if choice is None else repr(choice)


def _clipped(text: Any, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _changed(schema: type[_Schema], values: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """The values set away from the schema's defaults, as JSON values of the option's type (so ``0``
    and ``0.0`` are one temperature); names the schema does not know are kept as they are."""
    specs = {s.name: s for s in schema.specs()}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in skip:
            continue
        spec = specs.get(name)
        if spec is not None:
            value = _typed(spec.type, value)
            if value == _typed(spec.type, spec.default):
                continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _typed(kind: type, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    try:
        if kind is float:
            return float(value)
        if kind is int:
            return int(value)
        if kind is tuple:
            return tuple(value) if not isinstance(value, str) else (value,)
    except (TypeError, ValueError):
        return value
    return value


def _shown(values: Mapping[str, Any], name: str) -> str:
    return repr(values[name]) if name in values else "default"


def _adapters(adapters: Any) -> str:
    if not adapters:
        return "none"
    return ", ".join(f"{a.get('name')} ×{a.get('scale', 1.0):g}" if isinstance(a, Mapping) else str(a) for a in adapters)


def _seed(seed: Any) -> str:
    return "drawn" if seed is None else str(seed)
