"""Memory as nbllm shows it: one formatter for every status line, the process's resident memory, and
what a loaded torch model holds per device."""

from __future__ import annotations

from collections import Counter
from typing import Any


def format_memory(n: int) -> str:
    """Bytes of memory in binary units, as a status line shows them (``0.7 MiB``, ``3.52 GiB``)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def process_rss() -> int:
    """This process's resident memory in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


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
