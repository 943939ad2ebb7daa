"""Memory as nbllm shows it: one formatter for every status line, the process's resident memory, and
what a loaded torch model holds per device."""

from __future__ import annotations

import gc
import sys
import traceback
from collections import Counter
from collections.abc import Mapping
from typing import Any


def format_memory(n: int) -> str:
    """Bytes of memory in binary units, as a status line shows them (``0.7 MiB``, ``3.52 GiB``)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def process_rss() -> int:
    """This process's resident memory in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def model_memory(model: Any, device_map: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Bytes per device of every tensor a loaded torch model holds: parameters, buffers, and the
    quantization constants bitsandbytes keeps beside its weights (4-bit scales and code tables, 8-bit row
    scales), which are neither parameters nor buffers.

    A tensor on the meta device is offloaded: accelerate keeps the weights of a module it offloads to
    the CPU in RAM and those it offloads to disk in files, and leaves both modules' own tensors on meta.
    ``device_map`` (the model's ``hf_device_map``) tells the two apart; without it, meta is disk."""
    memory: Counter[str] = Counter()
    entries = sorted(((str(k), v) for k, v in (device_map or {}).items()), key=lambda kv: -len(kv[0]))

    def offloaded_to(name: str) -> str:
        for prefix, device in entries:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return "cpu" if str(device) == "cpu" else "disk"
        return "disk"

    def add(name: str, tensor: Any) -> None:
        if tensor is None:
            return
        device = offloaded_to(name) if tensor.device.type == "meta" else str(tensor.device)
        memory[device] += tensor.numel() * tensor.element_size()

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        add(name, tensor)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            add(name, getattr(state, "absmax", None))
            add(name, getattr(state, "code", None))
            if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
                add(name, state.state2.absmax)
                add(name, state.state2.code)
                add(name, getattr(state, "offset", None))
        add(name, getattr(weight, "SCB", None))
    return dict(memory)


def collect() -> None:
    """Collect garbage and return the CUDA allocator's cached blocks to the device (when torch is in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_frames(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s tracebacks, along its whole chain
    (``__cause__`` and ``__context__``), then :func:`collect`.

    A failed load or generation keeps, in those frames, what it was building: a partly loaded model, a KV
    cache, activations. Alive, they hold the memory that the previous model needs to load again, and
    IPython keeps the error (``sys.last_value``) after the cell. Frames still running (the caller's) are
    left as they are."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        group = getattr(current, "exceptions", None)
        if isinstance(group, tuple):
            pending += [e for e in group if isinstance(e, BaseException)]
    collect()
