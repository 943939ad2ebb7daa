"""Everything nbllm knows about GGUF files: the header, the quantization, split models, bad files.

One reader, :func:`read_gguf_header`, used by the models listing, the llama.cpp loader's checks and
:mod:`nbllm.testing`. It is hand-written, not ``gguf.GGUFReader``, for two reasons:

- **Speed.** ``GGUFReader`` builds a numpy view for every element of every array, the vocabulary
  included: 6.7 s for a file with a 151k-token vocabulary (Qwen-sized) here, against 0.04 s for this
  reader, which skips arrays by their lengths. A listing reads every file's header and a load reads it
  twice; 7 s each is not acceptable.
- **Listing without the extra.** ``gguf`` comes with ``nbllm[llamacpp]``; ``%llm_models`` and
  ``nbllm models`` must work without it.

Where ``gguf`` is installed its tables are used, never copies: ``GGML_QUANT_SIZES`` (to check that every
tensor lies inside the file) and ``LlamaFileType`` (to name ``general.file_type``). Without it, tensors
of unknown size are checked by their offsets only and the quantization comes from the file name.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoadError
from .frontend import command

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9  # the spec's value types (gguf.GGUFValueType): scalars above, then these two
_MAX_DIMS = 4

_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})(?P<ext>\.gguf)$", re.IGNORECASE)
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]{1,3})*|TQ\d_\d|MXFP4(?:_MOE)?|BF16|F16|FP16|F32|FP32)(?![A-Za-z0-9])",
    re.IGNORECASE,
)


# ------------------------------------------------------------------------------------ names and parts


def gguf_files(folder: Path) -> list[Path]:
    """The GGUF files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")


