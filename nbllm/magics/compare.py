"""``%%llm --compare a,b``: the replies of several models as columns that stream (thin: :mod:`nbllm.compare`)."""

from __future__ import annotations

import html
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

if TYPE_CHECKING:
    from ..options import GenerationOptions


class ColumnsView:
    """One display of several columns, one per model, updated as they grow (HTML columns in a notebook,
    with a text fallback; in a terminal the columns are written one after another when they end)."""

    def __init__(self, shell: Any, names: list[str]) -> None:
        self.in_kernel = getattr(shell, "kernel", None) is not None
        self.names = names
        self.texts = dict.fromkeys(names, "")
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._changed = False
        self._handle: Any = None

    def update(self, name: str, text: str) -> None:
        """A column's text so far (called from the thread running that model)."""
        with self._lock:
            self.texts[name] = text
            self._changed = True

    def tick(self) -> None:
        """Show what changed (on the cell's thread)."""
        with self._lock:
            changed, self._changed = self._changed, False
        if changed and self.in_kernel:
            self._show()

    def bundle(self) -> dict[str, str]:
        texts = dict(self.texts)
        plain = "\n\n".join(f"[{name}]\n{text}" for name, text in texts.items())
        notes = "".join(f"\n[note: {n}]" for n in self.notes)
        cells = "".join(
            f'<div style="flex:1;min-width:12em;padding:0 .6em;border-left:1px solid #ccc">'
            f"<b>{html.escape(name)}</b><pre style=\"white-space:pre-wrap;margin:.3em 0\">{html.escape(text)}</pre></div>"
            for name, text in texts.items())
        notes_html = "".join(f"<div><i>note: {html.escape(n)}</i></div>" for n in self.notes)
        return {"text/plain": plain + notes, "text/html": f'<div style="display:flex;gap:.4em">{cells}</div>{notes_html}'}

    def _show(self, metadata: Mapping[str, Any] | None = None) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self.bundle(), raw=True, display_id=True, metadata=dict(metadata or {}))
        else:
            self._handle.update(self.bundle(), raw=True, metadata=dict(metadata or {}))

    def finish(self, metadata: Mapping[str, Any]) -> None:
        if self.in_kernel:
            self._show(metadata)
        else:
            sys.stdout.write(self.bundle()["text/plain"] + "\n")
            sys.stdout.flush()


def show_comparison(shell: Any, prompt: str, names: str, options: GenerationOptions, *, chat: bool,
                    system: str | None, output: str | None, namespace: MutableMapping[str, Any]) -> Any:
    """Run the cell on each model and show the columns; the output carries every reply's record and
    outcome (``nbllm_runs``), so a saved notebook replays it without the models."""
    from ..compare import run_comparison, split_names

    view = ColumnsView(shell, split_names(names))
    try:
        comparison = run_comparison(prompt, names, options, chat=chat, system=system, update=view.update,
                                    tick=view.tick)
    except KeyboardInterrupt:
        view.notes.append("interrupted: the text so far is kept")
        view.finish({})
        raise UsageError("Comparison interrupted; the text each model wrote is kept and the models stay loaded.") from None
    view.texts = comparison.columns()
    view.notes = list(comparison.notes)
    rows = [{"record": r.record.to_dict(), "outcome": r.outcome(text=True)}
            for r in comparison.results.values() if r.record is not None]
    view.finish({"nbllm_runs": rows})
    if output:
        namespace[output] = comparison
    return comparison
