"""Tools at ``%llm_serve``: OpenAI's ``tools`` / ``tool_choice`` in chat completions, taken as the loaded
loader says (:meth:`~nbllm.loaders.base.Loader.tool_calling`, as a chat in the kernel asks: rendered by the
model's own template, passed on by a server's loader, answered from its recording by a replay), and
``tool_calls`` in the reply (``finish_reason: "tool_calls"``), as :mod:`nbllm.tools` reads them. The client runs the functions and sends their results back as ``tool`` messages, as OpenAI's API does.

A streamed reply with tools is sent when it is whole (its text cannot be told apart from a tool call
until it ends): one content or ``tool_calls`` delta, then the finish reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .engine import Engine, Prompt
from .options import GenerationOptions
from .result import Result
from .serve_requests import ChatRequest, RequestError
from .tools import Tool, ToolError, check_choice, parse_tool_calls


def _no_function(**_: Any) -> Any:  # a served tool runs at the client
    raise ToolError("a served tool runs at the client")


def request_tools(body: ChatRequest) -> tuple[list[Tool], str] | None:
    """The request's tools and its ``tool_choice`` in nbllm's words (``auto``, ``none``, ``required`` or a
    name); ``None`` when it sends no tools. A malformed one is a 400 naming the field."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice", "tool_choice names a tool but the request sends no tools", "send tools")
        return None
    tools = []
    for i, entry in enumerate(body.tools):
        function = entry.get("function") if entry.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError("tools", f"tool {i + 1} is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                               "send each tool as OpenAI's API describes it")
        tools.append(Tool(function["name"], _no_function, {"type": "function", "function": function}))
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise RequestError("tool_choice", "tool_choice is not {\"type\": \"function\", \"function\": {\"name\": ...}}",
                               "send auto, none, required or a function by name")
        choice = name
    try:
        return tools, check_choice(choice, tools)
    except ToolError as exc:
        raise RequestError("tool_choice", exc.cause, exc.fix) from None


def message_fields(message: Any) -> dict[str, Any]:
    """A request message's ``tool_calls`` (arguments read from their JSON text, as templates render them)
    or ``tool_call_id``, as nbllm's messages hold them."""
    extra = getattr(message, "model_extra", None) or {}
    out: dict[str, Any] = {}
    if isinstance(extra.get("tool_calls"), list):
        calls = []
        for call in extra["tool_calls"]:
            function = dict(call.get("function") or {}) if isinstance(call, Mapping) else {}
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass
            calls.append({"id": call.get("id"), "type": "function", "function": function})
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(extra.get(key), str):
            out[key] = extra[key]
    return out


def tool_starter(engine: Engine, messages: list[dict[str, Any]], options: GenerationOptions,
                 tools: list[Tool], choice: str) -> tuple[Callable[[], Result], str]:
    """The call that starts a generation with ``tools`` (a forced ``choice`` held to a call), and the tool
    format to read the reply with. The loaded loader says how it takes tools
    (:meth:`~nbllm.loaders.base.Loader.tool_calling`), as it does for a chat in the kernel: the model's
    template renders them and a grammar holds a forced call, or a server's loader passes them on with the
    ``tool_choice`` (a replay's stand-in answers as the recorded model took them). Each ``tool`` message of
    ``messages`` that names no function is given its call's name, in place."""
    _name_results(messages)
    try:
        calling = engine.loader.tool_calling()
        grammar, passed = calling.holding(tools, choice)
    except ToolError as exc:
        raise RequestError("tools", exc.cause, exc.fix) from None
    if grammar is not None:
        options = options.replace(grammar=grammar)
    schemas = [t.schema for t in tools] if choice != "none" else None

    def start() -> Result:
        ready: Prompt = engine.prompt_for(messages, chat=True, tools=schemas)
        return engine.stream_prompt(replace(ready, tool_choice=passed), options)

    return start, calling.format


def _name_results(messages: list[dict[str, Any]]) -> None:
    """Give each ``tool`` message that names no function the name of the call it answers (OpenAI's
    clients send the call's id alone), as a chat in the kernel holds it: templates that show the name
    render it, and the request is the one the same chat in the kernel sends (its identity, for a replay)."""
    names = {c.get("id"): (c.get("function") or {}).get("name")
             for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or ()}
    for m in messages:
        if m["role"] == "tool" and not m.get("name") and isinstance(names.get(m.get("tool_call_id")), str):
            m["name"] = names[m["tool_call_id"]]


def reply_message(text: str, fmt: str, choice: str,
                  messages: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], str | None]:
    """The assistant message for a reply's ``text`` (``tool_calls`` when it calls tools) and the finish
    reason ``tool_calls`` (or ``None``: the usual one). A call the text gives no id is named from the
    ``messages`` the reply answered, as a chat in the kernel names it: the same reply to the same messages
    names its calls alike, so the client's next request is the same too (a seeded run again, a replay)."""
    context = None if messages is None else json.dumps(messages, sort_keys=True, default=str)
    content, calls = (text, []) if choice == "none" else parse_tool_calls(text, fmt, context=context)
    calls = [c for c in calls if c.name]
    if not calls:
        return {"role": "assistant", "content": text}, None
    return {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": c.id, "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in calls]}, "tool_calls"


__all__ = ["message_fields", "reply_message", "request_tools", "tool_starter"]
