"""``%llm_settings`` and ``%llm_chat_panel``: show the ipywidgets panels (imported only when used)."""

from __future__ import annotations

from typing import Any

from IPython.core import magic_arguments
from IPython.core.magic import Magics, line_magic, magics_class

from ._common import lazy_arguments, parse_line, user_errors


@magics_class
class PanelMagics(Magics):
    """The settings panel and the chat panel, over the same engine and conversations as the magics."""

    @line_magic
    @user_errors
    def llm_settings(self, line: str) -> Any:
        """Show the settings panel: choose, download and load a model, set its options and the
        generation defaults of %%llm and %%llm_chat (needs ipywidgets: pip install 'nbllm[widgets]')."""
        from ..widgets import SettingsPanel

        return SettingsPanel()

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("name", nargs="?", default="default",
                              help="The conversation to show (default: default), the one %%llm_chat NAME uses.")
    @user_errors
    def llm_chat_panel(self, line: str) -> Any:
        """Show a chat panel over conversation NAME: replies stream in, Stop keeps what was written."""
        from ..widgets import ChatPanel

        args = parse_line(self.llm_chat_panel, line)
        return ChatPanel(args.name)
