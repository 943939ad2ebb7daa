"""The chat panel: a conversation rendered as markdown, with Send, Stop, Regenerate, Continue and Clear.

The panel shows one :class:`nbllm.chat.Conversation` from the registry, the same one ``%%llm_chat
NAME`` talks to. A reply is generated on a worker thread, so the kernel stays free: Stop works while a
reply is being written (it cancels the :class:`~nbllm.result.Result`; the partial reply is kept) and
other cells can run meanwhile (the engine runs one generation at a time).
"""

from __future__ import annotations

import html
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from ..chat import Conversation, Turn, conversation
from ..errors import NbllmError
from ..result import Result
from ._common import HELP_STYLE, MessageLine, button, guarded, title, track, untrack

log = logging.getLogger("nbllm.widgets")

UPDATE_INTERVAL = 0.1
"""Seconds between two updates of a streaming reply on the page."""

STOP_WAIT_SECONDS = 30.0
"""How long a Send after Stop waits for the stopped reply to end (it ends within a token)."""

CURSOR = " ▍"

_CSS = """<style>
.nbllm-msg { border-radius: 8px; padding: 2px 12px; margin: 4px 0; overflow-wrap: anywhere; }
.nbllm-msg-user { margin-left: 15%; background: rgba(66, 133, 244, .12); }
.nbllm-msg-assistant { margin-right: 15%; background: rgba(128, 128, 128, .10); }
.nbllm-msg .jp-OutputArea-prompt { display: none; }
.nbllm-msg .jp-RenderedMarkdown { padding: 0; }
</style>"""


_CODE_SPAN = re.compile(r"(`[^`]*`)")


def as_markdown(text: str) -> str:
    """Chat text as markdown, shown as written: a newline is a line break (as in chat UIs) and ``<`` is
    a character, not the start of an HTML tag (which the notebook would hide), except in code."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            out.append(line)
        elif fenced or not line.strip():
            out.append(line)
        else:
            parts = _CODE_SPAN.split(line)  # odd items are `code spans`
            line = "".join(p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;") for i, p in enumerate(parts))
            out.append(line + "  ")
    return "\n".join(out)


class MessageView(W.Output):
    """One message of the chat, rendered as markdown by the notebook (``text/markdown``)."""

    def __init__(self, role: str, text: str = "", note: str = "") -> None:
        super().__init__()
        self.role = role
        self.add_class("nbllm-msg")
        self.add_class(f"nbllm-msg-{role}")
        self.text = ""
        self.note = ""
        self.show(text, note)

    def show(self, text: str, note: str = "") -> None:
        """Replace the message's text (safe from any thread: it only sets a trait)."""
        self.text, self.note = text, note
        label = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        body = as_markdown(text) if text else "…"
        md = f"**{label}**" + (f" <small><i>{html.escape(note)}</i></small>" if note else "") + "\n\n" + body
        self.outputs = ({
            "output_type": "display_data",
            "data": {"text/markdown": md, "text/plain": f"{label}: {text}"},
            "metadata": {},
        },)


def _reply_note(turn: Turn) -> str:
    return " · ".join(turn.notes)


