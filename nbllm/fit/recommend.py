"""Load options for a model on a machine, each with its reason: the guide's sections 5 and 5.1 as rules.

The rules (``docs/fit.md`` shows them on worked examples):

* **dtype**: float16 on a GPU (the checkpoint's bfloat16 is kept only on Ampere or newer, which compute
  it natively; before Ampere there is no bfloat16); float32 on a CPU.
* **quantization**, only when the model does not fit: 8-bit, then 4-bit nf4 (compute in the GPU's 16-bit
  type), then nf4 with double quantization.
* **offloading** when even 4-bit does not fit: ``--gpu-split`` for the GPU's share and ``--cpu-memory``
  for the rest (not quantized: bitsandbytes leaves offloaded layers in 16 bits), then ``--disk-offload``.
* **flash-attention 2** on Ampere or newer, with the install command when flash-attn is missing.
* **trust-remote-code** when the architecture ships as code in the model's repository.
* **GGUF files**: ``--n-gpu-layers`` as many as fit with the KV cache and compute buffer, ``--n-ctx``
  the trained context (capped at 8192), shortened when that lets every layer onto the GPU.
* **llama.cpp with a GGUF** is named as the better choice on a CPU-only machine (quantized CPU kernels)
  and when the model is far larger than the GPU (layers split between GPU and CPU, all quantized).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..frontend import command
from ..loaders import GGUF_FORMAT, LLAMACPP, TRANSFORMERS
from ..loaders.llamacpp import N_CTX_CAP
from ..options import LoadOptions
from ..shown import ShownAsLines
from ..source import ModelSource
from .estimate import (
    CUDA_RUNTIME_BYTES,
    GPU_USABLE,
    RAM_USABLE,
    Estimate,
    activation_bytes,
    device_budget,
    estimate,
    probe_cached,
    transformers_context,
)
from .machine import LLAMA_CPP_CUDA_INSTALL, PIP_INSTALL, GiB, Machine
from .shape import ModelShape, model_shape

GGUF_BITS_PER_WEIGHT: dict[str, float] = {
    "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q4_K_M": 4.89, "Q3_K_M": 3.91, "Q2_K": 3.35,
}  # fmt: skip
"""Average bits per weight of llama.cpp's common quantizations (llama.cpp's quantize table, Llama-3-8B),
used to size a GGUF of a model that exists here only as a Transformers checkpoint."""

MIN_CONTEXT = 2048
"""The shortest context a recommendation shortens to before quantizing more or offloading."""

GGUF_BETTER_PARAMS = 500_000_000
"""From this size up, a CPU-only machine is told that llama.cpp with a GGUF is the better choice."""


@dataclass
class Recommendation(ShownAsLines):
    """Load options for one model on one machine, why each was chosen, and the memory they need."""

    model: str
    loader: str
    options: dict[str, Any]
    """Load option names (as in :class:`~nbllm.options.LoadOptions`) → values."""
    reasons: list[str]
    estimate: Estimate
    fits: bool
    """Whether the plan fits in the GPU(s) and RAM without disk offload."""
    machine: Machine
    better: Recommendation | None = None
    """A better plan that needs another file: a GGUF of this model through llama.cpp."""
    needs: str | None = None
    """For a plan that needs other files: what to download."""

    def load_options(self) -> LoadOptions:
        """The options as a validated :class:`LoadOptions` (what ``%llm_load --fit`` loads with)."""
        return LoadOptions.from_dict(self.options)

    def flags(self) -> str:
        """The options as ``%llm_load`` flags."""
        return flags(self.options)

    def lines(self) -> list[str]:
        out = [f"{self.loader}: {self.flags() or '(the defaults)'}"]
        if self.needs:
            out.append(f"  needs: {self.needs}")
        verdict = "fits" if self.fits else "does NOT fit in the GPU and RAM"
        out.append(f"  expected memory ({verdict}): {self.estimate.line()}")
        out.extend(f"- {r}" for r in self.reasons)
        if self.better is not None:
            out.append("")
            out.append("Better: " + self.better.lines()[0])
            out.extend(self.better.lines()[1:])
        return out



def flags(options: Mapping[str, Any]) -> str:
    """Load options as ``%llm_load`` flags (``--load-in-4bit --quant-type nf4``)."""
    out = []
    for name, value in options.items():
        flag = LoadOptions.spec(name).flag
        if value is True:
            out.append(flag)
        elif value is False and LoadOptions.spec(name).default is None:  # a three-state switch set off
            out.append("--no-" + flag[2:])
        elif value is False or value is None:
            continue
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
            out.append(f"{flag} {text!r}" if any(c in text for c in " ,") else f"{flag} {text}")
    return " ".join(out)


def recommend(
    model: str | Path | ModelSource | ModelShape,
    machine: Machine | None = None,
    *,
    context: int | None = None,
) -> Recommendation:
    """The load options for ``model`` on ``machine`` (this one if None), with one reason per choice.

    ``context`` is the context length to plan the KV cache for (default: the model's, capped at 8192).
    """
    shape = model_shape(model)
    machine = machine if machine is not None else probe_cached()
    if shape.format == GGUF_FORMAT:
        return _gguf(shape, machine, context, [])
    return _transformers(shape, machine, context)


# -------------------------------------------------------------------------------------- Transformers


def _gib(n: float) -> str:
    """Sizes in reasons: one decimal of GiB, MiB below half a GiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB / 2 else f"{n / 2**20:.1f} MiB"


def _dtype16(shape: ModelShape, machine: Machine, reasons: list[str]) -> str:
    slowest = min(machine.gpus, key=lambda g: g.capability)
    if machine.all_ampere:
        if shape.dtype == "bfloat16":
            reasons.append(f"dtype bfloat16: the checkpoint's own type, computed natively by {slowest.name} "
                           f"(Ampere or newer)")
            return "bfloat16"
        reasons.append(f"dtype float16: the checkpoint is {shape.dtype or 'of unknown type'}; float16 is fast "
                       f"and half the memory of float32 on {slowest.name}")
        return "float16"
    cap = f"{slowest.capability[0]}.{slowest.capability[1]}"
    saved = "; this model was saved in bfloat16, so if its output turns to garbage, load it with --dtype float32" \
        if shape.dtype == "bfloat16" else ""
    reasons.append(f"dtype float16: no bfloat16 before Ampere ({slowest.name} is compute capability {cap}){saved}")
    return "float16"


def _attention(shape: ModelShape, machine: Machine, options: dict[str, Any], reasons: list[str]) -> None:
    """flash-attention 2 where it runs (Ampere or newer), with the install command when it is missing."""
    if not machine.gpus:
        return
    slowest = min(machine.gpus, key=lambda g: g.capability)
    if not machine.all_ampere:
        cap = f"{slowest.capability[0]}.{slowest.capability[1]}"
        reasons.append(f"attention sdpa: flash-attention 2 needs Ampere or newer and {slowest.name} is compute "
                       f"capability {cap}")
        return
    if machine.has("flash-attn"):
        options["flash_attn"] = True
        reasons.append(f"flash-attention 2: {slowest.name} is Ampere or newer and flash-attn is installed "
                       "(faster attention, less memory for long prompts; if it errors, drop --flash-attn)")
    else:
        reasons.append(f"flash-attention 2 would run on {slowest.name} but flash-attn is not installed: "
                       f"{PIP_INSTALL['flash-attn']}, then add --flash-attn (sdpa until then)")


def _split_for(shape: ModelShape, machine: Machine, ctx: int, dtype_bytes: float) -> str:
    """--gpu-split for several GPUs: each one's usable memory less its runtime and a share of the KV
    cache and activations, in GiB (accelerate counts only weights against it)."""
    n = len(machine.gpus)
    share = (ctx * shape.kv_bytes_per_token(dtype_bytes) + activation_bytes(shape, ctx, dtype_bytes)) / n
    values = []
    for g in machine.gpus:
        room = g.memory_bytes * GPU_USABLE - CUDA_RUNTIME_BYTES - share
        values.append(max(math.floor(room / GiB * 2) / 2, 0.5))
    return ",".join(f"{v:g}" for v in values)


def _only_gpus(est: Estimate) -> bool:
    """Whether no weights went to the CPU or disk (a plan that must not offload)."""
    return not any(name in ("cpu", "disk") and mem.weights for name, mem in est.devices.items())


def _transformers(shape: ModelShape, machine: Machine, context: int | None) -> Recommendation:
    reasons: list[str] = []
    base: dict[str, Any] = {}
    if shape.needs_remote_code:
        base["trust_remote_code"] = True
        reasons.append(f"trust-remote-code: this model's architecture ({shape.model_type}) ships as Python code in "
                       "its repository; turn it on only if you trust where it comes from")
    if not machine.has("torch") or not machine.has("transformers"):
        reasons.append(f"Transformers is not installed: {PIP_INSTALL['transformers']}")
    ctx = transformers_context(shape, context)
    if not machine.gpus:
        return _transformers_cpu(shape, machine, ctx, base, reasons)
    return _transformers_gpu(shape, machine, ctx, base, reasons)


def _fit(shape: ModelShape, options: dict[str, Any], machine: Machine, ctx: int) -> Estimate:
    return estimate(shape, options, machine, context=ctx)


def _transformers_gpu(shape: ModelShape, machine: Machine, ctx: int, base: dict[str, Any],
                      reasons: list[str]) -> Recommendation:
    gpu_words = " + ".join(g.name for g in machine.gpus)
    usable = sum(device_budget(machine, f"cuda:{i}") or 0 for i in range(len(machine.gpus)))
    dtype16 = _dtype16(shape, machine, reasons)
    multi = len(machine.gpus) > 1
    candidates: list[tuple[str, dict[str, Any]]] = []
    if shape.prequantized:
        candidates.append((f"as stored ({shape.prequantized})", {**base}))
    else:
        candidates += [
            (dtype16, {**base, "dtype": dtype16}),
            ("8-bit", {**base, "dtype": dtype16, "load_in_8bit": True}),
            ("4-bit nf4", {**base, "load_in_4bit": True, "quant_type": "nf4", "compute_dtype": dtype16}),
            ("4-bit nf4 with double quantization",
             {**base, "load_in_4bit": True, "quant_type": "nf4", "compute_dtype": dtype16, "double_quant": True}),
        ]
    tried: list[str] = []
    for label, options in candidates:
        for plan_ctx in _contexts(ctx, last=(label, options) == candidates[-1]):
            opts = dict(options)
            if multi:
                opts["gpu_split"] = _split_for(shape, machine, plan_ctx, 2)
            est = _fit(shape, opts, machine, plan_ctx)
            if est.fits(machine) and _only_gpus(est):
                _explain_choice(label, tried, est, usable, gpu_words, reasons)
                if plan_ctx < ctx:
                    reasons.append(f"context: keep prompt + reply under {plan_ctx} tokens; the KV cache of the model's "
                                   f"{ctx} would not fit beside the weights")
                if multi:
                    reasons.append(f"gpu-split {opts['gpu_split']}: GiB of weights per GPU, so accelerate spreads the "
                                   "layers over every GPU (without it, all go to the first)")
                if "load_in_4bit" in opts or "load_in_8bit" in opts:
                    _bitsandbytes_reason(machine, reasons)
                _attention(shape, machine, opts, reasons)
                est = _fit(shape, opts, machine, plan_ctx)
                return Recommendation(shape.name, TRANSFORMERS, opts, reasons, est, True, machine)
        tried.append(f"{label} needs {_gib(_fit(shape, options, machine, ctx).on('cuda'))}")
    return _offload(shape, machine, ctx, base, dtype16, reasons, tried, usable)


def _contexts(ctx: int, last: bool) -> list[int]:
    """The context to plan for; for the last resort before offloading, also shorter ones (down to 2048)."""
    out = [ctx]
    while last and out[-1] // 2 >= MIN_CONTEXT:
        out.append(out[-1] // 2)
    return out


def _explain_choice(label: str, tried: list[str], est: Estimate, usable: int, gpus: str, reasons: list[str]) -> None:
    needs = _gib(est.on("cuda"))
    if not tried:
        reasons.append(f"no quantization: {label} needs {needs} with the KV cache for {est.context} tokens, within "
                       f"the {_gib(usable)} usable on {gpus}")
        return
    why = "; ".join(tried)
    if label.startswith("4-bit"):
        reasons.append(f"load-in-4bit, quant type nf4 (the best balance of size and quality): {why} — more than "
                       f"the {_gib(usable)} usable on {gpus}; {label} needs {needs}")
        reasons.append("compute dtype: the 4-bit layers compute in the GPU's 16-bit type (fast; float32 would "
                       "double the activations for no gain)")
    else:
        reasons.append(f"load-in-8bit: {why} — more than the {_gib(usable)} usable on {gpus}; 8-bit needs {needs} "
                       "(closer to the original than 4-bit)")


def _bitsandbytes_reason(machine: Machine, reasons: list[str]) -> None:
    if not machine.has("bitsandbytes"):
        reasons.append(f"bitsandbytes is needed and missing: {PIP_INSTALL['bitsandbytes']}")
    elif machine.gpus and machine.bitsandbytes_cuda is False:
        reasons.append(f"bitsandbytes has no CUDA library for torch's CUDA {machine.torch_cuda}: pip install -U "
                       "bitsandbytes")


def _offload(shape: ModelShape, machine: Machine, ctx: int, base: dict[str, Any], dtype16: str,
             reasons: list[str], tried: list[str], usable: int) -> Recommendation:
    """4-bit with the layers that do not fit on the GPU in RAM (then on disk); and the GGUF way."""
    opts: dict[str, Any] = {**base, "load_in_4bit": True, "quant_type": "nf4", "compute_dtype": dtype16}
    est = None
    for plan_ctx in _contexts(ctx, last=True):
        est = _offload_plan(shape, machine, plan_ctx, opts)
        if est is not None:
            break
    assert est is not None
    gpu_blocks = sum(m.blocks for n, m in est.devices.items() if n.startswith("cuda"))
    cpu = est.devices.get("cpu")
    disk = est.devices.get("disk")
    total_layers = len(shape.layer_blocks)
    on_gpu_layers = max(gpu_blocks - 1, 0)  # the embeddings come first
    reasons.append(f"offload: {'; '.join(tried)} — more than the {_gib(usable)} usable on the GPU")
    reasons.append(f"gpu-split {opts['gpu_split']}: about {on_gpu_layers} of {total_layers} layers stay on the GPU in "
                   "4-bit (the GPU also keeps the KV cache and the layer being computed)")
    if cpu is not None:
        dtype = shape.dtype or "float32"
        reasons.append(f"cpu-memory {opts['cpu_memory']:g}: the other layers ({_gib(cpu.weights)}) wait in RAM — "
                       f"offloaded layers are not quantized (they stay {dtype}) and are copied to the GPU at every "
                       "token, so it is slow")
    if disk is not None:
        reasons.append(f"disk-offload: {_gib(disk.weights)} fit neither in the GPU nor in RAM and go to disk: "
                       "seconds per token")
    _bitsandbytes_reason(machine, reasons)
    _attention(shape, machine, opts, reasons)
    est = _fit(shape, opts, machine, est.context)
    fits = est.fits(machine) and "disk" not in est.devices
    rec = Recommendation(shape.name, TRANSFORMERS, opts, reasons, est, fits, machine)
    rec.better = _gguf_alternative(shape, machine, ctx, why="too large for the GPU")
    return rec


def _offload_plan(shape: ModelShape, machine: Machine, ctx: int, opts: dict[str, Any]) -> Estimate | None:
    """Fill --gpu-split and --cpu-memory (and --disk-offload if RAM is short) for 4-bit offloading."""
    b = 2.0 if shape.dtype != "float32" else 4.0
    kv = ctx * shape.kv_bytes_per_token(b)
    split: list[float] = []
    for g in machine.gpus:
        room = g.memory_bytes * GPU_USABLE - CUDA_RUNTIME_BYTES - (kv + activation_bytes(shape, ctx, b)) / len(machine.gpus)
        split.append(max(math.floor(room / GiB * 2) / 2, 0.5))
    ram_gib = math.floor(machine.ram_bytes * RAM_USABLE / GiB)
    best = None
    while True:
        opts["gpu_split"] = ",".join(f"{v:g}" for v in split)
        opts.pop("disk_offload", None)
        opts["cpu_memory"] = ram_gib
        est = _fit(shape, opts, machine, ctx)
        if est.devices.get("disk") is not None:
            opts["disk_offload"] = True
        else:
            need = est.devices["cpu"].weights if "cpu" in est.devices else 0
            opts["cpu_memory"] = min(ram_gib, max(4, math.ceil(need / 0.9 / GiB / 4) * 4))
        est = _fit(shape, opts, machine, ctx)
        while est.on("cpu") > (device_budget(machine, "cpu") or 0) and opts["cpu_memory"] > 1:
            opts["cpu_memory"] -= 1
            opts["disk_offload"] = True
            est = _fit(shape, opts, machine, ctx)
        gpu_ok = all(est.on(f"cuda:{i}") <= (device_budget(machine, f"cuda:{i}") or 0) for i in range(len(split)))
        best = est
        if gpu_ok or all(v <= 0.5 for v in split):
            return best if gpu_ok or ctx <= MIN_CONTEXT else None
        split = [max(v - 0.5, 0.5) for v in split]


# ---------------------------------------------------------------------------------------- CPU only


def _transformers_cpu(shape: ModelShape, machine: Machine, ctx: int, base: dict[str, Any],
                      reasons: list[str]) -> Recommendation:
    reasons.append(f"no GPU: {machine.why_no_gpu or 'no CUDA GPU was found'}")
    budget = device_budget(machine, "cpu") or 0
    candidates: list[tuple[str, dict[str, Any]]] = [("float32", {**base, "dtype": "float32"})]
    if not shape.prequantized:
        candidates += [
            ("8-bit", {**base, "dtype": "float32", "load_in_8bit": True}),
            ("4-bit nf4", {**base, "load_in_4bit": True, "quant_type": "nf4", "compute_dtype": "float32"}),
        ]
    tried: list[str] = []
    chosen: tuple[dict[str, Any], Estimate] | None = None
    for label, options in candidates:
        est = _fit(shape, options, machine, ctx)
        if est.fits(machine):
            chosen = (options, est)
            if not tried:
                reasons.append(f"dtype float32: the safe and fast type on a CPU; {_gib(est.on('cpu'))} fits in the "
                               f"{_gib(budget)} of RAM a model may use")
            elif label == "8-bit":
                reasons.append(f"load-in-8bit: {'; '.join(tried)} — more than the {_gib(budget)} of RAM a model may "
                               f"use; 8-bit needs {_gib(est.on('cpu'))} and runs about as fast as float32 on a CPU")
            else:
                reasons.append(f"load-in-4bit nf4: {'; '.join(tried)} — more than the {_gib(budget)} of RAM a "
                               f"model may use; 4-bit needs {_gib(est.on('cpu'))} but runs about 10x slower than "
                               "float32 on a CPU")
            if label != "float32":
                _bitsandbytes_reason(machine, reasons)
            break
        tried.append(f"{label} needs {_gib(est.on('cpu'))}")
    fits = True
    if chosen is None:
        ram_gib = max(math.floor(budget / GiB), 1)
        while True:  # --cpu-memory limits the weights only: leave room for the KV cache and activations
            options = {**base, "dtype": "bfloat16", "cpu_memory": ram_gib, "disk_offload": True}
            est = _fit(shape, options, machine, ctx)
            if est.on("cpu") <= budget or ram_gib <= 1:
                break
            ram_gib -= 1
        chosen = (options, est)
        fits = False
        reasons.append(f"disk-offload: {'; '.join(tried)} — more than the {_gib(budget)} of RAM a model may use; "
                       f"bfloat16 with --cpu-memory {ram_gib} keeps what fits in RAM and reads the rest from disk "
                       "(quantization does not apply to offloaded layers): very slow")
    options, est = chosen
    rec = Recommendation(shape.name, TRANSFORMERS, options, reasons, est, fits, machine)
    if shape.params >= GGUF_BETTER_PARAMS or not fits:
        rec.better = _gguf_alternative(shape, machine, ctx, why="CPU only")
    return rec


# ---------------------------------------------------------------------------------------------- GGUF


def gguf_like(shape: ModelShape, quantization: str = "Q4_K_M") -> ModelShape:
    """The shape of a GGUF of this model at ``quantization`` (sizes from average bits per weight)."""
    bpw = GGUF_BITS_PER_WEIGHT[quantization]
    blocks = tuple(dataclasses.replace(b, stored_bytes=int(b.params * bpw / 8)) for b in shape.blocks)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": shape.layers,
        "llama.embedding_length": shape.hidden_size,
        "llama.attention.head_count": shape.heads,
        "llama.attention.head_count_kv": shape.kv_heads,
        "llama.attention.key_length": shape.head_dim,
        "llama.attention.value_length": shape.head_dim,
        "llama.context_length": shape.trained_context or 4096,
    }
    return dataclasses.replace(shape, name=f"a {quantization} GGUF of {shape.name}", format=GGUF_FORMAT,
                               source=f"{shape.source}, at {bpw} bits per weight", blocks=blocks, metadata=metadata,
                               quantization=quantization, dtype=None, prequantized=None, needs_remote_code=False)


def _gguf_alternative(shape: ModelShape, machine: Machine, ctx: int, why: str) -> Recommendation:
    choice = None
    for quant in ("Q4_K_M", "Q3_K_M", "Q2_K"):
        like = gguf_like(shape, quant)
        reasons = [f"llama.cpp with a GGUF: {why} — every layer stays quantized ({quant}, about "
                   f"{GGUF_BITS_PER_WEIGHT[quant]} bits per weight, {_gib(like.stored_bytes or 0)}) "
                   + ("and runs on llama.cpp's quantized CPU kernels" if not machine.gpus else
                      "and llama.cpp splits the layers between GPU and CPU without copying them at every token")]
        choice = _gguf(like, machine, ctx, reasons)
        if choice.fits:
            break
    assert choice is not None
    choice.needs = (f"a {choice.estimate.precision} GGUF of this model (search the Hub for '<model> GGUF'), e.g. "
                    f"{command('download file', 'ORG/MODEL-GGUF', f'*{choice.estimate.precision}*')}")
    return choice


def _gguf(shape: ModelShape, machine: Machine, context: int | None, reasons: list[str]) -> Recommendation:
    """--n-gpu-layers and --n-ctx for a GGUF: as many layers on the GPU as fit with their KV cache."""
    trained = shape.trained_context or 4096
    ctx = int(context or min(trained, N_CTX_CAP))
    opts: dict[str, Any] = {}
    offloads = machine.llama_cpp_offloads
    if machine.gpus and not offloads:
        if not machine.has("llama-cpp-python"):
            reasons.append(f"llama-cpp-python is not installed: {PIP_INSTALL['llama-cpp-python']} (for the GPU: "
                           f"{LLAMA_CPP_CUDA_INSTALL})")
        else:
            reasons.append(f"n-gpu-layers 0: this llama-cpp-python was built without GPU support, so every layer runs on "
                           f"the CPU; rebuild it for the GPU: {LLAMA_CPP_CUDA_INSTALL}")
    if offloads and machine.all_ampere:
        opts["flash_attn"] = True
        reasons.append("flash-attn: llama.cpp's own flash-attention kernels (no package needed) shrink its compute "
                       "buffer on Ampere or newer")
    n_layers = shape.layers
    chosen: tuple[int, int, Estimate] | None = None
    if offloads:
        contexts = [ctx] + ([N_CTX_CAP // 2] if ctx > N_CTX_CAP // 2 else [])
        for c in contexts:
            est = estimate(shape, {**opts, "n_gpu_layers": -1, "n_ctx": c}, machine)
            if est.fits(machine):
                chosen = (-1, c, est)
                break
        if chosen is None:
            for k in range(n_layers - 1, -1, -1):
                est = estimate(shape, {**opts, "n_gpu_layers": k, "n_ctx": ctx}, machine)
                if all(est.on(f"cuda:{i}") <= (device_budget(machine, f"cuda:{i}") or 0)
                       for i in range(len(machine.gpus))):
                    chosen = (k, ctx, est)
                    break
    else:
        c = ctx
        while True:
            est = estimate(shape, {**opts, "n_gpu_layers": 0, "n_ctx": c}, machine)
            if est.fits(machine) or c // 2 < MIN_CONTEXT:
                break
            c //= 2
        chosen = (0, c, est)
    assert chosen is not None
    layers, n_ctx, est = chosen
    opts["n_gpu_layers"] = layers
    opts["n_ctx"] = n_ctx
    if offloads:
        gpus = " + ".join(g.name for g in machine.gpus)
        if layers < 0:
            reasons.append(f"n-gpu-layers -1: all {n_layers} layers and the output fit on {gpus} "
                           f"({_gib(est.on('cuda'))} with the KV cache and compute buffer)")
        else:
            reasons.append(f"n-gpu-layers {layers}: {layers} of {n_layers} layers fit on {gpus} with their KV cache "
                           f"({_gib(est.on('cuda'))}); the other {n_layers - layers} run on the CPU from RAM")
    fits = est.fits(machine)
    if n_ctx < min(trained, N_CTX_CAP):
        full = estimate(shape, {**opts, "n_ctx": min(trained, N_CTX_CAP)}, machine).kv_cache_bytes
        reasons.append(f"n-ctx {n_ctx}: the model's {min(trained, N_CTX_CAP)} tokens would need {_gib(full)} of KV "
                       f"cache; {n_ctx} need {_gib(est.kv_cache_bytes)}"
                       + ("" if fits else " (still short of memory: see below)")
                       + (", and every layer fits on the GPU" if layers < 0 else ""))
    else:
        capped = f" (trained on {trained}; nbllm caps --n-ctx 0 at {N_CTX_CAP})" if trained > N_CTX_CAP else ""
        reasons.append(f"n-ctx {n_ctx}: the model's context{capped}, KV cache {_gib(est.kv_cache_bytes)}")
    if not fits:
        reasons.extend(est.problems(machine))
        reasons.append("a smaller quantization of this model (Q3_K_M, Q2_K) would need less memory")
    return Recommendation(shape.name, LLAMACPP, opts, reasons, est, fits, machine)
