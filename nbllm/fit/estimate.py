"""How much memory a model needs with given load options, per device, before it is loaded.

Three parts, each per device: the **weights** (in the dtype, or quantized by bitsandbytes, or as a GGUF
file stores them), the **KV cache** for the context length, and the **overhead** (the CUDA context, the
activations of a prompt, llama.cpp's compute buffer). Placement follows what the loaders do: the
Transformers loader puts everything on one device unless ``--gpu-split``/``--cpu-memory``/
``--disk-offload`` ask accelerate to spread it (over the GPUs ``--gpu-split`` names, or every GPU up to
its memory without it, then the CPU, then disk); llama.cpp
puts the last ``--n-gpu-layers`` layers on the GPU.

Rules, with the reason for each (``docs/fit.md`` has the table):

* bitsandbytes quantizes the ``nn.Linear`` weights of the layers; embeddings, norms, biases and
  ``lm_head`` stay in the model's dtype. 4-bit stores half a byte per weight plus one float32 scale per
  64 weights (double quantization: one byte per 64, plus a float32 per 256 blocks); 8-bit stores a byte per
  weight plus one float32 scale per output row.
* Layers that accelerate offloads to the CPU or disk are **not** quantized (the loader gives bitsandbytes a
  dict device map, with which it leaves them in the model's dtype), and they run on the GPU: each
  forward pass copies them over, so the GPU also holds their KV cache and room for the largest of them.
* Activations and KV cache are in the dtype of the unquantized parts (bitsandbytes casts its outputs
  back to the input's dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..loaders import GGUF_FORMAT, LLAMACPP, TRANSFORMERS, auto_loader
from ..loaders._gpu import GPU_RESERVE
from ..loaders.llamacpp import N_CTX_CAP, default_n_ctx, kv_cache_bytes
from ..memory import format_memory
from ..options import LoadOptions
from ..shown import ShownAsLines
from ..source import ModelSource
from .machine import GiB, Machine
from .shape import DTYPE_BYTES, Block, ModelShape, model_shape

CUDA_RUNTIME_BYTES = GiB // 2
"""Per GPU in use: the CUDA context, cuBLAS workspace and allocator slack, which torch's own counters
do not show (``nvidia-smi`` does)."""

GPU_USABLE = 0.95
"""The share of a GPU's memory a plan may fill (fragmentation, the display, other processes)."""

RAM_USABLE = 0.85
"""The share of the RAM a plan may fill (the OS, the notebook server, the kernel's own Python)."""

NF4_BLOCK = 64
"""bitsandbytes 4-bit block size: one scale per 64 weights (measured: ``quant_state.blocksize``)."""

_4BIT_TABLE_BYTES = 16 * 4
"""The nf4/fp4 code table each 4-bit Linear keeps (16 float32 values)."""

_DOUBLE_QUANT_TABLE_BYTES = 256 * 4 + 4
"""Double quantization's second-level code table (256 float32) and offset, per Linear."""


@dataclass
class DeviceMemory:
    """What one device holds: weights, KV cache and overhead (bytes), and how many blocks."""

    weights: int = 0
    kv_cache: int = 0
    overhead: int = 0
    blocks: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


