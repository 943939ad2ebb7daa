"""``%llm_runs``, ``%llm_replay``: the run log as a table, and replaying outputs without the model."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from ._common import lazy_arguments, parse_line, user_errors

if TYPE_CHECKING:
    from ..options import GenerationOptions
    from ..result import Result

# the run log, the replay and sweeps (and the engine under them) are imported when a magic runs, not by %load_ext


@magics_class
class ExperimentMagics(Magics):
    """The run log and replays."""

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("--last", metavar="N", type=int, default=20, help="Show the N latest runs (default: 20).")
    @magic_arguments.argument("--model", metavar="NAME", help="Only runs of models whose name contains NAME.")
    @magic_arguments.argument("--session", metavar="ID", help="Only the runs of one kernel (the session column).")
    @magic_arguments.argument("--path", metavar="FILE", help="Read another run log than this kernel's.")
    @user_errors
    def llm_runs(self, line: str) -> Any:
        """The run log as a table: one row per generation of any kernel (prompt, options, text, tokens,
        speed, record id). ``nbllm.runs(...)`` returns the same DataFrame. Example::

            %llm_runs --last 5 --model qwen
        """
        from ..runlog import runs

        args = parse_line(self.llm_runs, line)
        return runs(last=args.last, model=args.model, session=args.session, path=args.path)

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("source", nargs="?", help="A saved notebook (.ipynb) or a run log (.sqlite); "
                              "'off' turns the replay off; nothing: say what is replayed.")
    @magic_arguments.argument("--fallback", default="error", metavar="{error,run}",
                              help="At a prompt no recorded run matches: error (one line naming the closest run, "
                                   "the default) or run (load the model and run it, and the cells after it).")
    @magic_arguments.argument("--session", metavar="ID", help="Replay only one kernel's runs of a run log.")
    @user_errors
    def llm_replay(self, line: str) -> None:
        """Show a notebook's outputs again without its model: until ``%llm_replay off``, ``%llm_load``
        loads nothing and each ``%%llm``, ``%%llm_chat`` or ``nbllm.generate`` that matches a recorded
        run (same model, options, seed if given, prompt) shows that run's text, marked replayed in its
        record. Examples::

            %llm_replay results/study.ipynb
            %llm_replay ~/.local/share/nbllm/runs.sqlite --fallback run
            %llm_replay off
        """
        from ..recordings import FALLBACKS, active_replay, replay

        args = parse_line(self.llm_replay, line)
        if args.fallback not in FALLBACKS:  # (not argparse's choices: the replay is imported when used, not at %load_ext)
            raise UsageError(f"--fallback {args.fallback!r} is not valid. Use one of: {', '.join(FALLBACKS)}.")
        if args.source is None:
            current = active_replay()
            print(repr(current) if current is not None else "No replay is on.")
            return
        if args.source == "off":
            current = active_replay()
            replay(None)
            print(f"Replay off ({current.answered} outputs were replayed)." if current is not None else "No replay was on.")
            return
        started = replay(args.source, fallback=args.fallback, session=args.session)
        assert started is not None
        print(f"Replaying {len(started.recording)} recorded runs from {started.recording.source}: "
              "%llm_load loads nothing; prompts show their recorded outputs.")


def show_sweep(prompt: str, options: GenerationOptions, grid: str, *, chat: bool, system: str | None,
               output: str | None, namespace: MutableMapping[str, Any], model: str | None = None) -> None:
    """``%%llm --sweep GRID``: run the sweep, show its table (the rows' records and outcomes in the
    output's metadata, for replay), store the DataFrame in ``output``."""
    from IPython.display import display

    from ..sweeps import parse_grid, sweep

    values: dict[str, Any] = dict(parse_grid(grid))
    results: list[Result] = []
    if model is not None and "model" not in values:
        values["model"] = model
    frame = sweep(prompt, options, chat=chat, system=system, results=results, **values)
    if output:
        namespace[output] = frame
    rows = [{"record": r.record.to_dict(), "outcome": r.outcome(text=True)} for r in results if r.record is not None]
    display(frame, metadata={"nbllm_runs": rows})
    if frame.attrs.get("interrupted"):
        how = f"stopped ({frame.attrs['stopped']})" if frame.attrs.get("stopped") else "interrupted"
        raise UsageError(f"Sweep {how} after {len(frame)} of {frame.attrs['runs']} runs; the table keeps them.")


__all__ = ["ExperimentMagics", "show_sweep"]
