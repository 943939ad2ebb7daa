"""What both panels share: the one-line error/note display, running a callback so that its errors
land in the panel, and refreshing live panels after every notebook cell (so a model loaded with
``%llm_load`` or a turn sent with ``%%llm_chat`` shows up in panels already on screen)."""

from __future__ import annotations

import contextlib
import html
import logging
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import ipywidgets as W

from ..errors import NbllmError

log = logging.getLogger("nbllm.widgets")

T = TypeVar("T")

HELP_STYLE = "font-size: 11px; line-height: 1.35; color: var(--jp-ui-font-color2, #666); margin: 0 0 6px 2px"

WRAP = "white-space: normal; overflow-wrap: break-word"
"""A message wraps inside its panel: never a line cut off behind a scrollbar (a word is broken only
when it is longer than the line)."""

INFO_COLOR = "var(--jp-ui-font-color1, #333)"
"""Information and success (saved, downloaded, loaded with these notes): the text's own colour."""

WARN_COLOR = "var(--jp-warn-color1, #b26a00)"
"""Warnings (an option that has no effect here): orange."""

PanelWords = Callable[[NbllmError], str]
"""How a panel words a library error for its user (naming its buttons and fields, not flags)."""


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
            f"<div style='color: var(--jp-error-color1, #c62828); {WRAP}; font-size: 12px; line-height: 1.35'>"
            f"⚠ {html.escape(message)}</div>"
        )
        self.error.layout.display = None

    @property
    def note_text(self) -> str:
        """The note shown now ('' when none)."""
        return self._note_text

    _note_text = ""

    def show_note(self, message: str = "", *, info: str = "") -> None:
        """Show a warning (``message``, orange) and information (``info``, in the text's colour) in the
        note line; both empty: no note."""
        parts = [(WARN_COLOR, message), (INFO_COLOR, info)]
        self._note_text = "; ".join(text for _color, text in parts if text)
        self._warning_text = message
        self.note.value = "".join(
            f"<div class='nbllm-note-{'warning' if color == WARN_COLOR else 'info'}' "
            f"style='{HELP_STYLE}; {WRAP}; color: {color}'>{html.escape(text)}</div>"
            for color, text in parts if text
        )
        self.note.layout.display = None if self._note_text else "none"

    def show_info(self, message: str) -> None:
        """Show information or a success (not a warning) in the note line."""
        self.show_note(info=message)

    @property
    def warning_text(self) -> str:
        """The warning part of the note ('' when none)."""
        return self._warning_text

    _warning_text = ""

    @property
    def info_text(self) -> str:
        """The information part of the note ('' when none)."""
        return self._note_text.removeprefix(self._warning_text).removeprefix("; ")

    def clear_error(self) -> None:
        self._error_text = ""
        self.error.value = ""
        self.error.layout.display = "none"

    def clear(self) -> None:
        self.clear_error()
        self.show_note("")


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _option_flags() -> dict[str, str]:
    """Every option's flag → its name (the label of its field)."""
    from ..options import GenerationOptions, LoadOptions

    return {s.flag: s.name for s in [*LoadOptions.specs(), *GenerationOptions.specs()]}


def panel_words(text: str) -> str:
    """A library message in the panel's words: an option's flag (``--quant-type``) becomes the name its
    field is labelled with (``quant_type``)."""
    flags = _option_flags()
    return _FLAG.sub(lambda m: flags.get(m.group(0), m.group(0)), text)


def named_options(text: str) -> list[str]:
    """The options a message names (by flag or by name), in the order it names them: the first is
    what the message is about (*quant_type only affects load_in_4bit*)."""
    names = set(_option_flags().values())
    words = re.findall(r"(?<![\w-])[a-z][a-z0-9_]*", panel_words(text))
    return list(dict.fromkeys(w for w in words if w in names))


