"""Machine fit: probe, shapes, estimates against measured memory, recommendations for simulated machines,
failure mapping with real exceptions, saved settings in text-generation-webui's layout, %llm_doctor."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import need

from nbllm import models
from nbllm.errors import GenerationError, LoadError, ModelNotFoundError, NbllmError, OptionError
from nbllm.fit import (
    GPU,
    GiB,
    Machine,
    doctor,
    estimate,
    explain_failure,
    failure_error,
    failure_kind,
    gguf_like,
    measure_peak_memory,
    model_memory,
    model_shape,
    recommend,
    record_success,
    save_settings,
    saved_settings,
    settings_name,
    what_worked,
)
from nbllm.fit.estimate import GPU_USABLE, RAM_USABLE
from nbllm.frontend import using
from nbllm.options import GenerationOptions, LoadOptions
from nbllm.resolve import resolve

try:
    from hubserver import hub  # noqa: F401 - a fixture: a Hub-compatible server on 127.0.0.1
except ImportError:  # tests/ imported as a package
    from tests.hubserver import hub  # noqa: F401

# ------------------------------------------------------------------------------- shapes and machines

LLAMA_7B = {  # Llama-2-7b-hf's config.json (the sizes that matter)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "torch_dtype": "float16", "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}  # fmt: skip
LLAMA_13B = {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
             "num_attention_heads": 40, "num_key_value_heads": 40}
LLAMA_70B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8}
LLAMA3_8B = {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
REMOTE_CODE = {**LLAMA_7B, "model_type": "nbllm_custom_arch",
               "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}

RTX_4060 = Machine(gpus=[GPU("NVIDIA GeForce RTX 4060", 8 * GiB, (8, 9))], ram_bytes=62 * GiB,
                   disk_free_bytes=400 * GiB)
"""The guide's machine: an RTX 4060 with 8 GB and 62 GB of RAM (every library installed)."""
RTX_4060_NO_FLASH = Machine(
    gpus=RTX_4060.gpus, ram_bytes=62 * GiB, disk_free_bytes=400 * GiB, torch_cuda="12.4", llama_cpp_gpu=True,
    bitsandbytes_cuda=True,
    packages={"torch": "2.5.1", "transformers": "5.2", "accelerate": "1.1", "bitsandbytes": "0.45",
              "flash-attn": None, "llama-cpp-python": "0.3.5"},
)
RTX_4090 = Machine(gpus=[GPU("NVIDIA GeForce RTX 4090", 24 * GiB, (8, 9))], ram_bytes=64 * GiB)
TESLA_T4 = Machine(gpus=[GPU("Tesla T4", 15 * GiB, (7, 5))], ram_bytes=32 * GiB)
A100 = Machine(gpus=[GPU("NVIDIA A100-SXM4-40GB", 40 * GiB, (8, 0))], ram_bytes=128 * GiB)
TWO_3090 = Machine(gpus=[GPU("NVIDIA GeForce RTX 3090", 24 * GiB, (8, 6))] * 2, ram_bytes=128 * GiB)
CPU_32 = Machine(ram_bytes=32 * GiB, why_no_gpu="torch 2.13.0+cpu is a CPU-only build (no CUDA)")
CPU_64 = Machine(ram_bytes=64 * GiB, why_no_gpu="torch 2.13.0+cpu is a CPU-only build (no CUDA)")
CPU_BUILD_LLAMA = Machine(gpus=RTX_4060.gpus, ram_bytes=62 * GiB, llama_cpp_gpu=False)


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def shapes(tmp_path: Path) -> dict[str, Path]:
    """Model folders holding only config.json (no weights), shaped like real models."""
    return {name: write_config(tmp_path / name, cfg) for name, cfg in
            {"llama-7b": LLAMA_7B, "llama-13b": LLAMA_13B, "llama-70b": LLAMA_70B, "llama3-8b": LLAMA3_8B,
             "custom": REMOTE_CODE}.items()}


# --------------------------------------------------------------------------------- recommendations

