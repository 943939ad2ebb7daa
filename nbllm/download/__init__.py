"""Downloads from the Hugging Face Hub into the models folder, resumable and verified.

``download("organization/model[:revision]")`` is nbllm's ``download-model.py``: it asks the Hub for the
repository's files and their hashes (:mod:`.hub`), picks the files a loader needs (:mod:`.select`),
fetches and verifies each one, resuming where an earlier attempt stopped (:mod:`.transfer`);
``check_model`` verifies a local copy again (:mod:`.check`). :class:`DownloadOptions` is the one schema
of the download flags (:mod:`.options`). The bookkeeping files a download leaves
are :mod:`nbllm.store`'s.

Where files go (text-generation-webui's layout): one GGUF file → directly in the models folder; anything
else → the subfolder ``organization_model`` (``organization_model_<revision>`` for a revision other
than ``main``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .check import check_model
    from .hub import CONNECT_TIMEOUT, METADATA_TIMEOUT
    from .options import DownloadOptions
    from .result import DownloadResult, Echo
    from .select import DEFAULT_QUANTIZATION, QUANTIZATION_PREFERENCE, Selection, select_files
    from .transfer import download

_WHERE = {
    "check_model": "check", "CONNECT_TIMEOUT": "hub", "METADATA_TIMEOUT": "hub", "DownloadOptions": "options",
    "DownloadResult": "result", "Echo": "result", "DEFAULT_QUANTIZATION": "select", "QUANTIZATION_PREFERENCE": "select",
    "Selection": "select", "select_files": "select", "download": "transfer",
}
"""Each name's module, imported at first use: ``%load_ext nbllm`` needs only :mod:`.options` (the
``%llm_download`` flags), not the transfer machinery."""


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'nbllm.download' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_QUANTIZATION",
    "METADATA_TIMEOUT",
    "QUANTIZATION_PREFERENCE",
    "DownloadOptions",
    "DownloadResult",
    "Echo",
    "Selection",
    "check_model",
    "download",
    "select_files",
]
