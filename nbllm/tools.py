"""Tools in chat: notebook functions the model may call, through its own chat template's tool format.

A function becomes a :class:`Tool`: its signature and docstring become a JSON schema with transformers'
own ``get_json_schema`` (the schema ``apply_chat_template(tools=...)`` renders). The model's template
renders the tools; the reply is read for tool calls in the template's format (:func:`tool_format`:
Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama 3.x JSON ``{"name", "parameters"}``, Mistral
``[TOOL_CALLS][...]``); each call runs in the kernel (:func:`run_call`) and its result goes back as a
``tool`` message. A call naming an unknown function, with arguments that do not fit the schema, or whose
function raises, sends a one-line error back instead (the OpenAI convention), and the chat goes on.

``tool_choice`` ``"required"`` or a function's name is enforced with the structured-output engine: the
reply is held to a grammar of one call in the template's format (:func:`call_grammar`).

(transformers 5's ``tokenizer.parse_response`` needs a per-model ``response_template`` that neither the
built-in models nor GGUF files carry, so the three formats are read here.)
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatError

FORMATS = ("hermes", "llama3", "mistral")
"""The tool-call formats nbllm reads, as :func:`tool_format` names them."""

CHOICES = ("auto", "none", "required")
"""``tool_choice`` values besides a function's name."""


