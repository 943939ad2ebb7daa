"""The engine's lifecycle, records, interruption and failure handling, with real tiny models."""

from __future__ import annotations

import _thread
import threading

import pytest

import nbllm
from nbllm.engine import Engine, process_rss
from nbllm.errors import GenerationError, ModelNotFoundError, NoModelLoadedError, OptionError

try:
    from stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step
except ImportError:  # tests/ imported as a package
    from tests.stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step

PROMPT = "Once upon a time"
MiB = 2**20


@pytest.fixture(scope="module")
def big_pair():
    """Two distinct ~100 MB models, large enough for memory to show in the process RSS."""
    from nbllm.testing import tiny_transformers_model

    return [tiny_transformers_model(hidden_size=512, num_layers=8, seed=s) for s in (1, 2)]


def test_loading_the_same_model_with_the_same_options_does_nothing(engine, tiny_model):
    engine.load(tiny_model)
    loader = engine.loader
    status = engine.load(tiny_model, {"attn": "auto"})  # the same options, spelled out
    assert engine.loader is loader and status.already_loaded
    engine.load(tiny_model, attn="eager")
    assert engine.loader is not loader


def test_unload_frees_the_memory(engine, big_pair):
    model_bytes = 25_000_000 * 4
    engine.load(big_pair[0])
    engine.generate(PROMPT, max_new_tokens=2)  # touch every weight
    loaded = process_rss()
    assert engine.unload() is True
    freed = loaded - process_rss()
    assert freed > 0.7 * model_bytes, f"only {freed / MiB:.0f} MiB freed"
    assert engine.unload() is False
    assert not engine.status().loaded


def test_loading_another_model_releases_the_first_before_loading(engine, big_pair, monkeypatch):
    from nbllm.loaders.transformers import TransformersLoader

    engine.load(big_pair[0])
    engine.generate(PROMPT, max_new_tokens=2)  # touch every weight
    with_first = process_rss()
    at_start = []
    real_load = TransformersLoader.load

    def measured_load(self, source, options):
        at_start.append(process_rss())  # the moment the second model starts loading
        return real_load(self, source, options)

    monkeypatch.setattr(TransformersLoader, "load", measured_load)
    engine.load(big_pair[1])
    assert with_first - at_start[0] > 0.7 * 25_000_000 * 4, (with_first / MiB, at_start[0] / MiB)
    assert engine.status().model == big_pair[1].name


def test_status_reports_model_loader_options_placement_and_memory(engine, tiny_model):
    status = engine.load(tiny_model, attn="eager")
    assert (status.model, status.loader, status.format) == (tiny_model.name, "transformers", "transformers")
    assert status.options == {"attn": "eager"}
    assert status.placement.devices == {"cpu": 2}
    assert status.placement.memory_bytes["cpu"] > 100_000
    text = str(status)
    assert "placement: cpu: 2" in text and "--attn eager" in text and "process RSS" in text
    assert "No model loaded" in str(Engine().status())


def test_the_record_holds_everything_needed_to_reproduce(engine, tiny_model):
    import hashlib

    engine.load(tiny_model, attn="eager")
    result = engine.generate(PROMPT, temperature=0.9, max_new_tokens=5, seed=7)
    rec = result.record.to_dict()
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert rec["model"]["path"] == str(tiny_model)
    assert rec["model"]["sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert rec["load_options"]["attn"] == "eager"
    assert rec["generation_options"] == {**nbllm.GenerationOptions(temperature=0.9, max_new_tokens=5).to_dict(),
                                         "seed": 7}
    assert rec["seed"] == 7 and rec["prompt"] == PROMPT and rec["mode"] == "raw"
    for lib in ("nbllm", "torch", "transformers", "python"):
        assert rec["versions"][lib]
    assert result.timings.time_to_first_token > 0 and result.timings.decode_tokens_per_second > 0


def test_raw_prompts_compute_the_whole_prompt_so_a_seed_reproduces_exactly(engine, tiny_model, monkeypatch):
    engine.load(tiny_model)
    computed: list[int] = []
    hook = engine.loader.model.register_forward_pre_hook(
        lambda _m, _a, kw: computed.append(int(kw["input_ids"].shape[1])), with_kwargs=True)
    try:
        a = engine.generate(PROMPT, temperature=1.0, seed=99, max_new_tokens=10)
        first = computed[0]
        computed.clear()
        b = engine.generate(PROMPT, temperature=1.0, seed=99, max_new_tokens=10)
    finally:
        hook.remove()
    assert computed[0] == first == a.prompt_tokens  # the re-run computed the whole prompt again
    assert a.token_ids == b.token_ids and b.record.reused_prefix_tokens == 0


def test_generation_without_a_model_says_how_to_load_one(engine):
    with pytest.raises(NoModelLoadedError, match="no model is loaded. Load one first"):
        engine.generate("hi")


def test_bad_path_bad_value_bad_combination_keep_the_loaded_model(engine, tiny_model):
    engine.load(tiny_model)
    loader = engine.loader
    with pytest.raises(ModelNotFoundError, match="no model at /no/such/model"):
        engine.load("/no/such/model")
    with pytest.raises(OptionError):
        engine.load(tiny_model, dtype="float7")
    with pytest.raises(OptionError):
        engine.load(tiny_model, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(OptionError):
        engine.generate(PROMPT, temperature=-1)
    assert engine.loader is loader
    assert len(engine.generate(PROMPT, max_new_tokens=3).token_ids) == 3


def test_prompt_longer_than_the_context_is_refused(engine, tmp_path):
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(tmp_path / "m", max_position_embeddings=16))
    with pytest.raises(GenerationError, match="the prompt is .* tokens and the model's context holds 16"):
        engine.generate("word " * 40)


def test_keyboard_interrupt_stops_within_a_step_keeps_the_partial_text_and_the_model(engine, tiny_model):
    engine.load(tiny_model)
    loader = engine.loader
    model = loader.model
    steps, counting = count_steps(model)
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=5000)
    at, stopping = stop_at_step(engine, 10, _thread.interrupt_main)  # a kernel interrupt, from another thread
    seen = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for chunk in result:
                seen.append(chunk)
    finally:
        stopping.remove()
        counting.remove()
    assert at.get("told"), "the interrupt never reached the generation (it was not told to stop)"
    assert result.finish_reason == "interrupted" and result.interrupted
    # Within a step: the step under way when the interrupt came ends, and no other one starts.
    assert len(steps) == at["steps"] == 10
    assert steps_once_the_generation_thread_is_free(steps) == 10  # and nothing ran after it
    count = result.completion_tokens
    assert count == at["tokens"] == 9  # read before the interrupt; the step under way adds none
    full = engine.generate(PROMPT, temperature=0, max_new_tokens=count)
    assert full.token_ids == result.token_ids  # the partial text is exactly the start of the full one
    assert result.text == full.text and "".join(seen) == full.text[: len("".join(seen))]
    assert engine.loader is loader  # the same model, still loaded: nothing was reloaded


