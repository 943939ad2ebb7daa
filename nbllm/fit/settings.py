"""Saved per-model settings, in text-generation-webui's own ``config-user.yaml``, and what worked here.

text-generation-webui keeps, in its models folder, a ``config-user.yaml`` mapping a pattern to the
settings of the models whose names it matches (``re.match`` on lower-cased names, later entries win);
its "Save settings" button writes the entry ``<model name>$`` with the loader and its options::

    TheBloke_Llama-2-7B-fp16$:
      loader: Transformers
      cpu_memory: 0
      compute_dtype: float16
      quant_type: nf4
      load_in_4bit: true
      ...

nbllm reads and writes the same file in the same layout, so both tools share one set of settings: an
option both know is written under text-generation-webui's name (current names; older ones such as
``n_ctx``/``n_gpu_layers``/``use_flash_attention_2`` are read too), an option only nbllm has under its
own name, and keys nbllm does not know are kept as they are. Generation defaults go in the same entry
under text-generation-webui's names (``temperature``, ``top_p``, ...), which it applies when the model is
selected.

What loaded, with which options and how much memory it took at its peak, is nbllm's own bookkeeping:
``.nbllm/what-worked.json`` in the models folder.
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..errors import NbllmError, NbllmWarning, OptionError
from ..loaders import LLAMACPP, TRANSFORMERS, auto_loader, file_format, folder_format, option_loaders
from ..options import GenerationOptions, LoadOptions
from ..source import ModelSource
from ..store import read_worked, write_worked

SETTINGS_FILE = "config-user.yaml"

_TGW_LOADER = {TRANSFORMERS: "Transformers", LLAMACPP: "llama.cpp"}
_FROM_TGW_LOADER = {"transformers": TRANSFORMERS, "llama.cpp": LLAMACPP, "llamacpp_hf": LLAMACPP}

# nbllm option → text-generation-webui's key (per loader where they differ). Options absent here are
# written under their own (nbllm) name.
_TGW_KEYS: dict[str, dict[str, str]] = {
    "load_in_8bit": {TRANSFORMERS: "load_in_8bit"},
    "load_in_4bit": {TRANSFORMERS: "load_in_4bit"},
    "quant_type": {TRANSFORMERS: "quant_type"},
    "compute_dtype": {TRANSFORMERS: "compute_dtype"},
    "double_quant": {TRANSFORMERS: "use_double_quant"},
    "attn": {TRANSFORMERS: "attn_implementation"},
    "flash_attn": {TRANSFORMERS: "use_flash_attention_2", LLAMACPP: "flash_attn"},
    "compile": {TRANSFORMERS: "torch_compile"},
    "trust_remote_code": {TRANSFORMERS: "trust_remote_code"},
    "cpu_memory": {TRANSFORMERS: "cpu_memory"},
    "gpu_split": {TRANSFORMERS: "gpu_split", LLAMACPP: "tensor_split"},
    "disk_offload": {TRANSFORMERS: "disk"},
    "n_gpu_layers": {LLAMACPP: "gpu_layers"},
    "n_ctx": {LLAMACPP: "ctx_size"},
    "n_batch": {LLAMACPP: "batch_size"},
}

# Keys text-generation-webui writes for every model of a loader: written explicitly, defaults included,
# so that its own interface shows what nbllm saved rather than what it showed for the previous model.
_ALWAYS: dict[str, tuple[str, ...]] = {
    TRANSFORMERS: ("cpu_memory", "gpu_split", "quant_type", "load_in_8bit", "load_in_4bit", "disk_offload",
                   "double_quant"),
    LLAMACPP: ("n_gpu_layers", "n_ctx", "n_batch", "threads", "threads_batch", "cache_type", "gpu_split",
               "no_mmap", "mlock"),
}

# Every key read as a load option: text-generation-webui's current and older names, and nbllm's own.
_READ_ALIASES: dict[str, str] = {
    **{tgw: name for name, per in _TGW_KEYS.items() for tgw in per.values()},
    "n_gpu_layers": "n_gpu_layers", "n_ctx": "n_ctx", "n_batch": "n_batch", "flash_attn": "flash_attn",
    "use_flash_attention_2": "flash_attn", "tensor_split": "gpu_split",
    **{name: name for name in LoadOptions.names()},
}
_SPECIAL_READ = {"loader", "cpu", "bf16", "device", "dtype"}
_GPU_MEMORY = re.compile(r"^gpu_memory_(\d+)$")

_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty")
"""Generation options with the same name and meaning in text-generation-webui (seed and stop are mapped)."""


@dataclass
class SavedSettings:
    """The settings ``config-user.yaml`` holds for one model, as nbllm options."""

    model: str
    path: Path
    patterns: list[str]
    """The entries (patterns) that matched the model's name, in the order applied."""
    load: dict[str, Any] = field(default_factory=dict)
    """Load option names → values."""
    generation: dict[str, Any] = field(default_factory=dict)
    """Generation option names → values."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Keys nbllm does not use → why (text-generation-webui's own settings, other loaders)."""
    invalid: dict[str, str] = field(default_factory=dict)
    """Keys whose value nbllm cannot use (``ctx_size: abc``, ``loader: ExLlamav2``) → why; also in
    :attr:`ignored`. Each load says so (:meth:`invalid_note`)."""
    origin: dict[str, str] = field(default_factory=dict)
    """Key → the entry (pattern) its value came from (the last matching entry that sets it)."""

    def invalid_note(self) -> str | None:
        """One line naming each entry and key whose value is ignored, and why (``None``: there is none)."""
        if not self.invalid:
            return None
        parts = [f"entry {self.origin.get(key, '?')!r} key {key}: {why}" for key, why in self.invalid.items()]
        return (f"{self.path} has values nbllm ignores for {self.model}: " + "; ".join(parts)
                + " (fix or remove them there)")

    def load_options(self, typed: Mapping[str, Any] | None = None) -> LoadOptions:
        """The saved load options with ``typed`` (what the user gave on the line) over them."""
        return LoadOptions.from_dict({**self.load, **(typed or {})})

    def generation_options(self, base: GenerationOptions | None = None) -> GenerationOptions:
        """``base`` (the defaults in effect) with the saved generation settings over it."""
        start = base.to_dict() if base is not None else {}
        return GenerationOptions.from_dict({**start, **self.generation})

    def note(self) -> str:
        """The one line a load shows when it applies these settings."""
        from .recommend import flags

        shown = flags({k: v for k, v in self.load.items() if k != "loader"})
        loader = self.load.get("loader")
        parts = [p for p in (f"--loader {loader}" if loader else "", shown) if p]
        gen = f"; generation: {', '.join(f'{k}={v}' for k, v in self.generation.items())}" if self.generation else ""
        return (f"saved settings for {self.model} from {self.path}: {' '.join(parts) or 'none'}{gen} "
                "(options given on the line win)")

    def __bool__(self) -> bool:
        return bool(self.load or self.generation)


