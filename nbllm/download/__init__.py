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

from .check import check_model
from .hub import CONNECT_TIMEOUT, METADATA_TIMEOUT
from .options import DownloadOptions
from .result import DownloadResult, Echo
from .select import DEFAULT_QUANTIZATION, QUANTIZATION_PREFERENCE, Selection, select_files
from .transfer import download

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
