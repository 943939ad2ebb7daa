"""Reading a GGUF file's header and tensor table, without llama_cpp and without reading the weights.

The models folder uses it to name a file's quantization; the llama.cpp loader uses it to refuse a
file that is not a GGUF, a version llama.cpp cannot read, or a truncated download, before the
loaded model is released.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoadError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass
class GGUFHeader:
    """What nbllm reads from a GGUF file's header before handing it to llama.cpp."""

    version: int
    metadata: dict[str, Any]
    """Scalar and string key-values (arrays are left out: the vocabulary is not needed here)."""
    tensor_count: int
    data_end: int
    """Where the last tensor's data ends, in bytes (the file must be at least this long)."""
    unknown_types: set[int] = field(default_factory=set)
    """Tensor types this ``gguf`` package does not know the size of (their extent is not checked)."""

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))


class _Truncated(Exception):
    """Internal: the header runs past the end of the file or holds impossible values."""


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s GGUF header and tensor table, and check that every tensor lies inside the file.

    Raises :class:`~nbllm.errors.LoadError` with one line: not a GGUF file (a text file, an HTML error
    page, a Git LFS pointer), a GGUF version llama.cpp cannot read, or a truncated/damaged file.
    Reads only the header (memory-mapped), so it is cheap even for a file of many GiB.
    """
    name = path.name
    size = path.stat().st_size
    if size < 4:
        raise LoadError(f"{name} is not a GGUF file (it is {size} bytes long)", "check the path, or download it again")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic = buf[:4]
        if magic != GGUF_MAGIC:
            raise LoadError(f"{name} is not a GGUF file ({_what_it_is(buf[:64])})", _not_gguf_fix(buf[:64]))
        try:
            return _parse(buf, size)
        except _Truncated as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise LoadError(f"{name} is truncated or damaged{detail}", "download it again") from None
        except _UnsupportedVersion as exc:
            raise LoadError(
                f"{name} uses GGUF version {exc.args[0]}, which this llama.cpp cannot read",
                "download a newer conversion of the model (GGUF version 2 or 3)",
            ) from None


class _UnsupportedVersion(Exception):
    pass


def _what_it_is(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model's data"
    if text.startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page, probably an error page saved by a failed download"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "it does not start with the GGUF signature"


def _not_gguf_fix(head: bytes) -> str:
    if head.lstrip().lower().startswith(b"version https://git-lfs"):
        return "download the file itself (git lfs pull, or %llm_download)"
    return "check the path; if it should be a model, download it again"


def _parse(buf: mmap.mmap, size: int) -> GGUFHeader:
    pos = 4

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Truncated(f"the header ends early, at byte {size}")
        value = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += n
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if n > size - pos:
            raise _Truncated(f"the header ends early, at byte {size}" if n < 1 << 32 else "a string length is impossible")
        text = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return text

    def skip(vtype: int, depth: int = 0) -> None:
        nonlocal pos
        if vtype in _SCALARS:
            pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            n = take("Q")
            pos += n
        elif vtype == _ARRAY and depth < 2:
            etype, count = take("I"), take("Q")
            if count > size:
                raise _Truncated("an array length is impossible")
            if etype in _SCALARS:
                pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == _STRING:
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated(f"the header ends early, at byte {size}")
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                for _ in range(count):
                    skip(etype, depth + 1)
        else:
            raise _Truncated(f"unknown value type {vtype} in the header")
        if pos > size:
            raise _Truncated(f"the header ends early, at byte {size}")

    version = take("I")
    if version not in (2, 3):
        if version in (1,):
            raise _UnsupportedVersion(version)
        raise _Truncated(f"GGUF version {version} is not one that exists")
    n_tensors, n_kv = take("Q"), take("Q")
    if n_kv > size // 12 or n_tensors > size // 24:
        raise _Truncated("the header's counts are impossible")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        if vtype in _SCALARS:
            metadata[key] = take(_SCALARS[vtype])
        elif vtype == _STRING:
            metadata[key] = string()
        else:
            skip(vtype)
    tensors: list[tuple[int, int, int]] = []  # (offset, element count, type)
    for _ in range(n_tensors):
        string()
        n_dims = take("I")
        if n_dims > _MAX_DIMS:
            raise _Truncated(f"a tensor has {n_dims} dimensions")
        count = 1
        for _ in range(n_dims):
            count *= take("Q")
        ttype, offset = take("I"), take("Q")
        tensors.append((offset, count, ttype))
    alignment = int(metadata.get("general.alignment", 32)) or 32
    data_start = -(-pos // alignment) * alignment
    data_end, unknown = data_start, set()
    sizes = _type_sizes()
    for offset, count, ttype in tensors:
        if ttype in sizes:
            block, nbytes = sizes[ttype]
            end = data_start + offset + count // block * nbytes
        else:
            unknown.add(ttype)
            end = data_start + offset + 1
        data_end = max(data_end, end)
    if data_end > size:
        raise _Truncated(f"the file is {format_mb(size)} but its tensors need {format_mb(data_end)}")
    return GGUFHeader(version, metadata, n_tensors, data_end, unknown)


def _type_sizes() -> dict[int, tuple[int, int]]:
    """GGML tensor type → (block size, bytes per block), from the ``gguf`` package when installed."""
    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:
        return {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 30: (1, 2)}
    return {int(t): (int(b), int(n)) for t, (b, n) in GGML_QUANT_SIZES.items()}


def format_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"