class ToolError(ChatError):
    """Tools that cannot be used: not callable, no schema from the docstring, a model whose chat template
    has no tool format, an unknown ``tool_choice``."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its ``name`` and ``schema`` (``{"type": "function", "function": ...}``)."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.schema["function"].get("parameters") or {"type": "object", "properties": {}})

    @classmethod
    def of(cls, function: Any, name: str | None = None) -> Tool:
        """The tool for ``function`` (a Tool is returned as it is)."""
        if isinstance(function, Tool):
            return function
        label = name or getattr(function, "__name__", repr(function))
        if not callable(function):
            raise ToolError(f"{label!r} is {type(function).__name__}, not a function, so it cannot be a tool",
                            "give functions defined in the notebook, e.g. --tools add,search")
        from transformers.utils import get_json_schema  # the schema transformers' chat templates render

        try:
            schema = get_json_schema(function)
        except Exception as exc:  # TypeError / DocstringParsingException: no docstring, an untyped argument
            words = " ".join(str(exc).split())
            raise ToolError(f"function {label!r} cannot be described to the model: {words[:300]}",
                            "give it type hints and a docstring with an Args: section describing each argument") from None
        return cls(schema["function"]["name"], function, schema)


def tools_from(values: Iterable[Any] | Mapping[str, Any] | None) -> list[Tool]:
    """Tools from functions (or a ``{name: function}`` mapping); duplicate names are refused."""
    if values is None:
        return []
    pairs = list(values.items()) if isinstance(values, Mapping) else [(None, v) for v in values]
    tools = [Tool.of(v, n) for n, v in pairs]
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolError(f"two tools are called {dup!r}", "give each tool its own name")
    return tools


def tools_named(names: str, namespace: Mapping[str, Any]) -> list[Tool]:
    """``--tools f,g``: the functions of those names in ``namespace`` (the notebook's variables)."""
    found = {}
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name not in namespace:
            raise ToolError(f"--tools names {name!r}, which is not defined in the notebook",
                            "define the function first, or correct the name")
        found[name] = namespace[name]
    if not found:
        raise ToolError("--tools names no function", "give names separated by commas, e.g. --tools add,search")
    return tools_from(found)


# -- the template's format ---------------------------------------------------------------------------


def tool_format(template: str | None) -> str | None:
    """The tool-call format a chat template uses (one of :data:`FORMATS`), or ``None`` when it renders no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "parameters" in template and ("ipython" in template or "<|python_tag|>" in template or "tool_calls" in template):
        return "llama3"
    return None


@dataclass(frozen=True)
class ToolCalling:
    """How a loaded model takes tools (:meth:`nbllm.loaders.base.Loader.tool_calling`): the ``format`` its
    replies carry calls in (one of :data:`FORMATS`), and whether its ``server`` renders the tools and holds a
    forced call itself (the loader passes ``tools`` / ``tool_choice`` on) or the chat renders them with the
    model's template and holds a forced call with a grammar (:func:`call_grammar`). Records of a chat with
    tools keep it, so a replay sends the requests the recorded chat sent."""

    format: str
    server: bool = False

    def holding(self, tools: Sequence[Tool], choice: str) -> tuple[str | None, str | None]:
        """What a request with ``tools`` under ``choice`` carries to hold a forced call (``required`` or a
        name): the grammar of one call for a model nbllm renders tools for, or the ``tool_choice`` passed on
        to a server (``auto`` when not forced). Returns ``(grammar, tool_choice)``, either ``None`` where it
        does not apply. The one place the chat loop and ``%llm_serve`` decide it."""
        forced = choice not in ("auto", "none")
        if self.server:
            return None, choice if forced else "auto"
        return (call_grammar(self.format, tools, choice) if forced else None), None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "server": self.server}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCalling:
        return cls(str(data["format"]), bool(data.get("server", False)))


def require_format(template: str | None, model: str) -> str:
    """:func:`tool_format`, or one line saying the model cannot take tools."""
    fmt = tool_format(template)
    if fmt is None:
        raise ToolError(f"the chat template of {model} has no tool format, so it cannot call tools",
                        "load a model whose template takes tools (Qwen 2.5/3, Hermes, Llama 3.1+, Mistral), "
                        "or chat without --tools")
    return fmt


# -- calls -------------------------------------------------------------------------------------------


INTERRUPTED = "interrupted: the kernel was interrupted while the function ran, so it returned nothing"
"""The result of a call whose function a kernel interrupt stopped (:attr:`ToolCall.interrupted`)."""

NOT_RUN = "not run: the kernel was interrupted before this call"
"""The result of a call after it in the same reply: it never ran."""


@dataclass
class ToolCall:
    """One call the model made, and what came back (``result``: the function's value as text, or the
    one-line error sent back; ``error``: whether it is an error; ``interrupted``: a kernel interrupt
    stopped its function, and ``result`` says so)."""

    name: str
    arguments: Any
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(6))
    result: str | None = None
    error: bool = False
    interrupted: bool = False

    def message(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (OpenAI's and transformers' shape)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def result_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.id, "name": self.name, "content": self.result or ""}

    def __str__(self) -> str:
        args = self.arguments if isinstance(self.arguments, Mapping) else {}
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) if args or isinstance(self.arguments, Mapping) \
            else repr(self.arguments)
        tail = "" if self.result is None else (f" → error: {self.result}" if self.error else f" → {self.result}")
        return f"{self.name}({shown}){tail}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments, "result": self.result, "error": self.error,
                **({"interrupted": True} if self.interrupted else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        return cls(str(data["name"]), data.get("arguments"), str(data.get("id") or ""), data.get("result"),
                   bool(data.get("error", False)), bool(data.get("interrupted", False)))


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str, fmt: str, *, context: str | None = None) -> tuple[str, list[ToolCall]]:
    """The text of a reply outside its tool calls, and the calls (in ``fmt``, one of :data:`FORMATS`).

    A call whose JSON cannot be read becomes a call named ``""`` with the text as its arguments: it is
    answered with an error, so the model hears what was wrong. A call the text gives no ``id`` gets a
    random one, or, with ``context`` (what the reply answered), one derived from ``context``, the text and
    the call's place: the same reply to the same messages names its calls alike, so the requests after it
    are the same (a seeded run again, a replay)."""
    content, calls = _parsed(text, fmt)
    for i, call in enumerate(calls):
        if not call.id:
            call.id = "call_" + (secrets.token_hex(6) if context is None else
                                 hashlib.sha256(f"{context}\0{text}\0{i}".encode()).hexdigest()[:12])
    return content, calls


def _parsed(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    if fmt == "hermes":
        bodies = _HERMES.findall(text)
        content = _HERMES.sub("", text).strip()
        return content, [_call(json_or_text(b), "arguments") for b in bodies]
    if fmt == "mistral":
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        value = json_or_text(rest.strip())
        items = value if isinstance(value, list) else [value]
        return head.strip(), [_call(v, "arguments") for v in items]
    if fmt == "llama3":
        body = text.strip()
        body = body[len("<|python_tag|>"):].strip() if body.startswith("<|python_tag|>") else body
        if not body.startswith("{"):
            return text, []
        value = json_or_text(body)
        if isinstance(value, dict) and "name" in value:
            return "", [_call(value, "parameters")]
        return text, []
    raise ToolError(f"unknown tool format {fmt!r}", f"use one of {', '.join(FORMATS)}")


def json_or_text(text: str) -> Any:
    """The JSON value ``text`` starts with (text after it, e.g. a cut-off closing tag, is ignored), or the text."""
    try:
        return json.JSONDecoder().raw_decode(text.strip())[0]
    except ValueError:
        return text


def _call(value: Any, key: str) -> ToolCall:
    """The call ``value`` (a parsed JSON object) names; its ``id`` is empty when the text gives none."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall("", value if isinstance(value, str) else json.dumps(value), "")
    args = value.get(key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = json_or_text(args)
    return ToolCall(value["name"], args, str(value.get("id") or ""))


def run_call(call: ToolCall, tools: Sequence[Tool]) -> ToolCall:
    """Run ``call``'s function with its arguments (checked against the schema first) and keep the result
    as text; a bad call or a function that raises keeps a one-line error instead. Returns ``call``."""
    from .constraints import schema_problem

    by_name = {t.name: t for t in tools}
    tool = by_name.get(call.name)
    if tool is None:
        known = ", ".join(by_name) or "none"
        what = f"there is no tool named {call.name!r}" if call.name else f"the tool call {call.arguments!r} is not JSON with a name"
        call.result, call.error = f"{what} (tools: {known})", True
        return call
    problem = (schema_problem(call.arguments, tool.parameters) if isinstance(call.arguments, dict)
               else "the arguments are not a JSON object")
    if problem:
        call.result, call.error = f"the arguments of {call.name} do not fit its schema: {problem}", True
        return call
    try:
        value = tool.function(**call.arguments)
    except Exception as exc:  # the user's function: its error goes back to the model, the chat goes on
        line = " ".join(str(exc).split())
        call.result, call.error = f"{type(exc).__name__}: {line}" if line else type(exc).__name__, True
        return call
    call.result = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return call


# -- tool_choice -------------------------------------------------------------------------------------


def check_choice(choice: str, tools: Sequence[Tool]) -> str:
    """``tool_choice`` checked: one of :data:`CHOICES` or a tool's name."""
    if choice in CHOICES or choice in {t.name for t in tools}:
        return choice
    raise ToolError(f"tool_choice {choice!r} is neither auto, none, required nor one of the tools "
                    f"({', '.join(t.name for t in tools) or 'none given'})", "name one of them")


_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def call_grammar(fmt: str, tools: Sequence[Tool], choice: str) -> str:
    """An llguidance (Lark) grammar of exactly one tool call in ``fmt`` to one of ``tools`` (``choice``:
    ``required`` for any of them, or a tool's name), its arguments held to the tool's schema."""
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    key = "parameters" if fmt == "llama3" else "arguments"
    # no arguments beyond the function's own: a model given room for more fills it
    options = [{"type": "object", "properties": {"name": {"const": t.name},
                                                 key: {"additionalProperties": False, **t.parameters}},
                "required": ["name", key], "additionalProperties": False} for t in chosen]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": _COMPACT}
    body = "call: %json " + json.dumps(schema, ensure_ascii=False)
    if fmt == "hermes":
        return 'start: "<tool_call>\\n" call "\\n</tool_call>"\n' + body
    if fmt == "llama3":
        return "start: call\n" + body
    raise ToolError(f"tool_choice {choice!r} cannot be enforced for the {fmt} tool format",
                    "use tool_choice auto with this model")


__all__ = [
    "CHOICES", "FORMATS", "INTERRUPTED", "NOT_RUN", "Tool", "ToolCall", "ToolCalling", "ToolError", "call_grammar", "check_choice", "parse_tool_calls",
    "require_format", "run_call", "tool_format", "tools_from", "tools_named",
]
