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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core import magic_arguments
from IPython.core.error import UsageError

from ..errors import NbllmError, NbllmWarning

if TYPE_CHECKING:
    from ..engine import Engine
    from ..options import GenerationOptions, _Schema
    from ..result import Result

F = TypeVar("F", bound=Callable[..., Any])


def get_engine() -> Engine:
    """The kernel's engine, imported at first use (``%load_ext nbllm`` imports no engine, no loaders)."""
    from ..engine import get_engine as kernel_engine

    return kernel_engine()


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


def schema_arguments(*schemas: type[_Schema] | str, skip: Iterable[str] = ()) -> Callable[[F], F]:
    """``magic_arguments`` flags for every field of ``schemas`` (so ``%magic?`` lists them all). A schema may
    be named (``"options.LoadOptions"``, below ``nbllm``): its module is imported, and its flags made, when
    the parser is built (:func:`lazy_arguments`), not when the magics are registered."""
    skipped = set(skip)

    def add(target: Any) -> None:
        for schema in schemas:
            for flags, kwargs in _schema(schema).argparse_arguments():
                if kwargs.get("dest") not in skipped:
                    target.add_argument(*flags, **kwargs)

    return _Deferred(add)


def _schema(schema: type[_Schema] | str) -> type[_Schema]:
    if not isinstance(schema, str):
        return schema
    import importlib

    module, name = schema.rsplit(".", 1)
    return getattr(importlib.import_module(f"..{module}", __package__), name)


class _Deferred(magic_arguments.ArgDecorator):
    """A decorator whose arguments are added when the parser is built (their schema imported then)."""

    def __init__(self, add: Callable[[Any], None]) -> None:
        self.add = add

    def add_to_parser(self, parser: Any, group: Any) -> None:
        self.add(group if group is not None else parser)


def lazy_arguments(name: str | None = None) -> Any:
    """IPython's ``@magic_arguments()``, except that the parser (and the help text listing every flag, whose
    formatting was the slowest part of ``%load_ext nbllm``) is built when first needed: by
    :func:`parse_line`, or by ``%llm_load?`` (IPython asks an object's ``getdoc()`` for its help)."""
    return _LazyArguments(name)


class _LazyArguments(magic_arguments.magic_arguments):
    def __call__(self, func: F) -> F:
        if not getattr(func, "has_arguments", False):
            func.has_arguments = True  # type: ignore[attr-defined]
            func.decorators = []  # type: ignore[attr-defined]
        if self.name is not None:
            func.argcmd_name = self.name  # type: ignore[attr-defined]
        func.getdoc = functools.partial(magic_help, func)  # type: ignore[attr-defined]
        return func


def magic_parser(magic: Callable[..., Any]) -> Any:
    """The ``magic_arguments`` parser of ``magic`` (built now if it was not yet: :class:`lazy_arguments`)."""
    func: Any = getattr(magic, "__func__", magic)
    parser = func.__dict__.get("parser")
    if parser is None:
        parser = func.parser = magic_arguments.construct_parser(func)  # also sets __doc__ to the full help
    return parser


def magic_help(magic: Callable[..., Any]) -> str:
    """``magic``'s help as ``%magic?`` shows it: its docstring and every flag."""
    magic_parser(magic)
    return str(getattr(magic, "__func__", magic).__doc__)


def parse_line(magic: Callable[..., Any], line: str) -> Any:
    """Parse a magic's line with its ``magic_arguments`` parser, with shell quoting: ``--system
    'Be brief.'`` gives ``Be brief.`` (IPython's own splitter keeps the quotes). Every nbllm magic
    parses its line here."""
    try:
        argv = shlex.split(line, posix=True)
    except ValueError as exc:
        raise UsageError(f"cannot parse the line: {exc} (check the quotes)") from None
    return magic_parser(magic).parse_args(argv)


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
    func = schema_arguments("options.GenerationOptions")(func)

    def preset(target: Any) -> None:
        from ..options import BUILTIN_PRESETS

        target.add_argument("--preset", metavar="NAME",
                            help=f"Start from a named preset ({', '.join(BUILTIN_PRESETS)}, or NAME.yaml in presets/ beside "
                                 "the models folder, text-generation-webui's format); options typed on the line win "
                                 "over it.")

    return _Deferred(preset)(func)


def generation_options(args: argparse.Namespace, base: GenerationOptions) -> GenerationOptions:
    """The options of one cell: the flags typed on the line, over ``--preset`` (if any), over ``base``."""
    from ..options import GenerationOptions

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


