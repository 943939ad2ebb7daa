"""nbllm's one error family.

Every error a user sees is an :class:`NbllmError`: one line that says what went wrong (the cause) and
what to do about it (the fix). The magics show it as an IPython ``UsageError`` (no traceback).
"""

from __future__ import annotations

from typing import Any


class NbllmError(Exception):
    """An error written for the user: ``cause`` is what went wrong, ``fix`` is what to do."""

    def __init__(self, cause: str, fix: str | None = None) -> None:
        self.cause = cause.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one line shown to the user."""
        return f"{self.cause}. {self.fix[0].upper() + self.fix[1:]}." if self.fix else f"{self.cause}."


class NbllmWarning(UserWarning):
    """Something the user should know that is not an error: an option with no effect in this
    combination, a fallback. The magics show it as one ``note:`` line."""


class OptionError(NbllmError, ValueError):
    """An option value or a combination of options is invalid (raised before anything is loaded)."""


class ModelNotFoundError(NbllmError, FileNotFoundError):
    """The model named by the user does not exist where it was looked for."""


class LoadError(NbllmError):
    """The model exists but could not be loaded (corrupt files, missing memory, needs remote code...)."""


class MissingDependencyError(NbllmError, ImportError):
    """An optional library needed for the request is not installed."""


class NoModelLoadedError(NbllmError):
    """A prompt was sent but no model is loaded."""


class GenerationError(NbllmError):
    """Generation failed inside the loader library."""


class DownloadError(NbllmError):
    """Downloading from the Hugging Face Hub failed."""


class ChatError(NbllmError):
    """A conversation cannot do what was asked (nothing to regenerate, a bad file...)."""


class ImageError(NbllmError, ValueError):
    """An image cannot be used: unreadable, missing, or given to a model that takes no images."""


class ReplayError(NbllmError):
    """A replay cannot answer: no recorded run matches the request, or the recording cannot be read."""


def missing_dependency(package: str, extra: str) -> MissingDependencyError:
    """The error for an optional library that is not installed."""
    return MissingDependencyError(
        f"{package} is not installed", f"install it with: pip install 'nbllm[{extra}]'"
    )


def pandas_module() -> Any:
    """pandas, imported now (tables are DataFrames; ``import nbllm`` does not pay for it). It lives here, at
    the bottom of the package, so that every layer that makes a table can ask for it."""
    try:
        import pandas
    except ImportError:
        raise missing_dependency("pandas (the run log, sweep and score tables are DataFrames)", "experiments") from None
    return pandas
