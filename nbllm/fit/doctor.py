"""``%llm_doctor``'s report: this machine's findings, and for a model its shape, the recommendation, the
saved settings and what worked here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..errors import ModelNotFoundError
from ..frontend import command
from ..shown import ShownAsLines
from ..source import ModelSource
from .estimate import probe_cached
from .machine import Machine
from .recommend import Recommendation, recommend
from .settings import SavedSettings, WhatWorked, saved_settings, settings_name, what_worked
from .shape import ModelShape, locate, model_shape


@dataclass
class DoctorReport(ShownAsLines):
    """What ``%llm_doctor`` shows: printable (``str``), and each part an attribute for code."""

    machine: Machine
    shape: ModelShape | None = None
    recommendation: Recommendation | None = None
    saved: SavedSettings | None = None
    worked: WhatWorked | None = None

    def lines(self) -> list[str]:
        out = ["This machine:"]
        out.extend(f"  {line}" for line in self.machine.findings())
        if self.shape is None:
            out.append("")
            out.append(f"Give a model for its memory estimate and recommended options: {command('doctor', 'MODEL')}")
            return out
        out += ["", f"Model: {self.shape.describe()}"]
        out.extend(f"  note: {n}" for n in self.shape.notes)
        if self.recommendation is not None:
            out += ["", "Recommended options (with the memory they need):"]
            out.extend(f"  {line}" if line else "" for line in self.recommendation.lines())
        if self.saved:
            out += ["", f"Saved: {self.saved.note()}"]
            out.extend(f"  ignored {key}: {why}" for key, why in self.saved.ignored.items())
        if self.worked is not None:
            out += ["", self.worked.line()]
        return out



def doctor(
    model: str | Path | ModelSource | None = None,
    machine: Machine | None = None,
    *,
    context: int | None = None,
) -> DoctorReport:
    """This machine's findings; with ``model``, its shape, the recommended options (and their memory),
    its saved settings and the last options that loaded it here."""
    machine = machine if machine is not None else probe_cached(refresh=True)
    if model is None:
        return DoctorReport(machine)
    try:
        path: Path | None = locate(model)
    except ModelNotFoundError:
        path = None
    shape = model_shape(path if path is not None else model)  # a hub id not downloaded: from the Hub
    if path is not None:
        name = settings_name(model if isinstance(model, ModelSource) else path)
    else:
        repo, revision = models.parse_hub_id(str(model)) or (str(model), None)
        name = models.folder_name(repo, revision)
    return DoctorReport(
        machine=machine,
        shape=shape,
        recommendation=recommend(shape, machine, context=context),
        saved=saved_settings(name),
        worked=what_worked(name),
    )