# ----------------------------------------------------------------------------------------- the file


def settings_path(models_dir: str | Path | None = None) -> Path:
    """``config-user.yaml`` in the models folder (text-generation-webui's place for it)."""
    folder = Path(models_dir).expanduser() if models_dir is not None else models.models_dir()
    return folder / SETTINGS_FILE


def settings_name(source: ModelSource | str | Path) -> str:
    """The name an entry is keyed by: the model's name in the models folder, as text-generation-webui
    lists it (a subfolder's name, or a GGUF file's name at the root), not the file inside a folder."""
    if isinstance(source, ModelSource):
        if source.path is None:
            return source.name
        path = source.path
    else:
        path = Path(str(source))
        if not path.exists():
            return Path(str(source)).name
    return listed_name(path) or path.resolve().name


def listed_name(path: Path, models_dir: str | Path | None = None) -> str | None:
    """The name the models folder lists the model at ``path`` under (a subfolder, or a GGUF file at its
    root), or None when it is not in the folder. A link in the folder is a model of the folder, wherever
    its files are (``path`` may be the link or what it points to)."""
    root = Path(models_dir).expanduser() if models_dir is not None else models.models_dir()
    target = path.resolve()
    for inside in (path.absolute(), target):
        for folder in (root.absolute(), root.resolve()):
            if inside != folder and inside.is_relative_to(folder):
                return inside.relative_to(folder).parts[0]
    try:
        links = [e for e in root.iterdir() if e.is_symlink()]
    except OSError:
        return None
    for link in links:
        pointed = link.resolve()
        if target == pointed or (pointed.is_dir() and target.is_relative_to(pointed)):
            return link.name
    return None


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise NbllmError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                         "fix the YAML, or move the file away") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NbllmError(f"{path} is not a mapping of model patterns to settings", "fix it, or move the file away")
    return data


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _matches(pattern: str, name: str) -> bool:
    """text-generation-webui's rule: ``re.match`` of the lower-cased pattern on the lower-cased name
    (a name with regex characters still matches its own ``name$`` entry)."""
    if pattern == f"{name}$":
        return True
    try:
        return re.match(pattern.lower(), name.lower()) is not None
    except re.error:
        return False


