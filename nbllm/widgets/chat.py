"""The chat panel: a conversation rendered as markdown, with Send, Stop, Regenerate, Continue and Clear.

The panel shows one :class:`nbllm.chat.Conversation` from the registry, the same one ``%%llm_chat
NAME`` talks to. A reply is generated on a worker thread, so the kernel stays free: Stop works while a
reply is being written (it cancels the :class:`~nbllm.result.Result`; the partial reply is kept) and
other cells can run meanwhile (the engine runs one generation at a time).
"""

from __future__ import annotations

import html
import logging
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import ipywidgets as W

from ..chat import ContextFullError, Conversation, Turn, conversation
from ..errors import NbllmError, NoModelLoadedError
from ..result import Result
from ._common import HELP_STYLE, MessageLine, button, guarded, heartbeat, joined, title, track, untrack

log = logging.getLogger("nbllm.widgets")

UPDATE_INTERVAL = 0.1
"""Seconds between two updates of a streaming reply on the page."""

STOP_WAIT_SECONDS = 30.0
"""How long a Send after Stop waits for the stopped reply to end (it ends within a token)."""

CURSOR = " ▍"

BUSY = "A reply is still being written. Stop it first."
"""What a second Send (or Regenerate...) says while a reply is written; it goes when the reply ends."""

_CSS = """<style>
.nbllm-msg { border-radius: 8px; padding: 2px 12px; margin: 4px 0; overflow-wrap: anywhere; min-width: 0; }
.nbllm-msg-user { margin-left: 15%; background: rgba(66, 133, 244, .12); }
.nbllm-msg-assistant { margin-right: 15%; background: rgba(128, 128, 128, .10); }
.nbllm-msg .widget-html-content { line-height: normal; }
.nbllm-msg .jp-RenderedHTMLCommon { padding: 0; font-size: var(--jp-content-font-size1, 14px); }
.nbllm-msg .jp-RenderedHTMLCommon pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.nbllm-msg .nbllm-msg-head { margin: 4px 0 2px 0; }
.nbllm-msg .jp-RenderedHTMLCommon table { margin-left: 0; margin-right: auto; }
</style>"""

_MARKDOWN: Any = None


def _markdown() -> Any:
    """The markdown renderer of chat text (markdown-it-py, CommonMark with tables and strikethrough)."""
    global _MARKDOWN
    if _MARKDOWN is None:
        from markdown_it import MarkdownIt
        from markdown_it.common.utils import escapeHtml

        md = MarkdownIt("commonmark", {"breaks": True, "html": False})
        md.enable(["table", "strikethrough"]).disable(["entity"])

        def link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
            tokens[idx].attrSet("target", "_blank")  # a link must not take the notebook's tab away
            tokens[idx].attrSet("rel", "noopener noreferrer")
            return str(self.renderToken(tokens, idx, options, env))

        def image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
            """An image is never fetched from a reply: its alt text, as a link to it."""
            token = tokens[idx]
            src = escapeHtml(str(token.attrGet("src") or ""))
            alt = escapeHtml(self.renderInlineAsText(token.children or [], options, env)) or src
            return (f'<span class="nbllm-image">[image: <a href="{src}" target="_blank" '
                    f'rel="noopener noreferrer">{alt}</a>]</span>')

        md.add_render_rule("link_open", link_open)
        md.add_render_rule("image", image)
        _MARKDOWN = md
    return _MARKDOWN


def chat_html(text: str) -> str:
    """Chat text as HTML, rendered here in the kernel, shown as written: markdown (code blocks, lists,
    bold, tables), a newline is a line break (as in chat UIs), and ``<tag>``, ``&amp;`` and ``$5`` are
    characters: not HTML, not an entity, not math (the notebook's own markdown renderer would hide the
    tag and typeset the dollars). Links open in a new tab; images are not fetched."""
    return str(_markdown().render(text))


