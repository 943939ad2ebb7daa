"""The download flags, one schema: ``%llm_download``, ``nbllm download`` and the settings panel's
download field all take them from :class:`DownloadOptions` (same names, help and parsing)."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import OptionError
from ..options import _Schema, option

if TYPE_CHECKING:  # pragma: no cover
    from .result import DownloadResult, Echo


@dataclass(frozen=True)
class DownloadOptions(_Schema):
    """What to download from the Hugging Face Hub, and how."""

    model: str = option(
        "", "The hub id: organization/model, or organization/model:revision.",
        flag="model", metavar="organization/model[:revision]",
    )
    file: tuple[str, ...] = option(
        (), "Download only the files matching these shell-style patterns (quote them: '*Q5_K_M*'); in a GGUF "
        "repository this chooses the quantization (default: Q4_K_M).", metavar="PATTERN",
    )
    exclude: tuple[str, ...] = option((), "Skip the files matching these patterns.", metavar="PATTERN")
    revision: str | None = option(
        None, "Hub revision (branch, tag or commit sha) to download, as organization/model:revision does.",
        metavar="REVISION",
    )
    check: bool = option(
        False, "Verify a downloaded model against the Hub's checksums again (offline); download nothing."
    )
    models_dir: str | None = option(
        None, "Download into this models folder instead of the one in use.",
        flag="--dir", metavar="PATH",
    )
    quiet: bool = option(False, "No progress bars.")

    def validate(self) -> None:
        super().validate()
        if not self.model.strip():
            raise OptionError("no hub id given", "give organization/model, or organization/model:revision")

    @classmethod
    def argparse_arguments(cls, *, defaults_none: bool = True) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """(flags, kwargs) for ``argparse.add_argument``: the hub id positional, patterns as lists."""
        args: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        for s in cls.specs():
            kwargs: dict[str, Any] = {"help": s.help.replace("%", "%%")}
            if not s.flag.startswith("-"):  # the positional hub id (argparse names it by its flag)
                args.append(((s.flag,), {**kwargs, "metavar": s.metavar}))
                continue
            kwargs["dest"] = s.name
            if s.type is bool:
                kwargs["action"] = "store_true"
            elif s.type is tuple:
                kwargs.update(nargs="+", action="extend", metavar=s.metavar)
            else:
                kwargs["metavar"] = s.metavar
            args.append(((s.flag,), kwargs))
        return args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add every download flag to ``parser`` (the CLI's ``download`` command)."""
        for flags, kwargs in cls.argparse_arguments():
            parser.add_argument(*flags, **kwargs)

    @classmethod
    def usage(cls) -> str:
        """One line: ``organization/model[:revision] [--file PATTERN ...] ... [--quiet]``."""
        words: list[str] = []
        for s in cls.specs():
            if not s.flag.startswith("-"):
                words.insert(0, str(s.metavar))
            elif s.type is bool:
                words.append(f"[{s.flag}]")
            else:
                words.append(f"[{s.flag} {s.metavar}{' ...' if s.type is tuple else ''}]")
        return " ".join(words)

    @classmethod
    def parse(cls, line: str) -> DownloadOptions:
        """Options from a line as typed after ``%llm_download`` (shell quoting: ``--file '*Q5_K_M*'``)."""
        parser = _Parser(prog="download", add_help=False)
        cls.add_arguments(parser)
        try:
            argv = shlex.split(line, posix=True)
        except ValueError as exc:
            raise OptionError(f"cannot parse {line!r}: {exc}", "check the quotes") from None
        return cls.from_namespace(parser.parse_args(argv))

    def run(self, *, models_dir: str | Path | None = None, echo: Echo | None = print) -> DownloadResult:
        """Download (or ``--check``) as these options say; ``models_dir`` applies when ``--dir`` is not given."""
        from .transfer import download

        return download(
            self.model,
            revision=self.revision,
            files=self.file or None,
            exclude=self.exclude or None,
            check=self.check,
            models_dir=self.models_dir or models_dir,
            progress=not self.quiet,
            echo=echo,
        )


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one-line :class:`OptionError` (not an exit)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(message, f"usage: {DownloadOptions.usage()}")