# machine, model, options that must be chosen (subset), options that must not be there, words in the reasons
CASES = [
    pytest.param(RTX_4060, "llama-7b",
                 {"load_in_4bit": True, "quant_type": "nf4", "compute_dtype": "float16", "flash_attn": True},
                 ["dtype", "load_in_8bit", "cpu_memory", "disk_offload"], ["load-in-4bit", "nf4", "flash-attention 2"],
                 id="guide-rtx4060-7b"),
    pytest.param(RTX_4060_NO_FLASH, "llama-7b", {"load_in_4bit": True, "compute_dtype": "float16"},
                 ["flash_attn"], ["pip install flash-attn --no-build-isolation"], id="rtx4060-flash-attn-missing"),
    pytest.param(RTX_4060, "llama-13b", {"load_in_4bit": True, "quant_type": "nf4", "compute_dtype": "float16"},
                 ["disk_offload"], ["offloaded layers are not quantized"], id="rtx4060-13b-offloads"),
    pytest.param(RTX_4090, "llama-7b", {"dtype": "float16", "flash_attn": True},
                 ["load_in_4bit", "load_in_8bit"], ["no quantization"], id="24gb-7b-unquantized"),
    pytest.param(TESLA_T4, "llama-7b", {"dtype": "float16", "load_in_8bit": True},
                 ["flash_attn", "load_in_4bit"], ["no bfloat16 before Ampere", "flash-attention 2 needs Ampere"],
                 id="pre-ampere-t4-7b"),
    pytest.param(TESLA_T4, "llama3-8b", {"dtype": "float16"}, ["flash_attn"],
                 ["no bfloat16 before Ampere", "saved in bfloat16"], id="pre-ampere-bf16-checkpoint"),
    pytest.param(A100, "llama3-8b", {"dtype": "bfloat16", "flash_attn": True}, ["load_in_4bit", "load_in_8bit"],
                 ["bfloat16: the checkpoint's own type"], id="ampere-bf16-checkpoint"),
    pytest.param(TWO_3090, "llama-70b", {"load_in_4bit": True}, ["cpu_memory", "disk_offload"],
                 ["gpu-split"], id="two-gpus-70b-split"),
    pytest.param(CPU_64, "llama-7b", {"dtype": "float32"}, ["load_in_4bit", "load_in_8bit", "flash_attn"],
                 ["no GPU: torch 2.13.0+cpu is a CPU-only build", "float32"], id="cpu-only-64gb-7b"),
    pytest.param(CPU_32, "llama-7b", {"dtype": "float32", "load_in_8bit": True}, ["flash_attn"],
                 ["load-in-8bit", "no GPU"], id="cpu-only-32gb-7b"),
    pytest.param(RTX_4060, "custom", {"trust_remote_code": True}, [], ["trust-remote-code"],
                 id="remote-code"),
]


@pytest.mark.parametrize(("machine", "model", "chosen", "absent", "words"), CASES)
def test_recommendations_for_simulated_machines(shapes, machine, model, chosen, absent, words):
    rec = recommend(shapes[model], machine)
    for name, value in chosen.items():
        assert rec.options.get(name) == value, (name, rec.options)
    for name in absent:
        assert name not in rec.options, (name, rec.options)
    text = str(rec)
    for word in words:
        assert word in text, (word, text)
    assert rec.fits, text
    assert rec.estimate.fits(machine)
    rec.load_options()  # the options are valid together
    assert rec.flags() in text
    assert all(line.strip() for line in rec.reasons) and all("\n" not in line for line in rec.reasons)


def test_the_guides_rtx_4060_example_in_full(shapes):
    """Section 5.1's recommended set-up for an RTX 4060 with 62 GB: float16 compute, nf4, flash-attention
    2, 4-bit for a model that does not fit in 16 bits, and the memory it will take."""
    rec = recommend(shapes["llama-7b"], RTX_4060)
    assert rec.loader == "transformers"
    assert rec.flags() == "--load-in-4bit --quant-type nf4 --compute-dtype float16 --flash-attn"
    assert rec.estimate.context == 4096
    on_gpu = rec.estimate.on("cuda:0")
    assert 5.5 * GiB < on_gpu <= 8 * GiB * GPU_USABLE
    assert 3.6 * GiB < rec.estimate.devices["cuda:0"].weights < 4.1 * GiB  # 4-bit Llama-2-7B: ~3.9 GB measured
    assert rec.estimate.devices["cuda:0"].kv_cache == 2 * GiB  # 2 · 32 layers · 4096 · 4096 tokens · float16


def test_the_guides_offloading_range_for_a_13b_model_on_the_rtx_4060(shapes):
    """"Maximum CPU memory: 0 or 16-32 (if offloading)": a 13B model in 4-bit does not fit in 8 GB, so part
    of it waits in RAM, within the guide's range; a GGUF with part of the layers on the GPU is better."""
    rec = recommend(shapes["llama-13b"], RTX_4060)
    assert 16 <= rec.options["cpu_memory"] <= 32 and float(rec.options["gpu_split"]) < 8
    assert rec.fits and "disk" not in rec.estimate.devices
    assert rec.better is not None and rec.better.fits and 0 < rec.better.options["n_gpu_layers"] < 40


def test_70b_on_8gb_and_62gb_ram_against_a_gguf_through_llama_cpp(shapes):
    """4-bit with offloading needs the offloaded layers unquantized (more than the RAM: disk), so the
    GGUF through llama.cpp with part of the layers on the GPU is the better plan, and it fits."""
    rec = recommend(shapes["llama-70b"], RTX_4060)
    assert rec.loader == "transformers"
    assert {"load_in_4bit", "gpu_split", "cpu_memory", "disk_offload"} <= set(rec.options)
    assert not rec.fits
    assert "not quantized" in str(rec) and "disk" in rec.estimate.devices
    cpu = rec.estimate.devices["cpu"].weights + rec.estimate.devices["disk"].weights
    assert cpu > 100 * GiB  # most of 70B parameters in float16
    assert rec.estimate.on("cuda:0") <= 8 * GiB * GPU_USABLE
    better = rec.better
    assert better is not None and better.loader == "llama.cpp" and better.fits
    assert 5 <= better.options["n_gpu_layers"] < 80 and better.options["n_ctx"] == 4096
    assert better.estimate.on("cuda:0") <= 8 * GiB * GPU_USABLE
    assert better.estimate.on("cpu") <= 62 * GiB * RAM_USABLE
    assert "Q4_K_M" in (better.needs or "") and "Better: llama.cpp" in str(rec)
    assert f"n-gpu-layers {better.options['n_gpu_layers']}:" in str(rec)


