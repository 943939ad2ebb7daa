"""The LoRA API: ``lora_add`` / ``lora_remove`` / ``lora_clear`` / ``lora_list``, what ``%llm_lora`` and the
settings panel call, ``lora_restore`` (a record's adapters again, for replay), and :func:`resolve_adapter` (a path, a name in ``loras/``, or a hub id, downloaded
first). What an adapter is and the checks against the loaded model are :mod:`nbllm.adapters`'; the
engine applies adapters through its loader and records them (name, sha256, scale, hub revision) as part
of the model's identity (:meth:`nbllm.engine.Engine.model_identity`).
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoadError, OptionError
from .frontend import command
from .options import _Schema, option

if TYPE_CHECKING:  # %load_ext imports this module for %llm_lora's flags: the rest comes when an adapter does
    from .adapters import Adapter, LoraEntry
    from .engine import Engine


@dataclass(frozen=True)
class LoraOptions(_Schema):
    """How an adapter is applied: ``%llm_lora add``'s flags, the settings panel's scale."""

    scale: float = option(
        1.0, "How strongly the adapter applies: its LoRA update is multiplied by this (1: as trained, 0: no "
        "effect, negative: the opposite). Beyond a few times its trained strength an adapter mostly breaks the "
        "model, hence the bounds.", minimum=-4.0, maximum=4.0,
    )
    revision: str | None = option(
        None, "Hub revision (branch, tag or commit sha) of a hub id, as organization/adapter:revision does.",
        metavar="REVISION",
    )


def resolve_adapter(spec: str | Path, *, revision: str | None = None, scale: float = 1.0,
                    models: str | Path | None = None) -> Adapter:
    """What the user typed after ``%llm_lora add`` → an :class:`Adapter`.

    In order: an existing path; a name in the adapters folder; a hub id ``organization/adapter[:revision]``
    — a complete local copy is used as is, otherwise it is downloaded into the adapters folder first.
    """
    from .adapters import adapter_from_path
    from .resolve import locate

    return adapter_from_path(locate(spec, kind="adapter", revision=revision, models=models), scale=scale)


@dataclass(frozen=True)
class LoraList:
    """The adapters applied to the loaded model, and those in the adapters folder (a table in a notebook)."""

    folder: Path
    entries: tuple[LoraEntry, ...]
    applied: tuple[Adapter, ...]
    model: str | None
    """The loaded model's name (``None``: no model loaded)."""

    _HEADER = ("name", "format", "size", "revision", "status")

    def __iter__(self) -> Iterator[LoraEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def applied_line(self) -> str:
        """One line: what is applied to which model."""
        return applied_line(self.model, self.applied)

    def rows(self) -> list[tuple[str, ...]]:
        from .models import format_size

        scales = {a.path: a.scale for a in self.applied}
        return [
            (e.name, e.format.upper(), format_size(e.size), (e.revision or "")[:10],
             f"applied ×{scales[e.path]:g}" if e.path in scales else (f"not usable: {e.problem}" if e.problem else "ready"))
            for e in self.entries
        ]

    def text(self) -> str:
        if not self.entries:
            where = f"{self.folder}" + ("" if self.folder.is_dir() else " (does not exist yet)")
            return (f"{self.applied_line()}\nNo adapters in {where}. Download one with "
                    f"{command('download', 'organization/adapter')}, or give {command('lora add', 'PATH')} a path.")
        rows = [self._HEADER, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"{self.applied_line()}\nAdapters in {self.folder}:\n" + "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        cells = "".join(f"<th style='text-align:left'>{h}</th>" for h in self._HEADER)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in self.rows())
        return (f"<p>{html.escape(self.applied_line())}</p><table class='nbllm-loras'><caption style='text-align:left'>"
                f"Adapters in <code>{html.escape(str(self.folder))}</code></caption><thead><tr>{cells}</tr></thead>"
                f"<tbody>{body}</tbody></table>")


# ---------------------------------------------------------------------------------------------- the API


def _engine(engine: Engine | None) -> Engine:
    from .engine import get_engine  # at first use: %load_ext imports this module for %llm_lora's flags

    return engine or get_engine()


def lora_add(adapter: str | Path, scale: float = 1.0, *, revision: str | None = None,
             engine: Engine | None = None) -> tuple[Adapter, ...]:
    """Apply a LoRA adapter (a path, a name in the adapters folder, or a hub id, downloaded first) to the
    loaded model with ``scale``, on top of the adapters already applied; an adapter of the same name is
    replaced (its scale changed). Returns the adapters now applied. The model is not reloaded."""
    options = LoraOptions.from_dict(scale=scale, revision=revision)
    eng = _engine(engine)
    loader = eng.loader  # nothing is loaded: say so before resolving (or downloading) anything
    from .loaders.replay import ReplayLoader  # lazy, as the loaders are

    if isinstance(loader, ReplayLoader):  # a replay notes the adapter as recorded, as it notes the model
        spec = f"{adapter}:{options.revision}" if options.revision else str(adapter)
        new = loader.adapter(spec, scale=options.scale)
    else:
        new = resolve_adapter(adapter, revision=options.revision, scale=options.scale)
    current = list(eng.adapters)
    if any(a.name == new.name for a in current):
        current = [new if a.name == new.name else a for a in current]
    else:
        current.append(new)
    eng.set_adapters(current)
    return eng.adapters


def lora_remove(name: str, *, engine: Engine | None = None) -> tuple[Adapter, ...]:
    """Remove the applied adapter ``name``; returns the adapters still applied."""
    eng = _engine(engine)
    current = eng.adapters
    if not any(a.name == name for a in current):
        applied = ", ".join(a.name for a in current) or "none"
        raise OptionError(f"no adapter {name!r} is applied (applied: {applied})", f"give a name {command('lora list')} shows as applied")
    eng.set_adapters([a for a in current if a.name != name])
    return eng.adapters


def lora_clear(*, engine: Engine | None = None) -> tuple[Adapter, ...]:
    """Remove every applied adapter: the model is back to its own weights."""
    eng = _engine(engine)
    if eng.loaded and eng.adapters:
        eng.set_adapters([])
    return eng.adapters


def lora_restore(recorded: Sequence[Mapping[str, Any]], *, engine: Engine | None = None) -> tuple[Adapter, ...]:
    """Apply exactly the adapters a record names (its ``model["adapters"]``), with their scales, to the
    loaded model: what a replay does after loading the record's model. Each is found at its recorded path,
    else by its hub repository and commit, else by name; one whose weights no longer have the recorded
    sha256 is refused."""
    eng = _engine(engine)
    loader = eng.loader
    from .loaders.replay import ReplayLoader

    wanted = []
    for item in recorded:
        if isinstance(loader, ReplayLoader):
            wanted.append(loader.adapter(str(item.get("path") or item["name"]), scale=float(item.get("scale", 1.0))))
            continue
        path, repo, revision = item.get("path"), item.get("repo_id"), item.get("revision")
        spec = path if path and Path(path).exists() else f"{repo}:{revision}" if repo and revision else repo or item["name"]
        adapter = resolve_adapter(spec, scale=float(item.get("scale", 1.0)))
        if item.get("sha256") and dict(adapter.sha256) != dict(item["sha256"]):
            raise LoadError(f"{adapter.name}'s weights are not the recorded ones (their sha256 differs)",
                            f"put the recorded files back, or apply the adapter as it is now with {command('lora add', adapter.name)}")
        wanted.append(adapter)
    eng.set_adapters(wanted)
    return eng.adapters


def lora_list(*, models: str | Path | None = None, engine: Engine | None = None) -> LoraList:
    """The adapters applied to the loaded model and those in the adapters folder."""
    from .adapters import LorasFolder

    eng = _engine(engine)
    folder = LorasFolder(models)
    model = eng.status().model if eng.loaded else None
    return LoraList(folder.path, tuple(folder.list()), eng.adapters, model)


def applied_line(model: str | None, adapters: Sequence[Adapter]) -> str:
    """``Applied to MODEL: a ×1 (PEFT), b ×0.5 (PEFT)``, or that none is (or that no model is loaded)."""
    if model is None:
        return "No model loaded."
    if not adapters:
        return f"No adapter applied to {model}."
    return f"Applied to {model}: " + ", ".join(f"{a.label} ({a.format.upper()})" for a in adapters)
