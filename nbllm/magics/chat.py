"""``%%llm_chat``, ``%llm_chat_reset``, ``%llm_history``: named conversations, thin calls into nbllm.chat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from ..frontend import command
from ._common import (
    StreamView,
    generation_arguments,
    generation_options,
    interpolate,
    interpolate_message,
    lazy_arguments,
    output_argument,
    parse_line,
    show_stream,
    user_errors,
    waiting_shown,
)

if TYPE_CHECKING:
    from ..chat import Conversation
    from ..result import Result


@magics_class
class ChatMagics(Magics):
    """Multi-turn conversations with the loaded model, through its own chat template."""

    @line_cell_magic
    @lazy_arguments(name="%llm_chat")  # the usage line says %%llm_chat
    @magic_arguments.argument("name", nargs="?", default="default",
                              help="The conversation to continue (default: default); a new name starts one.")
    @generation_arguments
    @magic_arguments.argument("--system", metavar="TEXT",
                              help="Set the conversation's system prompt (kept for later cells; '' removes it).")
    @magic_arguments.argument("--regenerate", action="store_true",
                              help="Generate the last reply again (the earlier versions are kept); no message.")
    @magic_arguments.argument("--continue", dest="continue_", action="store_true",
                              help="Extend the last reply from where it ended; no message.")
    @magic_arguments.argument("--tools", metavar="F,G",
                              help="Notebook functions the model may call (names separated by commas); each call "
                                   "runs here and its result goes back to the model.")
    @magic_arguments.argument("--tool-choice", metavar="CHOICE", default="auto",
                              help="auto (default), none, required, or a function's name: the first reply is held "
                                   "to a call of it.")
    @magic_arguments.argument("--max-tool-calls", metavar="N", type=int, default=5,
                              help="Stop running calls after N of them in one message (default 5).")
    @magic_arguments.argument("--model", metavar="NAME",
                              help="Talk to the model loaded as NAME (%%llm_load MODEL --as NAME; default: the "
                                   "unnamed one); the conversation keeps it for later cells.")
    @output_argument
    @user_errors
    def llm_chat(self, line: str, cell: str | None = None) -> None:
        """Send the cell as your next message in conversation NAME; the reply streams into the output.

        The conversation goes on across cells and is rendered through the model's own chat template.
        ``{name}`` inserts the value of the variable ``name``; an image there (a PIL image, a numpy array,
        a ``pathlib.Path``) goes to a vision model as an image. When the history no longer fits the
        context, its oldest turns are left out (never the system prompt) and a note says so.
        Examples::

            %%llm_chat tutor --system "You are a patient maths tutor." --temperature 0.3
            What is a derivative?

            %llm_chat tutor --regenerate
            %llm_chat tutor --continue

            %%llm_chat --tools add,search --tool-choice required
            What is 2 + 3?
        """
        from ..chat import (
            conversation,  # the conversations (and the engine) load at first use, not at %load_ext
        )

        args = parse_line(self.llm_chat, line)
        shell = self.shell
        assert shell is not None
        message = interpolate_message((cell or "").strip("\n"), shell.user_ns)
        conv = conversation(args.name)
        if args.model is not None:
            from ..registry import DEFAULT, engine_for

            engine_for(args.model)  # an unknown name: one line, the conversation unchanged
            conv.model = None if args.model == DEFAULT else args.model
        options = generation_options(args, conv.engine.defaults)
        system = interpolate(args.system, shell.user_ns) if args.system is not None else None
        tools = None
        if args.tools is not None:
            from ..tools import tools_named

            tools = tools_named(args.tools, shell.user_ns)
        view = StreamView(shell)

        def stream(reply: Result) -> None:  # each reply as it is written (with tools: each of the loop's)
            if args.output:  # set first: an interrupted reply is kept there too
                shell.user_ns[args.output] = reply
            show_stream(shell, reply, view)
            view.next()

        before = len(conv.turns)
        with waiting_shown(view, conv.engine):
            try:
                conv.reply(message, options, regenerate=args.regenerate, continue_=args.continue_, system=system,
                           tools=tools, tool_choice=args.tool_choice, max_tool_calls=args.max_tool_calls,
                           on_tool_call=lambda call: print(f"[tool] {call}"), on_reply=stream)
            except KeyboardInterrupt:
                if len(conv.turns) == before:
                    raise  # nothing was kept: waiting_shown says what was interrupted
                call = conv.turns[-1].interrupted_call  # the loop kept the turn, its calls all answered
                if call is not None:
                    print(f"[tool] {call}")
                    what = (f"Interrupted while the tool {call.name} ran: the turn is kept with its calls (this one "
                            "answered as interrupted) and an empty reply marked partial")
                else:
                    what = "Interrupted: the turn is kept as far as it got (its calls, the reply marked partial)"
                raise UsageError(f"{what}; the model is still loaded. {command('chat continue', args.name)} lets the "
                                 "model answer from the results, or send the next message.") from None

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("name", nargs="?", default="default", help="The conversation (default: default).")
    @user_errors
    def llm_chat_reset(self, line: str) -> None:
        """Forget the turns of conversation NAME and start it over (its system prompt is kept)."""
        from ..chat import conversation

        args = parse_line(self.llm_chat_reset, line)
        n = conversation(args.name).reset()
        print(f"Conversation {args.name!r} reset ({n} turn{'' if n == 1 else 's'} forgotten).")

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("name", nargs="?", help="The conversation (default: default; with --load: the "
                              "name saved in the file).")
    @magic_arguments.argument("--save", metavar="FILE", help="Write the conversation to FILE (JSON).")
    @magic_arguments.argument("--load", metavar="FILE", help="Read a conversation from FILE, replacing NAME.")
    @user_errors
    def llm_history(self, line: str) -> Conversation | None:
        """Show conversation NAME as a chat; or save it to / load it from a JSON file. Examples::

            %llm_history tutor
            %llm_history tutor --save tutor.json
            %llm_history tutor --load tutor.json
        """
        from ..chat import conversation, load_conversation

        args = parse_line(self.llm_history, line)
        if args.save and args.load:
            raise UsageError("--save and --load cannot be used together. Choose one of them.")
        if args.load:
            return load_conversation(args.load, args.name)
        name = args.name or "default"
        if args.save:
            path = conversation(name, create=False).save(args.save)
            print(f"Saved conversation {name!r} to {path}.")
            return None
        return conversation(name, create=name == "default")


__all__ = ["ChatMagics"]
