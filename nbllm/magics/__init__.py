"""IPython magics: a thin layer over the nbllm library (``%load_ext nbllm``)."""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Register every nbllm magic with ``ipython``."""
    from .core import CoreMagics

    ipython.register_magics(CoreMagics)
