"""What a load does with machine fit: saved settings for the model, ``--fit``'s recommendation, the
options the user typed over both; after the load, what worked; on a failure, the cause and the fix.

The engine calls these around every load, so the magic, the API and the panel behave alike.
"""

from __future__ import annotations

import warnings

from .. import models
from ..errors import NbllmError, NbllmWarning
from ..options import GenerationOptions, LoadOptions
from ..source import ModelSource
from .failures import failure_error
from .measure import measure_peak_memory, reset_peak_memory
from .recommend import recommend
from .settings import SavedSettings, record_success, save_settings, saved_settings, settings_name


def in_models_folder(source: ModelSource) -> bool:
    """Whether the model's files are in the models folder (saved settings and what worked are kept there)."""
    if source.path is None:
        return False
    try:
        source.path.resolve().relative_to(models.models_dir().resolve())
    except (ValueError, OSError):
        return False
    return True


def load_options(source: ModelSource, typed: LoadOptions, *, fit: bool) -> tuple[LoadOptions, SavedSettings | None]:
    """The options to load ``source`` with: its saved settings (a note says so), then ``--fit``'s
    recommendation (each reason a note, before anything loads), then what the user set (which wins)."""
    base: dict[str, object] = {}
    saved = saved_settings(settings_name(source)) if in_models_folder(source) else None
    invalid = saved.invalid_note() if saved is not None else None
    if invalid:
        warnings.warn(invalid, NbllmWarning, stacklevel=3)
    if saved:
        warnings.warn(saved.note(), NbllmWarning, stacklevel=3)
        base.update(saved.load)
    if fit:
        rec = recommend(source)
        for line in str(rec).splitlines():
            warnings.warn(f"fit: {line.strip()}", NbllmWarning, stacklevel=3)
        base.update(rec.options)
    if not base:
        return typed, saved
    return LoadOptions.from_dict({**base, **typed.changed()}), saved


def before_load() -> None:
    reset_peak_memory()


def after_load(source: ModelSource, options: LoadOptions, loader: str, seconds: float, *, save: bool,
               defaults: GenerationOptions) -> None:
    """Remember what worked (models in the models folder); with ``save``, store the options as the
    model's settings in ``config-user.yaml`` (and say where)."""
    if save:
        path = save_settings(settings_name(source), options, defaults)
        warnings.warn(f"settings of {settings_name(source)} saved in {path}: loading it by name applies them",
                      NbllmWarning, stacklevel=3)
    if in_models_folder(source):
        record_success(settings_name(source), options, measure_peak_memory(), loader=loader, load_seconds=seconds)


def explained(exc: BaseException, source: ModelSource | None, options: LoadOptions | None, *,
              during: str) -> NbllmError | None:
    """The cause and the fix for a failure this module knows (out of memory, bitsandbytes without CUDA,
    flash-attn, remote code...), else ``None``."""
    cause = exc.__cause__ if isinstance(exc, NbllmError) and exc.__cause__ is not None else exc
    try:
        return failure_error(cause, source if source is not None and source.path is not None else None,
                             options, during=during)
    except Exception:  # explaining must never hide the original error
        return None


__all__ = ["after_load", "before_load", "explained", "in_models_folder", "load_options"]
