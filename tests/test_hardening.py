"""Edges a demanding user hit (issue 16): context limits, the system prompt, bad arguments, loading twice."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from IPython.core.error import UsageError

import nbllm
from nbllm.errors import NbllmError, NbllmWarning

PROMPT = "def fibonacci(n):"


@pytest.fixture(params=["transformers", "llama.cpp"])
def short_context(request: pytest.FixtureRequest, engine: Any) -> Any:
    """A model whose context holds 128 tokens, loaded."""
    if request.param == "llama.cpp":
        need("llama_cpp")
        engine.load(request.getfixturevalue("tiny_gguf"), n_ctx=128)
    else:
        from nbllm.testing import tiny_transformers_model

        engine.load(tiny_transformers_model(max_position_embeddings=128))
    assert engine.loader.context_length == 128
    return engine


def test_a_raw_prompt_is_capped_at_the_context_with_a_note_and_reason_context(short_context: Any) -> None:
    prompt = PROMPT * 8
    n = len(short_context.tokenize(prompt, add_special=True))
    with pytest.warns(NbllmWarning, match=f"at most {128 - n} of the 1000 new tokens"):
        result = short_context.generate(prompt, temperature=0, max_new_tokens=1000, repetition_penalty=1.0)
    assert result.finish_reason in ("context", "eos")
    if result.finish_reason == "context":
        assert result.completion_tokens == 128 - n
    with warnings.catch_warnings():
        warnings.simplefilter("error", NbllmWarning)  # no note when the reply fits
        short_context.generate(prompt, temperature=0, max_new_tokens=4)


def test_a_prompt_longer_than_the_context_is_one_line(short_context: Any) -> None:
    with pytest.raises(NbllmError, match="context holds 128") as err:
        short_context.generate(PROMPT * 60, temperature=0)
    assert "\n" not in str(err.value)
    assert short_context.generate(PROMPT, temperature=0, max_new_tokens=3).completion_tokens == 3


def test_system_implies_chat_in_the_api_and_empty_system_is_none(engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    with_system = nbllm.generate("hi", system="Be brief.", temperature=0, max_new_tokens=3)
    assert with_system.record.mode == "chat"
    assert with_system.record.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert "Be brief." in with_system.prompt
    no_system = nbllm.generate("hi", system="", temperature=0, max_new_tokens=3)
    plain_chat = nbllm.generate("hi", chat=True, temperature=0, max_new_tokens=3)
    assert no_system.record.messages == [{"role": "user", "content": "hi"}]
    assert no_system.prompt == plain_chat.prompt and no_system.text == plain_chat.text


def test_empty_system_flag_renders_no_system_turn(shell: Any, engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    shell.run_cell_magic("llm", "--system '' --temperature 0 --max-new-tokens 3 -o r", "hi")
    assert shell.user_ns["r"].record.messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("prompt", [None, 42, [1, 2], [{"role": "user"}], [{"role": "robot", "content": "x"}], "", " \n "])
def test_bad_prompts_are_one_line_errors(engine: Any, tiny_model: Path, prompt: Any) -> None:
    engine.load(tiny_model)
    with pytest.raises(NbllmError) as err:
        nbllm.generate(prompt)
    message = str(err.value)
    assert "\n" not in message and ("prompt" in message or "message" in message)
    assert nbllm.generate(PROMPT, temperature=0, max_new_tokens=2).completion_tokens == 2


def test_bad_options_argument_is_one_line(engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    with pytest.raises(NbllmError, match="options must be"):
        nbllm.generate(PROMPT, "temperature=0")  # type: ignore[arg-type]
    with pytest.raises(NbllmError, match="model must be"):
        nbllm.load(None)  # type: ignore[arg-type]


def test_loading_the_same_model_again_says_it_was_already_loaded(shell: Any, engine: Any, tiny_model: Path,
                                                                 capsys: Any) -> None:
    shell.run_line_magic("llm_load", str(tiny_model))
    assert capsys.readouterr().out.startswith("Loaded ")
    shell.run_line_magic("llm_load", str(tiny_model))
    assert capsys.readouterr().out.strip() == f"{tiny_model.name} is already loaded with these options; nothing was done."
    with pytest.raises(UsageError):
        shell.run_line_magic("llm_load", f"{tiny_model} --n-ctx 5")
