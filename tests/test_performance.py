"""``--compile``: a decode step compiled once per cache size, the same greedy text as eager, sampling
with the same meaning as transformers'; compile time in the timings. Speed is measured in benchmarks/."""

from __future__ import annotations

import gc

import pytest

from nbllm.loaders._compiled import cache_bucket, pick_sampled
from nbllm.result import Result, Timings

PROMPT = "The quick brown fox"


def test_cache_sizes_are_powers_of_two_within_the_context():
    assert [cache_bucket(n, 2048) for n in (1, 128, 129, 700, 2048)] == [128, 128, 256, 1024, 2048]
    assert cache_bucket(1500, 1000) == 1000
    assert cache_bucket(5000, None) == 8192


@pytest.mark.parametrize("knobs", [
    dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(min_p=0.2), dict(typical_p=0.6),
    dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
])
def test_sampling_keeps_the_tokens_transformers_keeps(knobs):
    """The compiled sampler draws from the same tokens as transformers' logits processors."""
    import torch
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    k = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0, **knobs}
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((1, 300), generator=generator) * 3
    history = torch.tensor([[3, 17, 17, 250]])
    seen = torch.zeros((1, 300), dtype=torch.bool)
    seen[0, history[0]] = True
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(k["repetition_penalty"]), TemperatureLogitsWarper(k["temperature"]),
        *([TopKLogitsWarper(k["top_k"])] if k["top_k"] else []),
        *([TopPLogitsWarper(k["top_p"])] if k["top_p"] < 1 else []),
        *([MinPLogitsWarper(k["min_p"])] if k["min_p"] else []),
        *([TypicalLogitsWarper(k["typical_p"])] if k["typical_p"] < 1 else []),
    ])
    expected = set(torch.isfinite(processors(history, logits.clone())).nonzero()[:, 1].tolist())
    vector = torch.tensor([k[n] for n in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")])
    drawn = set()
    for _ in range(3000):
        noise = torch.empty((1, 300)).exponential_(generator=generator)
        drawn.add(int(pick_sampled(logits, seen, vector, noise)))
    assert drawn <= expected
    assert len(drawn) >= min(len(expected), 3)  # it samples, it does not always pick the same token


def test_compile_time_is_shown_in_the_summary():
    result = Result("p", 1)
    result.finish("length", Timings(time_to_first_token=31.0, compile_seconds=30.5))
    assert "compiled in 30.5 s" in result.summary()
    result = Result("p", 1)
    result.finish("length", Timings(time_to_first_token=0.01))
    assert "compiled" not in result.summary()


@pytest.mark.slow
def test_compiled_greedy_text_equals_eager_compiled_once_and_per_model(engine, tiny_model):
    """One compile for two prompts of different lengths; the same tokens as eager; another model of the
    same shape (inductor's cache serves it) generates with its own weights, not the first one's."""
    import torch._dynamo

    from nbllm.testing import tiny_transformers_model

    other = tiny_transformers_model(seed=1)
    prompts = [PROMPT, PROMPT + " jumps over the lazy dog and keeps on running"]
    eager = {}
    for model in (tiny_model, other):
        engine.load(model)
        eager[model] = [engine.generate(p, temperature=0, max_new_tokens=12).token_ids for p in prompts]
    assert eager[tiny_model] != eager[other]

    torch._dynamo.utils.counters.clear()
    status = engine.load(tiny_model, compile=True)
    assert any(n.startswith("--compile: ") for n in status.placement.notes)
    first = engine.generate(prompts[0], temperature=0, max_new_tokens=12)
    assert first.timings.compile_seconds is not None and first.timings.compile_seconds > 0
    assert first.timings.time_to_first_token >= first.timings.compile_seconds
    second = engine.generate(prompts[1], temperature=0, max_new_tokens=12)
    assert second.timings.compile_seconds is None  # same cache size: no recompilation
    assert [first.token_ids, second.token_ids] == eager[tiny_model]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "caches of 128 tokens" in engine.status().details["compiled"]

    # top_k=1 sampling is the argmax: the sampled graph gives the greedy text too, and a seed repeats
    sampled = [engine.generate(prompts[0], temperature=0.9, top_k=1, seed=3, max_new_tokens=12) for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids == eager[tiny_model][0]
    assert sampled[0].timings.compile_seconds is not None and sampled[1].timings.compile_seconds is None

    engine.load(other, compile=True)
    assert [engine.generate(p, temperature=0, max_new_tokens=12).token_ids for p in prompts] == eager[other]

    # unloading frees the compiled graphs, and with them the packed weights they hold
    from torch._inductor.output_code import CompiledFxGraph

    engine.unload()
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, CompiledFxGraph)]


def test_compile_says_when_it_cannot_apply(engine, tiny_model_64):
    status = engine.load(tiny_model_64, load_in_8bit=True, compile=True)
    assert any("--compile has no effect" in n and "bitsandbytes" in n for n in status.placement.notes)
    assert status.details["compiled"] is False
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_token_stream_says_when_each_token_was_made_and_hands_all_over_in_order():
    """Fast tokens may reach the reader several at a time; each keeps the time it was made."""
    import threading
    import time

    from nbllm.streaming import threaded_tokens

    made: list[float] = []

    def run(emit):
        for i in range(200):
            made.append(time.perf_counter())
            emit(i)

    stream = threaded_tokens(run, threading.Event())
    got, stamps = [], []
    for token in stream:
        received = time.perf_counter()
        got.append(token)
        stamps.append(stream.emitted_at)
        assert made[token] <= stream.emitted_at <= received
    assert got == list(range(200))
    assert stamps == sorted(stamps)


def test_readme_performance_figures_are_the_benchmark_results_files():
    """The README quotes benchmarks/results/ verbatim: every figure there comes from a benchmark run."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"<!-- results: (\S+) -->\n(.*?)\n<!-- /results -->", readme, re.S)
    assert len(blocks) >= 5
    for path, text in blocks:
        assert path.startswith("benchmarks/results/") and (root / path).exists(), path
        assert text.strip() == (root / path).read_text().strip(), f"README differs from {path}"
        assert (root / path).with_suffix(".json").exists(), path


def test_a_compile_that_fails_says_so_once_and_the_model_generates_without_it(engine, tiny_model):
    from nbllm.errors import GenerationError

    engine.load(tiny_model)
    reference = engine.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids
    engine.load(tiny_model, compile=True)

    def no_compiler(*args, **kwargs):  # what torch.compile raises where it cannot build its C++ kernels
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    engine.loader._compiled._steps = {"greedy": no_compiler, "sampled": no_compiler}
    with pytest.raises(GenerationError, match="--compile could not compile this model's decode step .*C\\+\\+ compiler"):
        engine.generate(PROMPT, temperature=0, max_new_tokens=6)
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == reference
    status = engine.status()
    assert status.details["compiled"] is False
    assert any("compiling failed" in n for n in status.placement.notes)
    assert not any(n.startswith("--compile: ") for n in status.placement.notes)
