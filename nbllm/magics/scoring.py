"""``%%llm --choices``, ``%llm_tokens``, ``%%llm_perplexity``: thin calls into :mod:`nbllm.scoring`."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from IPython.core import magic_arguments
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from ..errors import OptionError
from ._common import interpolate, lazy_arguments, output_argument, parse_line, user_errors

if TYPE_CHECKING:  # the scoring module (and the engine under it) is imported when a magic runs, not at %load_ext
    from ..scoring import Scores


def split_choices(text: str) -> list[str]:
    """``" A| B| C"`` → ``[" A", " B", " C"]``: split at ``|``, spaces kept (they are part of a continuation)."""
    choices = text.split("|")
    if len(choices) < 2 or any(not c for c in choices):
        raise OptionError(f"--choices {text!r} needs two or more continuations, none empty",
                          'separate them with |, e.g. --choices " Paris| Lyon"')
    return choices


def show_choices(prompt: str, choices: str, *, output: str | None, namespace: MutableMapping[str, Any],
                 model: str | None = None) -> Scores:
    """Score ``choices`` after ``prompt`` and show the ranked table; its output carries the record and the
    scores, so a saved notebook replays it."""
    from IPython.display import display

    from ..scoring import score

    scores = score(prompt, split_choices(choices), model=model)
    if output:
        namespace[output] = scores
    metadata = {}
    if scores.record is not None:
        metadata = {"nbllm": scores.record.to_dict(), "nbllm_result": {"text": scores.to_json(), "finish_reason": "done"}}
    display({"text/plain": str(scores), "text/html": scores._repr_html_()}, raw=True, metadata=metadata)
    return scores


@magics_class
class ScoringMagics(Magics):
    """Tokens and perplexity of the loaded model."""

    @line_cell_magic
    @lazy_arguments()
    @magic_arguments.argument("text", nargs="*", help="The text (or write it in the cell, under %%llm_tokens).")
    @magic_arguments.argument("--chat", action="store_true",
                              help="Tokenize the text as one user turn rendered through the model's chat template.")
    @magic_arguments.argument("--system", metavar="TEXT", help="System prompt (implies --chat).")
    @output_argument
    @user_errors
    def llm_tokens(self, line: str, cell: str | None = None) -> Any:
        """The tokens of a text with the loaded model's tokenizer: each token and its id, and the count;
        with ``--chat`` the rendered chat prompt and the share of the context it takes. Examples::

            %llm_tokens The capital of France is
            %%llm_tokens --chat --system "Be brief."
            What is the capital of France?
        """
        args = parse_line(self.llm_tokens, line)
        user_ns = self.shell.user_ns if self.shell is not None else {}
        text = cell.strip("\n") if cell is not None else " ".join(args.text)
        from ..scoring import tokenize

        tokens = tokenize(interpolate(text, user_ns), chat=args.chat or args.system is not None, system=args.system)
        if args.output:
            user_ns[args.output] = tokens
        return tokens

    @line_cell_magic
    @lazy_arguments()
    @magic_arguments.argument("path", nargs="?", help="A text file (or write the text in the cell).")
    @magic_arguments.argument("--max-length", type=int, metavar="N",
                              help="Tokens per window (default: the model's context).")
    @magic_arguments.argument("--stride", type=int, default=512, metavar="N",
                              help="Tokens each window moves by (default: 512).")
    @output_argument
    @user_errors
    def llm_perplexity(self, line: str, cell: str | None = None) -> Any:
        """The loaded model's perplexity on the cell's text (or a file), with the sliding window of
        transformers' perplexity guide. Example::

            %%llm_perplexity --max-length 512 --stride 256
            The quick brown fox ...
        """
        from pathlib import Path

        args = parse_line(self.llm_perplexity, line)
        user_ns = self.shell.user_ns if self.shell is not None else {}
        if cell is not None and cell.strip():
            text: str | Path = interpolate(cell.strip("\n"), user_ns)
        elif args.path:
            text = Path(args.path).expanduser()
        else:
            raise OptionError("there is no text to measure", "write it in the cell, or give a text file's path")
        from ..scoring import perplexity

        result = perplexity(text, max_length=args.max_length, stride=args.stride)
        if args.output:
            user_ns[args.output] = result
        print(result)

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("tasks", help="lm-eval task names, separated by commas (nbllm.evaluate_tasks() lists them).")
    @magic_arguments.argument("--limit", type=float, metavar="N",
                              help="Samples per task (below 1: a share of them).")
    @magic_arguments.argument("--num-fewshot", type=int, metavar="K", help="Few-shot examples (default: the task's).")
    @magic_arguments.argument("--seed", type=int, default=1234, help="Seed of lm-eval's random choices (default: 1234).")
    @magic_arguments.argument("--include-path", metavar="DIR", help="A folder of your own task YAML files.")
    @output_argument
    @user_errors
    def llm_eval(self, line: str) -> Any:
        """Evaluate the loaded model on lm-evaluation-harness tasks (``pip install 'nbllm[eval]'``): a table
        of each task's metrics; ``-o VAR`` keeps the :class:`~nbllm.evaluate.Evaluation` (per-sample rows
        with ``VAR.samples(task)``). Example::

            %llm_eval arc_easy,hellaswag --limit 50 --num-fewshot 0
        """
        from ..evaluate import evaluate

        args = parse_line(self.llm_eval, line)
        limit = args.limit
        if limit is not None and limit >= 1 and float(limit).is_integer():
            limit = int(limit)
        result = evaluate(args.tasks, limit=limit, num_fewshot=args.num_fewshot, seed=args.seed,
                          include_path=args.include_path)
        if args.output:
            user_ns = self.shell.user_ns if self.shell is not None else {}
            user_ns[args.output] = result
        return result
