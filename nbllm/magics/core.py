"""``%llm_load``, ``%%llm``, ``%llm_unload``, ``%llm_status``: thin calls into the library."""

from __future__ import annotations

from typing import Any

from IPython.core import magic_arguments
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from ..errors import NbllmError
from ..memory import format_memory, process_rss
from ._common import (
    StreamView,
    generation_arguments,
    generation_options,
    get_engine,
    interpolate,
    lazy_arguments,
    output_argument,
    parse_line,
    schema_arguments,
    show_stream,
    user_errors,
    waiting_shown,
)


@magics_class
class CoreMagics(Magics):
    """Load a model once; prompt it from any cell."""

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("model", help="A model folder, a .gguf file, a models-folder name or a hub id (org/model).")
    @schema_arguments("options.LoadOptions")
    @magic_arguments.argument("--fit", action="store_true",
                              help="Load with the options recommended for this machine (%%llm_doctor MODEL shows "
                                   "them); options on the line win.")
    @magic_arguments.argument("--save-settings", action="store_true",
                              help="Save the options as this model's settings (config-user.yaml in the models "
                                   "folder, shared with text-generation-webui); loading it by name applies them.")
    @magic_arguments.argument("--as", dest="name", metavar="NAME",
                              help="Load it beside the models already loaded, as NAME (%%llm --model NAME, "
                                   "--compare NAME,...); it must fit beside them in memory.")
    @magic_arguments.argument("--replace", metavar="NAME",
                              help="Unload the model loaded as NAME first (to make room for this one).")
    @user_errors
    def llm_load(self, line: str) -> None:
        """Load a model into this kernel's engine; it stays loaded between cells.

        Loading another model releases the current one first; the same model with the same options
        returns at once. Examples::

            %llm_load ./models/org_model --load-in-4bit --compute-dtype bfloat16
            %llm_load ./models/model.Q4_K_M.gguf --n-ctx 4096 --n-gpu-layers -1
            %llm_load org_model --fit --save-settings
            %llm_load ./models/base --as base
            %llm_load ./models/tuned --as tuned --replace base

        A model of the models folder gets the settings saved for it (``--save-settings``, or
        text-generation-webui's ``config-user.yaml``); options on the line win.
        """
        args = parse_line(self.llm_load, line)
        from ..options import LoadOptions

        options = LoadOptions.from_namespace(args)
        from ..registry import models

        status = models().load(args.model, options, name=args.name, replace=args.replace, fit=args.fit,
                               save_settings=args.save_settings)
        as_name = f" as {args.name}" if args.name else ""
        if status.already_loaded:
            print(f"{status.model} is already loaded{as_name} with these options; nothing was done.")
            return
        where = ", ".join(f"{dev} {format_memory(n)}" for dev, n in status.placement.memory_bytes.items())
        print(f"Loaded {status.model}{as_name} with {status.loader}" + (f" ({where})" if where else "") +
              (f" in {status.load_seconds:.2f} s" if status.load_seconds is not None else ""))
        for note in status.placement.notes:
            print(note)

    @cell_magic
    @lazy_arguments(name="%llm")  # the usage line says %%llm
    @generation_arguments
    @magic_arguments.argument("--chat", action="store_true",
                              help="Send the cell as one user turn through the model's chat template.")
    @magic_arguments.argument("--system", metavar="TEXT", help="System prompt (implies --chat).")
    @magic_arguments.argument("--sweep", metavar="GRID",
                              help='Run the prompt with every combination of these options and show a table, e.g. '
                                   '--sweep "temperature=0,0.7 seed=1,2,3" (-o VAR stores the DataFrame).')
    @magic_arguments.argument("--choices", metavar="A|B|C",
                              help='Score these continuations of the cell (separated by |, spaces kept: " A| B") '
                                   "and show them ranked by log-likelihood instead of generating (-o VAR stores "
                                   "the scores).")
    @magic_arguments.argument("--model", metavar="NAME",
                              help="Prompt the model loaded as NAME (%%llm_load MODEL --as NAME; default: the "
                                   "unnamed one).")
    @magic_arguments.argument("--compare", metavar="A,B",
                              help="Run the cell on each of these models (names, or models to load for the "
                                   "comparison) and show their replies side by side, as columns (-o VAR stores "
                                   "the comparison).")
    @output_argument
    @user_errors
    def llm(self, line: str, cell: str) -> None:
        """Prompt the loaded model with the cell; the reply streams into the output.

        The cell is sent as raw text (``--chat`` sends it through the model's chat template).
        ``{name}`` inserts the value of the variable ``name``; ``{{name}}`` writes ``{name}``; other
        braces (code, JSON) are left alone. The run record (model, options, seed, versions) is
        attached to the output's metadata. Example::

            %%llm --temperature 0 --max-new-tokens 64 -o r
            Translate to Portuguese: {sentence}

            %%llm --compare base,tuned --temperature 0
            Write a haiku about the sea.
        """
        from ..registry import engine_for

        args = parse_line(self.llm, line)
        engine = engine_for(args.model) if args.model is not None else get_engine()
        options = generation_options(args, engine.defaults)
        user_ns = self.shell.user_ns if self.shell is not None else {}
        prompt = interpolate(cell.strip("\n"), user_ns)
        if not prompt.strip():
            raise NbllmError("the prompt is empty", "write it in the cell, under the %%llm line")
        chat = args.chat or args.system is not None
        if args.compare is not None:
            if args.model is not None or args.sweep is not None or args.choices is not None:
                raise NbllmError("--compare runs the cell on several models: it does not go with --model, --sweep "
                                 "or --choices", "use --compare alone (a sweep over models: --sweep \"model=a,b\")")
            from .compare import show_comparison

            show_comparison(self.shell, prompt, args.compare, options, chat=chat, system=args.system,
                            output=args.output, namespace=user_ns)
            return
        if args.choices is not None:
            from .scoring import show_choices

            show_choices(prompt, args.choices, output=args.output, namespace=user_ns, model=args.model)
            return
        if args.sweep is not None:
            from .experiments import show_sweep

            show_sweep(prompt, options, args.sweep, chat=chat, system=args.system, output=args.output, namespace=user_ns,
                       model=args.model)
            return
        view = StreamView(self.shell)
        with waiting_shown(view, engine):
            result = engine.stream(prompt, options, chat=chat, system=args.system)
        if args.output:
            user_ns[args.output] = result
        show_stream(self.shell, result, view)

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("name", nargs="?", help="The model loaded as NAME (default: the unnamed one).")
    @magic_arguments.argument("--all", dest="all_", action="store_true", help="Unload every model.")
    @user_errors
    def llm_unload(self, line: str) -> None:
        """Unload the model (or the one loaded as NAME, or --all) and free its memory. A reply streaming
        from it ends, its text kept; a sweep on it stops, keeping its finished rows."""
        from ..registry import models

        args = parse_line(self.llm_unload, line)
        registry = models()
        if args.all_:
            before = process_rss()
            names = registry.unload_all()
            if names:
                print(f"Unloaded {', '.join(names)}; process memory {format_memory(before)} → "
                      f"{format_memory(process_rss())}.")
            else:
                print("No model was loaded.")
            return
        engine = registry.engine(args.name)
        model = engine.status().model
        before = process_rss()
        if registry.unload(args.name):
            as_name = f" ({args.name})" if args.name else ""
            print(f"Unloaded {model}{as_name}; process memory {format_memory(before)} → {format_memory(process_rss())}.")
        elif registry.names():
            print(f"No unnamed model was loaded (loaded: {', '.join(registry.names())}: %llm_unload NAME, or --all).")
        else:
            print("No model was loaded.")

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("name", nargs="?", help="Only the model loaded as NAME.")
    @user_errors
    def llm_status(self, line: str) -> Any:
        """The loaded models, each with its loader and options, where its layers are and the memory used."""
        from ..registry import Listing, models

        args = parse_line(self.llm_status, line)
        registry = models()
        if args.name is not None:
            return registry.engine(args.name).status()
        statuses = registry.statuses()
        if set(statuses) <= {"default"}:  # one unnamed model (or none): as it always was
            return registry.default.status()
        return Listing(statuses)