@dataclass
class Estimate(ShownAsLines):
    """The memory a model needs with some load options, per device (``cuda:0``, ``cpu``, ``disk``)."""

    model: str
    loader: str
    options: dict[str, Any]
    """The load options estimated (only those that differ from the defaults)."""
    context: int
    """Tokens of context the KV cache is counted for."""
    precision: str
    """How the weights are stored: ``float16``, ``4-bit nf4``, ``Q4_K_M``..."""
    devices: dict[str, DeviceMemory] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shape: ModelShape | None = None

    @property
    def weights_bytes(self) -> int:
        return sum(d.weights for d in self.devices.values())

    @property
    def kv_cache_bytes(self) -> int:
        return sum(d.kv_cache for d in self.devices.values())

    @property
    def total_bytes(self) -> int:
        return sum(d.total for d in self.devices.values())

    def on(self, device: str) -> int:
        """Total bytes on ``device`` (``cuda`` sums every GPU)."""
        if device == "cuda":
            return sum(d.total for name, d in self.devices.items() if name.startswith("cuda"))
        return self.devices[device].total if device in self.devices else 0

    def problems(self, machine: Machine) -> list[str]:
        """Why this does not fit ``machine``, one line per device that overflows (empty: it fits)."""
        out = []
        for name, mem in self.devices.items():
            limit = device_budget(machine, name)
            if limit is not None and mem.total > limit:
                what = {"cpu": "RAM", "disk": "free disk"}.get(name, name)
                out.append(f"{name} needs {format_memory(mem.total)}, more than the {format_memory(limit)} of {what} "
                           "a plan may use")
        return out

    def fits(self, machine: Machine) -> bool:
        return not self.problems(machine)

    def line(self) -> str:
        """One line: where the memory goes."""
        parts = []
        for name, mem in self.devices.items():
            detail = f"weights {format_memory(mem.weights)}"
            if mem.kv_cache:
                detail += f", KV cache {format_memory(mem.kv_cache)}"
            if mem.overhead:
                detail += f", overhead {format_memory(mem.overhead)}"
            parts.append(f"{name} {format_memory(mem.total)} ({detail})")
        return "; ".join(parts)

    def lines(self) -> list[str]:
        out = [f"{self.model} with {self.loader}, {self.precision}, context {self.context} tokens:"]
        out.append("  " + self.line())
        out.extend(f"  note: {n}" for n in self.notes)
        return out



