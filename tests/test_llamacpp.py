"""The llama.cpp loader on real built-in GGUF models (CPU): option mapping, output parity with
llama-cpp-python itself, chat templates, load failures, streaming, interruption and quiet logs."""

from __future__ import annotations

import _thread
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from IPython.core.error import UsageError

import nbllm
from nbllm.engine import Prompt
from nbllm.errors import LoadError, MissingDependencyError, OptionError
from nbllm.loaders import llamacpp
from nbllm.loaders.llamacpp import (
    CACHE_TYPES,
    N_CTX_CAP,
    LlamaCppLoader,
    llama_kwargs,
    read_gguf_header,
)
from nbllm.options import LoadOptions

try:
    from stepping import steps_once_the_generation_thread_is_free, stopped_at_step
except ImportError:  # tests/ imported as a package
    from tests.stepping import steps_once_the_generation_thread_is_free, stopped_at_step
from nbllm.source import ModelSource

llama_cpp = need("llama_cpp")
pytestmark = pytest.mark.llamacpp

PROMPT = "The quick brown fox"


# ------------------------------------------------------------------------------------------- helpers


def source(path: Path) -> ModelSource:
    return ModelSource(path=path, format="gguf", name=path.name)


def direct_llama(path: Path, **kwargs: Any) -> Any:
    """A llama_cpp.Llama of its own, the reference nbllm is compared with."""
    return llama_cpp.Llama(str(path), verbose=False, **{"n_ctx": 2048, **kwargs})


def direct_greedy(llm: Any, prompt: str, n: int, **sampling: Any) -> list[int]:
    """Token ids llama-cpp-python itself generates greedily (its own generate loop and sampler)."""
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, **sampling):
        out.append(token)
        if len(out) == n or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
            break
    return out


def direct_sampled(llm: Any, prompt: str, n: int, **sampling: Any) -> list[int]:
    """Token ids llama-cpp-python itself samples (its generate loop, its sampler, the Llama's seed)."""
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, **sampling):
        out.append(token)
        if len(out) == n or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
            break
    return out


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def good_and_then(engine, tiny_gguf):
    """The tiny GGUF loaded and generating; after the test body, still loaded and still generating."""
    engine.load(tiny_gguf)
    before = engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids
    yield engine
    assert engine.status().model == tiny_gguf.name, "the previous model must stay loaded"
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids == before


# ------------------------------------------------------------------------------- option mapping (pure)

META = {
    "general.architecture": "llama",
    "llama.context_length": 4096,
    "llama.rope.freq_base": 10000.0,
    "llama.block_count": 2,
    "llama.attention.head_count": 4,
    "llama.embedding_length": 256,
}


def kwargs_for(meta: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    return llama_kwargs(source(Path("/m/x.gguf")), LoadOptions.from_dict(options), meta or META)


def test_defaults_map_to_text_generation_webui_meanings():
    assert kwargs_for() == {
        "model_path": "/m/x.gguf",
        "n_gpu_layers": -1,
        "n_ctx": 4096,
        "n_batch": 512,
        "n_threads": None,
        "n_threads_batch": None,
        "tensor_split": None,
        "flash_attn": False,
        "type_k": CACHE_TYPES["fp16"],
        "type_v": CACHE_TYPES["fp16"],
        "use_mmap": True,
        "use_mlock": False,
        "rope_freq_base": 0.0,
        "rope_freq_scale": 0.0,
        "verbose": False,
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"n_gpu_layers": 0}, {"n_gpu_layers": 0}),
        ({"n_gpu_layers": 20}, {"n_gpu_layers": 20}),
        ({"n_ctx": 1024}, {"n_ctx": 1024}),
        ({"n_batch": 128}, {"n_batch": 128}),
        ({"threads": 3}, {"n_threads": 3}),
        ({"threads_batch": 5}, {"n_threads_batch": 5}),
        ({"gpu_split": "60,40"}, {"tensor_split": [60.0, 40.0]}),
        ({"flash_attn": True}, {"flash_attn": True}),
        ({"cache_type": "q8_0"}, {"type_k": 8, "type_v": 1}),  # V stays fp16 without flash attention
        ({"cache_type": "q8_0", "flash_attn": True}, {"type_k": 8, "type_v": 8, "flash_attn": True}),
        ({"cache_type": "q4_0", "flash_attn": True}, {"type_k": 2, "type_v": 2, "flash_attn": True}),
        ({"no_mmap": True}, {"use_mmap": False}),
        ({"mlock": True}, {"use_mlock": True}),
        ({"alpha_value": 2.5}, {"rope_freq_base": pytest.approx(10000 * 2.5 ** (64 / 63))}),
        ({"rope_freq_base": 20000}, {"rope_freq_base": 20000.0}),
        ({"compress_pos_emb": 4}, {"rope_freq_scale": 0.25, "n_ctx": N_CTX_CAP}),  # 4096 * 4, capped
        ({"compress_pos_emb": 2}, {"rope_freq_scale": 0.5, "n_ctx": 8192}),
        ({"verbose": True}, {"verbose": True}),
    ],
)
def test_each_option_maps_to_its_llama_argument(options, expected):
    got = kwargs_for(**options)
    assert {k: got[k] for k in expected} == expected
    untouched = {k: v for k, v in kwargs_for().items() if k not in expected}
    assert {k: got[k] for k in untouched} == untouched


