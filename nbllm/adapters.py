"""LoRA adapters on disk and against a model: what an adapter is, where adapters live, and whether one
fits the loaded model — without the engine or downloads, so the engine, the loaders and downloads can
use it (the API that applies adapters is :mod:`nbllm.lora`).

Adapters live in a ``loras/`` folder beside the models folder, as text-generation-webui keeps
``user_data/loras/`` beside ``user_data/models/``: PEFT adapters in subfolders (``adapter_config.json``
and ``adapter_model.safetensors``), GGUF adapters as files. Two formats, each applied by the loader
that declares it (:attr:`nbllm.loaders.Loader.adapters`):

- ``peft``: a Hugging Face PEFT LoRA, applied by the Transformers loader;
- ``gguf``: a llama.cpp LoRA (``general.type = adapter``), applied by the llama.cpp loader.

Before anything changes, an adapter is checked against the loaded model (:func:`check_format`,
:func:`check_peft_adapter`, :func:`check_gguf_adapter`): another architecture or size, modules or a rank
the model lacks, the other format, a missing or damaged file — one line each, the model untouched.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import LoadError, ModelNotFoundError
from .frontend import command
from .gguf_file import GGUFError, GGUFHeader, gguf_files, read_gguf_header
from .models import ModelsFolder, folder_name, models_dir
from .safetensors_file import check_safetensors
from .store import Bookkeeping, pending_downloads, read_record, read_revision, weights_sha256


class AppliesAdapters(Protocol):
    """What :func:`check_format` reads of a loader class (:class:`nbllm.loaders.Loader` is one): its name and
    the adapter formats it applies. A protocol, so that this module needs nothing from the loaders (they
    import it, through the download package)."""

    name: str
    adapters: frozenset[str]

PEFT, GGUF = "peft", "gguf"

FORMAT_WORDS = {PEFT: "a PEFT LoRA adapter", GGUF: "a GGUF LoRA adapter"}

_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
"""The tensors a PEFT LoRA holds per adapted module (the names after the module's path)."""
_PEFT_PREFIX = "base_model.model."


def loras_dir(models: str | Path | None = None) -> Path:
    """The adapters folder: ``loras`` beside the models folder ``models`` (default: the one in effect)."""
    return (Path(models).expanduser() if models is not None else models_dir()).parent / "loras"


# ---------------------------------------------------------------------------------------- an adapter


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter on disk, with the scale it is (or is to be) applied with."""

    name: str
    """The folder's or file's name: what ``%llm_lora remove`` takes."""
    format: str
    """``peft`` (a folder with ``adapter_config.json``) or ``gguf`` (one ``.gguf`` file)."""
    path: Path
    scale: float = 1.0
    repo_id: str | None = None
    revision: str | None = None
    """The hub commit the files came from, when nbllm downloaded them."""
    sha256: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Weights file name → sha256 (hashed once per file; cached by path, size and mtime)."""

    @property
    def weights(self) -> Path:
        """The file holding the LoRA weights."""
        if self.format == GGUF:
            return self.path
        return next((self.path / n for n in _PEFT_WEIGHTS if (self.path / n).is_file()), self.path / _PEFT_WEIGHTS[0])

    @property
    def label(self) -> str:
        """``name ×scale`` as status lines show it."""
        return f"{self.name} ×{self.scale:g}"

    def config(self) -> dict[str, Any]:
        """A PEFT adapter's ``adapter_config.json`` (empty for a GGUF adapter)."""
        return _peft_config(self.path) if self.format == PEFT else {}

    def same_weights(self, other: Adapter) -> bool:
        """Whether ``other`` is this adapter, whatever its scale (same files, same content)."""
        return self.path == other.path and self.format == other.format and dict(self.sha256) == dict(other.sha256)

    def identity(self) -> dict[str, Any]:
        """What names this adapter in a record: name, format, scale, where it is, its weights' sha256 and
        hub provenance."""
        out: dict[str, Any] = {"name": self.name, "format": self.format, "scale": self.scale, "path": str(self.path),
                               "sha256": dict(self.sha256)}
        if self.repo_id:
            out["repo_id"] = self.repo_id
        if self.revision:
            out["revision"] = self.revision
        return out


def _peft_config(folder: Path) -> dict[str, Any]:
    path = folder / _CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{folder.name} has no {_CONFIG}", "download the adapter again") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{folder.name}/{_CONFIG} cannot be read ({type(exc).__name__})",
                        "download the adapter again") from None
    if not isinstance(data, dict):
        raise LoadError(f"{folder.name}/{_CONFIG} is not a JSON object", "download the adapter again")
    return data


def _gguf_adapter_header(path: Path) -> GGUFHeader:
    header = read_gguf_header(path)  # a damaged file: GGUFError (one line)
    if not header.is_adapter:
        raise LoadError(f"{path.name} is a model, not a LoRA adapter", f"load it with {command('load', path.name)}")
    return header


