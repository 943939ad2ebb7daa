"""Rendering messages through a model's own chat template, in jinja's sandbox.

The same rendering serves both loaders (the Transformers tokenizer's ``chat_template`` and the GGUF's
``tokenizer.chat_template``), so a chat prompt is built one way everywhere. It follows what
transformers' ``apply_chat_template`` does: an immutable sandbox, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from .errors import ChatError, NbllmWarning

FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, used for models that ship no chat template (nbllm says so when it uses it)."""

FALLBACK_NOTE = (
    "the model has no chat template: messages are rendered with nbllm's fallback template "
    "(ChatML: <|im_start|>role ... <|im_end|>)"
)


class ChatNote(NbllmWarning):
    """Something that changes a chat prompt: history left out, the fallback template."""


def _generation_tag() -> Any:
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks in some
    templates, as transformers supports): rendered as its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return GenerationTag


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return _dt.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_tag()]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text for ``messages`` (dicts with ``role`` and ``content``) under ``template``.

    ``template=None`` uses :data:`FALLBACK_TEMPLATE`. ``tools``: the JSON schemas of the functions the
    model may call (:mod:`nbllm.tools`), passed to the template as transformers' ``apply_chat_template`` does.
    """
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        compiled = _compile(template or FALLBACK_TEMPLATE)
    except TemplateSyntaxError as exc:
        raise ChatError(
            f"the model's chat template cannot be read: {exc.message} (line {exc.lineno})",
            "fix chat_template.jinja / tokenizer_config.json (or the GGUF's tokenizer.chat_template), "
            "or send raw prompts with %%llm",
        ) from None
    try:
        return str(
            compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                            **({"tools": list(tools)} if tools else {}), **special_tokens)
        )
    except TemplateError as exc:
        raise ChatError(
            f"the model's chat template refused these messages: {exc}",
            "check the roles (many templates want user and assistant turns to alternate, and allow a "
            "system prompt only first)",
        ) from None


def starts_with_bos(text: str, special_tokens: dict[str, str]) -> bool:
    """Whether a rendered prompt already begins with the BOS text (then the tokenizer must not add one)."""
    bos = special_tokens.get("bos_token") or ""
    return bool(bos) and text.startswith(bos)