def device_budget(machine: Machine, device: str) -> int | None:
    """Bytes a plan may put on ``device`` of ``machine`` (None: no known limit)."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index < len(machine.gpus):
            return int(machine.gpus[index].memory_bytes * GPU_USABLE)
        return 0
    if device == "cpu":
        return int(machine.ram_bytes * RAM_USABLE)
    if device == "disk":
        return machine.disk_free_bytes
    return None


def as_options(options: LoadOptions | Mapping[str, Any] | None) -> LoadOptions:
    if isinstance(options, LoadOptions):
        return options
    return LoadOptions.from_dict(dict(options or {}))


def estimate(
    model: str | Path | ModelSource | ModelShape,
    options: LoadOptions | Mapping[str, Any] | None = None,
    machine: Machine | None = None,
    *,
    context: int | None = None,
) -> Estimate:
    """The memory ``model`` needs when loaded with ``options`` on ``machine`` (this one if None).

    ``model`` is a model folder (config.json is enough), a .gguf file, a models-folder name, a hub id
    downloaded there, or a :class:`ModelShape`. ``context`` is the context length to count the KV cache
    for: llama.cpp's ``--n-ctx`` (0: the model's, capped at 8192) by default; for Transformers, the
    model's trained context capped at 8192 tokens.
    """
    shape = model_shape(model, file=getattr(as_options(options), "file", None))
    opts = as_options(options)
    if machine is None:
        machine = probe_cached()
    loader = opts.loader if opts.loader != "auto" else auto_loader(shape.format).name
    if loader == LLAMACPP:
        return _llamacpp(shape, opts, machine, context)
    return _transformers(shape, opts, machine, context)


_PROBED: Machine | None = None


def probe_cached(refresh: bool = False) -> Machine:
    """:meth:`Machine.probe`, once per process (GPUs and libraries do not change while a kernel runs)."""
    global _PROBED
    if _PROBED is None or refresh:
        _PROBED = Machine.probe()
    return _PROBED


# -------------------------------------------------------------------------------------- Transformers


def unquantized_dtype(shape: ModelShape, opts: LoadOptions) -> str:
    """The dtype of everything bitsandbytes leaves alone (and of activations and the KV cache)."""
    if opts.dtype != "auto":
        return opts.dtype
    return shape.dtype or "float32"


def block_bytes(block: Block, mode: str, dtype_bytes: float, opts: LoadOptions) -> int:
    """Bytes of ``block`` stored as ``mode`` (``plain``, ``8bit``, ``4bit``) with the rest in ``dtype_bytes``."""
    if block.stored_bytes is not None:
        return block.stored_bytes
    other = block.other_params * dtype_bytes
    if mode == "4bit":
        blocks = block.linear_params / NF4_BLOCK
        scales = blocks * 1 + blocks / 256 * 4 if opts.double_quant else blocks * 4
        tables = block.linear_modules * (_4BIT_TABLE_BYTES + (_DOUBLE_QUANT_TABLE_BYTES if opts.double_quant else 0))
        return int(block.linear_params / 2 + scales + tables + other)
    if mode == "8bit":
        return int(block.linear_params + block.linear_rows * 4 + other)
    return int(block.linear_params * dtype_bytes + other)


def transformers_context(shape: ModelShape, context: int | None) -> int:
    if context:
        return int(context)
    return min(shape.trained_context or 4096, N_CTX_CAP)


def _transformers(shape: ModelShape, opts: LoadOptions, machine: Machine, context: int | None) -> Estimate:
    dtype = unquantized_dtype(shape, opts)
    b = DTYPE_BYTES.get(dtype, 4)
    mode = "4bit" if opts.load_in_4bit else "8bit" if opts.load_in_8bit else "plain"
    notes: list[str] = list(shape.notes)
    if shape.prequantized:
        mode = "plain"
        notes.append(f"the checkpoint is already quantized ({shape.prequantized}): its stored sizes are counted")
    gpus = list(machine.gpus) if opts.device != "cpu" else []
    if opts.device == "cuda" and not machine.gpus:
        notes.append("--device cuda on a machine with no usable GPU: loading will fail")
    main = "cuda:0" if gpus else "cpu"
    split = opts.gpu_split_values
    offload = bool(split or opts.cpu_memory_limit is not None or opts.disk_offload)
    ctx = transformers_context(shape, context)
    placed: list[tuple[Block, str]]
    if not offload:
        placed = [(blk, main) for blk in shape.blocks]
    else:
        placed = _accelerate_fill(shape, opts, gpus, split, mode, b)
        used = {device for _, device in placed}
        notes.extend(f"cuda:{i} gets no layer: its --gpu-split share is smaller than the room accelerate keeps there "
                     "for the largest offloaded layer" for i in range(min(len(split), len(gpus)))
                     if f"cuda:{i}" not in used)
    devices: dict[str, DeviceMemory] = {}
    offloaded: list[int] = []
    for blk, device in placed:
        on_gpu = device.startswith("cuda")
        quantized_here = mode != "plain" and (on_gpu or not offload)
        nbytes = block_bytes(blk, mode if quantized_here else "plain", b, opts)
        mem = devices.setdefault(device, DeviceMemory())
        mem.weights += nbytes
        mem.blocks += 1
        if blk.name.startswith("layer"):
            kv_device = device if on_gpu else main  # offloaded layers compute on the main device
            devices.setdefault(kv_device, DeviceMemory()).kv_cache += int(
                ctx * shape.kv_bytes_per_token(b) / max(shape.layers, 1))
        if device in ("cpu", "disk") and gpus:
            offloaded.append(nbytes)
    overhead = devices.setdefault(main, DeviceMemory())
    overhead.weights += rotary_buffer_bytes(shape)
    overhead.overhead += activation_bytes(shape, ctx, b)
    if gpus:
        for name in list(devices):
            if name.startswith("cuda"):
                devices[name].overhead += CUDA_RUNTIME_BYTES
        if offloaded:
            overhead.overhead += max(offloaded)
            notes.append("offloaded layers are not quantized and are copied to the GPU for every forward pass "
                         "(slow); the GPU also keeps room for the largest of them")
        if offload and not split:
            notes.append(f"offloading, each GPU is filled up to {1 - GPU_RESERVE:.0%} of its free memory: the rest is "
                         "a reserve for activations and a long prompt's KV cache")
    if "disk" in devices:
        notes.append("layers on disk are read back for every token: expect seconds per token")
    precision = _precision(shape, opts, mode, dtype, bool(gpus))
    return Estimate(shape.name, TRANSFORMERS, opts.changed(), ctx, precision,
                    _ordered(devices), notes, shape)


def _precision(shape: ModelShape, opts: LoadOptions, mode: str, dtype: str, on_gpu: bool) -> str:
    if shape.prequantized:
        return f"already quantized ({shape.prequantized})"
    if mode == "4bit":
        compute = opts.compute_dtype if opts.compute_dtype != "auto" else ("float16" if on_gpu else "float32")
        dq = " + double quant" if opts.double_quant else ""
        return f"4-bit {opts.quant_type}{dq} ({compute} compute, the rest {dtype})"
    if mode == "8bit":
        return f"8-bit (the rest {dtype})"
    return dtype


def rotary_buffer_bytes(shape: ModelShape) -> int:
    """The rotary embedding's float32 frequency tables (``inv_freq`` and ``original_inv_freq``), buffers
    of the model that sit on its first device."""
    return 0 if shape.prequantized else shape.head_dim * 4


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: float) -> int:
    """The peak activations of one forward pass over a prompt of ``tokens`` tokens (fused attention: the
    attention matrix is not stored): the hidden states, q/k/v, and the MLP's intermediate products."""
    per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size
    return int(tokens * per_token * dtype_bytes)


