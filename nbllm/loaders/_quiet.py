"""Library messages that tell a notebook user nothing they can act on, kept out of the cell.

- torch's ``UserWarning: Overriding a previously registered kernel for the same operator and the same
  dispatch key`` when bitsandbytes (imported by transformers for ``--load-in-4bit``/``--load-in-8bit``, and
  by peft for LoRA adapters) registers its torch.compile'd ops a second time;
- bitsandbytes' ``Failed to load CPU gemm_4bit_forward from kernels-community`` log line (the optional
  ``kernels`` package is absent; bitsandbytes uses its own CPU code).

Everything else a library says still shows.
"""

from __future__ import annotations

import logging
import warnings

NOISE_WARNINGS = (r"Overriding a previously registered kernel for the same operator",)
NOISE_LOG_LINES = ("Failed to load CPU gemm_4bit_forward",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line in message for line in NOISE_LOG_LINES)


_FILTER = _DropNoise()


def quiet_library_noise() -> None:
    """Drop the messages above from here on. Called before the imports that make them: a filter added
    inside a ``warnings.catch_warnings`` block (as the magics run) lasts until the block ends."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name in ("bitsandbytes", "bitsandbytes.cextension"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
