"""Memory a loaded model really takes: what the estimates are checked against, and what "what worked
here" records."""

from __future__ import annotations

import sys

from ..memory import model_memory

__all__ = ["measure_peak_memory", "model_memory", "reset_peak_memory"]


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
