"""sha256 of model weights, cached by path, size and modification time so a file is hashed once."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_dir() -> Path:
    """nbllm's cache folder: ``$NBLLM_CACHE_DIR`` or ``~/.cache/nbllm``."""
    return Path(os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm")


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of one file, from the cache when the file has not changed since it was hashed."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    with _LOCK:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        return str(known[key])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    with _LOCK:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = value
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(index)
    return value


def weights_sha256(path: Path) -> dict[str, str]:
    """File name → sha256 of every weights file of a model (a GGUF file or a model folder)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    return {p.name: file_sha256(p) for p in files}
