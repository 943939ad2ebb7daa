"""Memory a loaded model really takes: what the estimates are checked against, and what "what worked
here" records."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any


def model_memory(model: Any) -> dict[str, int]:
    """Bytes per device of every tensor a loaded torch model holds: parameters, buffers, and the
    quantization constants bitsandbytes keeps beside its weights (4-bit scales and code tables, 8-bit row
    scales), which are neither parameters nor buffers. Tensors on the meta device are offloaded to disk."""
    memory: Counter[str] = Counter()

    def add(tensor: Any) -> None:
        if tensor is None:
            return
        device = "disk" if tensor.device.type == "meta" else str(tensor.device)
        memory[device] += tensor.numel() * tensor.element_size()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
                add(state.state2.absmax)
                add(state.state2.code)
                add(getattr(state, "offset", None))
        add(getattr(weight, "SCB", None))
    return dict(memory)


def measure_peak_memory() -> dict[str, int]:
    """Peak memory of this process so far: each CUDA device's peak allocation (when torch has already
    used CUDA) and the process's peak resident memory (``cpu``)."""
    out: dict[str, int] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    out[f"cuda:{i}"] = int(torch.cuda.max_memory_allocated(i))
        except Exception:
            pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["cpu"] = int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        pass
    return out


def reset_peak_memory() -> None:
    """Start CUDA's peak counters afresh (call before a load, so its record shows that load's peak). The
    process's peak RSS cannot be reset: ``cpu`` stays the process's lifetime peak."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
    except Exception:
        pass