def test_cpu_only_names_a_gguf_through_llama_cpp_as_the_better_choice(shapes):
    rec = recommend(shapes["llama-7b"], CPU_64)
    assert rec.better is not None and rec.better.loader == "llama.cpp"
    assert rec.better.options["n_gpu_layers"] == 0
    assert "quantized CPU kernels" in str(rec.better)


def test_a_70b_model_on_a_small_cpu_machine_is_said_not_to_fit(shapes):
    rec = recommend(shapes["llama-70b"], CPU_32)
    assert not rec.fits and rec.options.get("disk_offload") is True
    assert rec.estimate.on("cpu") <= 32 * GiB * RAM_USABLE  # --cpu-memory leaves room for the KV cache
    assert rec.better is not None and rec.better.loader == "llama.cpp"


@pytest.mark.parametrize(("machine", "model", "layers", "n_ctx"), [
    (RTX_4060, "llama-7b", -1, 4096),   # Q4_K_M 7B: every layer fits on 8 GB
    (RTX_4060, "llama-13b", None, 4096),  # 13B: part of the layers
    (CPU_64, "llama-7b", 0, 4096),
    (CPU_BUILD_LLAMA, "llama-7b", 0, 4096),  # a GPU, but llama-cpp-python built without CUDA
])
def test_gguf_layers_and_context(shapes, machine, model, layers, n_ctx):
    shape = gguf_like(model_shape(shapes[model]), "Q4_K_M")
    rec = recommend(shape, machine)
    assert rec.loader == "llama.cpp" and rec.fits
    assert rec.options["n_ctx"] == n_ctx
    if layers is None:
        assert 0 < rec.options["n_gpu_layers"] < shape.layers
        assert "run on the CPU" in str(rec)
    else:
        assert rec.options["n_gpu_layers"] == layers
    if machine is CPU_BUILD_LLAMA:
        assert 'CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python' in str(rec)


def test_gguf_context_is_shortened_when_that_puts_every_layer_on_the_gpu(shapes):
    long = write_config(shapes["llama-7b"].parent / "long", {**LLAMA3_8B, "max_position_embeddings": 131072})
    rec = recommend(gguf_like(model_shape(long)), Machine(gpus=[GPU("RTX 3060", 6 * GiB, (8, 6))], ram_bytes=32 * GiB))
    assert rec.options["n_gpu_layers"] == -1 and rec.options["n_ctx"] == 4096
    assert "every layer fits on the GPU" in str(rec)


def test_real_gguf_file_gets_every_layer_on_a_gpu(tiny_gguf):
    rec = recommend(tiny_gguf, RTX_4060)
    assert rec.options == {"flash_attn": True, "n_gpu_layers": -1, "n_ctx": 2048}


# ---------------------------------------------------------------------------------------- shapes


def test_shape_from_config_alone_equals_the_one_from_safetensors_headers(tiny_model_64, tmp_path):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_model_64 / "config.json", only_config / "config.json")
    from_config, from_headers = model_shape(only_config), model_shape(tiny_model_64)
    assert from_config.source == "config.json" and from_headers.source == "safetensors headers"
    assert from_config.blocks == from_headers.blocks
    assert from_config.params == from_headers.params


def test_safetensors_headers_are_read_without_the_weights(tiny_model_64, tmp_path):
    """Only the header is read: a copy whose weight bytes are zeros has the same shape."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tiny_model_64 / "config.json", copy / "config.json")
    data = (tiny_model_64 / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    (copy / "model.safetensors").write_bytes(data[: 8 + n] + bytes(len(data) - 8 - n))
    assert model_shape(copy).blocks == model_shape(tiny_model_64).blocks


def test_llama_7b_parameter_count_from_config(shapes):
    assert model_shape(shapes["llama-7b"]).params == 6_738_415_616  # Llama-2-7b's published count
    assert model_shape(shapes["llama-70b"]).params == 68_976_648_192  # Llama-2-70b's


def test_a_missing_model_is_one_line_with_a_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model at"):
        model_shape(tmp_path / "nothing-here")
    models.set_models_dir(tmp_path)
    try:  # offline (the tests' HF_HUB_OFFLINE=1): the Hub cannot be asked
        with using("notebook"), pytest.raises(ModelNotFoundError, match="config.json could not be fetched.*%llm_download org/model"):
            model_shape("org/model")
    finally:
        models.set_models_dir(None)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no token from the real machine."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "hf-cache"


def test_a_hub_id_is_read_from_the_hub_without_its_weights(hub, hf_cache, models_dir, tiny_model_64):
    """config.json is fetched and the safetensors header read with range requests: no weight downloaded."""
    hub.add_folder("org/tiny", tiny_model_64)
    shape = model_shape("org/tiny")
    assert shape.source == "safetensors headers from the Hub"
    assert shape.blocks == model_shape(tiny_model_64).blocks
    weights = [r for r in hub.gets("model.safetensors")]
    assert weights and all(r.range is not None for r in weights)
    size = (tiny_model_64 / "model.safetensors").stat().st_size
    ends = [int(r.range.rpartition("-")[2]) for r in weights if r.range]
    assert min(ends) < size - 1 or size < 100_001  # a header-sized range, not the file
    assert not any(models_dir.iterdir())  # nothing in the models folder
    report = doctor("org/tiny", CPU_64)
    assert report.recommendation is not None and report.recommendation.options == {"dtype": "float32"}


def test_a_hub_repository_without_safetensors_is_read_from_its_config(hub, hf_cache, models_dir):
    hub.add_repo("meta-llama/Llama-2-7b-hf", {"config.json": json.dumps(LLAMA_7B), "pytorch_model.bin": b"x" * 10})
    shape = model_shape("meta-llama/Llama-2-7b-hf")
    assert shape.source == "config.json from the Hub" and shape.params == 6_738_415_616
    assert recommend("meta-llama/Llama-2-7b-hf", RTX_4060).options["load_in_4bit"] is True


def test_a_hub_id_downloaded_into_the_models_folder_is_read_from_there(tmp_path):
    models.set_models_dir(tmp_path)
    try:
        write_config(tmp_path / models.folder_name("meta-llama/Llama-2-7b-hf"), LLAMA_7B)
        assert model_shape("meta-llama/Llama-2-7b-hf").params == 6_738_415_616
        assert model_shape("meta-llama_Llama-2-7b-hf").layers == 32  # its name in the models folder
    finally:
        models.set_models_dir(None)


# ----------------------------------------------------------------- estimates against measured memory


def _loaded_bytes(status: Any) -> int:
    """The loader's own measure: parameter and buffer bytes per device (TransformersLoader._placement)."""
    return sum(status.placement.memory_bytes.values())


