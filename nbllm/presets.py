"""Presets in text-generation-webui's format: ``NAME.yaml`` files of sampler settings.

nbllm's own (``deterministic``, ``balanced``, ``creative``) ship as such files (``nbllm/data/presets``);
a user's are read from ``presets/`` beside the models folder, as text-generation-webui keeps
``user_data/presets/`` beside ``user_data/models/`` — so pointing nbllm at a text-generation-webui
``user_data/models`` makes its presets work in ``--preset NAME``, the panel and Python. A user preset with
the name of a built-in one replaces it.

As in text-generation-webui, a preset sets every sampler: those its file names, and the others to their
neutral values (temperature 1, top_p 1, every other sampler off). It never touches max_new_tokens, stop,
the seed, logprobs or a constraint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .errors import NbllmWarning, OptionError
from .options import SAMPLER_ORDER, GenerationOptions

BUILTIN = ("deterministic", "balanced", "creative")
"""nbllm's own presets, in the order they are shown."""

BUILTIN_DIR = Path(__file__).parent / "data" / "presets"

NOT_PRESET = frozenset({"seed", "logprobs", "logprobs_after_samplers"})
"""Options of the sampling groups that a preset never sets."""

TGW_ONLY = frozenset({
    "tfs", "encoder_repetition_penalty", "penalty_alpha", "grammar_string", "auto_max_new_tokens", "max_tokens_second",
    "add_bos_token", "skip_special_tokens", "truncation_length", "static_cache", "num_beams", "length_penalty",
    "early_stopping", "min_length", "prompt_lookup_num_tokens", "show_after", "max_updates_second",
})
"""text-generation-webui preset keys nbllm has no option for: left out with a warning (when not neutral)."""

TGW_NEUTRAL: dict[str, Any] = {"tfs": 1, "encoder_repetition_penalty": 1, "penalty_alpha": 0, "grammar_string": "",
                               "num_beams": 1, "length_penalty": 1, "early_stopping": False, "min_length": 0}


def presets_dir(models: str | Path | None = None) -> Path:
    """The user's presets folder: ``presets`` beside the models folder ``models`` (default: the one in effect)."""
    from .models import models_dir

    return (Path(models).expanduser() if models is not None else models_dir()).parent / "presets"


def neutral() -> dict[str, Any]:
    """What a preset starts from: every sampling option off (text-generation-webui's neutral values)."""
    out = {s.name: s.default for s in GenerationOptions.specs()
           if s.group in ("sampling", "samplers") and s.name not in NOT_PRESET}
    out.update(temperature=1.0, top_p=1.0)
    return out


def _with_neutral(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the neutral ones; greedy (temperature 0) leaves the samplers it ignores at nbllm's
    defaults, where they do not warn."""
    start = neutral()
    if values.get("temperature") == 0.0:
        start.update({n: GenerationOptions.spec(n).default for n in ("top_p", "top_k", "min_p", "typical_p")})
    return {**start, **values}


def read_preset(path: str | Path) -> dict[str, Any]:
    """The option values of one preset file (text-generation-webui's YAML). Keys text-generation-webui has
    and nbllm lacks are left out with one warning; any other key, or a value the schema refuses, is an
    :class:`OptionError` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise OptionError(f"preset {path.name} cannot be read ({str(exc).splitlines()[0]})",
                          "fix the file: one 'option: value' per line") from None
    if not isinstance(data, dict):
        raise OptionError(f"preset {path.name} is not a list of 'option: value' lines", "fix the file")
    known = set(GenerationOptions.names()) - NOT_PRESET
    values: dict[str, Any] = {}
    lacking = []
    for key, value in data.items():
        key = str(key)
        if key in TGW_ONLY:
            if TGW_NEUTRAL.get(key, object()) != value:
                lacking.append(key)
        elif key == "do_sample":  # text-generation-webui's greedy switch
            if value is False:
                values["temperature"] = 0.0
        elif key == "sampler_priority":
            names = value.split() if isinstance(value, str) else [str(v) for v in value or ()]
            values[key] = tuple(n for n in names if n in SAMPLER_ORDER)  # tfs, encoder_repetition_penalty: absent
        elif key in known:
            values[key] = value
        else:
            raise OptionError(f"preset {path.name} has an unknown option {key!r}",
                              f"remove it, or use an option of --preset files: {', '.join(sorted(known))}")
    if lacking:
        warnings.warn(f"preset {path.stem}: nbllm has no {', '.join(lacking)}; left out", NbllmWarning, stacklevel=3)
    try:
        GenerationOptions.from_dict(_with_neutral(values))
    except OptionError as exc:
        raise OptionError(f"preset {path.name}: {exc.cause}", exc.fix) from None
    return values


def preset_files(models: str | Path | None = None) -> dict[str, Path]:
    """Every preset's file by name: nbllm's, then the user's (which replace nbllm's of the same name)."""
    files = {name: BUILTIN_DIR / f"{name}.yaml" for name in BUILTIN}
    folder = presets_dir(models)
    if folder.is_dir():
        for path in sorted(folder.glob("*.yaml")):
            files[path.stem] = path
    return files


def all_presets(models: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every preset by name: the option values its file sets."""
    return {name: read_preset(path) for name, path in preset_files(models).items()}


def apply_preset(name: str, base: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
    """``base`` (or the defaults) with preset ``name`` applied (every sampler: its file's values, the
    others neutral), then ``overrides`` on top (validated)."""
    files = preset_files()
    if name not in files:
        raise OptionError(f"unknown preset {name!r}", f"use one of: {', '.join(files)}")
    start = base.to_dict() if base is not None else {}
    return GenerationOptions.from_dict({**start, **_with_neutral(read_preset(files[name])), **overrides})


def save_preset(name: str, options: GenerationOptions, models: str | Path | None = None) -> Path:
    """Write ``options``' samplers as preset ``name`` in the user's presets folder, in text-generation-webui's
    format (the values away from neutral, as its "Save preset" writes them); returns the file."""
    import yaml

    start = neutral()
    values: dict[str, Any] = {}
    for key, off in start.items():
        value = getattr(options, key)
        if value != off:
            values[key] = list(value) if isinstance(value, tuple) else value
    folder = presets_dir(models)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