def interpolate_message(text: str, namespace: Mapping[str, Any]) -> str | list[Any]:
    """:func:`interpolate` for a chat message, where ``{name}`` may also be an image (a PIL image, a numpy
    array, a ``pathlib.Path``: :func:`nbllm.images.is_image`): then the message is a list of text pieces
    and images, in order; without images it is the same text :func:`interpolate` gives."""
    from ..images import is_image

    pieces: list[Any] = []
    at = 0
    for match in _NAME.finditer(text):
        name = match.group(2)
        if name is not None and name in namespace and is_image(namespace[name]):
            pieces += [interpolate(text[at:match.start()], namespace), namespace[name]]
            at = match.end()
    if not pieces:
        return interpolate(text, namespace)
    return [*pieces, interpolate(text[at:], namespace)]


class StreamView:
    """Shows a streamed result: one display updated at most every ``interval`` seconds in a
    notebook; plain writes to stdout in a terminal. The last update carries the record as metadata."""

    def __init__(self, shell: Any, interval: float = 0.05) -> None:
        self.in_kernel = getattr(shell, "kernel", None) is not None
        self.interval = interval
        self._handle: Any = None
        self._shown_at = 0.0
        self._text = ""
        self.waited_for: str | None = None
        self.waited_on: Result | None = None
        """The reply (another thread's) this cell said it waits for."""
        """Whose reply the cell waited for (:func:`owner_of`), once it had to."""

    def start(self) -> None:
        if self.in_kernel and self._handle is None:
            from IPython.display import display

            self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def next(self) -> None:
        """Show the next result in a display of its own below (the one shown stays as it is): a chat with
        tools shows each reply of its loop in turn."""
        self._handle, self._text, self._shown_at = None, "", 0.0
        self.waited_for, self.waited_on = None, None

    def waiting(self, result: Result | None = None) -> None:
        """Say that the model is busy with a reply another thread is writing (a served request's, the chat
        panel's): the output is not empty while the cell waits for it (the text replaces this line)."""
        self.waited_for = owner_of(result)
        self.waited_on = result
        self.show_line(WAITING.format(owner=self.waited_for))

    def show_line(self, line: str) -> None:
        """Show ``line`` in place of the output (a line of its own in a terminal)."""
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
        thought = result.reasoning.strip()  # a server's reasoning text: shown apart, after the reply
        if thought:
            suffix += f"\n[reasoning]\n{thought}"
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


WAITING = ("[waiting for {owner} to end: the model writes one reply at a time (interrupt the kernel "
           "to stop waiting)…]")

_OWNERS = {"nbllm-serve": "a served request", "nbllm-chat": "the chat panel's reply"}
"""The threads that read replies, by name prefix (:data:`nbllm.serve.THREAD_NAME`, the chat panel's worker)."""


def owner_of(result: Result | None) -> str:
    """Whose reply ``result`` is, in words, from the thread reading it."""
    reader = result.reader if result is not None else None
    name = reader.name if reader is not None else ""
    for prefix, words in _OWNERS.items():
        if name.startswith(prefix):
            return words
    return "a reply being read on another thread"


@contextlib.contextmanager
def waiting_shown(view: StreamView, engine: Engine | None = None) -> Iterator[None]:
    """Start a generation inside this block: if the engine has to wait for a reply being written on
    another thread (a served request's, the chat panel's), ``view`` says so; interrupting that wait is
    one line (nothing was generated; the model stays loaded), and stops the chat panel's reply (a served
    request is another client's: it goes on)."""
    with (engine if engine is not None else get_engine()).on_wait(view.waiting):
        try:
            yield
        except KeyboardInterrupt:
            if view.waited_for is None:
                raise UsageError("Interrupted before the generation started; nothing was generated and the model "
                                 "is still loaded.") from None
            if view.waited_on is not None and view.waited_for == _OWNERS["nbllm-chat"]:
                # the user interrupts what the kernel is doing: the panel's reply too (a served request is
                # another client's, and goes on)
                view.waited_on.cancel()
                view.show_line("[stopped the chat panel's reply (what it wrote is kept, marked partial)]")
                raise UsageError("Interrupted: the chat panel's reply this cell waited for was stopped (what it wrote "
                                 "is kept, marked partial); nothing was generated for this cell and the model is "
                                 "still loaded.") from None
            view.show_line(f"[stopped waiting for {view.waited_for}]")
            raise UsageError(f"Stopped waiting for {view.waited_for} to end; nothing was generated and the model "
                             "is still loaded.") from None


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
        n = result.completion_tokens
        after = f"{n} tokens" if n is not None else f"{len(result.chunks)} pieces"  # a server that did not count
        view.finish(result, note=f"interrupted after {after}")
        raise UsageError(
            f"Generation interrupted after {after}; the partial text is kept and the model is still loaded."
        ) from None
    view.finish(result, note="stopped" if result.finish_reason == "cancelled" else None)
    return result
