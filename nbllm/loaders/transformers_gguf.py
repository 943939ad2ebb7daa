"""A GGUF file through the Transformers loader (``--loader transformers``), as transformers' own GGUF
support reads it: every tensor dequantized (to float32, or the ``--dtype`` asked for) into an ordinary
PyTorch model, so Transformers' tools (PEFT adapters, scoring, ``--compile``) work on it. The price is
memory: a Q4 file takes about 6-7 times its size once dequantized to float32.

Cheap checks before anything is released (:func:`check_gguf`), the arguments that point transformers at
the file (:func:`gguf_arguments`), and the words status lines, notes and records use (:func:`dequantized`).
torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import LoadError, missing_dependency
from ..gguf_file import GGUFHeader, adapter_not_model, read_gguf_header, split_gguf_parts
from ..memory import format_memory


def supported_architectures() -> list[str]:
    """The architectures this transformers turns GGUF files into models of (its own list)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def _plain(name: str) -> str:
    """An architecture name without separators: GGUF writes ``qwen3moe`` and ``gpt-oss`` where transformers
    lists ``qwen3_moe`` and ``gpt_oss``."""
    return name.lower().replace("-", "").replace("_", "")


def check_gguf(file: Path) -> GGUFHeader:
    """Refuse, in one line, a GGUF file that transformers cannot load: ``gguf`` missing (transformers
    reads the file with it), an adapter, a split model, an architecture transformers does not convert."""
    if importlib.util.find_spec("gguf") is None:
        raise missing_dependency("gguf (transformers reads GGUF files with it)", "llamacpp")
    header = read_gguf_header(file)
    if header.is_adapter:
        raise adapter_not_model(file)
    if split_gguf_parts(file):
        raise LoadError(f"{file.name} is one part of a split GGUF model, which transformers does not load",
                        "load it with --loader llama.cpp (or --loader auto)")
    supported = supported_architectures()
    if _plain(header.architecture) not in {_plain(a) for a in supported}:
        raise LoadError(
            f"{file.name} is a {header.architecture} GGUF, an architecture transformers does not load from GGUF "
            f"(it loads {', '.join(supported)})",
            "load it with --loader llama.cpp (or --loader auto)",
        )
    return header


def gguf_arguments(file: Path) -> tuple[str, dict[str, Any]]:
    """``from_pretrained``'s folder and keyword arguments for a GGUF file (the same for the config, the
    model and the tokenizer)."""
    return str(file.parent), {"gguf_file": file.name}


def dequantized(file: Path, model: Any, memory_bytes: int) -> tuple[str, str]:
    """What loading ``file`` through transformers did, in words: (the status line and the record's
    ``dequantized``, the note line)."""
    quant = read_gguf_header(file).file_type or "quantized"
    dtype = str(model.dtype).removeprefix("torch.")
    size = file.stat().st_size
    words = (f"{quant} GGUF ({format_memory(size)}) to {dtype}: {format_memory(memory_bytes)} in memory, "
             f"{memory_bytes / size:.1f}x the file")
    note = (f"GGUF through transformers: every weight was dequantized from {quant} to {dtype} "
            f"({format_memory(memory_bytes)} in memory against {format_memory(size)} on disk), and decoding runs in "
            f"{dtype}; --loader llama.cpp runs the file as it is, in less memory")
    return words, note
