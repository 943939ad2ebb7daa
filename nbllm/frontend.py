"""Which front end the user is typing into, so that a fix names a command they can run there.

The same library error reaches a notebook user (who runs ``%llm_download org/model``) and a shell user of
the ``nbllm`` console command (who runs ``nbllm download org/model``). The CLI says so with
:func:`set_front_end`; everything else is the notebook (the magics, the panels, the Python API).
"""

from __future__ import annotations

from typing import Literal

FrontEnd = Literal["notebook", "cli"]

_COMMANDS: dict[str, dict[FrontEnd, str]] = {
    "models": {"notebook": "%llm_models", "cli": "nbllm models"},
    "download": {"notebook": "%llm_download", "cli": "nbllm download"},
}

_current: FrontEnd = "notebook"


def set_front_end(name: FrontEnd) -> FrontEnd:
    """Name the commands of ``name`` in messages from now on (the CLI does, at start); returns the previous one."""
    global _current
    previous, _current = _current, name
    return previous


def command(name: Literal["models", "download"], args: str = "") -> str:
    """The command that does ``name`` in the front end in use: ``%llm_download org/m`` or ``nbllm download org/m``."""
    return f"{_COMMANDS[name][_current]} {args}".rstrip()