def _loader_for(name: str, folder: Path) -> str | None:
    """The loader --loader auto would use for the model called ``name`` in ``folder`` (None if unknown)."""
    path = folder / name
    fmt = folder_format(path) if path.is_dir() else file_format(name)
    return auto_loader(fmt).name if fmt is not None else None


# -------------------------------------------------------------------------------------------- reading


def saved_settings(model_name: str, *, models_dir: str | Path | None = None) -> SavedSettings | None:
    """The settings ``config-user.yaml`` holds for ``model_name`` (None if no entry matches).

    ``model_name`` is the model's name in the models folder (see :func:`settings_name`). Every entry whose
    pattern matches is applied in file order, as text-generation-webui does. Values that are not valid
    nbllm options are left out and listed in ``ignored``; contradictory saved options raise
    :class:`~nbllm.errors.OptionError` naming the file.
    """
    path = settings_path(models_dir)
    data = _load_yaml(path)
    merged: dict[str, Any] = {}
    patterns = []
    origin: dict[str, str] = {}
    for pattern, entry in data.items():
        if isinstance(entry, Mapping) and _matches(str(pattern), model_name):
            patterns.append(str(pattern))
            merged.update(entry)
            origin.update((str(key), str(pattern)) for key in entry)
    if not patterns:
        return None
    folder = path.parent
    saved = SavedSettings(model_name, path, patterns, origin=origin)
    loader = _read_loader(merged, saved) or _loader_for(model_name, folder)
    _read_load(merged, loader, saved)
    _read_generation(merged, saved)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NbllmWarning)
            LoadOptions.from_dict(saved.load)
    except OptionError as exc:
        raise OptionError(f"the saved settings for {model_name} in {path} are invalid: {exc.cause}",
                          "edit or delete that entry (or save new settings over it)") from None
    return saved


def _read_loader(entry: Mapping[str, Any], saved: SavedSettings) -> str | None:
    value = entry.get("loader")
    if value is None:
        return None
    loader = _FROM_TGW_LOADER.get(str(value).lower())
    if loader is None:
        saved.ignored["loader"] = saved.invalid["loader"] = (
            f"{value} is not a loader nbllm has (it has {' and '.join(_TGW_LOADER.values())}), so --loader auto "
            "chooses")
        return None
    saved.load["loader"] = loader
    return loader


def _key_rank(key: str, name: str) -> int:
    """Which key wins when several name one option: text-generation-webui's current name, then nbllm's,
    then an older name."""
    if any(key == per.get(loader) for per in (_TGW_KEYS.get(name, {}),) for loader in (TRANSFORMERS, LLAMACPP)):
        return 0
    return 1 if key == name else 2