class MessageView(W.HTML):
    """One message of the chat, its markdown rendered to HTML in the kernel (:func:`chat_html`)."""

    def __init__(self, role: str, text: str = "", note: str = "", tokens: list[dict[str, Any]] | None = None,
                 images: list[Any] | None = None) -> None:
        super().__init__(layout=W.Layout(width="auto"))
        self.role = role
        self.add_class("nbllm-msg")
        self.add_class(f"nbllm-msg-{role}")
        self.text = ""
        self.note = ""
        self.images = list(images or [])
        """The message's images (:class:`~nbllm.images.ChatImage`), shown small under its text."""
        self.show(text, note, tokens)

    def show(self, text: str, note: str = "", tokens: list[dict[str, Any]] | None = None) -> None:
        """Replace the message's text (safe from any thread: it only sets a trait). ``tokens``: the reply's
        ``--logprobs`` entries, shown under it as the token view (coloured by probability, the
        alternatives on hover: :meth:`nbllm.tokens.TokenLogprobs.html`)."""
        self.text, self.note = text, note
        label = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        head = f"<b>{html.escape(label)}</b>" + (f" <small><i>{html.escape(note)}</i></small>" if note else "")
        body = chat_html(text) if text else "<p>…</p>"
        pictures = "".join(f"<img class='nbllm-msg-image' src='{image.data_url()}' title='sha256 {image.sha256}' "
                           "style='max-height: 128px; margin: 2px 4px 4px 0'>" for image in self.images)
        view = ""
        if tokens:
            from ..tokens import TokenLogprobs

            view = (f"<details class='nbllm-tokens' open><summary><small>tokens ({len(tokens)}, coloured by "
                    f"probability; hover for the alternatives)</small></summary>{TokenLogprobs(tokens).html()}</details>")
        self.value = (f"<div class='jp-RenderedHTMLCommon nbllm-md'><div class='nbllm-msg-head'>{head}</div>"
                      f"{body}{pictures}{view}</div>")


def words(exc: NbllmError) -> str:
    """A library error as the chat panel says it: naming the panels' buttons, not magics."""
    if isinstance(exc, NoModelLoadedError):
        return (f"{exc.cause}. Load one with the Load button of the settings panel (%llm_settings), or with "
                "%llm_load MODEL in a cell.")
    if isinstance(exc, ContextFullError) and exc.continuing:
        return (f"{exc.cause}. Lower max_new_tokens in the settings panel and click Regenerate, or click Clear "
                "to start over.")
    return exc.message


_writing: weakref.WeakSet[Result] = weakref.WeakSet()
"""The replies the chat panels are writing now."""
_hooked_kernel: Any = None
_idle_handler: Any = None


def _on_interrupt(signum: int, frame: Any) -> None:
    """A kernel interrupt (SIGINT) while no cell runs: stop the panels' replies, as Stop does."""
    for result in list(_writing):
        result.cancel()
    if callable(_idle_handler) and _idle_handler not in (signal.default_int_handler, _on_interrupt):
        _idle_handler(signum, frame)


def stop_replies_on_interrupt() -> None:
    """Make a kernel interrupt stop the chat panels' replies when no cell runs (while a cell runs, the
    interrupt is the cell's, and a cell that waits for a reply stops it: see ``waiting_shown``).

    ipykernel ignores SIGINT between requests: around each request it installs Python's default
    handler, and afterwards puts back the one it saved (``SIG_IGN`` from its start). The handler it
    saves becomes :func:`_on_interrupt` (which then does what the saved one did); called on the
    kernel's main thread (a button's handler, or a cell)."""
    global _hooked_kernel, _idle_handler
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipywidgets needs IPython
        return
    kernel = getattr(get_ipython(), "kernel", None)
    if (kernel is None or kernel is _hooked_kernel or not hasattr(kernel, "saved_sigint_handler")
            or threading.current_thread() is not threading.main_thread()):
        return
    if kernel.saved_sigint_handler is not _on_interrupt:
        _idle_handler = kernel.saved_sigint_handler
        kernel.saved_sigint_handler = _on_interrupt
    _hooked_kernel = kernel