def _tensor_bytes(model: Any) -> int:
    """Every tensor the model holds: parameters, buffers and bitsandbytes' quantization constants."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code]
            if getattr(state, "nested", False):
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        scb = getattr(weight, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("options", [
    {},
    {"load_in_8bit": True},
    {"load_in_4bit": True, "quant_type": "nf4"},
    {"load_in_4bit": True, "quant_type": "fp4", "double_quant": True},
], ids=["float32", "8bit", "4bit-nf4", "4bit-fp4-double-quant"])
def test_estimated_weights_match_the_loaded_model_on_this_cpu(engine, tiny_model_64, options):
    machine = Machine(ram_bytes=16 * GiB)
    predicted = estimate(tiny_model_64, {**options, "device": "cpu"}, machine).weights_bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = engine.load(tiny_model_64, device="cpu", **options)
    exact = _tensor_bytes(engine._loader.model)
    assert abs(predicted - exact) <= 0.01 * exact, (predicted, exact)
    # what the status line shows counts bitsandbytes' scales and code tables too
    assert model_memory(engine._loader.model) == status.placement.memory_bytes == {"cpu": exact}
    assert _loaded_bytes(status) == exact


def test_estimated_gguf_weights_match_llama_cpp(tiny_gguf):
    llama_cpp = need("llama_cpp")
    predicted = estimate(tiny_gguf, {}, Machine(ram_bytes=16 * GiB)).weights_bytes
    llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=64, verbose=False)
    try:
        measured = int(llama_cpp.llama_model_size(llm.model))
    finally:
        llm.close()
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_kv_cache_of_a_gguf_is_the_llama_cpp_loaders_own(tiny_gguf):
    from nbllm.gguf_file import read_gguf_header
    from nbllm.loaders.llamacpp import kv_cache_bytes

    est = estimate(tiny_gguf, {"n_ctx": 1024}, Machine(ram_bytes=16 * GiB))
    expected = kv_cache_bytes(read_gguf_header(tiny_gguf).metadata, 1024, LoadOptions(n_ctx=1024))
    assert est.kv_cache_bytes == pytest.approx(expected, rel=0.01)


def test_offloaded_layers_are_not_quantized_and_run_on_the_gpu(shapes):
    """accelerate offload with bitsandbytes: the CPU's layers stay float16; the KV cache stays on the GPU."""
    est = estimate(shapes["llama-13b"], {"load_in_4bit": True, "gpu_split": "4", "cpu_memory": 32}, RTX_4060)
    cpu, gpu = est.devices["cpu"], est.devices["cuda:0"]
    per_layer_16bit = model_shape(shapes["llama-13b"]).layer_blocks[0].params * 2
    assert cpu.weights >= per_layer_16bit and cpu.weights % per_layer_16bit < per_layer_16bit
    assert cpu.kv_cache == 0 and gpu.kv_cache == est.kv_cache_bytes
    assert any("not quantized" in n for n in est.notes)


