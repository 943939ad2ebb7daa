"""What every nbllm magic shares: one-line errors, one line parser (shell quoting), flags derived from
the schemas, {name} interpolation and a streaming text view."""

from __future__ import annotations

import argparse
import contextlib
import functools
import keyword
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
from ..options import GenerationOptions, _Schema
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
    'Be brief.'`` gives ``Be brief.`` (IPython's own splitter keeps the quotes). Every nbllm magic
    parses its line here."""
    try:
        argv = shlex.split(line, posix=True)
    except ValueError as exc:
        raise UsageError(f"cannot parse the line: {exc} (check the quotes)") from None
    return magic.parser.parse_args(argv)  # type: ignore[attr-defined]


def variable_name(text: str) -> str:
    """``-o VAR``: a name the next cells can use (a Python identifier that is not a keyword)."""
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Python variable name: use letters, digits and _, not starting with a digit "
            "(for example: -o r)"
        )
    return text


output_argument = magic_arguments.argument(
    "-o", "--output", metavar="VAR", type=variable_name, help="Store the result object in the variable VAR."
)
"""The ``-o VAR`` flag of the magics that generate."""


def generation_arguments(func: F) -> F:
    """The generation flags (every :class:`GenerationOptions` field) and ``--preset NAME``."""
    func = schema_arguments(GenerationOptions)(func)
    return magic_arguments.argument(
        "--preset", metavar="NAME",
        help=f"Start from a named preset ({', '.join(GenerationOptions.presets())}); options typed on the line "
             "win over it.",
    )(func)


def generation_options(args: argparse.Namespace, base: GenerationOptions) -> GenerationOptions:
    """The options of one cell: the flags typed on the line, over ``--preset`` (if any), over ``base``."""
    if args.preset is None:
        return GenerationOptions.from_namespace(args, base)
    return GenerationOptions.preset(args.preset, base, **GenerationOptions.typed(args))


_NAME = re.compile(r"\{\{([^\W\d]\w*)\}\}?|\{([^\W\d]\w*)\}")


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}`` by the value of the user variable ``name``; ``{{name}}`` (or ``{{name}``)
    writes the literal text ``{name}``.

    Every other brace is left alone, so a prompt holding code, JSON or a ``{{ jinja }}`` template goes
    through unchanged; so is ``{name}`` when no variable of that name exists. Inserted values are not
    interpolated again.
    """

    def substitute(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped is not None:
            return "{" + escaped + "}"
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
        if self.in_kernel and self._handle is None:
            from IPython.display import display

            self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def waiting(self, _result: Result | None = None) -> None:
        """Say that the model is busy with a reply another thread is writing (the chat panel's): the
        output is not empty while the cell waits for it (the text replaces this line)."""
        line = WAITING
        if not self.in_kernel:
            print(line, flush=True)
            return
        self.start()
        self._handle.update({"text/plain": line}, raw=True)

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
        tokens = result.tokens  # --logprobs: the tokens coloured by probability (plain text: a table)
        if not self.in_kernel:
            sys.stdout.write(extra + suffix + "\n" + (tokens.text() + "\n" if tokens is not None else ""))
            sys.stdout.flush()
            return
        bundle = {"text/plain": full + suffix}
        if tokens is not None:
            bundle = {"text/plain": full + suffix + "\n\n" + tokens.text(), "text/html": tokens.html()}
        self._handle.update(bundle, raw=True, metadata=output_metadata(result, note))


def output_metadata(result: Result, note: str | None = None) -> dict[str, Any]:
    """What an output of ``result`` carries: its record (``nbllm``) and how it ended (``nbllm_result``:
    what a replay of the saved notebook needs besides the text; ``note`` is the ``[note]`` line the
    view added after the text)."""
    if result.record is None:
        return {}
    outcome = result.outcome()
    if note:
        outcome["note"] = note
    return {"nbllm": result.record.to_dict(), "nbllm_result": outcome}


WAITING = ("[waiting for the chat panel's reply to end: the model writes one reply at a time (interrupt the kernel "
           "to stop waiting)…]")


def waiting_shown(view: StreamView) -> contextlib.AbstractContextManager[None]:
    """Start a generation inside this block: if the engine has to wait for a reply being written on
    another thread (the chat panel's), ``view`` says so."""
    from ..engine import get_engine

    return get_engine().on_wait(view.waiting)


def show_stream(shell: Any, result: Result, view: StreamView | None = None) -> Result:
    """Stream ``result`` into the cell's output (``view``, if :func:`waiting_shown` started it). A
    kernel interrupt stops the generation, keeps the partial text shown and in the result, and becomes
    a one-line UsageError (the model stays loaded)."""
    view = view or StreamView(shell)
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
