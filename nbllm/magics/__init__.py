"""IPython magics: a thin layer over the nbllm library (``%load_ext nbllm``)."""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Register every nbllm magic with ``ipython`` (none of them imports torch or ipywidgets here)."""
    from .chat import ChatMagics
    from .core import CoreMagics
    from .experiments import ExperimentMagics
    from .lora import LoraMagics
    from .models import ModelMagics
    from .panels import PanelMagics
    from .scoring import ScoringMagics
    from .serve import ServeMagics

    for magics in (CoreMagics, ChatMagics, ModelMagics, PanelMagics, LoraMagics, ExperimentMagics, ServeMagics,
                   ScoringMagics):
        ipython.register_magics(magics)
    from .fit import FitMagics  # %llm_doctor

    ipython.register_magics(FitMagics)