def adapter_from_path(path: Path, *, scale: float = 1.0) -> Adapter:
    """The adapter at ``path`` — a PEFT folder, a GGUF adapter file, or a folder holding one — checked for
    missing and damaged files (one line each), with its weights hashed for records."""
    path = path.expanduser().resolve()
    books = Bookkeeping.of(path)
    if books.unfinished:
        repo = books.record().get("repo_id")
        raise ModelNotFoundError(f"{path.name} is an unfinished download",
                                 f"run {command('download', repo)} to finish it" if repo else "download it again")
    if path.is_dir() and not (path / _CONFIG).is_file():
        found = [g for g in gguf_files(path) if _is_gguf_adapter(g)]
        if len(found) != 1:
            raise LoadError(
                f"{path.name} is not a LoRA adapter folder (no {_CONFIG}"
                + (f"; it holds {len(found)} GGUF adapters" if found else ", no GGUF adapter") + ")",
                "give the folder of a PEFT adapter, or a GGUF adapter file",
            )
        return adapter_from_path(found[0], scale=scale)
    fmt = PEFT if path.is_dir() else GGUF if path.suffix.lower() == ".gguf" else None
    if fmt is None:
        raise LoadError(f"{path.name} is not a LoRA adapter (a folder with {_CONFIG}, or a .gguf adapter file)",
                        "give the adapter's folder or file")
    weights = adapter_files(path, fmt)
    record = read_record(path) or {}
    return Adapter(path.name, fmt, path, scale, record.get("repo_id"), read_revision(path), weights_sha256(weights))


def _is_gguf_adapter(path: Path) -> bool:
    try:
        return read_gguf_header(path).is_adapter
    except (GGUFError, OSError):
        return False


def is_adapter_repo(files: Iterable[str]) -> bool:
    """Whether a hub repository's file list is a PEFT adapter's (``adapter_config.json`` and its weights)."""
    root = {f for f in files if "/" not in f}
    return _CONFIG in root and any(w in root for w in _PEFT_WEIGHTS)


def is_gguf_adapter(path: Path) -> bool:
    """Whether ``path`` is a GGUF adapter file (its header says ``general.type = adapter``)."""
    return path.is_file() and path.suffix.lower() == ".gguf" and _is_gguf_adapter(path)


# --------------------------------------------------------------------------------- checks against a model


_FIXES = {
    PEFT: "convert it with llama.cpp's convert_lora_to_gguf.py, or load the model's Transformers form",
    GGUF: "use the adapter's PEFT form (adapter_config.json + adapter_model.safetensors), or load the model's "
          "GGUF form with --loader llama.cpp",
}


def check_format(adapter: Adapter, loader: AppliesAdapters) -> None:
    """Refuse an adapter whose format the loaded model's loader does not apply (a GGUF adapter on a
    Transformers model and the reverse)."""
    if adapter.format in loader.adapters:
        return
    if not loader.adapters:
        raise LoadError(f"the {loader.name} loader applies no adapters", "load the model with a local loader")
    raise LoadError(f"{adapter.name} is {FORMAT_WORDS[adapter.format]}, which the {loader.name} loader does not apply",
                    _FIXES[adapter.format])


def _made_for(adapter: Adapter) -> str:
    base = adapter.config().get("base_model_name_or_path")
    return f"apply it to the model it was made for ({base})" if base else "apply it to the model it was made for"


