"""Chat template rendering matches transformers' apply_chat_template, including its extensions."""

from __future__ import annotations

import pytest

from nbllm.chat_template import FALLBACK_TEMPLATE, render_chat, starts_with_bos
from nbllm.errors import ChatError

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
MESSAGES = [{"role": "user", "content": "Olá {x} 🤖"}, {"role": "assistant", "content": "Oi!"}]

GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% generation %}A: {{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def test_generation_tags_render_like_transformers(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = tok.apply_chat_template(MESSAGES, chat_template=GENERATION_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    assert render_chat(GENERATION_TEMPLATE, MESSAGES, special_tokens=special) == expected


def test_a_template_with_a_syntax_error_says_so():
    with pytest.raises(ChatError, match="chat template cannot be read: .*line 1"):
        render_chat("{% for m in messages %}", MESSAGES, special_tokens=SPECIAL)


def test_raise_exception_in_a_template_is_one_line_about_roles():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first!') }}{% endif %}"
    with pytest.raises(ChatError, match="refused these messages: System first!"):
        render_chat(template, MESSAGES, special_tokens=SPECIAL)


def test_fallback_is_chatml_and_starts_with_bos():
    text = render_chat(None, MESSAGES[:1], special_tokens=SPECIAL)
    assert text == "<s><|im_start|>user\nOlá {x} 🤖<|im_end|>\n<|im_start|>assistant\n"
    assert starts_with_bos(text, SPECIAL) and render_chat(FALLBACK_TEMPLATE, MESSAGES[:1], special_tokens=SPECIAL) == text
