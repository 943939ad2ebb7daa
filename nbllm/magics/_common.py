"""What every nbllm magic shares: one-line errors, flags derived from the schemas, {name}
interpolation and a streaming text view."""

from __future__ import annotations

import functools
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from IPython.core import magic_arguments
from IPython.core.error import UsageError

from ..errors import NbllmError, NbllmWarning
from ..options import _Schema
from ..result import Result

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Show an :class:`NbllmError` raised by ``func`` as a one-line ``UsageError`` (no traceback), and
    nbllm's warnings (an option that has no effect, a fallback chat template) as one ``note:`` line
    each, where they happen, instead of Python's warning with a file name and a source line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", NbllmWarning)
            warnings.showwarning = functools.partial(_show_note, warnings.showwarning)
            try:
                return func(*args, **kwargs)
            except NbllmError as exc:
                raise UsageError(exc.message) from None

    return wrapper  # type: ignore[return-value]


def _show_note(original: Callable[..., None], message: Warning | str, category: type[Warning], *args: Any,
               **kwargs: Any) -> None:
    if issubclass(category, NbllmWarning):
        print(f"note: {message}")
    else:  # another library's warning: shown as Python shows it
        original(message, category, *args, **kwargs)


def schema_arguments(*schemas: type[_Schema], skip: Iterable[str] = ()) -> Callable[[F], F]:
    """``magic_arguments`` flags for every field of ``schemas`` (so ``%magic?`` lists them all)."""
    skipped = set(skip)

    def decorate(func: F) -> F:
        for schema in reversed(schemas):
            for flags, kwargs in reversed(schema.argparse_arguments()):
                if kwargs["dest"] not in skipped:
                    func = magic_arguments.argument(*flags, **kwargs)(func)
        return func

    return decorate


def parse_line(magic: Callable[..., Any], line: str) -> Any:
    """Parse a magic's line with its ``magic_arguments`` parser, with shell quoting: ``--system
    'Be brief.'`` gives ``Be brief.`` (IPython's own splitter keeps the quotes)."""
    try:
        argv = shlex.split(line, posix=True)
    except ValueError as exc:
        raise UsageError(f"cannot parse the line: {exc} (check the quotes)") from None
    return magic.parser.parse_args(argv)  # type: ignore[attr-defined]


_NAME = re.compile(r"\{\{|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}`` by the value of the user variable ``name``; ``{{`` writes a literal ``{``.

    Every other brace is left alone, so a prompt holding code or JSON goes through unchanged; so is
    ``{name}`` when no variable of that name exists.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "{{":
            return "{"
        name = match.group(1)
        return str(namespace[name]) if name in namespace else match.group(0)

    return _NAME.sub(substitute, text)


class StreamView:
    """Shows a streamed result: one display updated at most every ``interval`` seconds in a
    notebook; plain writes to stdout in a terminal. The last update carries the record as metadata."""

    def __init__(self, shell: Any, interval: float = 0.05) -> None:
        self.in_kernel = getattr(shell, "kernel", None) is not None
        self.interval = interval
        self._handle: Any = None
        self._shown_at = 0.0
        self._text = ""

    def start(self) -> None:
        if self.in_kernel:
            from IPython.display import display

            self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def add(self, chunk: str) -> None:
        self._text += chunk
        if not self.in_kernel:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            return
        now = time.monotonic()
        if now - self._shown_at >= self.interval:
            self._shown_at = now
            self._handle.update({"text/plain": self._text}, raw=True)

    def finish(self, result: Result, note: str | None = None) -> None:
        """Show the final text (with what was held back until the end) and attach the record."""
        full = "".join(result.chunks)
        extra = full[len(self._text) :] if full.startswith(self._text) else ""
        self._text = full
        suffix = f"\n[{note}]" if note else ""
        if not self.in_kernel:
            sys.stdout.write(extra + suffix + "\n")
            sys.stdout.flush()
            return
        metadata = {"nbllm": result.record.to_dict()} if result.record else {}
        self._handle.update({"text/plain": full + suffix}, raw=True, metadata=metadata)


def show_stream(shell: Any, result: Result) -> Result:
    """Stream ``result`` into the cell's output. A kernel interrupt stops the generation, keeps the
    partial text shown and in the result, and becomes a one-line UsageError (the model stays loaded)."""
    view = StreamView(shell)
    view.start()
    try:
        for chunk in result:
            view.add(chunk)
    except KeyboardInterrupt:
        result.close()
        view.finish(result, note=f"interrupted after {result.completion_tokens} tokens")
        raise UsageError(
            f"Generation interrupted after {result.completion_tokens} tokens; the partial text is kept "
            "and the model is still loaded."
        ) from None
    view.finish(result, note="stopped" if result.finish_reason == "cancelled" else None)
    return result