def test_cpu_memory_without_gpu_split_fills_the_gpu_first_then_the_cpu(shapes):
    """--cpu-memory alone (the guide's "Maximum CPU memory"): the GPU takes what fits in its memory, the
    CPU the rest up to the limit, as the loader asks accelerate (each GPU with what it has free, less the
    loader's 10% reserve)."""
    est = estimate(shapes["llama-7b"], {"dtype": "float16", "cpu_memory": 40}, RTX_4060)
    gpu, cpu = est.devices["cuda:0"], est.devices["cpu"]
    assert gpu.blocks > 0 and cpu.blocks > 0 and gpu.blocks + cpu.blocks == 34
    budget = 8 * GiB * 0.95 * 0.9
    assert gpu.weights <= budget < gpu.weights + model_shape(shapes["llama-7b"]).layer_blocks[0].params * 2 * 2
    assert "disk" not in est.devices
    # --gpu-split alone: the GPU's share, and the CPU takes the rest with no limit (not the disk)
    est = estimate(shapes["llama-7b"], {"dtype": "float16", "gpu_split": "4"}, RTX_4060)
    assert 0 < est.devices["cuda:0"].weights <= 4 * GiB and est.devices["cpu"].blocks > 0
    assert "disk" not in est.devices


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"dtype": "float16"}, {"load_in_4bit": True}, {"load_in_8bit": True}])
def test_estimated_weights_match_cuda_memory(engine, options):
    import torch

    from nbllm.testing import tiny_transformers_model

    folder = tiny_transformers_model(hidden_size=1024, num_layers=4, num_heads=16, intermediate_size=2816,
                                     vocab_size=4096)
    machine = Machine.probe()
    predicted = estimate(folder, options, machine).devices["cuda:0"].weights
    engine.unload()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    engine.load(folder, **options)
    measured = torch.cuda.memory_allocated(0) - before
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


# -------------------------------------------------------------------------------- this machine


def test_probe_of_this_machine_is_sensible():
    import torch

    machine = Machine.probe()
    assert machine.ram_bytes > GiB and machine.disk_free_bytes and machine.disk_free_bytes > 0
    assert machine.packages is not None and machine.packages["torch"] == torch.__version__
    text = str(machine)
    if torch.cuda.is_available():
        assert machine.gpus and "GPU 0:" in text
        return
    assert machine.gpus == ()
    assert machine.why_no_gpu and "GPU: none usable" in text
    if torch.version.cuda is None:
        assert "CPU-only build" in machine.why_no_gpu
        assert machine.bitsandbytes_cuda in (False, None)
    if machine.packages.get("llama-cpp-python"):
        import llama_cpp

        assert machine.llama_cpp_gpu == bool(llama_cpp.llama_supports_gpu_offload())
    assert Machine.from_dict(json.loads(json.dumps(machine.to_dict()))) == machine


def test_importing_nbllm_fit_imports_no_heavy_library():
    code = "import nbllm.fit, nbllm.magics.fit, sys; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', " \
           "'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_simulated_machine_round_trips_as_data():
    data = RTX_4060_NO_FLASH.to_dict()
    assert data["gpus"][0] == {"name": "NVIDIA GeForce RTX 4060", "memory_bytes": 8 * GiB, "capability": [8, 9],
                               "free_bytes": None}
    assert Machine.from_dict(json.loads(json.dumps(data))) == RTX_4060_NO_FLASH
    assert "fix: flash-attn is missing" in str(RTX_4060_NO_FLASH)


# --------------------------------------------------------------------------------------- failures


def test_cuda_out_of_memory_says_which_option_frees_how_much(shapes):
    import torch

    exc = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 172.00 MiB. GPU 0 has a total capacity of 7.75 GiB of which "
        "20.56 MiB is free. Of the allocated memory 7.10 GiB is allocated by PyTorch")
    error = failure_error(exc, shapes["llama-7b"], {"dtype": "float16"}, RTX_4060)
    assert isinstance(error, LoadError)
    text = error.message
    assert text.startswith("the GPU ran out of memory loading llama-7b (tried to allocate 172.00 MiB; 20.56 MiB of "
                           "7.75 GiB free). ")
    found = dict(re.findall(r"(--load-in-4bit|--load-in-8bit) frees about ([\d.]+ GiB)", text))
    assert set(found) == {"--load-in-4bit", "--load-in-8bit"}
    assert float(found["--load-in-4bit"].split()[0]) > float(found["--load-in-8bit"].split()[0]) > 1
    assert "--gpu-split" in text and "--cpu-memory" in text and "\n" not in text


def test_out_of_memory_during_generation_keeps_the_model_and_names_the_context(shapes):
    import torch

    text = explain_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
                           shapes["llama-7b"], {"load_in_4bit": True}, RTX_4060, during="generation")
    assert text is not None and "still loaded" in text and "shorter prompt" in text
    assert isinstance(failure_error(torch.OutOfMemoryError("x"), during="generation"), GenerationError)


def test_out_of_memory_with_a_gguf_names_fewer_gpu_layers_and_a_shorter_context(shapes):
    import torch

    shape = gguf_like(model_shape(shapes["llama-13b"]))
    text = explain_failure(torch.OutOfMemoryError("CUDA error: out of memory"), shape, {"n_gpu_layers": -1},
                           RTX_4060)
    assert text is not None
    assert re.search(r"--n-gpu-layers \d+ frees about", text) and re.search(r"--n-ctx 2048 frees about", text)


def test_real_cpu_out_of_memory_is_recognized(shapes):
    import torch

    with pytest.raises(RuntimeError) as info:
        torch.empty(2**50, dtype=torch.float32)
    assert failure_kind(info.value) == "cpu_oom"
    text = explain_failure(info.value, shapes["llama-7b"], {}, CPU_32)
    assert text is not None and "ran out of RAM" in text and "--load-in-4bit frees about" in text