def _reply_tokens(turn: Turn) -> list[dict[str, Any]] | None:
    """The reply's ``--logprobs`` entries (each generation's, for a continued reply), when it has them."""
    if turn.reply is None:
        return None
    entries = [e for r in turn.reply.records for e in (r.logprobs or ())]
    return entries or None


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
        self._shown: list[tuple[str, str | None, str, int]] | None = None
        self._render_lock = threading.RLock()

        self.system = W.Textarea(value=self.chat.system or "", placeholder="System prompt (optional)",
                                 description="System", continuous_update=False, rows=2,
                                 style={"description_width": "initial"}, layout=W.Layout(width="auto"))
        self.system.add_class("nbllm-system")
        self.view = W.VBox(layout=W.Layout(width="100%", flex="0 0 auto", overflow="visible"))
        self.view.add_class("nbllm-chat-messages")
        # The messages sit in a scroll box laid out bottom up (column-reverse): the browser keeps its
        # view at the end while a reply grows, and where the user scrolled to once they scroll up.
        self._scroller_layout = W.Layout(
            width="100%", max_height="520px", overflow="hidden auto", flex_flow="column-reverse",
            border="1px solid var(--jp-border-color2, #ccc)", padding="4px")
        self.scroller = self._new_scroller()
        # ipywidgets' text area reports its text, not its keys: Enter cannot send without front-end
        # code, so Enter writes a new line and the Send button sends (the placeholder says so).
        self.input = W.Textarea(placeholder="Message (the Send button sends it; Enter starts a new line)", rows=3,
                                layout=W.Layout(width="auto"))
        self.input.add_class("nbllm-input")
        self.upload = W.FileUpload(accept="image/*", multiple=True, description="Image",
                                   tooltip="Images to send with the next message (a vision model takes them)")
        self.upload.add_class("nbllm-upload")
        self.send_button = button("Send", "send", style="primary", icon="paper-plane")
        self.stop_button = button("Stop", "stop", style="warning", icon="stop")
        self.regenerate_button = button("Regenerate", "regenerate", icon="redo")
        self.continue_button = button("Continue", "continue", icon="forward")
        self.clear_button = button("Clear", "clear", icon="trash")
        self.status = W.HTML()
        self.status.add_class("nbllm-chat-status")
        self.model = W.Dropdown(description="Model", options=["default"], value="default",
                                tooltip="The model that replies: the unnamed one (default), or one loaded --as NAME",
                                style={"description_width": "initial"}, layout=W.Layout(width="auto"))
        self.model.add_class("nbllm-chat-model")

        self._parts: list[W.Widget] = [
            W.HTML(_CSS),
            heartbeat(),
            title(f"nbllm · chat “{self.chat.name}”"),
            self.model,
            self.system,
            self.scroller,
            self.input,
            W.HBox([self.send_button, self.stop_button, self.regenerate_button, self.continue_button,
                    self.clear_button, self.upload]),
            self.status,
            self.messages,
        ]
        super().__init__(self._parts, layout=W.Layout(width="100%", max_width="820px", padding="8px",
                                                      border="1px solid var(--jp-border-color2, #ccc)"))
        self.add_class("nbllm-chat-panel")
        self.add_class("nbllm-panel")

        self.send_button.on_click(lambda _b: self.send())
        self.stop_button.on_click(lambda _b: self.stop())
        self.regenerate_button.on_click(lambda _b: self.regenerate())
        self.continue_button.on_click(lambda _b: self.continue_reply())
        self.clear_button.on_click(lambda _b: self.clear())
        self.system.observe(self._system_changed, names="value")
        self.model.observe(self._model_changed, names="value")

        self.refresh()
        track(self)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        """Whether the panel is writing a reply now."""
        return self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the reply being written is finished; returns False on timeout."""
        return joined(self._worker, timeout)

    def refresh(self) -> None:
        """Show the conversation as it is now (it may have changed through ``%%llm_chat``: then the
        numbers line, which was about the panel's last reply, goes)."""
        self._redraw(ours=False)

    def _models_shown(self) -> None:
        """The model list: the unnamed model and every model loaded --as NAME; the conversation's own chosen."""
        from ..registry import DEFAULT, models

        names = [DEFAULT, *models().named_loaded()]
        chosen = self.chat.model or DEFAULT
        if chosen not in names:
            names.append(chosen)  # unloaded since: shown, and a send says so in one line
        if list(self.model.options) != names:
            self.model.options = names
        if self.model.value != chosen:
            self.model.value = chosen

    def _model_changed(self, change: dict[str, Any]) -> None:
        from ..registry import DEFAULT

        new = change["new"]
        if new is not None:
            self.chat.model = None if new == DEFAULT else new

    def _redraw(self, *, ours: bool) -> None:
        if self.generating:
            return
        self._models_shown()
        with self._render_lock:
            if (self.chat.system or "") != self.system.value:
                self.system.value = self.chat.system or ""
            shown = [(t.shown, t.reply.content if t.reply else None, _reply_note(t), len(_reply_tokens(t) or ()))
                     for t in self.chat.turns]
            if shown == self._shown and len(self.view.children) == sum(1 + (r is not None) for _u, r, _n, _t in shown):
                self._set_buttons(generating=False)
                return  # unchanged since last shown: no redraw after every cell
            if not ours and self._shown is not None and shown != self._shown:
                self.status.value = ""  # a turn from elsewhere: the numbers shown were another reply's
            self._shown = shown
            views: list[W.Widget] = []
            for turn in self.chat.turns:
                views.append(MessageView("user", turn.shown, images=turn.images))
                if turn.reply is not None:
                    views.append(MessageView("assistant", turn.reply.content, _reply_note(turn), _reply_tokens(turn)))
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
        """Send the input box's text (or ``text``) as the next user message, with the uploaded images
        before it (then the upload is emptied), and stream the reply."""
        message = (self.input.value if text is None else text).strip()
        uploads = list(self.upload.value)
        if not uploads:
            self._start(lambda: self.chat.reply(message), user=message, restore_input=message)
            return
        from ..images import as_image

        images = guarded(self.messages, lambda: [as_image(bytes(f["content"]), f["name"]) for f in uploads], words)
        if images is None:
            return  # an unreadable upload: said in one line; the upload stays to be replaced
        pieces: list[Any] = [*images, message] if message else images
        shown = "".join(f"[image {image.sha256[:12]}]" for image in images) + message
        if self._start(lambda: self.chat.reply(pieces), user=shown, restore_input=message, images=images):
            self.upload.value = ()

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
        """Forget the conversation's turns (the system prompt stays) and the last reply's numbers."""
        if guarded(self.messages, self.chat.reset, words) is not None:
            self.status.value = ""
        self.refresh()

    # -- internals -----------------------------------------------------------------------------------
    def _new_scroller(self) -> W.Box:
        box = W.Box([self.view], layout=self._scroller_layout)
        box.add_class("nbllm-chat-view")
        return box

    def _to_the_end(self) -> None:
        """Show the end of the chat, where the message just sent and its reply are, even if the user
        had scrolled up: a new scroll box starts at its end (the kernel cannot scroll the page's box)."""
        old, self.scroller = self.scroller, self._new_scroller()
        self._parts = [self.scroller if part is old else part for part in self._parts]
        self.children = self._parts
        old.close()

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
        images: list[Any] | None = None,
    ) -> bool:
        """Start a generation (on this thread, so its errors show at once) and stream it on a worker.

        After Stop, the stopped reply ends within a token: a Send right after it waits for that (the
        stopped reply joins the conversation first), rather than being refused or racing it."""
        stopping = self._result is not None and self._result.cancel_event.is_set()
        if self.generating and stopping:
            self.wait(STOP_WAIT_SECONDS)
        if self.generating:
            self.messages.show_error(BUSY)
            return False
        self.chat.system = self.system.value or None
        result = guarded(self.messages, start, words)
        if result is None:
            return False
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
                    views.append(MessageView("user", user, images=images))
                    self._to_the_end()
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
        _writing.add(result)
        stop_replies_on_interrupt()
        self._worker.start()
        return True

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
            self.messages.show_error(words(exc))
        except Exception as exc:  # a bug: one line in the panel, the traceback in the log
            failed = True
            log.exception("chat generation failed")
            self.messages.show_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            _writing.discard(result)
            self._result = None
            if failed and restore_input is not None and not self.input.value:
                self.input.value = restore_input
            if result.done:
                self.status.value = f"<span style='{HELP_STYLE}'>{html.escape(result.summary())}</span>"
            if self.messages.error_text == BUSY:  # a second click while it wrote: no longer true
                self.messages.clear_error()
            self._busy = False
            self._redraw(ours=True)

    def _set_buttons(self, *, generating: bool) -> None:
        self.stop_button.disabled = not generating
        for b in (self.send_button, self.regenerate_button, self.continue_button, self.clear_button):
            b.disabled = generating
        if not generating:
            last = self.chat.turns[-1] if self.chat.turns else None
            self.regenerate_button.disabled = last is None
            self.continue_button.disabled = last is None or last.reply is None
            self.clear_button.disabled = not self.chat.turns


__all__ = ["ChatPanel", "MessageView", "chat_html"]
