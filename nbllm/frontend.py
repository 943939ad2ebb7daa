"""Which front end the user is typing into, so that a fix names a command they can run there.

The same library error reaches a notebook user (who runs ``%llm_download org/model``), a Python user
(``nbllm.download.download('org/model')``) and a shell user of the ``nbllm`` console command
(``nbllm download org/model``). Every library message that names a command asks :func:`command`
for it; none spells a magic itself (``tests/test_architecture.py`` checks).

The front end in use is, in order: the one :func:`using` or :func:`set_front_end` named (the CLI does,
at start); ``notebook`` where nbllm's magics are loaded in the running IPython (``%load_ext nbllm``);
else ``python``.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

FrontEnd = Literal["notebook", "python", "cli"]


@dataclass(frozen=True)
class Forms:
    """One command in each front end: templates whose ``{0}``, ``{1}``... are the arguments given to
    :func:`command` (the Python form quotes them, except placeholders such as ``MODEL``)."""

    notebook: str
    python: str
    cli: str | None = None
    """``None``: the console command has no such command; a CLI user is shown the Python form."""


_COMMANDS: dict[str, Forms] = {
    "load": Forms("%llm_load {0}", "nbllm.load({0})"),
    "load as": Forms("%llm_load {0} --as {1}", "nbllm.load({0}, name={1})"),
    "load in place": Forms("%llm_load {0} --replace {1}", "nbllm.load({0}, replace={1})"),
    "load in place as": Forms("%llm_load {0} --as {1} --replace {2}", "nbllm.load({0}, name={1}, replace={2})"),
    "unload": Forms("%llm_unload {0}", "nbllm.unload({0})"),
    "compare": Forms("%%llm --compare {0}", "nbllm.compare(PROMPT, {0})"),
    "status": Forms("%llm_status", "nbllm.status()"),
    "models": Forms("%llm_models", "nbllm.models.ModelsFolder().list()", "nbllm models"),
    "download": Forms("%llm_download {0}", "nbllm.download.download({0})", "nbllm download {0}"),
    "download file": Forms("%llm_download {0} --file {1}", "nbllm.download.download({0}, files=[{1}])",
                           "nbllm download {0} --file {1}"),
    "doctor": Forms("%llm_doctor {0}", "nbllm.fit.doctor({0})"),
    "lora add": Forms("%llm_lora add {0}", "nbllm.lora_add({0})"),
    "lora list": Forms("%llm_lora list", "nbllm.lora_list()"),
    "chat": Forms("%%llm_chat {0}", "nbllm.Chat({0})"),
    "chat reset": Forms("%llm_chat_reset {0}", "Conversation.reset()"),
    "chat regenerate": Forms("%llm_chat {0} --regenerate", "Conversation.regenerate()"),
    "chat continue": Forms("%llm_chat {0} --continue", "Conversation.continue_reply()"),
    "history save": Forms("%llm_history --save {0}", "Conversation.save({0})"),
    "history load": Forms("%llm_history {0} --load {1}", "nbllm.Conversation.load({1})"),
    "replay": Forms("%llm_replay {0}", "nbllm.replay({0})"),
    "replay off": Forms("%llm_replay off", "nbllm.replay(None)"),
    "runs": Forms("%llm_runs", "nbllm.runs()"),
    "serve": Forms("%llm_serve {0}", "nbllm.serve({0})"),
    "serve stop": Forms("%llm_serve --stop", "server.stop()"),
    "serve allow origin": Forms("%llm_serve --allow-origin {0}", "nbllm.serve(allow_origin=[{0}])"),
    "serve key": Forms("%llm_serve --api-key-env {0}", "nbllm.serve(api_key_env={0})"),
    "eval": Forms("%llm_eval {0}", "nbllm.evaluate({0})"),
}

_override: FrontEnd | None = None
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_./:*-]*$")


def set_front_end(name: FrontEnd | None) -> FrontEnd | None:
    """Name the commands of ``name`` in messages from now on (the CLI does, at start); ``None``: back to
    guessing. Returns the previous setting."""
    global _override
    previous, _override = _override, name
    return previous


@contextmanager
def using(name: FrontEnd) -> Iterator[None]:
    """Name the commands of ``name`` in messages built inside the block."""
    previous = set_front_end(name)
    try:
        yield
    finally:
        set_front_end(previous)


def front_end() -> FrontEnd:
    """The front end whose commands messages name now (see the module's docstring)."""
    if _override is not None:
        return _override
    ipython = sys.modules.get("IPython")  # never imported here: without IPython there is no notebook
    shell = ipython.get_ipython() if ipython is not None else None
    manager = getattr(shell, "extension_manager", None)
    return "notebook" if manager is not None and "nbllm" in getattr(manager, "loaded", ()) else "python"


def command(name: str, *args: str | None) -> str:
    """The command that does ``name`` in the front end in use, with ``args``: ``%llm_download org/m``,
    ``nbllm.download.download('org/m')`` or ``nbllm download org/m``. An argument left out (or ``None``)
    leaves its place empty."""
    forms = _COMMANDS[name]
    where = front_end()
    if where == "cli" and forms.cli is not None:
        return _fill(forms.cli, args, quote=False)
    if where == "notebook":
        return _fill(forms.notebook, args, quote=False)
    return _fill(forms.python, args, quote=True)


def commands() -> dict[str, Forms]:
    """Every command a message may name, with its three forms (the docs' table, the tests)."""
    return dict(_COMMANDS)


def _fill(template: str, args: tuple[str | None, ...], *, quote: bool) -> str:
    def text(arg: str | None) -> str:
        if arg is None or arg == "":
            return ""
        if _PLACEHOLDER.match(arg):
            return arg
        return repr(arg) if quote else shlex.quote(arg)

    count = len(re.findall(r"\{\d\}", template))
    values = [text(a) for a in args] + [""] * max(0, count - len(args))
    filled = template.format(*values)
    return re.sub(r" +", " ", filled.replace("(, ", "(").replace(" )", ")")).replace("[]", "").strip()