def _read_load(entry: Mapping[str, Any], loader: str | None, saved: SavedSettings) -> None:
    values: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    keys: dict[str, str] = {"device": "cpu" if entry.get("cpu") is True else "device",
                            "dtype": "dtype" if entry.get("dtype") is not None else "bf16"}
    """nbllm option → the key of the file it was read from."""
    for key, value in entry.items():
        if key in _SPECIAL_READ or key in _GENERATION_KEYS or key in ("seed", "custom_stopping_strings"):
            continue
        gpu = _GPU_MEMORY.match(str(key))
        if gpu:
            continue
        name = _READ_ALIASES.get(str(key))
        if name is None:
            saved.ignored[str(key)] = "not an nbllm option"
            continue
        rank = _key_rank(str(key), name)
        if name not in values or rank < ranks[name]:
            values[name], ranks[name], keys[name] = value, rank, str(key)
    # Conversions of text-generation-webui's values to nbllm's.
    if values.get("cpu_memory") in (0, "0", "", None):
        values.pop("cpu_memory", None)
    elif isinstance(values.get("cpu_memory"), (int, float)) and values["cpu_memory"] > 1024:
        values["cpu_memory"] = values["cpu_memory"] / 1024  # older text-generation-webui wrote MiB
    if values.get("gpu_split") in ("", None, 0):
        values.pop("gpu_split", None)
    gpu_memory = sorted((int(m.group(1)), v) for k, v in entry.items() if (m := _GPU_MEMORY.match(str(k))))
    if gpu_memory and "gpu_split" not in values and any(v for _, v in gpu_memory):
        values["gpu_split"] = ",".join(f"{float(v) / 1024:g}" for _, v in gpu_memory if v)  # MiB in older files
    if entry.get("cpu") is True:
        values["device"] = "cpu"
    elif entry.get("device") in ("cpu", "cuda", "auto"):
        values["device"] = entry["device"]
    if entry.get("dtype") is not None:
        values["dtype"] = entry["dtype"]
    elif entry.get("bf16") is True:
        values["dtype"] = "bfloat16"
    if values.get("attn") == "auto":
        values.pop("attn")
    if values.get("flash_attn") is False:  # text-generation-webui's unticked box: no choice made (auto), not off
        values.pop("flash_attn")
    for name, value in values.items():
        spec = LoadOptions.spec(name)
        understood_by = option_loaders(name)
        if loader is not None and name != "loader" and loader not in understood_by:
            if value not in (None, False, spec.default):
                saved.ignored[keys.get(name, name)] = (f"a {' and '.join(understood_by)} option; this model loads with "
                                                       f"{loader}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NbllmWarning)
                coerced = getattr(LoadOptions.from_dict({name: value}), name)
        except OptionError as exc:
            key = keys.get(name, name)
            saved.ignored[key] = saved.invalid[key] = f"{value!r} ignored ({exc.cause})"
            continue
        if coerced != spec.default:
            saved.load[name] = coerced


def _read_generation(entry: Mapping[str, Any], saved: SavedSettings) -> None:
    values: dict[str, Any] = {k: entry[k] for k in _GENERATION_KEYS if k in entry}
    if "seed" in entry:
        values["seed"] = None if entry["seed"] in (None, -1, "-1") else entry["seed"]
    stops = entry.get("custom_stopping_strings")
    if isinstance(stops, str) and stops.strip():
        try:
            parsed = ast.literal_eval(f"[{stops}]")
            values["stop"] = tuple(str(s) for s in parsed if str(s))
        except (ValueError, SyntaxError):
            saved.ignored["custom_stopping_strings"] = saved.invalid["custom_stopping_strings"] = (
                f"{stops!r} ignored (not a list of quoted strings)")
    elif isinstance(stops, (list, tuple)):
        values["stop"] = tuple(str(s) for s in stops if str(s))
    for name, value in values.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NbllmWarning)
                saved.generation[name] = getattr(GenerationOptions.from_dict({name: value}), name)
        except OptionError as exc:
            key = "custom_stopping_strings" if name == "stop" else name
            saved.ignored[key] = saved.invalid[key] = f"{value!r} ignored ({exc.cause})"


# -------------------------------------------------------------------------------------------- writing


def tgw_entry(options: LoadOptions, loader: str, generation: GenerationOptions | None = None) -> dict[str, Any]:
    """The ``config-user.yaml`` entry for these options, in text-generation-webui's layout."""
    out: dict[str, Any] = {"loader": _TGW_LOADER[loader]}
    changed = options.changed()
    for name in LoadOptions.names():
        value = getattr(options, name)
        if name in ("loader", "device", "dtype"):
            continue
        if loader not in option_loaders(name):
            continue
        always = name in _ALWAYS[loader]
        if name not in changed and not always:
            continue
        key = _TGW_KEYS.get(name, {}).get(loader, name)
        if name == "cpu_memory":
            value = value or 0
        elif name == "gpu_split":
            value = value or ""
        elif name in ("compute_dtype", "attn") and value == "auto":
            continue
        out[key] = value
    if loader == TRANSFORMERS:
        out["cpu"] = options.device == "cpu"
        out["bf16"] = options.dtype == "bfloat16"
        if options.device == "cuda":
            out["device"] = "cuda"
        if options.dtype in ("float16", "float32"):
            out["dtype"] = options.dtype
    if generation is not None:
        for name in _GENERATION_KEYS:
            out[name] = getattr(generation, name)
        out["seed"] = -1 if generation.seed is None else generation.seed
        out["custom_stopping_strings"] = ", ".join(json.dumps(s, ensure_ascii=False) for s in generation.stop)
    return out


_OWNED_LOAD_KEYS = set(_READ_ALIASES) | {"loader", "cpu", "bf16", "device", "dtype"}
_OWNED_GENERATION_KEYS = {*_GENERATION_KEYS, "seed", "custom_stopping_strings"}


