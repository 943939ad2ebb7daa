"""Scoring, perplexity and tokens (:mod:`nbllm.scoring`): against transformers' own numbers, across both
loaders, with meaning on the real model, and one line for each bad input."""

from __future__ import annotations

import math
import random

import pytest

import nbllm
from nbllm.errors import NbllmError

CONTEXT = "The capital of France is"
CHOICES = [" Paris", " Lyon", " a city in Europe"]
PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget. After a long debate, the members agreed to "
    "spend more money on schools and public transport, and less on new roads. The mayor said that the decision "
    "would help families and reduce traffic in the centre of the town. Many residents attended the meeting and "
    "several of them spoke in favour of the plan. The budget will be published next week on the council's website."
)


def _direct_logprob(model, ids, start):
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [float(logp[i - 1, ids[i]]) for i in range(start, len(ids))], [
        int(logp[i - 1].argmax()) == ids[i] for i in range(start, len(ids))]


@pytest.fixture
def hf_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def test_score_equals_transformers_forward_and_is_batched_like_one_by_one(engine, tiny_model, hf_model):
    engine.load(tiny_model)
    scores = nbllm.score(CONTEXT, CHOICES)
    context_ids = engine.tokenize(CONTEXT, add_special=True)
    for choice in scores:
        ids = context_ids + choice.token_ids
        assert engine.tokenize(CONTEXT + choice.continuation, add_special=True) == ids
        direct, greedy = _direct_logprob(hf_model, ids, len(context_ids))
        assert choice.token_logprobs == pytest.approx(direct, abs=1e-4)
        assert choice.logprob == pytest.approx(sum(direct), abs=1e-4)
        assert choice.is_greedy == all(greedy)
        assert choice.per_token == pytest.approx(choice.logprob / len(choice.token_ids))
        assert choice.per_byte == pytest.approx(choice.logprob / len(choice.continuation.encode()))
        alone = nbllm.score(CONTEXT, [choice.continuation])[0]
        assert alone.logprob == pytest.approx(choice.logprob, abs=1e-4)  # padding in the batch changes nothing
    assert scores.best.logprob == max(c.logprob for c in scores)
    assert [r["rank"] for r in scores.rows()] == [1, 2, 3]


def test_the_greedy_continuation_is_greedy(engine, tiny_gguf):
    engine.load(tiny_gguf)
    reply = engine.generate(CONTEXT, temperature=0, max_new_tokens=4)
    scores = nbllm.score(CONTEXT, [reply.text, reply.text + " zz"])
    assert scores[0].is_greedy and not scores[1].is_greedy or reply.text.endswith(" zz")


def test_both_loaders_score_alike(engine, tiny_model, tiny_gguf):
    engine.load(tiny_model)
    a = nbllm.score(CONTEXT, CHOICES)
    engine.load(tiny_gguf, cache_type="fp32")
    b = nbllm.score(CONTEXT, CHOICES)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-3)
        assert x.is_greedy == y.is_greedy


def test_llama_cpp_generates_the_same_after_scoring(engine, tiny_gguf):
    engine.load(tiny_gguf)
    before = engine.generate(CONTEXT, temperature=0, max_new_tokens=8).text
    nbllm.score(CONTEXT, CHOICES)
    nbllm.perplexity(PARAGRAPH, max_length=32, stride=16, progress=False)
    assert engine.generate(CONTEXT, temperature=0, max_new_tokens=8).text == before


def _guide_perplexity(model, ids, max_length, stride):
    """transformers' perplexity guide (docs: perplexity.md), as written there."""
    import torch

    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(nll_sum / n_tokens))


@pytest.mark.parametrize(("max_length", "stride"), [(32, 16), (32, 32), (1024, 512)])
def test_perplexity_equals_the_guides_loop(engine, tiny_model, hf_model, max_length, stride):
    engine.load(tiny_model)
    got = nbllm.perplexity(PARAGRAPH, max_length=max_length, stride=stride, progress=False)
    ids = engine.tokenize(PARAGRAPH, add_special=True)
    assert got.tokens == len(ids)
    assert got.perplexity == pytest.approx(_guide_perplexity(hf_model, ids, max_length, stride), rel=1e-5)
    assert got.record is not None and got.record.mode == "perplexity"


def test_perplexity_of_both_loaders_agree_and_a_list_is_joined(engine, tiny_model, tiny_gguf, tmp_path):
    engine.load(tiny_model)
    a = nbllm.perplexity(PARAGRAPH, max_length=48, stride=16, progress=False)
    engine.load(tiny_gguf, cache_type="fp32")
    b = nbllm.perplexity(PARAGRAPH, max_length=48, stride=16, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
    parts = PARAGRAPH.split(". ")
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(parts))
    from pathlib import Path

    assert nbllm.perplexity(parts, max_length=48, stride=16, progress=False).perplexity == pytest.approx(
        nbllm.perplexity(Path(path), max_length=48, stride=16, progress=False).perplexity)