class ChatPanel(W.VBox):
    """A chat with the loaded model over the conversation ``name`` (shared with ``%%llm_chat NAME``).

    Generation options are the engine's defaults (set them in the settings panel or with
    ``get_engine().defaults``). :meth:`wait` blocks until the reply being written is finished.
    """

    def __init__(self, name: str = "default", *, chat: Conversation | None = None) -> None:
        self.chat = chat if chat is not None else conversation(name)
        self.messages = MessageLine()
        self._result: Result | None = None
        self._worker: threading.Thread | None = None
        self._busy = False
        self._shown: list[tuple[str, str | None, str]] | None = None
        self._render_lock = threading.RLock()

        self.system = W.Textarea(value=self.chat.system or "", placeholder="System prompt (optional)",
                                 description="System", continuous_update=False, rows=2,
                                 style={"description_width": "initial"}, layout=W.Layout(width="100%"))
        self.system.add_class("nbllm-system")
        self.view = W.VBox(layout=W.Layout(width="100%", max_height="520px", overflow="auto",
                                           border="1px solid var(--jp-border-color2, #ccc)", padding="4px"))
        self.view.add_class("nbllm-chat-view")
        self.input = W.Textarea(placeholder="Message (Send to submit)", rows=3, layout=W.Layout(width="100%"))
        self.input.add_class("nbllm-input")
        self.send_button = button("Send", "send", style="primary", icon="paper-plane")
        self.stop_button = button("Stop", "stop", style="warning", icon="stop")
        self.regenerate_button = button("Regenerate", "regenerate", icon="redo")
        self.continue_button = button("Continue", "continue", icon="forward")
        self.clear_button = button("Clear", "clear", icon="trash")
        self.status = W.HTML()
        self.status.add_class("nbllm-chat-status")

        super().__init__([
            W.HTML(_CSS),
            title(f"nbllm · chat “{self.chat.name}”"),
            self.system,
            self.view,
            self.input,
            W.HBox([self.send_button, self.stop_button, self.regenerate_button, self.continue_button,
                    self.clear_button]),
            self.status,
            self.messages,
        ], layout=W.Layout(width="100%", max_width="820px", padding="8px",
                           border="1px solid var(--jp-border-color2, #ccc)"))
        self.add_class("nbllm-chat-panel")

        self.send_button.on_click(lambda _b: self.send())
        self.stop_button.on_click(lambda _b: self.stop())
        self.regenerate_button.on_click(lambda _b: self.regenerate())
        self.continue_button.on_click(lambda _b: self.continue_reply())
        self.clear_button.on_click(lambda _b: self.clear())
        self.system.observe(self._system_changed, names="value")

        self.refresh()
        track(self)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        """Whether the panel is writing a reply now."""
        return self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the reply being written is finished; returns False on timeout."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def refresh(self) -> None:
        """Show the conversation as it is now (it may have changed through ``%%llm_chat``)."""
        if self.generating:
            return
        with self._render_lock:
            if (self.chat.system or "") != self.system.value:
                self.system.value = self.chat.system or ""
            shown = [(t.user, t.reply.content if t.reply else None, _reply_note(t)) for t in self.chat.turns]
            if shown == self._shown and len(self.view.children) == sum(1 + (r is not None) for _u, r, _n in shown):
                self._set_buttons(generating=False)
                return  # unchanged since last shown: no redraw after every cell
            self._shown = shown
            views: list[W.Widget] = []
            for turn in self.chat.turns:
                views.append(MessageView("user", turn.user))
                if turn.reply is not None:
                    views.append(MessageView("assistant", turn.reply.content, _reply_note(turn)))
            old = self.view.children
            self.view.children = views
            for v in old:
                v.close()
            self._set_buttons(generating=False)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.refresh()  # shown again (e.g. re-run cell): show the engine's state now
        return super()._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        untrack(self)
        if self._result is not None:
            self._result.cancel()
        super().close()

    # -- actions -------------------------------------------------------------------------------------
    def send(self, text: str | None = None) -> None:
        """Send the input box's text (or ``text``) as the next user message and stream the reply."""
        message = (self.input.value if text is None else text).strip()
        self._start(lambda: self.chat.reply(message), user=message, restore_input=message)

    def regenerate(self) -> None:
        """Write the last reply again (the earlier version is kept in the conversation)."""
        user = self.chat.turns[-1].user if self.chat.turns else None
        self._start(lambda: self.chat.reply(regenerate=True), user=user, replace_last=True)

    def continue_reply(self) -> None:
        """Let the model go on with the last reply from where it ended."""
        self._start(lambda: self.chat.reply(continue_=True), continue_last=True)

    def stop(self) -> None:
        """Stop the reply being written; what was written is kept (marked partial)."""
        if self._result is not None:
            self._result.cancel()

    def clear(self) -> None:
        """Forget the conversation's turns (the system prompt stays)."""
        guarded(self.messages, self.chat.reset)
        self.refresh()

    # -- internals -----------------------------------------------------------------------------------
    def _system_changed(self, change: dict[str, Any]) -> None:
        self.chat.system = change["new"] or None

    def _start(
        self,
        start: Callable[[], Result],
        *,
        user: str | None = None,
        restore_input: str | None = None,
        replace_last: bool = False,
        continue_last: bool = False,
    ) -> None:
        """Start a generation (on this thread, so its errors show at once) and stream it on a worker.

        After Stop, the stopped reply ends within a token: a Send right after it waits for that (the
        stopped reply joins the conversation first), rather than being refused or racing it."""
        stopping = self._result is not None and self._result.cancel_event.is_set()
        if self.generating and stopping:
            self.wait(STOP_WAIT_SECONDS)
        if self.generating:
            self.messages.show_error("A reply is still being written. Stop it first.")
            return
        self.chat.system = self.system.value or None
        result = guarded(self.messages, start)
        if result is None:
            return
        self._result = result
        self._busy = True
        with self._render_lock:
            views = list(self.view.children)
            prefix = ""
            if continue_last and views:
                reply_view = views[-1]
                assert isinstance(reply_view, MessageView)
                prefix = reply_view.text
            else:
                if replace_last and views and getattr(views[-1], "role", None) == "assistant":
                    views[-1].close()
                    views = views[:-1]
                if not replace_last and user is not None:
                    views.append(MessageView("user", user))
                reply_view = MessageView("assistant")
                views.append(reply_view)
            self.view.children = views
        if restore_input is not None:
            self.input.value = ""
        self._set_buttons(generating=True)
        self.status.value = f"<span style='{HELP_STYLE}'>writing…</span>"
        self._worker = threading.Thread(
            target=self._stream, args=(result, reply_view, prefix, restore_input), name="nbllm-chat", daemon=True
        )
        result.read_by(self._worker)  # a cell run meanwhile waits for this reply instead of stopping it
        self._worker.start()

    def _stream(self, result: Result, view: MessageView, prefix: str, restore_input: str | None) -> None:
        """The worker: read the result and show its text every UPDATE_INTERVAL seconds."""
        text, shown_at = prefix, 0.0
        failed = False
        try:
            for chunk in result:
                text += chunk
                now = time.monotonic()
                if now - shown_at >= UPDATE_INTERVAL:
                    shown_at = now
                    view.show(text + CURSOR)
                    self.status.value = (f"<span style='{HELP_STYLE}'>writing… {result.completion_tokens} "
                                         "tokens</span>")
        except NbllmError as exc:
            failed = True
            self.messages.show_error(exc.message)
        except Exception as exc:  # a bug: one line in the panel, the traceback in the log
            failed = True
            log.exception("chat generation failed")
            self.messages.show_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            self._result = None
            if failed and restore_input is not None and not self.input.value:
                self.input.value = restore_input
            if result.done:
                self.status.value = f"<span style='{HELP_STYLE}'>{html.escape(result.summary())}</span>"
            self._busy = False
            self.refresh()

    def _set_buttons(self, *, generating: bool) -> None:
        self.stop_button.disabled = not generating
        for b in (self.send_button, self.regenerate_button, self.continue_button, self.clear_button):
            b.disabled = generating
        if not generating:
            last = self.chat.turns[-1] if self.chat.turns else None
            self.regenerate_button.disabled = last is None
            self.continue_button.disabled = last is None or last.reply is None
            self.clear_button.disabled = not self.chat.turns


__all__ = ["ChatPanel", "MessageView", "as_markdown"]
