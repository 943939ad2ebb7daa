"""Memory as nbllm shows it: one formatter for every status line, and the process's resident memory."""

from __future__ import annotations


def format_memory(n: int) -> str:
    """Bytes of memory in binary units, as a status line shows them (``0.7 MiB``, ``3.52 GiB``)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def process_rss() -> int:
    """This process's resident memory in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)
