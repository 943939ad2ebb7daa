"""A failure from a loader library, turned into its cause and fix (the guide's section 7, and more).

The loaders call :func:`failure_error` (or :func:`explain_failure` for the text) on an exception they
caught; it returns ``None`` for a failure it does not know, so the caller keeps its own message.

Most kinds are told apart by exception type (``torch.OutOfMemoryError``, ``MemoryError``,
``ModuleNotFoundError.name``). The libraries raise the others as plain ``ValueError``/``RuntimeError``/
``ImportError`` whose only distinguishing mark is their text, so those are matched against the phrases
in :data:`KNOWN_MESSAGES`, kept in this one table; the tests raise the real exceptions from the installed
libraries wherever that can be done on a CPU, so a change of wording shows up as a failing test.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import GenerationError, LoadError, NbllmError, NbllmWarning
from ..frontend import command
from ..loaders import LLAMACPP, auto_loader
from ..memory import format_memory
from ..options import LoadOptions
from ..source import ModelSource
from .estimate import CUDA_RUNTIME_BYTES, RAM_USABLE, as_options, device_budget, estimate, probe_cached
from .machine import LLAMA_CPP_CUDA_INSTALL, PIP_INSTALL, GiB, Machine
from .shape import ModelShape, model_shape

KNOWN_MESSAGES: dict[str, tuple[str, ...]] = {
    "cuda_oom": ("CUDA out of memory", "CUDA error: out of memory", "cudaMalloc failed: out of memory",
                 "failed to allocate CUDA", "CUBLAS_STATUS_ALLOC_FAILED"),
    "cpu_oom": ("DefaultCPUAllocator: can't allocate memory", "failed to allocate CPU buffer", "not enough memory"),
    "bnb_no_gpu": ("not available in CPU-only version of bitsandbytes", "compatible CUDA binary found",
                   "bitsandbytes native library functionality but it's not available",
                   "supported by the bitsandbytes version you have installed",
                   "bitsandbytes was compiled without GPU support"),
    "bnb_missing": ("quantization requires bitsandbytes",),
    "bnb_offload": ("Some modules are dispatched on the CPU or the disk",),
    "flash_missing": ("the package for FlashAttention2 doesn't seem to be installed",
                      "the package flash_attn seems to be not installed", "No module named 'flash_attn"),
    "flash_unsupported": ("FlashAttention only supports Ampere GPUs or newer", "does not support Flash Attention",
                          "Flash Attention 2 is not available on CPU", "FlashAttention2 has been toggled on"),
    "flash_dtype": ("FlashAttention only support fp16 and bf16 data type",
                    "Flash Attention 2 only supports torch.float16 and torch.bfloat16"),
    "remote_code": ("trust_remote_code=True", "contains custom code which must be executed"),
    "unknown_architecture": ("does not recognize this architecture",),
    "no_cuda": ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "CUDA driver version is insufficient",
                "no CUDA GPUs are available", "CUDA driver initialization failed"),
}
"""Failure kind → phrases the libraries put in their messages (transformers 5.x, bitsandbytes 0.4x-0.5x,
torch 2.x, llama.cpp's log), for the failures that have no exception type of their own."""

_IMPORT_TO_PIP = {
    "flash_attn": "flash-attn --no-build-isolation", "google": "protobuf", "sentencepiece": "sentencepiece",
    "tiktoken": "tiktoken", "einops": "einops", "bitsandbytes": "bitsandbytes", "accelerate": "accelerate",
    "llama_cpp": "'nbllm[llamacpp]'", "transformers": "'nbllm[transformers]'", "torch": "'nbllm[transformers]'",
    "timm": "timm", "tokenizers": "tokenizers", "safetensors": "safetensors", "triton": "triton",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and the ones it was raised from (loaders wrap library errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failure_kind(exc: BaseException) -> str | None:
    """Which known failure ``exc`` is (a key of :data:`KNOWN_MESSAGES`, or ``missing_module``), or None."""
    for err in _chain(exc):
        names = {cls.__name__ for cls in type(err).__mro__}
        text = str(err)
        if "OutOfMemoryError" in names:  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same)
            return "cuda_oom"
        for kind in ("cuda_oom", "bnb_no_gpu", "bnb_missing", "bnb_offload", "flash_missing", "flash_dtype",
                     "flash_unsupported", "remote_code", "unknown_architecture", "no_cuda", "cpu_oom"):
            if any(phrase in text for phrase in KNOWN_MESSAGES[kind]):
                return kind
        if isinstance(err, MemoryError):
            return "cpu_oom"
        if isinstance(err, ModuleNotFoundError) and err.name:
            return "flash_missing" if err.name.startswith("flash_attn") else "missing_module"
    return None


def _module_name(exc: BaseException) -> str | None:
    for err in _chain(exc):
        if isinstance(err, ModuleNotFoundError) and err.name:
            return err.name
    return None


def _name_of(model: Any) -> str:
    if model is None:
        return "the model"
    if isinstance(model, ModelShape):
        return model.name
    if isinstance(model, ModelSource):
        return model.name
    return Path(str(model)).name or str(model)


def failure_error(
    exc: BaseException,
    model: str | Path | ModelSource | ModelShape | None = None,
    options: LoadOptions | Mapping[str, Any] | None = None,
    machine: Machine | None = None,
    *,
    during: str = "load",
) -> NbllmError | None:
    """The :class:`~nbllm.errors.LoadError` (``during="load"``) or
    :class:`~nbllm.errors.GenerationError` (``during="generation"``) for ``exc``, with the cause and the
    fix; ``None`` if ``exc`` is not a failure this module knows. ``model``, ``options`` and ``machine``
    (this one if None) let an out-of-memory error say which option frees how much."""
    kind = failure_kind(exc)
    if kind is None:
        return None
    name = _name_of(model)
    opts = as_options(options) if options is not None else LoadOptions()
    cls: type[NbllmError] = GenerationError if during == "generation" else LoadError
    verb = "generating" if during == "generation" else f"loading {name}"
    if kind == "cuda_oom":
        cause = f"the GPU ran out of memory {verb}{_oom_detail(exc)}"
        if during == "generation":
            cause += " (the model is still loaded)"
        return cls(cause, _memory_fix(model, opts, machine, during, gpu=True))
    if kind == "cpu_oom":
        cause = f"the machine ran out of RAM {verb}{_cpu_detail(exc)}"
        return cls(cause, _memory_fix(model, opts, machine, during, gpu=False))
    if kind == "bnb_no_gpu":
        return cls(f"bitsandbytes cannot use the GPU {verb}: this bitsandbytes has no CUDA library for this torch",
                   "install one that matches torch's CUDA version: pip install -U bitsandbytes (python -m "
                   "bitsandbytes shows what it finds); or load without --load-in-4bit/--load-in-8bit")
    if kind == "bnb_missing":
        return cls("--load-in-4bit/--load-in-8bit need bitsandbytes, which is not installed",
                   f"install it: {PIP_INSTALL['bitsandbytes']}")
    if kind == "bnb_offload":
        return cls(f"the quantized model does not fit on the GPU {verb}",
                   f"offload the rest: add --gpu-split GIB and --cpu-memory GIB ({command('doctor', 'MODEL')} computes them)")
    if kind == "flash_missing":
        return cls("flash-attention 2 was asked for but the flash-attn package is not installed",
                   f"install it: {PIP_INSTALL['flash-attn']} (needs an NVIDIA GPU and CUDA); or use --attn sdpa")
    if kind == "flash_unsupported":
        return cls(f"flash-attention 2 cannot run here ({_first_line(exc)[:160]})",
                   "use --attn sdpa (flash-attention 2 needs an Ampere or newer NVIDIA GPU and a model that supports "
                   "it; a flash-attn built for another torch is reinstalled with pip install flash-attn "
                   "--no-build-isolation --force-reinstall)")
    if kind == "flash_dtype":
        return cls(f"flash-attention 2 runs only in float16 or bfloat16, and the model is in another dtype ({verb})",
                   "load it with --dtype bfloat16 (or float16), or with --attn sdpa")
    if kind == "remote_code":
        return cls(f"{name} ships its own model code and needs --trust-remote-code",
                   "add --trust-remote-code if you trust the repository it comes from")
    if kind == "unknown_architecture":
        arch = re.search(r"model type `([^`]+)`", str(exc))
        which = f" ({arch.group(1)})" if arch else ""
        return cls(f"this transformers does not know {name}'s architecture{which}",
                   "upgrade it: pip install -U transformers; if the model's repository ships its own code, add "
                   "--trust-remote-code instead")
    if kind == "no_cuda":
        machine = machine or probe_cached()
        why = machine.why_no_gpu or _first_line(exc)
        return cls(f"the GPU is not usable: {why}",
                   "load on the CPU with --device cpu, or install a CUDA build of torch and the NVIDIA driver "
                   f"({command('doctor')} shows what is missing)")
    module = _module_name(exc) or "a module"
    top = module.split(".")[0]
    pip = _IMPORT_TO_PIP.get(top, top.replace("_", "-"))
    return cls(f"{verb} needs the Python package {top!r}, which is not installed", f"install it: pip install {pip}")


def explain_failure(
    exc: BaseException,
    model: str | Path | ModelSource | ModelShape | None = None,
    options: LoadOptions | Mapping[str, Any] | None = None,
    machine: Machine | None = None,
    *,
    during: str = "load",
) -> str | None:
    """The one line (cause and fix) for ``exc``, or ``None`` when it is not a known failure."""
    error = failure_error(exc, model, options, machine, during=during)
    return None if error is None else error.message


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)")
_CAPACITY = re.compile(r"total capacity of ([\d.]+ [KMGT]i?B) of which ([\d.]+ [KMGT]i?B) is free")
_CPU_BYTES = re.compile(r"tried to allocate (\d+) bytes")


def _oom_detail(exc: BaseException) -> str:
    """``(tried to allocate 2.00 GiB; 1.02 GiB of 7.75 GiB free)`` from torch's message, when it says."""
    text = " ".join(str(e) for e in _chain(exc))
    parts = []
    tried = _TRIED.search(text)
    if tried:
        parts.append(f"tried to allocate {tried.group(1)}")
    cap = _CAPACITY.search(text)
    if cap:
        parts.append(f"{cap.group(2)} of {cap.group(1)} free")
    return f" ({'; '.join(parts)})" if parts else ""


def _cpu_detail(exc: BaseException) -> str:
    text = " ".join(str(e) for e in _chain(exc))
    match = _CPU_BYTES.search(text)
    return f" (tried to allocate {format_memory(int(match.group(1)))})" if match else ""


def _memory_fix(model: Any, opts: LoadOptions, machine: Machine | None, during: str, *, gpu: bool) -> str:
    """Which options free how much memory, from the estimates of this model (generic advice without it)."""
    generic_gpu = ("use --load-in-4bit (about a quarter of float16), offload layers with --gpu-split and "
                   "--cpu-memory, or a shorter context; for a GGUF, lower --n-gpu-layers or --n-ctx")
    generic_cpu = ("use --load-in-8bit or --load-in-4bit, --disk-offload with --cpu-memory, or a GGUF through "
                   "llama.cpp; close other programs using RAM")
    if model is None:
        return (("use a shorter prompt or fewer --max-new-tokens, or reload with less on the GPU: " if during ==
                 "generation" else "") + (generic_gpu if gpu else generic_cpu))
    try:
        shape = model_shape(model)
        machine = machine or probe_cached()
        return _memory_options(shape, opts, machine, during, gpu=gpu) or (generic_gpu if gpu else generic_cpu)
    except NbllmError:
        return generic_gpu if gpu else generic_cpu


def _memory_options(shape: ModelShape, opts: LoadOptions, machine: Machine, during: str, *, gpu: bool) -> str:
    device = "cuda" if gpu else "cpu"
    now = estimate(shape, opts, machine)
    used = now.on(device)
    fixes: list[str] = []

    def frees(label: str, changed: Mapping[str, Any], context: int | None = None) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NbllmWarning)
                other = estimate(shape, LoadOptions.from_dict({**opts.changed(), **changed}), machine, context=context)
        except NbllmError:
            return
        saved = used - other.on(device)
        if saved >= 2**28:
            fixes.append(f"{label} frees about {format_memory(saved)}")

    per_1k = int(1000 * (now.kv_cache_bytes / max(now.context, 1)))
    if during == "generation":
        fixes.append(f"a shorter prompt or fewer --max-new-tokens (every 1000 tokens hold {format_memory(per_1k)} of "
                     "KV cache)")
    loader = opts.loader if opts.loader != "auto" else auto_loader(shape.format).name
    if loader == LLAMACPP:
        if gpu:
            layers = _layers_that_fit(shape, opts, machine)
            if layers is not None:
                frees(f"--n-gpu-layers {layers}", {"n_gpu_layers": layers})
        half = max(now.context // 2, 512)
        frees(f"--n-ctx {half}", {"n_ctx": half})
        if opts.cache_type == "fp16":
            frees("--cache-type q8_0 --flash-attn", {"cache_type": "q8_0", "flash_attn": True})
    else:
        if not opts.load_in_4bit:
            frees("--load-in-4bit", {"load_in_4bit": True, "load_in_8bit": False})
        if not opts.load_in_4bit and not opts.load_in_8bit:
            frees("--load-in-8bit", {"load_in_8bit": True})
        if gpu and not opts.gpu_split and machine.gpus:
            cuda0 = now.devices.get("cuda:0")
            room = (device_budget(machine, "cuda:0") or 0) - CUDA_RUNTIME_BYTES - (
                cuda0.kv_cache + cuda0.overhead if cuda0 else 0)
            split = max(math.floor(room / GiB * 2) / 2, 0.5)
            ram = max(int(machine.ram_bytes * RAM_USABLE / GiB), 1)
            frees(f"--gpu-split {split:g} --cpu-memory {ram} (the layers that do not fit wait in RAM, unquantized; "
                  "slow)", {"gpu_split": f"{split:g}", "cpu_memory": ram})
        if during != "generation":
            half = max(now.context // 2, 512)
            frees(f"planning for {half} tokens of context instead of {now.context}", {}, context=half)
    if not fixes:
        return ""
    return "; ".join(fixes) + (f" ({command('doctor', shape.name)} shows a plan that fits)" if during != "generation" else "")


def _layers_that_fit(shape: ModelShape, opts: LoadOptions, machine: Machine) -> int | None:
    for k in range(shape.layers - 1, -1, -1):
        est = estimate(shape, LoadOptions.from_dict({**opts.changed(), "n_gpu_layers": k}), machine)
        if all(est.on(f"cuda:{i}") <= (device_budget(machine, f"cuda:{i}") or 0) for i in range(len(machine.gpus))):
            return k
    return None


def install_hint(package: str) -> str:
    """The pip command for a package nbllm can use (``llama-cpp-python`` with CUDA: the rebuild)."""
    if package == "llama-cpp-python-cuda":
        return LLAMA_CPP_CUDA_INSTALL
    return PIP_INSTALL.get(package, f"pip install {package}")
