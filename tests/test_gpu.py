"""CUDA-only paths: bitsandbytes on the GPU, flash-attention, --compile with CUDA graphs, offloading across
GPU/CPU/disk, llama.cpp on a GPU, CUDA memory. The decisions behind them are tested on the CPU in
tests/test_gpu_decisions.py; these run the real thing.

Marked ``gpu``: skipped where CUDA is not available (conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytestmark = pytest.mark.gpu

PROMPT = "The quick brown fox"
GiB = 2**30


def _torch():
    import torch

    return torch


def _flash_attention_runs() -> bool:
    return _torch().cuda.get_device_capability(0)[0] >= 8 and importlib.util.find_spec("flash_attn") is not None


def _split_placing_part_on_gpu(folder: Path, dtype: str = "float32", quantized: str | None = None) -> str:
    """A --gpu-split share (GiB) for GPU 0 that holds some of the model's modules and not all (accelerate
    also keeps room there for the largest offloaded layer): the middle of the shares that do, found with
    the map the loader builds (``dtype``: what the model loads in; ``quantized``: "4bit" or "8bit")."""
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig

    from nbllm.loaders import _gpu

    model = _gpu.empty_model(AutoConfig.from_pretrained(folder), dtype, remote=False)
    total = compute_module_sizes(model)[""]
    shares = []
    for twentieths in range(1, 41):
        share = total * twentieths // 20
        devices = set(_gpu.offload_map(model, {0: share, "cpu": 50 * GiB}, dtype, quantized).values())
        if 0 in devices and "cpu" in devices:
            shares.append(share)
    assert shares, "no share splits this model between the GPU and the CPU"
    return f"{shares[len(shares) // 2] / GiB:.9f}"


def _clear_cublas_workspaces() -> None:
    """cuBLAS allocates a workspace at the first matmul on a stream and keeps it (torch's own leak checker
    clears them before counting, as here)."""
    _torch()._C._cuda_clearCublasWorkspaces()


def test_loads_on_the_gpu_by_default_and_matches_model_generate(engine, tiny_model):
    status = engine.load(tiny_model)
    assert status.placement.devices == {"cuda:0": 2}
    model, tok = engine.loader.model, engine.loader.tokenizer
    ids = tok(PROMPT, return_tensors="pt").to("cuda")
    direct = model.generate(**ids, do_sample=False, max_new_tokens=16)[0, ids["input_ids"].shape[1]:].tolist()
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=16).token_ids == direct


# -- item 8: the compute dtype, checked after a generate (bitsandbytes sets it at the first forward) --
def test_4bit_on_cuda_computes_in_float16_by_default(engine, tiny_model_64):
    import bitsandbytes as bnb

    engine.load(tiny_model_64, load_in_4bit=True)  # a float32 checkpoint: the rest loads in float16 on a GPU
    layer = engine.loader.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8
    assert layer.compute_dtype == _torch().float16  # after the forward passes, where bitsandbytes may change it
    assert engine.loader.model.model.embed_tokens.weight.dtype == _torch().float16


def test_8bit_on_cuda(engine, tiny_model_64):
    import bitsandbytes as bnb

    engine.load(tiny_model_64, load_in_8bit=True)
    assert isinstance(engine.loader.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8


# -- items 1 and 2: flash-attention where it runs, and not with --compile or float32 -----------------
def test_flash_attention_runs_or_names_what_is_missing(engine, tiny_model):
    from nbllm.errors import OptionError

    if _flash_attention_runs():
        engine.load(tiny_model, flash_attn=True, dtype="bfloat16")
        assert engine.status().details["attn_implementation"] == "flash_attention_2"
        assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8
        status = engine.load(tiny_model, dtype="bfloat16")
        assert status.details["attn_implementation"] == "flash_attention_2"  # auto picks it
    else:
        major, _ = _torch().cuda.get_device_capability(0)
        expected = "needs the flash-attn package" if major >= 8 else "needs an Ampere or newer GPU"
        with pytest.raises(OptionError, match=expected):
            engine.load(tiny_model, flash_attn=True)


def test_auto_attention_gives_a_float32_model_sdpa_and_an_explicit_flash_is_refused(engine, tiny_model):
    from nbllm.errors import OptionError

    status = engine.load(tiny_model)  # a float32 checkpoint
    assert status.details["attn_implementation"] == "sdpa"
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4
    if _flash_attention_runs():
        with pytest.raises(OptionError, match="runs only in float16 or bfloat16"):
            engine.load(tiny_model, flash_attn=True)
        assert engine.status().model == tiny_model.name  # refused before the model was released


def test_compile_on_cuda_uses_sdpa_under_auto_and_refuses_flash_attention(engine, tiny_model):
    from nbllm.errors import OptionError

    engine.load(tiny_model, dtype="bfloat16")
    eager = engine.generate(PROMPT, temperature=0, max_new_tokens=12).token_ids
    status = engine.load(tiny_model, dtype="bfloat16", compile=True)
    assert status.details["attn_implementation"] == "sdpa"
    assert "CUDA graphs" in status.details["compiled"]
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=12).token_ids == eager
    if _flash_attention_runs():
        with pytest.raises(OptionError, match="without an attention mask"):
            engine.load(tiny_model, dtype="bfloat16", compile=True, flash_attn=True)


# -- item 7 ------------------------------------------------------------------------------------------
def test_device_cpu_with_flash_attention_is_refused_before_the_model_is_released(engine, tiny_model):
    from nbllm.errors import OptionError

    engine.load(tiny_model)
    with pytest.raises(OptionError, match="needs an NVIDIA GPU and none is available"):
        engine.load(tiny_model, device="cpu", flash_attn=True, dtype="bfloat16")
    assert engine.status().model == tiny_model.name


# -- items 3, 4, 5, 10: offloading ----------------------------------------------------------------------
def test_gpu_split_with_more_values_than_gpus_is_refused(engine, tiny_model):
    from nbllm.errors import OptionError

    n = _torch().cuda.device_count()
    with pytest.raises(OptionError, match=f"--gpu-split names {n + 1} GPUs"):
        engine.load(tiny_model, gpu_split=",".join(["1"] * (n + 1)))


def test_gpu_split_limits_memory_per_gpu_and_offloads_the_rest_to_cpu(engine, tiny_model_64):
    status = engine.load(tiny_model_64, gpu_split=_split_placing_part_on_gpu(tiny_model_64), cpu_memory=4)
    assert "cuda:0" in status.placement.devices and "cpu" in status.placement.devices
    assert "cpu" in status.placement.memory_bytes and "disk" not in status.placement.memory_bytes  # offloaded to RAM, said so
    assert not any("no layer fits" in n for n in status.placement.notes)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_a_gpu_split_below_the_largest_layer_runs_on_the_cpu_and_says_so(engine, tiny_model_64):
    status = engine.load(tiny_model_64, gpu_split="0.0005")
    assert "cuda:0" not in status.placement.devices
    assert any(n.startswith("cuda:0 was given 0.0005 GiB but no layer fits") for n in status.placement.notes)


def test_4bit_offloaded_layers_stay_unquantized_and_gpu_layers_are_4bit(engine, tiny_model_64):
    import bitsandbytes as bnb

    torch = _torch()
    split = _split_placing_part_on_gpu(tiny_model_64, "float16", "4bit")  # 4-bit on a GPU loads the rest in float16
    status = engine.load(tiny_model_64, load_in_4bit=True, gpu_split=split)
    device_map = engine.loader.model.hf_device_map
    assert isinstance(device_map, dict) and "cpu" in device_map.values()
    for name, module in engine.loader.model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            on_cpu = any(name == k or name.startswith(k + ".") for k, d in device_map.items() if d == "cpu")
            assert isinstance(module, bnb.nn.Linear4bit) is not on_cpu, name
    assert "cpu" in status.placement.memory_bytes
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_cpu_memory_alone_keeps_the_model_on_the_gpu_with_a_reserve(engine, tiny_model_64):
    torch = _torch()
    free = torch.cuda.mem_get_info(0)[0]
    status = engine.load(tiny_model_64, cpu_memory=4)
    assert set(status.placement.devices) == {"cuda:0"}
    assert engine.loader._device_kwargs["max_memory"][0] <= 0.9 * free  # transformers' 10%, kept by nbllm
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_gpu_split_alone_offloads_the_rest_to_ram_not_disk(engine, tiny_model_64):
    status = engine.load(tiny_model_64, gpu_split=_split_placing_part_on_gpu(tiny_model_64))  # no --cpu-memory
    assert "cuda:0" in status.placement.devices and "cpu" in status.placement.devices
    assert "disk" not in status.placement.devices and "disk" not in status.placement.memory_bytes
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_gpu_split_across_two_gpus(engine, tiny_model_64):
    if _torch().cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    status = engine.load(tiny_model_64, gpu_split=f"{_split_placing_part_on_gpu(tiny_model_64)},10")
    assert {"cuda:0", "cuda:1"} <= set(status.placement.devices)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_the_machine_probe_finds_bitsandbytes_cuda_library():
    from nbllm.fit import Machine

    machine = Machine.probe()
    if machine.has("bitsandbytes"):
        assert machine.bitsandbytes_cuda is True
        assert not any("bitsandbytes has no CUDA library" in line for line in machine.findings())


# -- item 6: a failed load gives its memory back before the previous model returns -----------------
def test_an_out_of_memory_load_frees_what_it_allocated_before_the_previous_model_returns(engine, tiny_model):
    import nbllm.loaders
    from nbllm.errors import LoadError
    from nbllm.loaders import TokenLoader
    from nbllm.options import LoadOptions
    from nbllm.source import ModelSource

    torch = _torch()

    class AllocatesThenOutOfMemory(TokenLoader):
        name: ClassVar[str] = "cuda-oom"
        formats: ClassVar[frozenset[str]] = frozenset({"cuda-oom"})

        @classmethod
        def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
            return ModelSource(format="cuda-oom", name="big", path=Path(spec)) if spec.endswith("-cudaoom") else None

        def load(self, source: ModelSource, options: LoadOptions) -> None:
            partial = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # noqa: F841 (held by the frame)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def unload(self) -> None: ...
        def tokenize(self, text: str, *, add_special: bool) -> list[int]: return []
        def decode(self, ids: Any) -> str: return ""
        @property
        def eos_token_ids(self) -> frozenset[int]: return frozenset()
        def generate_tokens(self, request: Any) -> Any: return iter(())

    engine.load(tiny_model)
    with_model = torch.cuda.memory_allocated()
    nbllm.loaders.register(AllocatesThenOutOfMemory)
    try:
        with pytest.raises(LoadError, match="loaded again") as info:
            engine.load("/models/x-cudaoom")
        assert info.value is not None  # the error is alive, as IPython's sys.last_value keeps it
        assert torch.cuda.memory_allocated() == with_model  # the 256 MiB went with the frames
    finally:
        nbllm.loaders.unregister("cuda-oom")


# -- item 9: llama.cpp on a GPU ---------------------------------------------------------------------
def test_llama_cpp_on_a_gpu_leaves_flash_attention_to_llama_cpp_unless_told(engine, tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python was built without GPU support")
    engine.load(tiny_gguf)
    assert engine.loader.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=4).completion_tokens == 4
    engine.load(tiny_gguf, flash_attn=False)
    assert engine.loader.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


# -- item 11: memory back on unload ---------------------------------------------------------------------
def test_unload_returns_cuda_memory(engine, tiny_model_64):
    torch = _torch()
    _clear_cublas_workspaces()
    before = torch.cuda.memory_allocated()
    engine.load(tiny_model_64)
    engine.generate(PROMPT, max_new_tokens=4)
    assert torch.cuda.memory_allocated() > before
    engine.unload()
    _clear_cublas_workspaces()  # not the model's: the first matmul of a stream allocates one, kept by cuBLAS
    assert torch.cuda.memory_allocated() == before


def test_unload_returns_the_cuda_graph_pool_of_compile(engine, tiny_model):
    torch = _torch()
    _clear_cublas_workspaces()
    torch.cuda.empty_cache()
    before, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    engine.load(tiny_model, compile=True)
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids) == 8  # records the graphs
    assert torch.cuda.memory_reserved() > reserved
    engine.unload()
    _clear_cublas_workspaces()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.memory_reserved() <= reserved  # the graphs' private pool went too
