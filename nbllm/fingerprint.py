"""Moved: the weights sha256 cache is :mod:`nbllm.store`'s (it owns nbllm's bookkeeping files).

Kept so ``engine.py``'s ``from .fingerprint import weights_sha256`` still works; import from
:mod:`nbllm.store` instead, then delete this module.
"""

from __future__ import annotations

from .store import cache_dir, file_sha256, weights_sha256

__all__ = ["cache_dir", "file_sha256", "weights_sha256"]