def peft_targets(keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """PEFT tensor name → (module path, LoRA part, the rest), e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` →
    ``("model.layers.0.self_attn.q_proj", "lora_A", "weight")``. Raises for tensors that are not LoRA
    parts (whole modules saved with ``modules_to_save``), which nbllm does not apply."""
    out: dict[str, tuple[str, str, str]] = {}
    others = []
    for key in keys:
        parts = key.removeprefix(_PEFT_PREFIX).split(".")
        at = next((i for i, p in enumerate(parts) if p in _LORA_PARTS), None)
        if at is None or at == 0:
            others.append(key.removeprefix(_PEFT_PREFIX))
            continue
        out[key] = (".".join(parts[:at]), parts[at], ".".join(parts[at + 1 :]))
    if others:
        raise LoadError(f"the adapter also replaces whole modules ({', '.join(sorted(others)[:3])}), which nbllm does "
                        "not apply (only LoRA updates)", "choose an adapter without modules_to_save")
    return out


def check_peft_adapter(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]],
                       modules: Mapping[str, tuple[int, int]], model: str) -> None:
    """Refuse a PEFT adapter that does not fit the model: ``shapes`` are its tensors' shapes, ``modules``
    the model's adaptable modules (path → (in features, out features); embeddings: (tokens, width))."""
    try:
        targets = peft_targets(shapes)
    except LoadError as exc:
        raise LoadError(f"{adapter.name}: {exc.cause}", exc.fix) from None
    if not targets:
        raise LoadError(f"{adapter.name} holds no LoRA weights", "download the adapter again")
    config = adapter.config()
    ours = {m.rsplit(".", 1)[-1] for m in modules}
    wanted = config.get("target_modules")
    if isinstance(wanted, list) and (lacking := sorted(set(wanted) - ours - {"all-linear"})):
        raise LoadError(f"{adapter.name} targets modules {model} lacks ({', '.join(lacking)}): it was made for "
                        "another architecture", _made_for(adapter))
    missing = sorted({m for m, _, _ in targets.values() if m not in modules})
    if missing:
        names = sorted({m.rsplit(".", 1)[-1] for m in missing})
        if not set(names) & ours:
            cause = f"{adapter.name} was made for another architecture: it adapts {', '.join(names)} modules, which {model} lacks"
        else:
            cause = f"{adapter.name} adapts {missing[-1]}, which {model} lacks ({len(missing)} such modules): it was made for a larger model"
        raise LoadError(cause, _made_for(adapter))
    ranks: dict[str, dict[str, int]] = {}
    for key, (module, part, _rest) in targets.items():
        shape, (n_in, n_out) = shapes[key], modules[module]
        if part in ("lora_A", "lora_embedding_A"):
            found, want, rank = shape[-1], n_in, shape[0]
        elif part in ("lora_B", "lora_embedding_B"):
            found, want, rank = shape[0], n_out, shape[-1]
        else:  # DoRA's magnitude: one per output feature
            found, want, rank = shape[-1], n_out, -1
        if found != want:
            side = "takes" if part.endswith("A") else "gives"
            raise LoadError(f"{adapter.name} was made for a model of another size: its {module} {side} {found} features, "
                            f"{model}'s {want}", _made_for(adapter))
        if rank >= 0:
            ranks.setdefault(module, {})[part[-1]] = rank
    declared = config.get("r")
    patterns = config.get("rank_pattern") or {}
    for module, pair in ranks.items():
        if len(set(pair.values())) != 1 or set(pair) != {"A", "B"}:
            raise LoadError(f"{adapter.name}'s weights for {module} do not form a LoRA pair (ranks {pair})",
                            "download the adapter again")
        rank = next(iter(pair.values()))
        if isinstance(declared, int) and not patterns and rank != declared:
            raise LoadError(f"{adapter.name}'s {_CONFIG} says rank {declared} but its weights have rank {rank}: "
                            "the two files do not belong together", "download the adapter again")


def check_gguf_adapter(adapter: Adapter, model: GGUFHeader, model_name: str) -> GGUFHeader:
    """Refuse a GGUF adapter that does not fit the model whose header is ``model``; returns the adapter's
    header. Checks what llama.cpp checks (architecture, tensor names and shapes) with nbllm's words."""
    header = _gguf_adapter_header(adapter.path)
    kind = header.metadata.get("adapter.type")
    if kind != "lora":
        raise LoadError(f"{adapter.name} is a {kind or 'untyped'} adapter; llama.cpp applies LoRA adapters here",
                        "choose a LoRA adapter (adapter.type = lora)")
    if header.architecture != model.architecture:
        raise LoadError(f"{adapter.name} was made for a {header.architecture} model; {model_name} is "
                        f"{model.architecture}", "apply it to the model it was made for")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, dims in header.tensors.items():
        base, _, part = name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[part] = dims
        elif not name.endswith("_norm.weight"):  # (norms are skipped by llama.cpp too)
            raise LoadError(f"{adapter.name} holds {name}, which is not a LoRA tensor", "download the adapter again")
    if not pairs:
        raise LoadError(f"{adapter.name} holds no LoRA weights", "download the adapter again")
    missing = sorted(b for b in pairs if b not in model.tensors)
    if missing:
        raise LoadError(f"{adapter.name} adapts {missing[-1]}, which {model_name} lacks ({len(missing)} such tensors): "
                        "it was made for another model", "apply it to the model it was made for")
    for base, pair in sorted(pairs.items()):
        if set(pair) != {"lora_a", "lora_b"}:
            raise LoadError(f"{adapter.name} has only one half of the LoRA pair for {base}", "download the adapter again")
        target, a, b = model.tensors[base], pair["lora_a"], pair["lora_b"]
        if base.endswith("token_embd.weight"):  # llama.cpp stores this pair flipped
            fits = target[0] == b[1] and target[1] == a[1]
        else:
            fits = target[0] == a[0] and target[1] == b[1] and a[1] == b[0]
        if not fits:
            raise LoadError(f"{adapter.name} was made for a model of another size: its {base} is "
                            f"{a[0]}×{b[-1]}, {model_name}'s is {target[0]}×{target[1]}",
                            "apply it to the model it was made for")
    return header


