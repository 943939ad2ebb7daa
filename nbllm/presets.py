"""Presets in text-generation-webui's format: ``NAME.yaml`` files of sampler settings.

nbllm's own (``deterministic``, ``balanced``, ``creative``) ship as such files (``nbllm/data/presets``);
a user's are read from ``presets/`` beside the models folder, as text-generation-webui keeps
``user_data/presets/`` beside ``user_data/models/`` — so pointing nbllm at a text-generation-webui
``user_data/models`` makes its presets work in ``--preset NAME``, the panel and Python. A user preset with
the name of a built-in one replaces it.

As in text-generation-webui, a preset sets every sampler: those its file names, and the others to their
neutral values (temperature 1, top_p 1, every other sampler off). It never touches max_new_tokens, stop,
the seed, logprobs or a constraint. The code lives in :mod:`nbllm.options` (``GenerationOptions.preset``
uses it); this module is its public face.
"""

from __future__ import annotations

from .options import BUILTIN_PRESETS as BUILTIN
from .options import PRESETS_BUILTIN_DIR as BUILTIN_DIR
from .options import all_presets, apply_preset, neutral, preset_files, presets_dir, read_preset, save_preset

__all__ = ["BUILTIN", "BUILTIN_DIR", "all_presets", "apply_preset", "neutral", "preset_files", "presets_dir",
           "read_preset", "save_preset"]