def test_every_llamacpp_option_changes_the_llama_arguments():
    """No option of the schema that applies to llama.cpp is silently dropped by the mapping."""
    not_load_arguments = {"loader", "revision", "file",  # they choose the file, checked elsewhere
                          "draft_model", "draft_max"}  # a second Llama, built in load() (tests/test_speculative.py)
    other_value = {"gpu_split": "1,1", "cache_type": "q4_0", "n_gpu_layers": 0, "n_ctx": 256}
    base = kwargs_for()
    for spec in LoadOptions.specs():
        if spec.name not in LlamaCppLoader.load_options or spec.name in not_load_arguments:
            continue
        if spec.name in other_value:
            value = other_value[spec.name]
        elif spec.type is bool:
            value = True
        else:
            value = spec.default * 2 if spec.default else 3
        assert kwargs_for(**{spec.name: value}) != base, spec.name


def test_n_ctx_zero_is_the_trained_context_capped():
    assert kwargs_for({**META, "llama.context_length": 131072})["n_ctx"] == N_CTX_CAP == 8192
    assert kwargs_for({**META, "llama.context_length": 2048})["n_ctx"] == 2048
    # strings, as llama_cpp.Llama.metadata holds them, work as well
    assert kwargs_for({**META, "llama.context_length": "2048"})["n_ctx"] == 2048
    no_length = {k: v for k, v in META.items() if k != "llama.context_length"}
    assert kwargs_for(no_length)["n_ctx"] == llamacpp.N_CTX_FALLBACK
    assert kwargs_for({**META, "llama.context_length": 131072}, n_ctx=32768)["n_ctx"] == 32768


def test_alpha_value_scales_the_models_own_rope_base():
    """10000 · alpha^(64/63) for the usual base; a model trained with another base keeps its scale."""
    assert kwargs_for(alpha_value=2)["rope_freq_base"] == pytest.approx(10000 * 2 ** (64 / 63))
    llama3 = {**META, "llama.rope.freq_base": 500000.0}
    assert kwargs_for(llama3, alpha_value=2)["rope_freq_base"] == pytest.approx(500000 * 2 ** (64 / 63))
    with pytest.raises(OptionError, match="--alpha-value and --rope-freq-base"):
        kwargs_for(alpha_value=2, rope_freq_base=20000)


def test_cache_type_ids_are_llama_cpps():
    assert CACHE_TYPES == {
        "fp16": llama_cpp.GGML_TYPE_F16,
        "q8_0": llama_cpp.GGML_TYPE_Q8_0,
        "q4_0": llama_cpp.GGML_TYPE_Q4_0,
        "fp32": llama_cpp.GGML_TYPE_F32,
    }


def test_fp32_cache_is_fp32_for_both_caches_without_flash_attention():
    from nbllm.loaders.llamacpp import cache_types

    assert cache_types(LoadOptions(cache_type="fp32")) == (llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F32)
    assert cache_types(LoadOptions(cache_type="q8_0"))[1] == llama_cpp.GGML_TYPE_F16


# --------------------------------------------------------------------------- option mapping (real load)


def test_a_real_load_gets_the_non_default_values(engine, tiny_gguf):
    engine.load(tiny_gguf, n_ctx=512, n_batch=64, threads=1, threads_batch=2, compress_pos_emb=2, no_mmap=True)
    llm = engine.loader.llm
    assert llama_cpp.llama_n_ctx(llm.ctx) == 512 == engine.loader.context_length
    assert llm.context_params.n_batch == 64 and llama_cpp.llama_n_batch(llm.ctx) == 64
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (1, 2)
    assert llm.context_params.rope_freq_scale == 0.5
    assert llm.model_params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE  # --no-mmap
    details = engine.status().details
    assert details["n_ctx"] == 512 and details["threads"] == "1/2" and "freq_scale 0.5" in details["rope"]


def test_n_ctx_default_is_the_trained_context_not_512(engine, tiny_gguf, tmp_path):
    engine.load(tiny_gguf)
    assert engine.loader.context_length == 2048 == llama_cpp.llama_n_ctx(engine.loader.llm.ctx)
    from nbllm.testing import tiny_gguf_model

    long = tiny_gguf_model(tmp_path / "long.gguf", max_position_embeddings=32768)
    engine.load(long)
    assert engine.loader.context_length == N_CTX_CAP
    assert any("--n-ctx 0 caps it at 8192" in n for n in engine.status().placement.notes)