def _accelerate_fill(shape: ModelShape, opts: LoadOptions, gpus: list[Any], split: tuple[float, ...], mode: str,
                     b: float) -> list[tuple[Block, str]]:
    """Blocks in order onto the devices accelerate is given (the GPUs named by --gpu-split, or every GPU
    up to its usable memory without it, then the CPU up to --cpu-memory or without a limit, then disk),
    each up to its budget; bitsandbytes asks for 10% headroom."""
    budgets: list[tuple[str, float]] = []
    factor = 0.9 if mode != "plain" else 1.0
    largest = max((block_bytes(blk, "plain", b, opts) for blk in shape.blocks), default=0)
    # without --gpu-split the loader gives each GPU its free memory less a reserve (GPU_RESERVE)
    sizes = [gib * GiB for gib in split[: len(gpus)]] if split else \
        [(g.free_bytes or g.memory_bytes * GPU_USABLE) * (1 - GPU_RESERVE) for g in gpus]
    for i, size in enumerate(sizes):
        budgets.append((f"cuda:{i}", max(size * factor - largest, 0)))
    limit = opts.cpu_memory_limit
    budgets.append(("cpu", limit * GiB * factor if limit is not None else float("inf")))
    budgets.append(("disk", float("inf")))
    placed: list[tuple[Block, str]] = []
    slot, used = 0, 0.0
    for blk in shape.blocks:
        while True:
            device, budget = budgets[slot]
            quantized = mode != "plain" and device.startswith("cuda")
            size = block_bytes(blk, mode if quantized else "plain", b, opts)
            if used + size <= budget or device == "disk":
                placed.append((blk, device))
                used += size
                break
            slot, used = slot + 1, 0.0
    return placed


def _ordered(devices: dict[str, DeviceMemory]) -> dict[str, DeviceMemory]:
    order = sorted(devices, key=lambda d: (not d.startswith("cuda"), d == "disk", d))
    return {d: devices[d] for d in order if devices[d].total or d.startswith("cuda") or devices[d].blocks}


# -------------------------------------------------------------------------------------------- llama.cpp


