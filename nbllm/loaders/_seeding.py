"""Seeding a generation as ``transformers.set_seed`` does, without its import.

``from transformers import set_seed`` imports ``transformers.trainer_utils``, which imports peft when it
is installed, which imports bitsandbytes, which registers torch.compile'd ops: 5.5 s on a kernel's first
prompt (measured with ``python -X importtime``), and torch's "Overriding a previously registered kernel"
warning in the cell. What ``set_seed`` does for a generation is three calls, made here.
"""

from __future__ import annotations


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (every device: ``torch.manual_seed`` seeds CUDA, MPS and
    XPU too), as ``transformers.set_seed(seed)`` does, so a seeded generation samples the same tokens."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