# ------------------------------------------------------------------------------------ the adapters folder


@dataclass(frozen=True)
class LoraEntry:
    """One adapter in the adapters folder, as ``%llm_lora list`` shows it."""

    name: str
    path: Path
    format: str
    size: int
    revision: str | None
    repo_id: str | None
    problem: str | None = None
    """Why it cannot be applied (an unfinished download, a damaged file); ``None``: ready."""


class LorasFolder:
    """The adapters folder (``loras/`` beside the models folder ``models``): what is there, where downloads go."""

    def __init__(self, models: str | Path | None = None) -> None:
        self.models = Path(models).expanduser() if models is not None else models_dir()
        self.path = loras_dir(self.models)

    def list(self) -> list[LoraEntry]:
        """Every adapter in the folder by name, unfinished downloads and damaged files included."""
        entries = [e for child in self._children() if (e := self._entry(child)) is not None]
        names = {e.name for e in entries}
        for pending in pending_downloads(self.path) if self.path.is_dir() else ():
            if pending.name not in names:
                entries.append(LoraEntry(pending.name, self.path / pending.name, GGUF, pending.size,
                                         pending.record.get("revision"), pending.record.get("repo_id"),
                                         "download not finished"))
        return sorted(entries, key=lambda e: e.name.lower())

    def get(self, name: str) -> LoraEntry:
        """The entry called ``name``; :class:`ModelNotFoundError` (with close names) if none."""
        entries = self.list()
        for entry in entries:
            if entry.name == name:
                if entry.problem:
                    raise LoadError(f"{name} cannot be applied: {entry.problem}", "download it again")
                return entry
        close = difflib.get_close_matches(name, [e.name for e in entries], n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelNotFoundError(f"no adapter {name!r} in {self.path}{hint}",
                                 f"run {command('lora list')} to see what is there, or give a path or a hub id")

    def find_download(self, repo_id: str, revision: str | None = None) -> Path | None:
        """A complete local copy of the hub adapter ``repo_id``: one nbllm downloaded (its records say so),
        or the folder text-generation-webui's downloader names ``organization_adapter``."""
        if self.path.is_dir():
            # the bookkeeping of a download is the models folder's: the same lookup serves both folders
            found = ModelsFolder(self.path).find_download(repo_id, revision)
            if found is not None:
                return found.path
        folder = self.path / folder_name(repo_id, revision)
        return folder if (folder / _CONFIG).is_file() and not Bookkeeping.of_folder(folder).started else None

    def _children(self) -> Iterator[Path]:
        if self.path.is_dir():
            yield from (p for p in self.path.iterdir() if not p.name.startswith("."))

    def _entry(self, path: Path) -> LoraEntry | None:
        books = Bookkeeping.of(path)
        if path.is_dir() and ((path / _CONFIG).is_file() or books.started):
            fmt, size = PEFT, sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file() and path.suffix.lower() == ".gguf":
            fmt, size = GGUF, path.stat().st_size
        else:
            return None
        problem = None
        if books.unfinished:
            problem = "download not finished"
        else:
            try:
                adapter_files(path, fmt)
            except LoadError as exc:
                problem = exc.cause
        record = books.record()
        return LoraEntry(path.name, path, fmt, size, read_revision(path), record.get("repo_id"), problem)


def adapter_files(path: Path, fmt: str) -> Path:
    """Check an adapter's files without hashing them: a missing or damaged file, or an adapter of another
    kind than LoRA, raises one line. Returns the weights file."""
    if fmt == GGUF:
        _gguf_adapter_header(path)
        return path
    config = _peft_config(path)
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoadError(f"{path.name} is a {kind} adapter; nbllm applies LoRA adapters only",
                        "choose a LoRA adapter (peft_type LORA in adapter_config.json)")
    weights = Adapter(path.name, fmt, path).weights
    if not weights.is_file():
        raise LoadError(f"{path.name} has no adapter weights ({' or '.join(_PEFT_WEIGHTS)})",
                        "download the adapter again")
    if weights.suffix == ".safetensors":
        check_safetensors(weights, what="adapter")
    return weights


def adapters_line(adapters: Sequence[Adapter]) -> str:
    """``a ×1, b ×0.5`` (or ``none``): what a status line says is applied."""
    return ", ".join(a.label for a in adapters) or "none"


_SAFE = re.compile(r"[^0-9A-Za-z_]")


def module_key(name: str, serial: int) -> str:
    """A name a loader can register an adapter under (PEFT's module dictionaries refuse dots)."""
    return f"{_SAFE.sub('_', name)}_{serial}"