def test_tokenize_gives_the_tokenizers_ids_and_the_chat_share(engine, tiny_model):
    from transformers import AutoTokenizer

    engine.load(tiny_model)
    tokens = nbllm.tokenize("Hello world, again")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert tokens.ids == tok("Hello world, again")["input_ids"] and tokens.count == len(tokens.ids)
    chat = nbllm.tokenize("Hello", chat=True, system="Be brief.")
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                                       tokenize=False, add_generation_prompt=True)
    assert chat.text == rendered and chat.chat
    assert chat.share == pytest.approx(chat.count / engine.loader.context_length)
    assert "tokens (" in chat.summary()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: nbllm.score("", [" a"]), "the context is empty"),
    (lambda: nbllm.score("x", []), "there are no continuations"),
    (lambda: nbllm.score("x", [" a", ""]), "continuation 2 is empty"),
    (lambda: nbllm.score("word " * 3000, [" a"]), "the model's context holds"),
    (lambda: nbllm.perplexity("", progress=False), "the text is empty"),
    (lambda: nbllm.perplexity("some text here", stride=0), "stride 0 is below 1"),
    (lambda: nbllm.perplexity("some text here", max_length=99999), "longer than the model's context"),
    (lambda: nbllm.tokenize(""), "there is no text to tokenize"),
])
def test_bad_input_is_one_line_and_the_model_stays(engine, tiny_model, call, message):
    engine.load(tiny_model)
    with pytest.raises(NbllmError, match=message) as caught:
        call()
    assert "\n" not in caught.value.message
    assert engine.loaded


def test_choices_magic_ranks_and_replays_from_the_run_log(shell, engine, tiny_gguf, tmp_path, monkeypatch, capsys):
    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", '--choices " Paris| Lyon| Rome" -o s', CONTEXT)
    scores = shell.user_ns["s"]
    out = capsys.readouterr().out
    assert "rank" in out and all(c in out for c in ("' Paris'", "' Lyon'", "' Rome'"))
    assert out.index(repr(scores.best.continuation)) < min(out.index(repr(c.continuation)) for c in scores
                                                            if c is not scores.best) or len({c.logprob for c in scores}) < 3
    shell.run_line_magic("llm_replay", str(log))
    try:
        shell.run_line_magic("llm_load", str(tiny_gguf))
        shell.run_cell_magic("llm", '--choices " Paris| Lyon| Rome" -o again', CONTEXT)
        again = shell.user_ns["again"]
        assert again.replayed and [c.logprob for c in again] == [c.logprob for c in scores]
        with pytest.raises(NbllmError, match="no recorded score"):
            nbllm.score(CONTEXT, [" Madrid", " Oslo"])
    finally:
        shell.run_line_magic("llm_replay", "off")


def test_tokens_magic(shell, engine, tiny_model, capsys):
    shell.run_line_magic("llm_load", str(tiny_model))
    tokens = shell.run_line_magic("llm_tokens", "Hello world")
    assert tokens.ids == engine.tokenize("Hello world", add_special=True)
    chat = shell.run_cell_magic("llm_tokens", "--chat", "Hello")
    assert chat.chat and "Hello" in chat.text and "context" in str(chat)


def test_a_loader_without_scores_is_one_line(engine):
    """A server model has no token scores here: one line, the model stays."""
    from nbllm.scoring import _scorer

    class NoScores:
        name = "remote"
        scores_tokens = False

    with pytest.raises(NbllmError, match="does not give the log-probabilities of given tokens"):
        _scorer(NoScores())  # type: ignore[arg-type]


# -- meaning, on the real model (SmolLM2-135M-Instruct, llama.cpp) --------------------------------------

@pytest.fixture(scope="module")
def real_gguf():
    from nbllm.testing import real_model_gguf

    try:
        return real_model_gguf()
    except NbllmError as exc:
        pytest.skip(str(exc))


def test_real_model_knows_paris_from_lyon(engine, real_gguf):
    engine.load(real_gguf)
    scores = nbllm.score("The capital of France is", [" Paris", " Lyon", " London"])
    by = {c.continuation: c.logprob for c in scores}
    assert by[" Paris"] > by[" Lyon"] and by[" Paris"] > by[" London"]
    assert scores.best.continuation == " Paris" and scores.best.is_greedy


def test_real_models_perplexity_on_english_is_far_below_the_shuffled_text(engine, real_gguf):
    engine.load(real_gguf)
    words = PARAGRAPH.split()
    random.Random(0).shuffle(words)
    english = nbllm.perplexity(PARAGRAPH, progress=False).perplexity
    shuffled = nbllm.perplexity(" ".join(words), progress=False).perplexity
    assert english * 4 < shuffled, (english, shuffled)
    assert math.isfinite(english) and english > 1