def llamacpp_compute_bytes(shape: ModelShape, n_ctx: int, n_batch: int, flash_attn: bool) -> int:
    """llama.cpp's compute buffer: a batch's logits, hidden states and (without flash attention) its
    attention scores over the whole context."""
    scores = 0 if flash_attn else n_ctx * shape.heads
    return int(n_batch * 4 * (shape.vocab_size + scores + 8 * shape.hidden_size))


def llamacpp_gpu_layers(shape: ModelShape, opts: LoadOptions, machine: Machine) -> tuple[int, bool]:
    """(layers on the GPU, whether the output layer is too), as llama.cpp decides from --n-gpu-layers."""
    if not machine.llama_cpp_offloads:
        return 0, False
    n = shape.layers if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, shape.layers)
    return n, opts.n_gpu_layers < 0 or opts.n_gpu_layers > shape.layers


def _llamacpp(shape: ModelShape, opts: LoadOptions, machine: Machine, context: int | None) -> Estimate:
    if shape.format != GGUF_FORMAT:
        raise_not_gguf(shape)
    n_ctx = int(context or opts.n_ctx or default_n_ctx(shape.metadata, opts))
    gpu_layers, output_on_gpu = llamacpp_gpu_layers(shape, opts, machine)
    notes: list[str] = list(shape.notes)
    if opts.n_gpu_layers != 0 and machine.gpus and not machine.llama_cpp_offloads:
        notes.append("this llama-cpp-python has no GPU support: every layer runs on the CPU")
    kv_total = kv_cache_bytes(shape.metadata, n_ctx, opts)
    if kv_total is None:
        kv_total = int(n_ctx * shape.kv_bytes_per_token(2))
    gpu_names = _llama_gpu_names(machine, opts, gpu_layers)
    devices: dict[str, DeviceMemory] = {}
    first_gpu_layer = shape.layers - gpu_layers
    layer_index = 0
    for blk in shape.blocks:
        if blk.name.startswith("layer"):
            on_gpu = layer_index >= first_gpu_layer
            device = gpu_names[(layer_index - first_gpu_layer) * len(gpu_names) // max(gpu_layers, 1)] if on_gpu else "cpu"
            layer_index += 1
            mem = devices.setdefault(device, DeviceMemory())
            mem.kv_cache += kv_total // max(shape.layers, 1)
        elif blk.name == "head" and output_on_gpu and gpu_names:
            device = gpu_names[-1]
            mem = devices.setdefault(device, DeviceMemory())
        else:
            device = "cpu"
            mem = devices.setdefault(device, DeviceMemory())
        mem.weights += blk.stored_bytes or 0
        mem.blocks += 1
    # unset, llama.cpp may turn flash attention on by itself: counted as off, the larger buffer
    compute = llamacpp_compute_bytes(shape, n_ctx, opts.n_batch, bool(opts.flash_attn))
    if gpu_layers:
        devices[gpu_names[0]].overhead += compute
        for name in gpu_names:
            devices.setdefault(name, DeviceMemory()).overhead += CUDA_RUNTIME_BYTES
    else:
        devices.setdefault("cpu", DeviceMemory()).overhead += compute
    if not opts.no_mmap and devices.get("cpu") and devices["cpu"].weights:
        notes.append("CPU weights are memory-mapped from the file: they count as page cache, read as needed")
    return Estimate(shape.name, LLAMACPP, opts.changed(), n_ctx, shape.quantization or "GGUF",
                    _ordered(devices), notes, shape)


def _llama_gpu_names(machine: Machine, opts: LoadOptions, gpu_layers: int) -> list[str]:
    if not gpu_layers or not machine.gpus:
        return []
    count = len(opts.gpu_split_values) or len(machine.gpus)
    return [f"cuda:{i}" for i in range(min(count, len(machine.gpus)))]


def raise_not_gguf(shape: ModelShape) -> None:
    from ..errors import OptionError

    raise OptionError(f"{shape.name} is not a GGUF file; llama.cpp loads only .gguf models",
                      "use --loader transformers (or --loader auto)")