def test_rope_options_reach_llama_cpp(engine, tiny_gguf):
    """--rope-freq-base B and the --alpha-value giving the same B generate the same text; both differ
    from the model's own base; --compress-pos-emb changes the text too."""
    prompt = PROMPT * 20  # positions far enough for the RoPE base to matter
    engine.load(tiny_gguf)
    plain = engine.generate(prompt, temperature=0, max_new_tokens=16).token_ids
    engine.load(tiny_gguf, rope_freq_base=20000)
    assert engine.loader.llm.context_params.rope_freq_base == 20000
    by_base = engine.generate(prompt, temperature=0, max_new_tokens=16).token_ids
    engine.load(tiny_gguf, alpha_value=2 ** (63 / 64))
    assert engine.loader.llm.context_params.rope_freq_base == pytest.approx(20000)
    by_alpha = engine.generate(prompt, temperature=0, max_new_tokens=16).token_ids
    engine.load(tiny_gguf, compress_pos_emb=2)
    linear = engine.generate(prompt, temperature=0, max_new_tokens=16).token_ids
    assert by_base == by_alpha != plain
    assert linear != plain


def test_quantized_kv_cache_and_flash_attention_load_and_generate(engine, tmp_path):
    from nbllm.testing import tiny_gguf_model

    wide_heads = tiny_gguf_model(tmp_path / "h64.gguf", num_heads=1)  # head size 64: q8_0 blocks of 32 fit
    engine.load(wide_heads, cache_type="q8_0", flash_attn=True)
    params = engine.loader.llm.context_params
    assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)
    assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=8).completion_tokens == 8
    engine.load(wide_heads, cache_type="q4_0")
    params = engine.loader.llm.context_params
    assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_Q4_0, llama_cpp.GGML_TYPE_F16)
    assert any("V cache stays fp16" in n for n in engine.status().placement.notes)
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=8).completion_tokens == 8


def test_quantized_cache_on_heads_too_small_is_one_line_before_release(good_and_then, tiny_gguf):
    with pytest.raises(OptionError) as err:
        good_and_then.load(tiny_gguf, cache_type="q8_0", flash_attn=True)  # head size 16
    assert "multiple of 32" in one_line(err.value) and "--cache-type fp16" in str(err.value)


def test_options_with_no_effect_on_this_machine_are_accepted_with_one_note_each(shell, engine, tiny_gguf, capsys):
    """One rule for every loader: an option that has no effect here loads, with one note: line."""
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has GPU support")
    shell.run_line_magic("llm_load", f"{tiny_gguf} --gpu-split 60,40 --n-gpu-layers 20 --threads 999")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3
    assert "--gpu-split has no effect here" in notes[0] and "without GPU support" in notes[0]
    assert "--n-gpu-layers 20 has no effect here" in notes[1]
    assert "--threads 999 is more than the" in notes[2]
    assert engine.loader.kwargs["n_gpu_layers"] == 20 and engine.status().placement.devices == {"cpu": 2}
    shell.run_line_magic("llm_load", str(tiny_gguf))  # the defaults (-1: all layers) say nothing
    assert "note:" not in capsys.readouterr().out


def test_mlock_loads(engine, tiny_gguf):
    engine.load(tiny_gguf, mlock=True)
    assert engine.loader.kwargs["use_mlock"] is True
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=4).completion_tokens == 4


# ------------------------------------------------------------------------------ output parity with llama_cpp


def test_greedy_magic_output_equals_llama_cpp_python(shell, engine, tiny_gguf):
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", "--temperature 0 -o r --max-new-tokens 20", PROMPT)
    r = shell.user_ns["r"]
    ref = direct_llama(tiny_gguf)
    try:
        assert r.token_ids == direct_greedy(ref, PROMPT, 20)
        completion = ref.create_completion(PROMPT, max_tokens=20, temperature=0)["choices"][0]["text"]
    finally:
        ref.close()
    # llama-cpp-python drops bytes that are not UTF-8 (errors="ignore"); nbllm shows them as U+FFFD
    assert r.text.replace("\ufffd", "") == completion
    assert r.finish_reason == "length" and r.completion_tokens == 20


def test_greedy_with_repetition_penalty_equals_llama_cpp_python(engine, tiny_gguf):
    engine.load(tiny_gguf)
    plain = engine.generate(PROMPT, temperature=0, max_new_tokens=40).token_ids
    penalized = engine.generate(PROMPT, temperature=0, repetition_penalty=3.0, max_new_tokens=40).token_ids
    ref = direct_llama(tiny_gguf)
    try:
        assert penalized == direct_greedy(ref, PROMPT, 40, repeat_penalty=3.0)
    finally:
        ref.close()
    assert penalized != plain


