"""ipywidgets panels over the nbllm library: :class:`SettingsPanel` (choose, download and load a model;
generation defaults) and :class:`ChatPanel` (a chat that streams replies). ``pip install 'nbllm[widgets]'``."""

from __future__ import annotations

try:
    import ipywidgets  # noqa: F401
    import markdown_it  # noqa: F401 - the chat panel renders markdown with it
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import missing_dependency

    raise missing_dependency({"markdown_it": "markdown-it-py"}.get(exc.name or "", "ipywidgets"), "widgets") from None

from .chat import ChatPanel
from .settings import SettingsPanel

__all__ = ["ChatPanel", "SettingsPanel"]
