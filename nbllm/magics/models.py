"""``%llm_models`` and ``%llm_download``: the models folder from a notebook.

Thin on purpose: each magic parses its line and makes one call into :mod:`nbllm.models` or
:mod:`nbllm.download`; ``%llm_download``'s flags are :class:`~nbllm.download.DownloadOptions`'. The
class is also the configurable behind ``%config ModelMagics.models_dir = "/path/to/models"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core.magic import Magics, line_magic, magics_class
from traitlets import Unicode, observe

from ._common import lazy_arguments, parse_line, schema_arguments, user_errors

if TYPE_CHECKING:
    from ..models import ModelList

F = TypeVar("F", bound=Callable[..., Any])


def _download_flags(func: F) -> F:
    """``magic_arguments`` for every field of :class:`DownloadOptions` (so ``%llm_download?`` lists them)."""
    return schema_arguments("download.options.DownloadOptions")(func)  # imported when the parser is built


@magics_class
class ModelMagics(Magics):
    """Magics for the models folder; ``models_dir`` is configurable with ``%config``."""

    models_dir = Unicode(
        "",
        help="Models folder for %llm_models, %llm_download and %llm_load names (overrides NBLLM_MODELS_DIR; "
        "empty: NBLLM_MODELS_DIR, else ~/.local/share/nbllm/models).",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        # %config only sees the shell's configurables; IPython's own %store magics register the same way.
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)
        if self.models_dir:  # set from an IPython profile before the class existed
            from ..models import set_models_dir

            set_models_dir(self.models_dir)

    @observe("models_dir")
    def _models_dir_changed(self, change: dict[str, Any]) -> None:
        from ..models import set_models_dir

        set_models_dir(change["new"] or None)

    @line_magic
    @lazy_arguments()
    @user_errors
    def llm_models(self, line: str) -> ModelList:
        """List the models folder: name, loader, format and quantization, size, revision, status."""
        from ..models import ModelsFolder

        parse_line(self.llm_models, line)
        return ModelsFolder().list()

    @line_magic
    @lazy_arguments()
    @_download_flags
    @user_errors
    def llm_download(self, line: str) -> None:
        """Download a model from the Hugging Face Hub into the models folder (resumable, verified).

        Config and tokenizer files always; safetensors over .bin; in a GGUF repository the Q4_K_M file
        unless --file chooses. Run it again after an interruption to continue where it stopped.
        """
        from ..download.options import (
            DownloadOptions,  # the download package itself is imported when it downloads
        )

        DownloadOptions.from_namespace(parse_line(self.llm_download, line)).run()