def test_sampling_options_mean_what_they_mean_in_transformers(engine, tiny_gguf):
    """top_k 1, min_p 1 and a tiny top_p each leave only the most likely token: greedy output."""
    engine.load(tiny_gguf)
    greedy = engine.generate(PROMPT, temperature=0, max_new_tokens=24).token_ids
    for narrow in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        sampled = engine.generate(PROMPT, temperature=1.5, seed=7, max_new_tokens=24, **narrow)
        assert sampled.token_ids == greedy, narrow
    wide = engine.generate(PROMPT, temperature=1.5, top_p=1.0, top_k=0, seed=7, max_new_tokens=24)
    assert wide.token_ids != greedy  # nothing left of llama-cpp-python's defaults (top_k 40, min_p 0.05)
    kw = LlamaCppLoader.sampling_kwargs(nbllm.GenerationOptions(
        temperature=0.5, top_p=0.8, top_k=7, min_p=0.05, typical_p=0.9, repetition_penalty=1.2))
    assert kw == {"temp": 0.5, "top_p": 0.8, "top_k": 7, "min_p": 0.05, "typical_p": 0.9, "repeat_penalty": 1.2}


def test_same_seed_same_text_also_after_unload_and_reload(engine, tiny_gguf):
    """The same seed gives the same text: raw prompts are evaluated whole every time (no prefix reuse,
    which would evaluate the rest of a prompt in another batch shape and can change a sampled text)."""
    opts = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24}
    engine.load(tiny_gguf)
    a = engine.generate(PROMPT, seed=1234, **opts)
    b = engine.generate(PROMPT, seed=1234, **opts)
    c = engine.generate(PROMPT, seed=4321, **opts)
    assert a.token_ids == b.token_ids != c.token_ids
    engine.unload()
    engine.load(tiny_gguf)
    assert engine.generate(PROMPT, seed=1234, **opts).token_ids == a.token_ids
    # the seed drawn when none is given is recorded and reproduces the text
    drawn = engine.generate(PROMPT, temperature=1.0, max_new_tokens=16)
    again = engine.generate(PROMPT, **{**drawn.record.generation_options, "stop": ()})
    assert again.token_ids == drawn.token_ids


def test_llama_cpps_random_seed_value_is_never_passed(engine, tiny_gguf):
    engine.load(tiny_gguf)
    top = 2**32 - 1  # llama.cpp reads 0xFFFFFFFF as "pick a random seed"
    a = engine.generate(PROMPT, temperature=1.0, seed=top, max_new_tokens=16)
    b = engine.generate(PROMPT, temperature=1.0, seed=top, max_new_tokens=16)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.02, "typical_p": 0.95, "repetition_penalty": 1.1},
        {"temperature": 1.5, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0},
    ],
    ids=["every-sampler", "wide"],
)
def test_sampled_output_equals_llama_cpp_python_with_the_same_seed(engine, tiny_gguf, options):
    """nbllm's sampled tokens are what llama-cpp-python itself samples with Llama(seed=...) and the same
    sampling parameters, named as llama-cpp-python names them."""
    engine.load(tiny_gguf)
    opts = nbllm.GenerationOptions(max_new_tokens=24, seed=2024, **options)
    ours = engine.generate(PROMPT, opts).token_ids
    sampling = {"temp": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k, "min_p": opts.min_p,
                "typical_p": opts.typical_p, "repeat_penalty": opts.repetition_penalty}
    ref = direct_llama(tiny_gguf, seed=2024)
    try:
        theirs = direct_sampled(ref, PROMPT, 24, **sampling)
        ref.set_seed(2025)
        other = direct_sampled(ref, PROMPT, 24, **sampling)
    finally:
        ref.close()
    assert ours == theirs
    assert other != theirs  # it is sampled: another seed, other tokens


def test_prefix_reuse_on_and_off_give_the_same_greedy_text(engine, tiny_gguf, monkeypatch):
    """With reuse (conversations) only what a prompt adds to the kept context is evaluated, and the
    record says how much was reused; raw prompts evaluate everything."""
    engine.load(tiny_gguf)
    loader = engine.loader
    first_eval: list[int] = []
    real_eval = loader.llm.eval

    def spy(tokens: Any) -> None:
        if not first_eval:
            first_eval.append(len(tokens))  # the prompt tokens this generation had to evaluate
        real_eval(tokens)

    def reusing(text: str) -> Any:
        result = engine.stream_prompt(Prompt(text, loader.tokenize(text, add_special=True)),
                                      {"temperature": 0, "max_new_tokens": 12}, reuse_prefix=True)
        _ = result.text
        return result

    monkeypatch.setattr(loader.llm, "eval", spy)
    first = reusing(PROMPT)
    longer = PROMPT + first.text + " and"
    n_longer = len(loader.tokenize(longer, add_special=True))
    first_eval.clear()
    reused = reusing(longer)
    assert first_eval[0] < n_longer - 3
    assert reused.record.reused_prefix_tokens == n_longer - first_eval[0]
    first_eval.clear()
    fresh = engine.generate(longer, temperature=0, max_new_tokens=12)
    assert first_eval[0] == n_longer and fresh.record.reused_prefix_tokens == 0
    assert reused.token_ids == fresh.token_ids