def guarded(messages: MessageLine, action: Callable[[], T], words: PanelWords | None = None) -> T | None:
    """Run ``action``; show an :class:`NbllmError` (or any other failure) in ``messages`` in one line.

    Widget callbacks run inside the kernel's comm handler, where a raised exception reaches only the
    kernel log; the user must see it in the panel instead. ``words`` rewords a library error for the
    panel (by its type). Warnings raised meanwhile (ineffective combinations) are shown as a note.
    """
    messages.clear()
    result: T | None = None
    with collected_notes() as notes:
        try:
            result = action()
        except NbllmError as exc:
            messages.show_error(words(exc) if words is not None else exc.message)
        except Exception as exc:  # an unexpected bug: still one line in the panel, the traceback in the log
            log.exception("nbllm panel action failed")
            messages.show_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
    if notes:  # after any note the action itself showed
        messages.show_note("; ".join(n for n in dict.fromkeys([messages.warning_text, *notes]) if n),
                           info=messages.info_text)
    return result


_notes_by_thread: dict[int, list[str]] = {}
_shown_elsewhere: Any = None


def _route_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                   line: str | None = None) -> None:
    """``warnings.showwarning`` while a panel collects notes: a user warning raised on a collecting
    thread goes to that thread's notes; anything else is shown as before."""
    notes = _notes_by_thread.get(threading.get_ident())
    if notes is not None and issubclass(category, UserWarning):
        notes.append(str(message))
        return
    _shown_elsewhere(message, category, filename, lineno, file, line)


class panel_notes:  # noqa: N801 - used as a context manager, like warnings.catch_warnings
    """Collect the user warnings raised on this thread (a panel's action or its load worker) as notes.

    ``warnings.catch_warnings`` is not thread-safe: one entered on a worker while a cell enters another
    restores the wrong state and can leave the kernel's warnings captured for good. This hooks
    ``warnings.showwarning`` while some thread collects and routes by thread. (Python's filters still
    apply: a note repeated at the same place may be shown once until some code changes the filters.)
    """

    def __enter__(self) -> list[str]:
        global _shown_elsewhere
        self.notes: list[str] = []
        with _hook_lock:
            if not _notes_by_thread:
                _shown_elsewhere = warnings.showwarning
                warnings.showwarning = _route_warning
            self.outer = _notes_by_thread.get(threading.get_ident())
            _notes_by_thread[threading.get_ident()] = self.notes
        return self.notes

    def __exit__(self, *_: Any) -> None:
        with _hook_lock:
            if self.outer is not None:
                _notes_by_thread[threading.get_ident()] = self.outer
                self.outer.extend(self.notes)
            else:
                del _notes_by_thread[threading.get_ident()]
            if not _notes_by_thread and warnings.showwarning is _route_warning:
                warnings.showwarning = _shown_elsewhere


_hook_lock = threading.Lock()


@contextlib.contextmanager
def collected_notes() -> Iterator[list[str]]:
    """The user warnings raised in the block, as notes: on the kernel's main thread (where widget
    callbacks and cells run one at a time) every one of them, through ``catch_warnings``; on a
    worker thread through :class:`panel_notes`."""
    if threading.current_thread() is not threading.main_thread():
        with panel_notes() as routed:
            yield routed
        return
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            notes.extend(str(w.message) for w in caught if issubclass(w.category, UserWarning))


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


def joined(worker: threading.Thread | None, timeout: float | None) -> bool:
    """Wait for a panel's worker thread (a reply, a load) to end; False if it is still running after
    ``timeout`` seconds."""
    if worker is not None:
        worker.join(timeout)
        return not worker.is_alive()
    return True


def button(description: str, css: str, *, style: str = "", tooltip: str = "", icon: str = "") -> W.Button:
    """A button with a stable CSS class (``nbllm-<css>``) for tests and user styles."""
    b = W.Button(description=description, button_style=style, tooltip=tooltip, icon=icon,
                 layout=W.Layout(width="auto"))
    b.add_class(f"nbllm-{css}")
    return b


def title(text: str) -> W.HTML:
    return W.HTML(f"<b style='font-size: 14px'>{html.escape(text)}</b>")


# -- a dead kernel --------------------------------------------------------------------------------

HEARTBEAT_SECONDS = 2.0
"""How often the kernel tells its panels on the page that it is alive."""

