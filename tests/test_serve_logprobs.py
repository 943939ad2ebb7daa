"""``%llm_serve`` answers logprobs, echo, token-id and listed prompts, n > 1 and chat logprobs
(:mod:`nbllm.serve_logprobs`), checked with the official ``openai`` client against nbllm's own numbers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.serve import stop

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

PROMPT = "Once upon a time"


@pytest.fixture
def served(engine: Any, tiny_gguf: Path) -> Iterator[Any]:
    nbllm.load(tiny_gguf, cache_type="fp32")
    server = nbllm.serve(port=0)
    yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120), nbllm.status().model
    stop()


def test_completion_logprobs_equal_the_results_tokens(served: Any) -> None:
    client, model = served
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    local = nbllm.generate(PROMPT, max_new_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == local.text
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in local.tokens], abs=1e-6)
    assert [len(t) for t in lp.top_logprobs] == [len({*(a[0] for a in e["top"]), e["token"]}) for e in local.tokens]
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == local.text


def test_echo_gives_the_prompts_logprobs_as_score_does(served: Any) -> None:
    """What lm-eval's local-completions sends for loglikelihood: token ids, echo, logprobs 1, max_tokens 1."""
    client, model = served
    engine = nbllm.get_engine()
    context = engine.tokenize("The capital of France is", add_special=True)
    whole = engine.tokenize("The capital of France is Paris", add_special=True)
    out = client.completions.create(model=model, prompt=[whole, context], max_tokens=1, temperature=0, logprobs=1,
                                    echo=True, seed=1234)
    assert [c.index for c in out.choices] == [0, 1]
    first = out.choices[0].logprobs
    assert first.token_logprobs[0] is None and len(first.token_logprobs) == len(whole) + 1
    scores = nbllm.score("The capital of France is", [" Paris"])[0]
    assert sum(first.token_logprobs[len(context):-1]) == pytest.approx(scores.logprob, abs=1e-4)
    greedy = all(lp == max(top.values()) for lp, top in zip(first.token_logprobs[len(context):-1],
                                                             first.top_logprobs[len(context):-1], strict=True))
    assert greedy == scores.is_greedy
    assert out.usage.prompt_tokens == len(whole) + len(context)


def test_n_choices_are_seeded_one_after_another(served: Any) -> None:
    client, model = served
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
    texts = [c.text for c in out.choices]
    assert texts == [nbllm.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=7 + i).text for i in range(3)]
    assert len(set(texts)) > 1


def test_chat_logprobs_and_top_logprobs(served: Any) -> None:
    client, model = served
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2)
    local = nbllm.generate(messages, max_new_tokens=5, temperature=0, logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in local.tokens], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert out.choices[0].message.content == local.text


def test_bad_logprob_requests_are_one_line_400s(served: Any) -> None:
    client, model = served
    with pytest.raises(openai.BadRequestError, match="logprobs 21 is out of range"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="answered whole: leave stream out"):
        list(client.completions.create(model=model, prompt=PROMPT, max_tokens=2, logprobs=2, stream=True))
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="prompt must be a text, token ids, or a list"):
        client.completions.create(model=model, prompt=[[]], max_tokens=2)  # type: ignore[list-item]