# ----------------------------------------------------------------------------------- streaming and stops


def test_streamed_text_equals_the_finished_text(engine, tiny_gguf):
    engine.load(tiny_gguf)
    for opts in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        streamed = list(engine.stream(PROMPT, max_new_tokens=40, **opts))
        assert "".join(streamed) == engine.generate(PROMPT, max_new_tokens=40, **opts).text
        assert len(streamed) > 5


def test_stop_strings_end_generation_and_are_not_shown(engine, tiny_gguf):
    engine.load(tiny_gguf)
    full = engine.generate(PROMPT, temperature=0, max_new_tokens=40).text
    stop = full[10:14]
    result = engine.generate(PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert result.finish_reason == "stop" and result.text == full[: full.index(stop)]


def test_generation_stops_at_the_end_of_the_context(engine, tiny_gguf):
    engine.load(tiny_gguf, n_ctx=256)
    prompt_ids = engine.loader.tokenize(PROMPT * 12, add_special=True)
    with pytest.warns(nbllm.errors.NbllmWarning, match=f"at most {256 - len(prompt_ids)} of the 500 new tokens"):
        result = engine.generate(PROMPT * 12, temperature=0, max_new_tokens=500)
    assert result.finish_reason == "context"
    assert result.completion_tokens == 256 - len(prompt_ids)
    with pytest.raises(nbllm.NbllmError, match="larger --n-ctx"):
        engine.generate(PROMPT * 200, temperature=0)


def test_eos_tokens_include_the_models_end_of_generation_tokens(engine, tiny_gguf):
    engine.load(tiny_gguf)
    assert 2 in engine.loader.eos_token_ids  # </s>
    assert engine.loader.decode([1, 2]) == ""  # control tokens are never shown
    assert engine.loader.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


def test_cancel_from_another_thread_stops_within_a_step_and_keeps_the_partial_text(engine, tiny_gguf):
    engine.load(tiny_gguf)
    full = engine.generate(PROMPT, temperature=0, max_new_tokens=300)
    assert full.completion_tokens > 20
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=300)
    with stopped_at_step(engine, 6, lambda: threading.Thread(target=result.cancel).start()) as (steps, at):
        text = result.text
    assert at["told"] and result.finish_reason == "cancelled" and result.interrupted
    # within a step: the step under way ends, no other starts (llama.cpp's eval is its step)
    assert len(steps) == 6 and steps_once_the_generation_thread_is_free(steps) == 6
    n = result.completion_tokens
    assert n in (5, 6) and at["tokens"] == 5
    assert text == "".join(result.chunks) == engine.generate(PROMPT, temperature=0, max_new_tokens=n).text
    assert full.text.startswith(text)
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=300).text == full.text  # still loaded and well


def test_keyboard_interrupt_in_the_magic_stops_within_a_step_and_keeps_the_partial_text(shell, engine, tiny_gguf,
                                                                                        capsys):
    shell.run_line_magic("llm_load", str(tiny_gguf))
    full = engine.generate(PROMPT, temperature=0, max_new_tokens=2000).text
    loader = engine.loader
    capsys.readouterr()
    # what Jupyter's "interrupt the kernel" does, at the 10th step
    with stopped_at_step(engine, 10, _thread.interrupt_main) as (steps, at), \
            pytest.raises(UsageError, match=r"^Generation interrupted after 9 tokens; the partial text is kept"):
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 2000 -o r", PROMPT)
    r = shell.user_ns["r"]
    # llama.cpp steps on the cell's own thread: the interrupt is raised there, before the 10th eval runs
    assert r is at["result"] and r.finish_reason == "interrupted" and "told" not in at
    assert len(steps) == 10 and r.completion_tokens == at["tokens"] == 9 and full.startswith(r.text)
    assert capsys.readouterr().out.startswith(r.text)
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=2000).text == full  # still loaded and well
    assert engine.loader is loader


# ---------------------------------------------------------------------------------------- chat template