def test_real_flash_attention_missing_error(tiny_model):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    from transformers import AutoModelForCausalLM

    with pytest.raises(ImportError) as info:
        AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="flash_attention_2")
    text = explain_failure(info.value)
    assert text is not None and "pip install flash-attn --no-build-isolation" in text and "--attn sdpa" in text


def test_real_trust_remote_code_and_unknown_architecture_errors(tmp_path):
    from transformers import AutoConfig

    remote = write_config(tmp_path / "remote", REMOTE_CODE)
    with pytest.raises(ValueError) as info:
        AutoConfig.from_pretrained(remote)
    assert failure_kind(info.value) == "remote_code"
    assert "--trust-remote-code" in (explain_failure(info.value, remote) or "")
    unknown = write_config(tmp_path / "unknown", {**LLAMA_7B, "model_type": "nbllm_unknown_arch"})
    with pytest.raises(ValueError) as info:
        AutoConfig.from_pretrained(unknown)
    text = explain_failure(info.value, unknown) or ""
    assert "nbllm_unknown_arch" in text and "pip install -U transformers" in text


def test_real_torch_without_cuda_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises((AssertionError, RuntimeError)) as info:
        torch.zeros(1, device="cuda")
    text = explain_failure(info.value, machine=Machine.probe())
    assert text is not None and text.startswith("the GPU is not usable: ") and "--device cpu" in text


def test_real_bitsandbytes_cpu_only_error():
    from bitsandbytes.cextension import BNBNativeLibrary

    with pytest.raises(RuntimeError) as info:
        BNBNativeLibrary(object()).cquantize_blockwise_fp16_nf4()
    assert failure_kind(info.value) == "bnb_no_gpu"
    assert "pip install -U bitsandbytes" in (explain_failure(info.value) or "")


def test_missing_module_names_the_pip_package_and_wrapped_errors_are_seen_through():
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module("nbllm_no_such_module.sub")
    try:
        raise LoadError("could not load m", "check it") from info.value
    except LoadError as wrapped:
        text = explain_failure(wrapped)
    assert text is not None and "pip install nbllm-no-such-module" in text


def test_an_unknown_failure_is_left_to_the_caller():
    assert failure_error(ValueError("a bad value")) is None
    assert explain_failure(KeyError("x")) is None


# --------------------------------------------------------------------------------- saved settings

TGW_FILE = """\
.*llama:
  instruction_template: Llama-v2
TheBloke_Llama-2-13B-fp16$:
  loader: Transformers
  cpu_memory: 0
  gpu_split: ''
  compute_dtype: float16
  quant_type: nf4
  load_in_8bit: false
  load_in_4bit: true
  attn_implementation: sdpa
  cpu: false
  disk: false
  use_double_quant: true
  bf16: false
  no_use_fast: false
  temperature: 0.6
  top_p: 0.95
  seed: -1
  custom_stopping_strings: '"###", "\\\\nUser:"'
llama-2-7b-chat.Q4_K_M.gguf$:
  loader: llama.cpp
  gpu_layers: 20
  threads: 0
  threads_batch: 0
  batch_size: 256
  ctx_size: 4096
  cache_type: q8_0
  tensor_split: ''
  no_mmap: false
  mlock: false
  streaming_llm: false
old-webui-model$:
  loader: Transformers
  n_ctx: 2048
  gpu_memory_0: 6144
  cpu_memory: 16
  use_flash_attention_2: true
  torch_compile: true
  trust_remote_code: true
  alpha_value: 2.5
"""


