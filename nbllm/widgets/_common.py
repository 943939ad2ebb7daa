"""What both panels share: the one-line error/note display, running a callback so that its errors
land in the panel, and refreshing live panels after every notebook cell (so a model loaded with
``%llm_load`` or a turn sent with ``%%llm_chat`` shows up in panels already on screen)."""

from __future__ import annotations

import html
import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import ipywidgets as W

from ..errors import NbllmError

log = logging.getLogger("nbllm.widgets")

T = TypeVar("T")

HELP_STYLE = "font-size: 11px; line-height: 1.35; color: var(--jp-ui-font-color2, #666); margin: 0 0 6px 2px"


class MessageLine(W.VBox):
    """Two single lines under a panel's buttons: the last error (red) and notes such as option warnings."""

    def __init__(self) -> None:
        self.error = W.HTML(layout=W.Layout(display="none"))
        self.error.add_class("nbllm-error")
        self.note = W.HTML(layout=W.Layout(display="none"))
        self.note.add_class("nbllm-note")
        super().__init__([self.error, self.note])

    @property
    def error_text(self) -> str:
        """The error shown now ('' when none): what tests and users read."""
        return self._error_text

    _error_text = ""

    def show_error(self, message: str) -> None:
        self._error_text = message
        self.error.value = (
            "<div style='color: var(--jp-error-color1, #c62828); white-space: nowrap; overflow: hidden; "
            f"text-overflow: ellipsis' title='{html.escape(message, quote=True)}'>⚠ {html.escape(message)}</div>"
        )
        self.error.layout.display = None

    @property
    def note_text(self) -> str:
        """The note shown now ('' when none)."""
        return self._note_text

    _note_text = ""

    def show_note(self, message: str) -> None:
        self._note_text = message
        self.note.value = (
            f"<div style='{HELP_STYLE}; color: var(--jp-warn-color1, #b26a00)'>{html.escape(message)}</div>"
            if message else ""
        )
        self.note.layout.display = None if message else "none"

    def clear(self) -> None:
        self._error_text = ""
        self.error.value = ""
        self.error.layout.display = "none"
        self.show_note("")


def guarded(messages: MessageLine, action: Callable[[], T]) -> T | None:
    """Run ``action``; show an :class:`NbllmError` (or any other failure) in ``messages`` in one line.

    Widget callbacks run inside the kernel's comm handler, where a raised exception reaches only the
    kernel log; the user must see it in the panel instead. Warnings raised by option validation
    (ineffective combinations) are shown as a note.
    """
    messages.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action()
        except NbllmError as exc:
            messages.show_error(exc.message)
            return None
        except Exception as exc:  # an unexpected bug: still one line in the panel, the traceback in the log
            log.exception("nbllm panel action failed")
            messages.show_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return None
        finally:
            notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            if notes:  # after any note the action itself showed
                messages.show_note("; ".join(n for n in dict.fromkeys([messages.note_text, *notes]) if n))
    return result


class Refreshable(Protocol):
    def refresh(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_hooked_shell: Any = None


def _after_cell(*_: Any) -> None:
    for panel in list(_live):
        try:
            panel.refresh()
        except Exception:  # a panel must never break the user's cells
            log.exception("refreshing an nbllm panel failed")


def track(panel: Refreshable) -> None:
    """Refresh ``panel`` after every cell the IPython shell runs (while the panel is alive)."""
    global _hooked_shell
    _live.add(panel)
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipywidgets needs IPython
        return
    shell = get_ipython()
    if shell is not None and shell is not _hooked_shell:
        shell.events.register("post_run_cell", _after_cell)
        _hooked_shell = shell


def untrack(panel: Refreshable) -> None:
    _live.discard(panel)


def refresh_all(except_: Any = None) -> None:
    """Refresh every live panel but ``except_`` (after one panel changed the shared engine)."""
    for panel in list(_live):
        if panel is not except_:
            try:
                panel.refresh()
            except Exception:
                log.exception("refreshing an nbllm panel failed")


def button(description: str, css: str, *, style: str = "", tooltip: str = "", icon: str = "") -> W.Button:
    """A button with a stable CSS class (``nbllm-<css>``) for tests and user styles."""
    b = W.Button(description=description, button_style=style, tooltip=tooltip, icon=icon,
                 layout=W.Layout(width="auto"))
    b.add_class(f"nbllm-{css}")
    return b


def title(text: str) -> W.HTML:
    return W.HTML(f"<b style='font-size: 14px'>{html.escape(text)}</b>")