def split_gguf_parts(file: Path) -> list[Path] | None:
    """All parts of a split GGUF model (``name-00001-of-00003.gguf``), or ``None`` if ``file`` is whole."""
    m = _SPLIT.match(file.name)
    if m is None:
        return None
    total = int(m["total"])
    return [file.with_name(f"{m['base']}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def unsplit_name(name: str) -> str:
    """The name of the model a GGUF part belongs to: ``m-00001-of-00002.gguf`` → ``m.gguf``."""
    return _SPLIT.sub(lambda m: m["base"] + m["ext"], name)


def gguf_models(files: Sequence[Path]) -> list[Path]:
    """GGUF files grouped into models: a split model counts once, by its first part; a multimodal
    projector (:func:`is_projector`) is not a model."""
    return [p for p in files if ((parts := split_gguf_parts(p)) is None or p == parts[0]) and not is_projector(p.name)]


def is_projector(name: str) -> bool:
    """Whether a GGUF file name is a multimodal projector (the vision encoder llama.cpp's libmtmd loads
    beside a model: ``mmproj-*.gguf``, as llama.cpp's ``convert_hf_to_gguf.py --mmproj`` names it, and as
    text-generation-webui finds it in a model's folder)."""
    return "mmproj" in name.lower() and name.lower().endswith(".gguf")


def projector_for(model: Path) -> Path | None:
    """The projector beside a GGUF model: a ``mmproj*.gguf`` file in its folder when the folder holds
    this one model (several projectors: the F16 one, else the first by name); ``None`` otherwise."""
    folder = model.parent
    try:
        files = gguf_files(folder)
    except OSError:
        return None
    projectors = [p for p in files if is_projector(p.name)]
    if not projectors or [m.name for m in gguf_models(files)] != [model.name]:
        return None
    return next((p for p in projectors if "f16" in p.name.lower()), projectors[0])


def pick_projector(paths: Sequence[str]) -> str | None:
    """The projector to download with a GGUF model from a repository's file paths (the F16 one, else the
    first by name), or ``None`` when the repository has none."""
    projectors = sorted(p for p in paths if is_projector(p.rsplit("/", 1)[-1]))
    return next((p for p in projectors if "f16" in p.lower()), projectors[0] if projectors else None)


def quantization_from_name(name: str) -> str | None:
    """The quantization named in a GGUF file name (``model.Q4_K_M.gguf`` → ``Q4_K_M``), if any."""
    stem = unsplit_name(name)
    found = _QUANT_IN_NAME.findall(stem.removesuffix(".gguf").removesuffix(".GGUF"))
    if not found:
        return None
    quant = found[-1].upper()
    return {"FP16": "F16", "FP32": "F32"}.get(quant, quant)


def file_type_name(code: object) -> str | None:
    """llama.cpp's name of a ``general.file_type`` code (``15`` → ``Q4_K_M``), from ``gguf.LlamaFileType``.

    ``None`` for an unknown code, or without the ``gguf`` package (the name is then read from the file name).
    """
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    try:
        from gguf import LlamaFileType

        member = LlamaFileType(code)
    except (ImportError, ValueError):
        return None
    if member.name == "GUESSED":
        return None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


# ------------------------------------------------------------------------------------------ the header


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
    """Tensor types whose size is not known here (their extent is checked by offset only)."""
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Tensor name → its dimensions as the file lists them (ggml order: the row length first)."""

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    @property
    def file_type(self) -> str | None:
        """The quantization ``general.file_type`` names (``Q4_K_M``, ``F16``...), if it says one."""
        return file_type_name(self.metadata.get("general.file_type"))

    @property
    def is_adapter(self) -> bool:
        """Whether the file is an adapter (a LoRA for a model), not a model: ``general.type`` says so."""
        return self.metadata.get("general.type") == "adapter"


class GGUFError(LoadError):
    """A file llama.cpp cannot load, as its header shows: one line with the cause and the fix.

    ``problem`` is the cause without the file's name (the models listing shows it in its status column).
    """

    def __init__(self, path: Path, problem: str, fix: str, *, verb: str = "is") -> None:
        self.problem = problem
        super().__init__(f"{path.name} {verb} {problem}", fix)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s GGUF header and tensor table, and check that every tensor lies inside the file.

    Raises :class:`GGUFError` (a :class:`~nbllm.errors.LoadError`) with one line: not a GGUF file (an
    empty or text file, an HTML error page, a Git LFS pointer), a GGUF version llama.cpp cannot read, or
    a truncated/damaged file. Reads only the header (memory-mapped), so it is cheap even for many GiB.
    """
    size = path.stat().st_size
    if size < 4:
        what = "it is empty" if size == 0 else f"it is {size} bytes long"
        raise GGUFError(path, f"not a GGUF file ({what})", "check the path, or download it again")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            head = bytes(buf[:64])
            raise GGUFError(path, f"not a GGUF file ({_what_it_is(head)})", _not_gguf_fix(head))
        try:
            return _parse(buf, size)
        except _Truncated as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise GGUFError(path, f"truncated or damaged{detail}", "download it again") from None
        except _UnsupportedVersion as exc:
            raise GGUFError(
                path,
                f"GGUF version {exc.args[0]}, which this llama.cpp cannot read",
                "download a newer conversion of the model (GGUF version 2 or 3)",
                verb="uses",
            ) from None


def inspect_gguf(model: Path) -> tuple[GGUFHeader | None, str | None]:
    """The header of GGUF model ``model`` and what makes it unloadable (``None``: it looks whole).

    Every part of a split model is checked; a problem in a later part names that part.
    """
    first: GGUFHeader | None = None
    for part in split_gguf_parts(model) or [model]:
        where = "" if part == model else f"{part.name}: "
        try:
            header = read_gguf_header(part)
        except GGUFError as exc:
            return first, where + exc.problem
        except OSError as exc:
            return first, f"{where}unreadable ({exc.strerror or type(exc).__name__})"
        first = first or header
    if first is not None and first.is_adapter:
        return first, adapter_not_model(model).problem
    return first, None


def adapter_not_model(path: Path) -> GGUFError:
    """The error for a GGUF adapter given where a model is expected (the listing shows its ``problem``)."""
    return GGUFError(path, "a LoRA adapter, not a model",
                     f"load the model it was made for, then apply the adapter with {command('lora add', path.name)}")


class _Truncated(Exception):
    """Internal: the header runs past the end of the file or holds impossible values."""


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
        return f"download the file itself (git lfs pull, or {command('download')})"
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
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        if n_dims > _MAX_DIMS:
            raise _Truncated(f"a tensor has {n_dims} dimensions")
        dims = tuple(take("Q") for _ in range(n_dims))
        ttype, offset = take("I"), take("Q")
        tensors.append((offset, math.prod(dims), ttype))
        shapes[name] = dims
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
        raise _Truncated(f"the file is {_format_mb(size)} but its tensors need {_format_mb(data_end)}")
    return GGUFHeader(version, metadata, n_tensors, data_end, unknown, shapes)


def _type_sizes() -> dict[int, tuple[int, int]]:
    """GGML tensor type → (block size, bytes per block), from the ``gguf`` package (empty without it)."""
    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:
        return {}
    return {int(t): (int(b), int(n)) for t, (b, n) in GGML_QUANT_SIZES.items()}


def _format_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"