def test_chat_uses_the_gguf_chat_template(shell, engine, tiny_gguf):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", "--chat --system 'Be brief.' --temperature 0 --max-new-tokens 12 -o r", "Hello!")
    r = shell.user_ns["r"]
    llm = engine.loader.llm
    template = llm.metadata["tokenizer.chat_template"]
    assert engine.loader.chat_template == template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    expected = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    assert r.prompt == expected == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n"
    assert r.record.mode == "chat" and r.record.messages == messages
    # the rendered prompt's <s> and </s> are the special tokens, with no second BOS
    ids = engine.loader.tokenize(expected, add_special=False)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 2
    ref = direct_llama(tiny_gguf)
    try:
        out = []
        for t in ref.generate(ref.tokenize(expected.encode(), add_bos=False, special=True), temp=0.0):
            out.append(t)
            if len(out) == 12 or t == 2:
                break
    finally:
        ref.close()
    assert r.token_ids == out


# ------------------------------------------------------------------------------- loader choice and refusals


def test_loader_auto_picks_by_format(engine, tiny_gguf, tiny_model, tmp_path):
    assert engine.load(tiny_gguf).loader == "llama.cpp"
    assert engine.load(tiny_model).loader == "transformers"
    shutil.copy(tiny_gguf, tmp_path / "model.Q8_0.gguf")
    assert engine.load(tmp_path).loader == "llama.cpp"  # a folder holding one GGUF


def test_forcing_the_wrong_loader_is_one_line(shell, engine, tiny_gguf, tiny_model):
    # (a GGUF file with --loader transformers is not wrong: transformers dequantizes it, see test_real_model.py)
    with pytest.raises(UsageError) as err:
        shell.run_line_magic("llm_load", f"{tiny_model} --loader llama.cpp")
    assert "is a Transformers model folder (the one holding config.json), which the llama.cpp loader does not load" in one_line(err.value)
    shell.run_line_magic("llm_load", f"{tiny_gguf} --loader llama.cpp")
    assert engine.status().loader == "llama.cpp"


def test_an_option_meaningless_to_llama_cpp_is_refused_in_one_line(shell, engine, tiny_gguf):
    with pytest.raises(UsageError) as err:
        shell.run_line_magic("llm_load", f"{tiny_gguf} --load-in-4bit")
    assert "--load-in-4bit" in one_line(err.value) and "llama.cpp" in str(err.value)
    assert not engine.loaded


# ------------------------------------------------------------------------------- damaged and missing files


def _truncated(tiny_gguf: Path, tmp: Path) -> Path:
    out = tmp / "truncated.gguf"
    out.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    return out


def _header_cut(tiny_gguf: Path, tmp: Path) -> Path:
    out = tmp / "cut-in-header.gguf"
    out.write_bytes(tiny_gguf.read_bytes()[:300])
    return out


def _text(tiny_gguf: Path, tmp: Path) -> Path:
    out = tmp / "notes.gguf"
    out.write_text("these are my notes, not a model\n")
    return out


def _html_page(tiny_gguf: Path, tmp: Path) -> Path:
    out = tmp / "model.Q4_K_M.gguf"  # what a download that got the Hub's error page instead of the file leaves
    out.write_text(
        "<!DOCTYPE html>\n<html class=\"\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\" />\n"
        "<title>502 Bad Gateway – Hugging Face</title>\n</head>\n<body><h1>502</h1><p>Bad gateway – "
        "réessayez plus tard.</p>" + "<div></div>\n" * 400 + "</body>\n</html>\n",
        encoding="utf-8",
    )
    return out


def _lfs_pointer(tiny_gguf: Path, tmp: Path) -> Path:
    out = tmp / "pointer.gguf"
    out.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    return out


def _missing(tiny_gguf: Path, tmp: Path) -> Path:
    return tmp / "nowhere" / "missing.gguf"


def _two_ggufs(tiny_gguf: Path, tmp: Path) -> Path:
    folder = tmp / "two"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "model.Q4_K_M.gguf")
    shutil.copy(tiny_gguf, folder / "model.Q8_0.gguf")
    return folder


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_truncated, ["truncated or damaged", "Download it again"]),
        (_header_cut, ["truncated or damaged", "Download it again"]),
        (_text, ["not a GGUF file", "text file"]),
        (_html_page, ["model.Q4_K_M.gguf is not a GGUF file", "HTML page", "error page"]),
        (_lfs_pointer, ["not a GGUF file", "Git LFS pointer"]),
        (_missing, ["no model at", "missing.gguf"]),
        (_two_ggufs, ["holds 2 models", "each a GGUF file", "--file"]),
    ],
    ids=["truncated", "header-cut", "text-file", "html-page", "lfs-pointer", "missing", "two-ggufs"],
)
def test_bad_files_are_one_line_and_the_loaded_model_stays(shell, good_and_then, tiny_gguf, tmp_path, make, words):
    bad = make(tiny_gguf, tmp_path)
    with pytest.raises(UsageError) as err:
        shell.run_line_magic("llm_load", str(bad))
    message = one_line(err.value)
    for w in words:
        assert w in message, message