def test_cancel_from_another_thread(engine, tiny_model):
    engine.load(tiny_model)
    model = engine.loader.model
    steps, counting = count_steps(model)
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=5000)
    at, stopping = stop_at_step(engine, 6, lambda: threading.Thread(target=result.cancel).start())
    try:
        text = result.text
    finally:
        stopping.remove()
        counting.remove()
    assert at["told"] and result.finish_reason == "cancelled"
    assert len(steps) == 6 and steps_once_the_generation_thread_is_free(steps) == 6
    n = result.completion_tokens
    assert n in (5, 6) and at["tokens"] == 5  # what came before the cancel, and the step under way's token
    assert text == "".join(result.chunks) == engine.generate(PROMPT, temperature=0, max_new_tokens=n).text


@pytest.mark.timeout(120)
def test_an_exception_in_the_generating_thread_is_raised_not_a_hang(engine, tiny_model):
    engine.load(tiny_model)
    model = engine.loader.model
    real_forward = model.forward
    calls = [0]

    def failing_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_forward(*args, **kwargs)

    model.forward = failing_forward
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=50)
    with pytest.raises(GenerationError) as info:  # a hang would end at the test's timeout instead
        _ = result.text
    assert "RuntimeError: CUDA error: device-side assert triggered" in info.value.message
    assert result.finish_reason == "error" and len(result.token_ids) == 3
    model.forward = real_forward
    assert len(engine.generate(PROMPT, max_new_tokens=3).token_ids) == 3


def test_result_replays_its_chunks_and_reports(engine, tiny_model):
    engine.load(tiny_model)
    result = engine.generate(PROMPT, temperature=0, max_new_tokens=8)
    assert "".join(result) == result.text == str(result)
    assert "8 tokens" in result.summary() and "ended: length" in result.summary()
    assert result.to_dict()["record"]["seed"] == result.seed
    done = []
    result.on_done(done.append)
    assert done == [result]


def test_python_api_without_ipython(tiny_model, engine):
    status = nbllm.load(tiny_model, attn="sdpa")
    assert status.loaded and nbllm.status().model == tiny_model.name
    assert "".join(nbllm.stream(PROMPT, temperature=0, max_new_tokens=6)) == nbllm.generate(
        PROMPT, temperature=0, max_new_tokens=6).text
    assert nbllm.unload() is True


def test_close_while_streaming_finishes_the_result_at_once(engine, tiny_model):
    """An interrupt can land between two chunks, outside the generation: close() must still end it."""
    engine.load(tiny_model)
    model = engine.loader.model
    steps, counting = count_steps(model)
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=5000)
    stream = iter(result)
    try:
        for _ in range(3):
            next(stream)
        before = len(steps)  # the generation thread may be a few tokens ahead of the reader
        result.close()
        after = len(steps)
    finally:
        counting.remove()
    assert result.done and result.finish_reason == "interrupted"
    assert after <= before + 1  # within a step of close()
    assert steps_once_the_generation_thread_is_free(steps) == after  # close() returned once it had stopped
    assert 3 <= result.completion_tokens <= after
    assert list(stream) == []


def test_chat_without_a_template_uses_the_fallback_with_a_note(engine, tmp_path):
    from nbllm.chat_template import ChatNote
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(tmp_path / "no-template", chat_template=False))
    with pytest.warns(ChatNote, match="no chat template"):
        result = engine.generate("Hi", chat=True, max_new_tokens=2)
    assert result.prompt == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
