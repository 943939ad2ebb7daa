"""CUDA-only paths: bitsandbytes on the GPU, flash-attention, gpu-split across devices, CUDA memory.

Marked ``gpu``: skipped where CUDA is not available (conftest.py).
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.gpu

PROMPT = "The quick brown fox"


def _torch():
    import torch

    return torch


def test_loads_on_the_gpu_by_default_and_matches_model_generate(engine, tiny_model):
    status = engine.load(tiny_model)
    assert status.placement.devices == {"cuda:0": 2}
    model, tok = engine.loader.model, engine.loader.tokenizer
    ids = tok(PROMPT, return_tensors="pt").to("cuda")
    direct = model.generate(**ids, do_sample=False, max_new_tokens=16)[0, ids["input_ids"].shape[1]:].tolist()
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=16).token_ids == direct


def test_4bit_on_cuda_computes_in_float16_by_default(engine, tiny_model_64):
    import bitsandbytes as bnb

    engine.load(tiny_model_64, load_in_4bit=True)
    layer = engine.loader.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    assert layer.compute_dtype == _torch().float16
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8


def test_8bit_on_cuda(engine, tiny_model_64):
    import bitsandbytes as bnb

    engine.load(tiny_model_64, load_in_8bit=True)
    assert isinstance(engine.loader.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8


def test_flash_attention_runs_or_names_what_is_missing(engine, tiny_model):
    torch = _torch()
    major, _ = torch.cuda.get_device_capability(0)
    has_package = importlib.util.find_spec("flash_attn") is not None
    if major >= 8 and has_package:
        engine.load(tiny_model, flash_attn=True, dtype="bfloat16")
        assert engine.status().details["attn_implementation"] == "flash_attention_2"
        assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8
        status = engine.load(tiny_model, dtype="bfloat16")
        assert status.details["attn_implementation"] == "flash_attention_2"  # auto picks it
    else:
        from nbllm.errors import OptionError

        expected = "needs the flash-attn package" if major >= 8 else "needs an Ampere or newer GPU"
        with pytest.raises(OptionError, match=expected):
            engine.load(tiny_model, flash_attn=True)


def test_gpu_split_with_more_values_than_gpus_is_refused(engine, tiny_model):
    from nbllm.errors import OptionError

    n = _torch().cuda.device_count()
    with pytest.raises(OptionError, match=f"--gpu-split names {n + 1} GPUs"):
        engine.load(tiny_model, gpu_split=",".join(["1"] * (n + 1)))


def test_gpu_split_limits_memory_per_gpu_and_offloads_the_rest_to_cpu(engine, tiny_model_64):
    # a limit below the model's size on GPU 0: the remaining layers go to the next GPU or the CPU
    status = engine.load(tiny_model_64, gpu_split="0.0005", cpu_memory=4)
    assert "cuda:0" in status.placement.devices and "cpu" in status.placement.devices
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_cpu_memory_alone_keeps_the_model_on_the_gpu(engine, tiny_model_64):
    # accelerate uses only the devices max_memory names: the GPU is given what it has free
    status = engine.load(tiny_model_64, cpu_memory=4)
    assert set(status.placement.devices) == {"cuda:0"}
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_gpu_split_alone_offloads_the_rest_to_ram_not_disk(engine, tiny_model_64):
    status = engine.load(tiny_model_64, gpu_split="0.0005")  # no --cpu-memory: no limit on RAM
    assert "cuda:0" in status.placement.devices and "cpu" in status.placement.devices
    assert "disk" not in status.placement.devices
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_gpu_split_across_two_gpus(engine, tiny_model_64):
    if _torch().cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    status = engine.load(tiny_model_64, gpu_split="0.0005,10")
    assert {"cuda:0", "cuda:1"} <= set(status.placement.devices)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_unload_returns_cuda_memory(engine, tiny_model_64):
    torch = _torch()
    before = torch.cuda.memory_allocated()
    engine.load(tiny_model_64)
    engine.generate(PROMPT, max_new_tokens=4)
    assert torch.cuda.memory_allocated() > before
    engine.unload()
    assert torch.cuda.memory_allocated() == before