def test_file_picks_one_of_several_ggufs(engine, tiny_gguf, tmp_path):
    folder = _two_ggufs(tiny_gguf, tmp_path)
    status = engine.load(folder, file="model.Q8_0.gguf")
    assert status.loader == "llama.cpp" and status.model == "model.Q8_0.gguf"


def test_header_reader_reads_what_the_loader_needs(tiny_gguf):
    header = read_gguf_header(tiny_gguf)
    assert header.version == 3 and header.architecture == "llama"
    assert header.metadata["llama.context_length"] == 2048
    assert header.metadata["tokenizer.chat_template"].startswith("{{- bos_token }}")
    assert header.data_end == tiny_gguf.stat().st_size and not header.unknown_types


def test_empty_and_old_version_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="not a GGUF file"):
        read_gguf_header(empty)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(64))
    with pytest.raises(LoadError, match="GGUF version 1"):
        read_gguf_header(v1)


def test_unknown_architecture_says_what_llama_cpp_said(good_and_then, tmp_path, capfd):
    import gguf
    import numpy as np

    path = tmp_path / "strange.gguf"
    w = gguf.GGUFWriter(path, "nosucharch")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    capfd.readouterr()
    with pytest.raises(LoadError) as err:
        good_and_then.load(path)
    message = one_line(err.value)
    assert "nosucharch" in message and "is loaded again" in message
    assert capfd.readouterr().err == ""  # llama.cpp's own error lines stayed out of the output


def test_a_kv_cache_larger_than_the_machine_is_refused_before_release(good_and_then, tiny_gguf):
    with pytest.raises(LoadError) as err:
        good_and_then.load(tiny_gguf, n_ctx=10**9)
    message = one_line(err.value)
    assert "not enough memory for --n-ctx 1000000000" in message and "Lower --n-ctx" in message


def test_a_load_failure_says_what_llama_cpp_logged(good_and_then, tiny_gguf, tmp_path, capfd):
    """A file that is a valid GGUF but lacks a tensor llama.cpp needs: llama.cpp logs why and fails; nbllm's
    one line carries llama.cpp's own words (captured from its log, not made up), which --verbose shows as
    llama.cpp printed them."""
    data = bytearray(tiny_gguf.read_bytes())
    name = b"blk.1.ffn_down.weight"
    at = data.find(name)
    assert at > 0 and data.count(name) == 1
    data[at : at + len(name)] = b"blk.1.ffn_dowX.weight"  # same length: the file stays a readable GGUF
    broken = tmp_path / "renamed-tensor.gguf"
    broken.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(LoadError) as err:
        good_and_then.load(broken)
    message = one_line(err.value)
    said = "tensor 'blk.1.ffn_down.weight' not found"
    assert f'llama.cpp could not load renamed-tensor.gguf: llama.cpp says "{said}"' in message
    assert "is loaded again" in message and capfd.readouterr().err == ""  # quiet: only the one line
    with pytest.raises(LoadError):
        good_and_then.load(broken, verbose=True)
    assert said in capfd.readouterr().err  # the same words, printed by llama.cpp itself


OUT_OF_MEMORY = """
import resource, sys
import nbllm
from nbllm.errors import LoadError
from nbllm.loaders import llamacpp

path, n_ctx = sys.argv[1], 2_000_000  # a KV cache of ~1 GB: less than the machine's RAM, more than allowed below
def fail():
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY))  # a small machine
    try:
        nbllm.load(path, n_ctx=n_ctx)
    except LoadError as exc:
        print(exc.message)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
fail()
print([line for line in llamacpp.LOG.errors() if "alloc" in line])
nbllm.load(path, n_ctx=512)
fail()
print(nbllm.status().options)
"""