@pytest.fixture
def models_dir(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    models.set_models_dir(folder)
    yield folder
    models.set_models_dir(None)


def test_a_file_text_generation_webui_wrote_is_read(models_dir):
    (models_dir / "config-user.yaml").write_text(TGW_FILE)
    saved = saved_settings("TheBloke_Llama-2-13B-fp16")
    assert saved is not None
    assert saved.patterns == [".*llama", "TheBloke_Llama-2-13B-fp16$"]
    assert saved.load == {"loader": "transformers", "compute_dtype": "float16", "load_in_4bit": True,
                          "attn": "sdpa", "double_quant": True}
    assert saved.generation == {"temperature": 0.6, "top_p": 0.95, "seed": None, "stop": ("###", "\\nUser:")}
    assert set(saved.ignored) == {"instruction_template", "no_use_fast"}
    assert "--load-in-4bit" in saved.note() and "options given on the line win" in saved.note()

    gguf = saved_settings("llama-2-7b-chat.Q4_K_M.gguf")
    assert gguf is not None
    assert gguf.load == {"loader": "llama.cpp", "n_gpu_layers": 20, "n_batch": 256, "n_ctx": 4096,
                         "cache_type": "q8_0"}
    assert "streaming_llm" in gguf.ignored

    old = saved_settings("old-webui-model")
    assert old is not None
    assert old.load == {"loader": "transformers", "gpu_split": "6", "cpu_memory": 16.0, "flash_attn": True,
                        "compile": True, "trust_remote_code": True, "alpha_value": 2.5}
    assert "n_ctx" in old.ignored  # a llama.cpp option, and this model loads with Transformers
    assert saved_settings("some-other-model") is None


def test_options_on_the_line_win_over_saved_ones(models_dir):
    (models_dir / "config-user.yaml").write_text(TGW_FILE)
    saved = saved_settings("TheBloke_Llama-2-13B-fp16")
    assert saved is not None
    options = saved.load_options({"load_in_4bit": False, "load_in_8bit": True, "compute_dtype": "auto",
                                  "double_quant": False})
    assert options.load_in_8bit and not options.load_in_4bit and options.attn == "sdpa"
    assert saved.generation_options(GenerationOptions(max_new_tokens=64)).max_new_tokens == 64


@pytest.mark.parametrize(("name", "options"), [
    ("org_model", LoadOptions(loader="transformers", load_in_4bit=True, quant_type="fp4", compute_dtype="bfloat16",
                              double_quant=True, flash_attn=True, cpu_memory=24, gpu_split="7.5", disk_offload=True,
                              trust_remote_code=True, alpha_value=1.75, compile=True, device="cuda")),
    ("org_model2", LoadOptions(loader="transformers", dtype="bfloat16", attn="eager", revision="v2")),
    ("org_model3", LoadOptions(loader="transformers", dtype="float32", device="cpu")),
    ("model.Q4_K_M.gguf", LoadOptions(loader="llama.cpp", n_gpu_layers=20, n_ctx=4096, n_batch=256, threads=4,
                                      cache_type="q8_0", flash_attn=True, gpu_split="60,40", no_mmap=True,
                                      rope_freq_base=500000.0, compress_pos_emb=2.0, file="model.Q4_K_M.gguf")),
])
def test_saved_settings_round_trip(models_dir, name, options):
    generation = GenerationOptions(temperature=0.0, max_new_tokens=99, stop=("\n\n", 'say "stop"', "ünï"), seed=7)
    save_settings(name, options, generation)
    saved = saved_settings(name)
    assert saved is not None and not saved.ignored
    assert saved.load_options() == options
    assert saved.generation_options() == generation


def test_what_nbllm_writes_is_what_text_generation_webui_reads(models_dir):
    """text-generation-webui's own rule (re.match on lower-cased patterns, later entries win) applied to
    the file nbllm wrote gives its own key names and values."""
    (models_dir / "config-user.yaml").write_text(TGW_FILE)
    save_settings("TheBloke_Llama-2-13B-fp16", LoadOptions(load_in_4bit=True, compute_dtype="float16", flash_attn=True),
                  GenerationOptions(temperature=0.3))
    data = yaml.safe_load((models_dir / "config-user.yaml").read_text())
    tgw_sees: dict[str, Any] = {}
    for pattern in data:
        if re.match(pattern.lower(), "thebloke_llama-2-13b-fp16"):
            tgw_sees.update(data[pattern])
    assert "loader" not in tgw_sees and tgw_sees["load_in_4bit"] is True  # loader auto: it infers one, as nbllm
    assert tgw_sees["compute_dtype"] == "float16" and tgw_sees["quant_type"] == "nf4"
    assert tgw_sees["use_flash_attention_2"] is True and tgw_sees["temperature"] == 0.3
    assert tgw_sees["cpu_memory"] == 0 and tgw_sees["gpu_split"] == "" and tgw_sees["use_double_quant"] is False
    assert tgw_sees["no_use_fast"] is False and tgw_sees["instruction_template"] == "Llama-v2"  # its own keys kept
    assert "attn_implementation" not in tgw_sees  # auto: nbllm decides, as it said before
    assert list(data)[:2] == [".*llama", "TheBloke_Llama-2-13B-fp16$"]  # the other entries, in their order
    assert data["llama-2-7b-chat.Q4_K_M.gguf$"]["gpu_layers"] == 20


def test_saving_again_drops_options_no_longer_given(models_dir):
    save_settings("m", LoadOptions(load_in_4bit=True, double_quant=True))
    save_settings("m", LoadOptions(dtype="float16"))
    saved = saved_settings("m")
    assert saved is not None and saved.load == {"dtype": "float16"}  # loader auto: stored and read as auto
    assert saved.generation == {}


def test_a_gguf_in_a_folder_is_saved_under_the_folders_name(models_dir, tiny_gguf):
    folder = models_dir / "TheBloke_Tiny-GGUF"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / tiny_gguf.name)
    assert settings_name(resolve("TheBloke_Tiny-GGUF")) == "TheBloke_Tiny-GGUF"
    assert settings_name(folder / tiny_gguf.name) == "TheBloke_Tiny-GGUF"
    save_settings("TheBloke_Tiny-GGUF", LoadOptions(n_ctx=512))
    saved = saved_settings("TheBloke_Tiny-GGUF")
    assert saved is not None and saved.load == {"n_ctx": 512}


def test_invalid_saved_settings_name_the_file(models_dir):
    (models_dir / "config-user.yaml").write_text("bad$:\n  load_in_4bit: true\n  load_in_8bit: true\n")
    with pytest.raises(OptionError, match="saved settings for bad in .*config-user.yaml are invalid"):
        saved_settings("bad")
    (models_dir / "config-user.yaml").write_text("this: [is not: valid yaml\n")
    with pytest.raises(NbllmError, match="config-user.yaml cannot be read"):
        saved_settings("x")


