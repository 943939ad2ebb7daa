"""The ``nbllm`` console command: the models folder from a terminal (or a Docker entrypoint).

``nbllm models`` lists the models folder; ``nbllm download organization/model[:revision]`` is nbllm's
``download-model.py``, with :class:`~nbllm.download.DownloadOptions`' flags (the same as
``%llm_download``'s). Both are thin: each is one call into :mod:`nbllm.models` / :mod:`nbllm.download`.
Messages name the CLI's commands, not the magics. Errors print one line to stderr and exit with status 1
(130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .download.options import DownloadOptions
from .errors import NbllmError
from .frontend import set_front_end

_DIR_HELP = "models folder to use (default: $NBLLM_MODELS_DIR, else ~/.local/share/nbllm/models)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbllm", description="Manage the models folder nbllm loads from (see `nbllm models`)."
    )
    # --dir works before the command (nbllm --dir PATH models) and after it (nbllm models --dir PATH).
    parser.add_argument("--dir", dest="dir_before", metavar="PATH", help=_DIR_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("models", help="list the models in the models folder")
    listing.add_argument("--dir", dest="models_dir", metavar="PATH", help=_DIR_HELP)
    dl = commands.add_parser(
        "download",
        help="download a model from the Hugging Face Hub into the models folder",
        description="Download organization/model[:revision] into the models folder. An interrupted download "
        "continues where it stopped when run again.",
    )
    DownloadOptions.add_arguments(dl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (also used as the console script's)."""
    args = _parser().parse_args(argv)
    models_dir = args.models_dir or args.dir_before
    previous = set_front_end("cli")
    try:
        if args.command == "models":
            from .models import ModelsFolder

            print(ModelsFolder(models_dir).list().text())
        else:
            DownloadOptions.from_namespace(args).run(models_dir=models_dir)
    except NbllmError as exc:
        print(f"nbllm: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nbllm: interrupted. Run the same command again to continue where it stopped.", file=sys.stderr)
        return 130
    finally:
        set_front_end(previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