def test_llama_cpp_running_out_of_memory_names_the_fix(tiny_gguf):
    """llama.cpp really fails to allocate (a process allowed less memory than the KV cache needs): its
    log says so, and nbllm says it in one line with the fix; a model loaded before is loaded again."""
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(tiny_gguf)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(nbllm.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    first, logged, second, options = done.stdout.splitlines()
    assert first.startswith(f"not enough memory to load {tiny_gguf.name} with --n-ctx 2000000. Lower --n-ctx")
    assert "failed to allocate" in logged  # llama.cpp's own log lines, captured
    assert second.startswith(f"not enough memory to load {tiny_gguf.name} with --n-ctx 2000000 ({tiny_gguf.name} "
                             "is loaded again)")
    assert options == "{'n_ctx': 512}"


def test_missing_llama_cpp_python_says_how_to_install(engine, tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        engine.load(tiny_gguf)
    assert "pip install 'nbllm[llamacpp]'" in one_line(err.value)


# --------------------------------------------------------------------------------- logs, records, status


def test_llama_cpp_log_is_quiet_unless_verbose(engine, tiny_gguf, capfd):
    capfd.readouterr()
    engine.load(tiny_gguf, n_ctx=4096)  # more than trained: llama.cpp warns about it
    engine.generate("<s>" + PROMPT, temperature=0, max_new_tokens=8)  # a double BOS: llama.cpp warns
    out, err = capfd.readouterr()
    assert err == "" and "llama" not in out
    engine.load(tiny_gguf, verbose=True)
    engine.generate(PROMPT, temperature=0, max_new_tokens=4)
    out, err = capfd.readouterr()
    assert "llama_model_loader" in err or "llama_context" in err
    engine.unload()
    assert llamacpp.LOG.mode == "forward"  # llama-cpp-python's own logging again


def test_record_names_the_gguf_file_and_its_sha256(engine, tiny_gguf):
    engine.load(tiny_gguf, n_ctx=1024)
    record = engine.generate(PROMPT, temperature=0, max_new_tokens=4).record
    assert record.loader == "llama.cpp"
    assert record.model["name"] == tiny_gguf.name and record.model["format"] == "gguf"
    assert record.model["sha256"] == {tiny_gguf.name: hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}
    assert record.load_options["n_ctx"] == 1024
    assert "llama_cpp_python" in record.versions


def test_status_describes_the_file_and_placement(engine, tiny_gguf):
    status = engine.load(tiny_gguf)
    assert status.details["file"] == tiny_gguf.name
    assert status.details["quantization"] == "F32"
    assert status.details["n_ctx"] == 2048 and status.details["n_gpu_layers"] == -1
    if not llama_cpp.llama_supports_gpu_offload():
        assert status.placement.devices == {"cpu": 2}
    assert sum(status.placement.memory_bytes.values()) > tiny_gguf.stat().st_size * 0.9
    assert any("memory-mapped" in n for n in status.placement.notes)
    assert "llama.cpp" in str(status)


def test_unload_closes_the_llama_object(engine, tiny_gguf, monkeypatch):
    engine.load(tiny_gguf)
    llm = engine.loader.llm
    closed = []
    real_close = llm.close
    monkeypatch.setattr(llm, "close", lambda: (closed.append(1), real_close())[1])
    engine.unload()
    assert closed == [1] and not engine.loaded


def test_unload_gives_the_memory_back(engine):
    """Measured in the process's resident memory: a ~100 MB model read into memory (``--no-mmap``) is
    freed by unload. (Memory-mapped weights are file pages that the kernel keeps or drops on its own, so
    the RSS of a mapped model says little either way; read into memory they are the process's own.)"""
    import os
    import subprocess

    from nbllm.testing import tiny_gguf_model

    big = tiny_gguf_model(hidden_size=512, num_layers=8)
    weights = big.stat().st_size
    assert weights > 90 * 2**20
    # A fresh process: in this one, memory freed by earlier tests is reused without the RSS growing.
    code = (
        "import llama_cpp, nbllm\n"
        "from nbllm.memory import process_rss\n"
        "before = process_rss()\n"
        f"nbllm.load({str(big)!r}, no_mmap=True, n_ctx=256)\n"
        "nbllm.generate('Hello', temperature=0, max_new_tokens=2)\n"
        "loaded = process_rss()\n"
        "assert nbllm.unload() is True\n"
        "print(before, loaded, process_rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    before, loaded, after = (int(v) for v in out.stdout.split()[-3:])
    assert loaded - before > 0.8 * weights, f"only {(loaded - before) / 2**20:.0f} MiB came in"
    freed = loaded - after
    assert freed > 0.8 * weights, f"only {freed / 2**20:.0f} of {(loaded - before) / 2**20:.0f} MiB given back"


def test_a_gguf_whose_chat_template_does_not_compile_loads_with_a_note(shell, engine, tiny_gguf, tmp_path, capsys):
    """llama-cpp-python compiles the GGUF's template while loading; a syntax error there used to refuse
    the whole model ("Download the file again"). Raw prompts need no template: load, and say so."""
    data = bytearray(tiny_gguf.read_bytes())
    at = data.find(b"{%- for message in messages %}")
    assert at > 0
    data[at : at + 2] = b"{{"  # same length: the file stays a valid GGUF, the template no longer compiles
    broken = tmp_path / "broken-template.gguf"
    broken.write_bytes(bytes(data))
    shell.run_line_magic("llm_load", str(broken))
    out = capsys.readouterr().out
    assert "note: the chat template in broken-template.gguf does not compile (line 1:" in out
    assert "raw prompts work" in out and engine.loaded
    raw = engine.generate(PROMPT, temperature=0, max_new_tokens=5)
    assert raw.completion_tokens == 5
    assert engine.generate("Hi", chat=True, temperature=0, max_new_tokens=3).record.mode == "chat"  # generic template