def save_settings(
    model_name: str,
    load_options: LoadOptions | Mapping[str, Any],
    generation: GenerationOptions | Mapping[str, Any] | None = None,
    *,
    models_dir: str | Path | None = None,
) -> Path:
    """Store ``load_options`` (and ``generation`` defaults, if given) for ``model_name`` in the models
    folder's ``config-user.yaml``, under the key ``<model_name>$`` as text-generation-webui does.

    Other entries, and keys of this entry that nbllm does not own (text-generation-webui's own settings),
    are kept; generation keys are left alone when ``generation`` is None. Returns the file's path.
    """
    import yaml

    options = load_options if isinstance(load_options, LoadOptions) else LoadOptions.from_dict(dict(load_options))
    gen = None
    if generation is not None:
        gen = generation if isinstance(generation, GenerationOptions) else GenerationOptions.from_dict(dict(generation))
    path = settings_path(models_dir)
    data = _load_yaml(path)
    loader = options.loader if options.loader != "auto" else (_loader_for(model_name, path.parent) or TRANSFORMERS)
    key = f"{model_name}$"
    old = data.get(key) if isinstance(data.get(key), Mapping) else {}
    owned = _OWNED_LOAD_KEYS | (_OWNED_GENERATION_KEYS if gen is not None else set())
    kept = {k: v for k, v in (old or {}).items() if k not in owned and not _GPU_MEMORY.match(str(k))}
    entry = tgw_entry(options, loader, gen)
    if options.loader == "auto":  # stored as auto: no loader key (text-generation-webui then infers one too)
        del entry["loader"]
    data[key] = {**entry, **kept}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    _write_atomic(path, text)
    return path


def forget_settings(model_name: str, *, models_dir: str | Path | None = None) -> bool:
    """Remove ``model_name``'s own entry (``<model_name>$``); True if there was one."""
    import yaml

    path = settings_path(models_dir)
    data = _load_yaml(path)
    if data.pop(f"{model_name}$", None) is None:
        return False
    _write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False))
    return True


# --------------------------------------------------------------------------------------- what worked


@dataclass
class WhatWorked:
    """The last options a model loaded with on this machine, and the peak memory measured."""

    model: str
    loader: str | None
    options: dict[str, Any]
    peak_memory: dict[str, int]
    recorded_at: str
    machine: str | None = None
    load_seconds: float | None = None

    def line(self) -> str:
        from ..memory import format_memory
        from .recommend import flags

        peak = ", ".join(f"{dev} {format_memory(n)}" for dev, n in self.peak_memory.items()) or "not measured"
        took = f", loaded in {self.load_seconds:.1f} s" if self.load_seconds is not None else ""
        where = f" on {self.machine}" if self.machine else ""
        return (f"what worked here ({self.recorded_at[:16].replace('T', ' ')}{where}): {self.loader or 'auto'} "
                f"{flags(self.options) or '(defaults)'}; peak memory {peak}{took}")

    def __str__(self) -> str:
        return self.line()


def _models_root(models_dir: str | Path | None) -> Path:
    return Path(models_dir).expanduser() if models_dir is not None else models.models_dir()


def record_success(
    model_name: str,
    load_options: LoadOptions | Mapping[str, Any],
    peak_memory: Mapping[str, int] | None = None,
    *,
    loader: str | None = None,
    machine: str | None = None,
    load_seconds: float | None = None,
    models_dir: str | Path | None = None,
) -> Path:
    """Remember that ``model_name`` loaded with ``load_options`` here, and the peak memory per device
    (``{"cuda:0": bytes, "cpu": bytes}``; :func:`measure_peak_memory` measures it). One record per model:
    the last one that worked."""
    options = load_options if isinstance(load_options, LoadOptions) else LoadOptions.from_dict(dict(load_options))
    return write_worked(_models_root(models_dir), model_name, {
        "loader": loader,
        "options": options.changed(),
        "peak_memory": {str(k): int(v) for k, v in (peak_memory or {}).items()},
        "recorded_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "load_seconds": load_seconds,
    })


def what_worked(model_name: str, *, models_dir: str | Path | None = None) -> WhatWorked | None:
    """The last record of ``model_name`` loading on this machine, or None."""
    entry = read_worked(_models_root(models_dir)).get(model_name)
    if entry is None:
        return None
    return WhatWorked(
        model=model_name,
        loader=entry.get("loader"),
        options=dict(entry.get("options") or {}),
        peak_memory={str(k): int(v) for k, v in (entry.get("peak_memory") or {}).items()},
        recorded_at=str(entry.get("recorded_at") or ""),
        machine=entry.get("machine"),
        load_seconds=entry.get("load_seconds"),
    )
