"""Token log-probabilities in results (``logprobs=K``): both loaders, against the libraries' own numbers."""

from __future__ import annotations

import json
import math

import pytest

from nbllm.errors import NbllmError
from nbllm.options import GenerationOptions
from nbllm.tokens import after_samplers, entry, log_softmax

PROMPT = "Once upon a time"


def _lp(values):
    import numpy as np

    return np.asarray(values, dtype=np.float64)


def test_log_softmax_sums_to_one_and_entry_keeps_the_top_k_in_order():
    import numpy as np

    logits = np.array([1.0, 3.0, 2.0, -1.0])
    logp = log_softmax(logits)
    assert math.isclose(float(np.exp(logp).sum()), 1.0, rel_tol=1e-12)
    e = entry(2, logits, 2, str)
    assert e["id"] == 2 and math.isclose(e["logprob"], float(logp[2]), rel_tol=1e-6)
    assert [t[1] for t in e["top"]] == [1, 2]


def test_after_samplers_greedy_leaves_one_token_and_top_k_leaves_k():
    logits = _lp([1.0, 3.0, 2.0, -1.0])
    greedy = after_samplers(logits, GenerationOptions(temperature=0))
    assert list(greedy).count(0.0) == 1 and greedy[1] == 0.0
    two = log_softmax(after_samplers(logits, GenerationOptions(temperature=1.0, top_k=2, top_p=1.0)))
    import numpy as np

    assert np.isfinite(two).sum() == 2 and math.isclose(float(np.exp(two[np.isfinite(two)]).sum()), 1.0)


def test_after_samplers_equals_transformers_warpers():
    """The numpy samplers give the same distribution as transformers' own warpers, in its order."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=gen) * 3
    opts = GenerationOptions(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        scores = warper(None, scores)
    theirs = torch.log_softmax(scores, -1)[0].numpy()
    ours = log_softmax(after_samplers(logits[0].numpy(), opts))
    import numpy as np

    assert (np.isfinite(theirs) == np.isfinite(ours)).all()
    finite = np.isfinite(theirs)
    assert np.allclose(theirs[finite], ours[finite], atol=1e-5)


def test_transformers_greedy_logprobs_equal_the_models_own_forward(engine, tiny_model):
    """Each new token's logprob equals log_softmax of the model's logits at its position."""
    import torch
    from transformers import AutoModelForCausalLM

    engine.load(tiny_model)
    r = engine.generate(PROMPT, temperature=0, max_new_tokens=8, logprobs=3)
    tokens = r.tokens
    assert tokens is not None and len(tokens) == len(r.token_ids) == 8
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = engine.tokenize(PROMPT, add_special=True) + r.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    start = len(ids) - len(r.token_ids)
    for i, e in enumerate(tokens):
        assert e["id"] == r.token_ids[i]
        assert abs(e["logprob"] - float(logp[start - 1 + i, e["id"]])) < 1e-4
        assert e["top"][0][1] == e["id"]  # greedy: the token is the most likely one
        assert len(e["top"]) == 3


def test_both_loaders_greedy_logprobs_agree_on_the_same_weights(engine, tiny_model, tiny_gguf):
    engine.load(tiny_model)
    a = engine.generate(PROMPT, temperature=0, max_new_tokens=10, logprobs=5)
    engine.load(tiny_gguf, cache_type="fp32")  # llama.cpp's fp16 KV cache moves logprobs by up to ~0.05 here
    b = engine.generate(PROMPT, temperature=0, max_new_tokens=10, logprobs=5)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert abs(x["logprob"] - y["logprob"]) < 1e-3
        assert [t[1] for t in x["top"][:2]] == [t[1] for t in y["top"][:2]]
        for (_, i, lx), (_, j, ly) in zip(x["top"], y["top"], strict=True):
            if i == j:
                assert abs(lx - ly) < 1e-3


@pytest.mark.parametrize("model", ["tiny_model", "tiny_gguf"])
def test_after_samplers_gives_the_drawn_distribution(engine, model, request):
    engine.load(request.getfixturevalue(model))
    r = engine.generate(PROMPT, temperature=0.9, top_k=5, max_new_tokens=6, seed=3, logprobs=8,
                        logprobs_after_samplers=True)
    for e in r.tokens:
        assert len(e["top"]) <= 5  # top-k 5 leaves five tokens possible
        assert e["id"] in [t[1] for t in e["top"]]
        assert math.isclose(sum(math.exp(t[2]) for t in e["top"]), 1.0, rel_tol=1e-6)
    greedy = engine.generate(PROMPT, temperature=0, max_new_tokens=3, logprobs=2, logprobs_after_samplers=True)
    assert all(e["logprob"] == 0.0 and len(e["top"]) == 1 for e in greedy.tokens)


def test_logprobs_do_not_change_the_text(engine, tiny_gguf):
    engine.load(tiny_gguf)
    plain = engine.generate(PROMPT, temperature=0.8, seed=11, max_new_tokens=12)
    kept = engine.generate(PROMPT, temperature=0.8, seed=11, max_new_tokens=12, logprobs=5)
    assert plain.text == kept.text and plain.token_ids == kept.token_ids


def test_logprobs_in_the_record_the_frame_and_chat(engine, tiny_model):
    engine.load(tiny_model)
    r = engine.generate("Hi", chat=True, temperature=0, max_new_tokens=5, logprobs=2)
    record = r.record.to_dict()
    assert [e["id"] for e in record["logprobs"]] == r.token_ids
    json.loads(r.record.to_json())  # strict enough for JSON
    frame = r.tokens.frame()
    assert list(frame["id"]) == r.token_ids and (frame["prob"] <= 1).all()
    assert "".join(frame["token"]) == r.text
    assert r.record.identity()["generation_options"] == {"temperature": 0.0, "max_new_tokens": 5, "logprobs": 2}
    plain = engine.generate("Hi", temperature=0, max_new_tokens=3)
    assert plain.tokens is None and plain.record.logprobs is None


def test_logprobs_out_of_range_is_one_line(engine, tiny_model):
    engine.load(tiny_model)
    with pytest.raises(NbllmError, match="--logprobs 21 is above 20"):
        engine.generate(PROMPT, logprobs=21)
    with pytest.raises(NbllmError, match="--logprobs -1 is below 0"):
        engine.generate(PROMPT, logprobs=-1)
    assert engine.loaded


def test_magic_logprobs_show_the_token_view_and_replay_shows_it_again(shell, engine, tiny_gguf, tmp_path, monkeypatch):
    """``%%llm --logprobs``: the token table in plain text, the record in the run log; ``%llm_replay`` of the log
    gives the same tokens without the model."""
    from nbllm import runlog

    log = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBLLM_RUN_LOG", str(log))
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 6 --logprobs 3 -o r", PROMPT)
    r = shell.user_ns["r"]
    runlog.flush()
    row = runlog.RunLog(log).rows()[-1]
    assert [e["id"] for e in row["record"]["logprobs"]] == r.token_ids
    html = r.tokens.html()
    assert html.count("class='nbllm-token'") == len(r.token_ids) and "title=" in html
    shell.run_line_magic("llm_replay", str(log))
    try:
        shell.run_line_magic("llm_load", str(tiny_gguf))
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 6 --logprobs 3 -o again", PROMPT)
        again = shell.user_ns["again"]
        assert again.replayed and [e["logprob"] for e in again.tokens] == [e["logprob"] for e in r.tokens]
    finally:
        shell.run_line_magic("llm_replay", "off")
