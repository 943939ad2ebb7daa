"""What the Transformers loader decides about GPUs before it loads: the dtype a model runs in, whether its
class supports flash-attention, the memory given to each device (with a reserve), and the device map
for offloading, built on an empty-weights model (no weights are read).

Why a map is built here rather than left to ``device_map="auto"``: transformers prepares a bitsandbytes
model before it resolves "auto", and bitsandbytes leaves the modules placed on the CPU or disk
unquantized only when it is given the map as a dict (``quantizer_bnb_4bit.py``, ``quantizer_bnb_8bit.py``).
With "auto", offloaded layers would be quantized and ``llm_int8_enable_fp32_cpu_offload`` would only
silence the check. text-generation-webui builds the dict the same way (``infer_auto_device_map``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..options import LoadOptions

GPU_RESERVE = 0.10
"""The share of a GPU's free memory kept out of the device map: activations, the KV cache of a long
prompt, the CUDA context's growth. transformers keeps the same 10% when it is given no ``max_memory``;
passing one (nbllm always does, to name every device) turns its reserve off, so nbllm keeps it."""

BNB_RESERVE = 0.10
"""bitsandbytes' own margin on every device (its quantizers' ``adjust_max_memory``): room for the
buffers created while quantizing. transformers applies it only when it resolves the map itself."""

FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The dtype a checkpoint's config says its weights are in (``dtype``, or the older ``torch_dtype``),
    float32 when it says none (transformers' default then)."""
    for cfg in (config, config.get("text_config") or {}):
        value = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
        if value in FLOAT_DTYPES:
            return value
    return "float32"


def compute_dtype(options: LoadOptions, on_gpu: bool) -> str:
    """The dtype 4-bit layers compute in: --compute-dtype, or float16 on a GPU and float32 on a CPU."""
    return options.compute_dtype if options.compute_dtype != "auto" else ("float16" if on_gpu else "float32")


def load_dtype(options: LoadOptions, config: Mapping[str, Any], on_gpu: bool) -> str | None:
    """The dtype to pass to ``from_pretrained`` (``None``: the checkpoint's, ``dtype="auto"``).

    With --load-in-4bit on a GPU and no --dtype, the model's other parts (embeddings, norms, attention,
    the output layer) load in the compute dtype, as text-generation-webui loads them (float16 unless
    bf16): a float32 checkpoint would otherwise keep them in float32 on the GPU, twice the memory, and
    too wide for flash-attention. The 4-bit layers compute in --compute-dtype either way: transformers
    builds each ``Linear4bit`` with it, and bitsandbytes 0.50 then casts the input to it (it adopts the
    input's dtype, ``set_compute_type``, only for a layer built without one)."""
    if options.dtype in FLOAT_DTYPES:
        return options.dtype
    if options.load_in_4bit and on_gpu:
        return compute_dtype(options, on_gpu)
    return None


def run_dtype(options: LoadOptions, config: Mapping[str, Any], on_gpu: bool) -> str:
    """The dtype the model's unquantized parts, and so its attention, will run in."""
    return load_dtype(options, config, on_gpu) or checkpoint_dtype(config)


def attention_support(config: Mapping[str, Any]) -> tuple[bool | None, bool | None]:
    """(flash-attention 2, sdpa) support of the model class the config names, as the class declares it
    (``_supports_flash_attn``, ``_supports_sdpa``); ``None`` where the class is not transformers' own
    (remote code) or cannot be found."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None, None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))
    if not isinstance(name, str):
        return None, None
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError):
        return None, None
    flash = bool(getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False))
    return flash, bool(getattr(cls, "_supports_sdpa", False))


def max_memory(options: LoadOptions, split: tuple[float, ...], free: Mapping[int | str, int]) -> dict[int | str, int]:
    """Bytes each device may take, every device named (accelerate uses no other): each GPU --gpu-split's
    share, or else its free memory less :data:`GPU_RESERVE`; the CPU --cpu-memory, or else the RAM
    available (no limit, as in text-generation-webui)."""
    gpus = [k for k in free if isinstance(k, int)]
    out: dict[int | str, int] = {}
    for i in gpus:
        out[i] = int(split[i] * 2**30) if split else int(free[i] * (1 - GPU_RESERVE))
    limit = options.cpu_memory_limit
    out["cpu"] = int(limit * 2**30) if limit is not None else int(free["cpu"])
    return out


def empty_model(config: Any, dtype: str, remote: bool) -> Any:
    """The model ``config`` describes, with its weights on the meta device (nothing allocated)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote, dtype=getattr(torch, dtype))
    model.tie_weights()
    return model


def offload_map(model: Any, memory: Mapping[int | str, int], dtype: str, quantized: str | None) -> dict[str, int | str]:
    """The device map for ``model`` (an :func:`empty_model`) over ``memory``: the GPUs filled in order
    with the layers as they will be stored there (4-bit or 8-bit when ``quantized``), then the rest on
    the CPU (up to its budget) and on disk (the loader refuses a map with disk in it without
    --disk-offload), in the dtype they will have there: bitsandbytes leaves the
    modules a dict map puts on the CPU or disk unquantized.

    accelerate decides the GPUs' share (``infer_auto_device_map``: it keeps no-split blocks whole, keeps
    room on the first GPU for the largest offloaded layer, ties tied weights); the CPU/disk boundary is
    then drawn over the remaining modules at their unquantized size."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype, compute_module_sizes, get_balanced_memory

    plain = getattr(torch, dtype)
    target: Any = {"4bit": CustomDtype.INT4, "8bit": torch.int8}.get(quantized or "", plain)
    budgets = {k: int(v * (1 - BNB_RESERVE)) if quantized else int(v) for k, v in memory.items()}
    kept = _unquantized_parameters(model, plain) if quantized else {}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    # "auto" in transformers balances the layers over several GPUs (one GPU: the budgets stay as they are)
    balanced = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split, dtype=target,
                                   special_dtypes=kept)
    placed = infer_auto_device_map(model, max_memory=balanced, dtype=target, special_dtypes=kept,
                                   no_split_module_classes=no_split)
    sizes = compute_module_sizes(model, dtype=plain)
    room = budgets["cpu"]
    out: dict[str, int | str] = {}
    for name, device in placed.items():
        if isinstance(device, int) or str(device).startswith("cuda"):
            out[name] = device
            continue
        size = sizes.get(name, 0)
        if size <= room:
            out[name], room = "cpu", room - size
        else:
            out[name], room = "disk", 0  # in order: once one module goes to disk, the rest follow
    return out


def _unquantized_parameters(model: Any, dtype: Any) -> dict[str, Any]:
    """Parameters bitsandbytes leaves in the model's dtype: all but the weights of ``nn.Linear`` layers,
    and the output layer's too (transformers keeps it unquantized)."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not output}
    return {name: dtype for name, _ in model.named_parameters() if name not in linear}


def empty_gpus(device_map: Mapping[str, Any], memory: Mapping[int | str, int]) -> list[str]:
    """One note for each GPU given memory that got no module: accelerate keeps room on the first GPU for
    the largest layer it offloads, so a share smaller than that places nothing there."""
    used = {d if isinstance(d, int) else int(str(d).partition(":")[2] or 0)
            for d in device_map.values() if isinstance(d, int) or str(d).startswith("cuda")}
    return [f"cuda:{i} was given {memory[i] / 2**30:.3g} GiB but no layer fits in it (accelerate also keeps room "
            "there for the largest offloaded layer): the model runs without it; raise its --gpu-split share"
            for i in memory if isinstance(i, int) and i not in used]
