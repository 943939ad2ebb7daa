"""The ``nbllm`` console command: the models folder from a terminal (or a Docker entrypoint).

``nbllm models`` lists the models folder; ``nbllm download organization/model[:revision]`` is nbllm's
``download-model.py``. Both are thin: each is one call into :mod:`nbllm.models` / :mod:`nbllm.download`.
Errors print one line to stderr and exit with status 1 (130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import NbllmError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbllm", description="Manage the models folder nbllm loads from (see `nbllm models`)."
    )
    parser.add_argument(
        "--dir",
        metavar="PATH",
        help="models folder to use (default: $NBLLM_MODELS_DIR, else ~/.local/share/nbllm/models)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("models", help="list the models in the models folder")
    dl = commands.add_parser(
        "download",
        help="download a model from the Hugging Face Hub into the models folder",
        description="Download organization/model[:revision] into the models folder. An interrupted download "
        "continues where it stopped when run again.",
    )
    dl.add_argument("model", metavar="organization/model[:revision]")
    dl.add_argument(
        "--file",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="download only files matching (e.g. '*Q5_K_M*')",
    )
    dl.add_argument("--exclude", nargs="+", action="extend", metavar="PATTERN", help="skip files matching")
    dl.add_argument(
        "--check", action="store_true", help="verify an already downloaded model again; download nothing"
    )
    dl.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (also used as the console script's)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            from .models import ModelsFolder

            print(ModelsFolder(args.dir).list().text())
        else:
            from .download import download

            download(
                args.model,
                files=args.file,
                exclude=args.exclude,
                check=args.check,
                models_dir=args.dir,
                progress=not args.quiet,
            )
    except NbllmError as exc:
        print(f"nbllm: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nbllm: interrupted. Run the same command again to continue where it stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