def test_what_worked_round_trip(models_dir):
    assert what_worked("m") is None
    peak = measure_peak_memory()
    assert peak["cpu"] > 10 * 2**20
    record_success("m", LoadOptions(load_in_4bit=True), {"cuda:0": 5 * GiB, "cpu": 2 * GiB}, loader="transformers",
                   machine="RTX 4060", load_seconds=12.5)
    worked = what_worked("m")
    assert worked is not None and worked.options == {"load_in_4bit": True}
    assert worked.peak_memory == {"cuda:0": 5 * GiB, "cpu": 2 * GiB}
    assert "what worked here" in worked.line() and "--load-in-4bit" in worked.line() and "5.00 GiB" in worked.line()
    assert (models_dir / ".nbllm" / "what-worked.json").is_file()


# ---------------------------------------------------------------------------------------- %llm_doctor


def test_llm_doctor_without_a_model_shows_this_machine(shell):
    report = shell.run_line_magic("llm_doctor", "")
    text = str(report)
    assert text.startswith("This machine:") and "RAM:" in text and "libraries:" in text
    assert "%llm_doctor MODEL" in text


def test_llm_doctor_with_a_model(shell, models_dir, tiny_model_64):
    target = models_dir / "org_tiny"
    shutil.copytree(tiny_model_64, target)
    save_settings("org_tiny", LoadOptions(dtype="float32"), GenerationOptions(temperature=0.2))
    record_success("org_tiny", LoadOptions(dtype="float32"), {"cpu": 300 * 2**20}, loader="transformers")
    report = shell.run_line_magic("llm_doctor", "org_tiny --context 1024")
    text = str(report)
    assert "Model: org_tiny: llama" in text and "read from safetensors headers" in text
    assert "Recommended options" in text and report.recommendation.flags() in text
    assert report.recommendation.estimate.context == 1024
    assert "Saved: saved settings for org_tiny" in text and "temperature=0.2" in text
    assert "what worked here" in text


def test_llm_doctor_errors_are_one_line(shell, tmp_path):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"^no model at .*\. Give an existing path, a name from %llm_models"):
        shell.run_line_magic("llm_doctor", str(tmp_path / "missing"))


def test_doctor_report_parts_are_attributes(tiny_model_64):
    report = doctor(tiny_model_64, CPU_64)
    assert report.shape is not None and report.recommendation is not None
    assert report.recommendation.options == {"dtype": "float32"}


# ------------------------------------------------------------------------------ docs/fit.md examples

DOC_EXAMPLES = {
    "rtx4060-7b": (RTX_4060, "meta-llama_Llama-2-7b-hf", LLAMA_7B),
    "rtx4060-13b": (RTX_4060, "meta-llama_Llama-2-13b-hf", LLAMA_13B),
    "rtx4090-7b": (RTX_4090, "meta-llama_Llama-2-7b-hf", LLAMA_7B),
    "t4-7b": (TESLA_T4, "meta-llama_Llama-2-7b-hf", LLAMA_7B),
    "rtx4060-70b": (RTX_4060, "meta-llama_Llama-2-70b-hf", LLAMA_70B),
    "cpu-7b": (CPU_32, "meta-llama_Llama-2-7b-hf", LLAMA_7B),
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "fit.md"


def test_the_worked_examples_in_docs_fit_md_are_what_recommend_prints(tmp_path):
    """Each example block in docs/fit.md is the current output; NBLLM_UPDATE_DOCS=1 rewrites them."""
    import os

    text = DOC.read_text(encoding="utf-8")
    for name, (machine, folder, config) in DOC_EXAMPLES.items():
        model = write_config(tmp_path / name / folder, config)
        printed = str(recommend(model, machine))
        block = re.compile(rf"(<!-- fit-example {name} -->\n```\n)(.*?)(\n```\n<!-- /fit-example -->)", re.S)
        match = block.search(text)
        assert match, f"docs/fit.md has no example {name}"
        if os.environ.get("NBLLM_UPDATE_DOCS"):
            text = block.sub(lambda m, new=printed: m.group(1) + new + m.group(3), text)
        else:
            assert match.group(2) == printed, f"example {name} is out of date: NBLLM_UPDATE_DOCS=1 pytest -k docs"
    if os.environ.get("NBLLM_UPDATE_DOCS"):
        DOC.write_text(text, encoding="utf-8")


def test_the_readme_table_of_the_guides_machine_is_what_recommend_says(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for config in (LLAMA_7B, LLAMA_13B, LLAMA_70B):
        rec = recommend(write_config(tmp_path / str(config["hidden_size"]), config), RTX_4060)
        plan = rec.better if not rec.fits and rec.better is not None else rec
        row = f"`{plan.flags()}`"
        assert row in readme, row
        assert f"GPU {plan.estimate.on('cuda:0') / GiB:.2f} GiB" in readme
        if "cpu" in plan.estimate.devices:
            assert f"RAM {plan.estimate.on('cpu') / GiB:.2f} GiB" in readme


def test_the_readme_example_runs(models_dir):
    write_config(models_dir / "org_model", LLAMA_7B)
    code = re.search(r"```python\n(from nbllm.fit import GPU.*?)```", (Path(__file__).resolve().parents[1] /
                     "README.md").read_text(encoding="utf-8"), re.S)
    assert code
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    assert namespace["rec"].options["load_in_4bit"] is True
