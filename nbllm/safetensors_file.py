"""What nbllm checks in a safetensors file before a library reads it: a whole header, and every tensor
inside the file. Its own module so that the Transformers loader and the adapters share it without
importing each other."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import LoadError


def check_safetensors(path: Path, *, what: str = "model") -> dict[str, Any]:
    """Fail early, before the current model is released, on a truncated or damaged safetensors file;
    return its header (tensor name → dtype, shape, data offsets). ``what`` names it in the fix."""
    size = path.stat().st_size
    damaged = LoadError(
        f"{path.name} is truncated or damaged", f"download the {what} again (nbllm download ... --check verifies it)"
    )
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise damaged
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise damaged from None
    if not isinstance(header, dict):
        raise damaged
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise damaged
    return header