DEAD_AFTER_SECONDS = 15.0
"""How long the page waits for a beat before it says the kernel behind a panel is gone (long enough
for a kernel that holds Python's lock for a while, e.g. in a first ``import torch``)."""

_BEAT_JS = """
(function (element) {
  // nbllm: say on the page when the kernel behind this panel is gone (restarted, shut down, dead).
  // The kernel changes the panel's heartbeat every HEARTBEAT ms; with none for DEAD ms the panel is
  // marked dead and its controls disabled; a beat again (a busy kernel) undoes it.
  const HEARTBEAT = %(heartbeat)d, DEAD = %(dead)d;
  let root = null, last = null, seen = Date.now();
  const controls = 'button, input, select, textarea';
  const mark = (dead) => {
    if (dead === root.classList.contains('nbllm-dead')) return;
    root.classList.toggle('nbllm-dead', dead);
    let note = root.querySelector(':scope > .nbllm-dead-note');
    if (dead) {
      if (!note) {
        note = document.createElement('div');
        note.className = 'nbllm-dead-note';
        note.setAttribute('role', 'alert');
        note.style.cssText = 'color: var(--jp-error-color1, #c62828); font-size: 12px; margin: 2px 0 6px 0; '
          + 'white-space: normal; overflow-wrap: break-word';
        note.textContent = '⚠ The kernel behind this panel is gone (restarted or shut down): its buttons do '
          + 'nothing now. Run the panel\\'s cell again for a panel of the running kernel.';
        root.insertBefore(note, root.firstChild);
      }
      for (const el of root.querySelectorAll(controls)) {
        if (!el.disabled) { el.disabled = true; el.dataset.nbllmDead = '1'; }
      }
    } else {
      if (note) note.remove();
      for (const el of root.querySelectorAll('[data-nbllm-dead]')) { el.disabled = false; delete el.dataset.nbllmDead; }
    }
  };
  const timer = setInterval(() => {
    root = root || element.closest('.nbllm-panel');
    if (!root) return;  // not on the page yet
    if (!root.isConnected) { clearInterval(timer); return; }  // the panel was closed or its cell cleared
    const beat = root.querySelector('.nbllm-heartbeat');
    const now = beat ? beat.textContent : null;
    if (now !== last) { last = now; seen = Date.now(); }
    mark(Date.now() - seen > DEAD);
  }, Math.min(1000, HEARTBEAT));
})(element);
"""


_beat: W.HTML | None = None
_beat_lock = threading.Lock()


def heartbeat() -> W.Widget:
    """What a panel holds to notice a dead kernel on the page: a hidden widget the kernel changes every
    :data:`HEARTBEAT_SECONDS` (one for all panels of the kernel), and the page's script that watches it.

    ipywidgets keeps a panel's view on the page after its kernel restarted or died, frozen in its last
    state and deaf to clicks; only the page can tell, by the beats that stop coming."""
    global _beat
    with _beat_lock:
        if _beat is None:
            _beat = W.HTML("0", layout=W.Layout(display="none"))
            _beat.add_class("nbllm-heartbeat")
            threading.Thread(target=_beating, args=(_beat,), name="nbllm-heartbeat", daemon=True).start()
        beat = _beat
    watcher = W.Output(layout=W.Layout(display="none"))
    watcher.add_class("nbllm-heartbeat-watch")
    js = _BEAT_JS % {"heartbeat": HEARTBEAT_SECONDS * 1000, "dead": DEAD_AFTER_SECONDS * 1000}
    watcher.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": {"application/javascript": js, "text/plain": ""}},)
    return W.Box([beat, watcher], layout=W.Layout(display="none"))


def _beating(beat: W.HTML) -> None:
    tick, count = threading.Event(), 0
    while not tick.wait(HEARTBEAT_SECONDS):
        count += 1
        try:
            beat.value = str(count)
        except Exception:  # the widget was closed (Widget.close_all): no more beats
            log.debug("the panels' heartbeat stopped", exc_info=True)
            return
