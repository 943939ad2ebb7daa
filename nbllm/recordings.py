"""Recordings and replay: show a notebook's outputs again without its model.

A **recording** is what a saved notebook's outputs carry (each ``%%llm`` / ``%%llm_chat`` output holds
its record in its metadata, a ``%%llm --sweep`` table the records of its rows) or what a run log holds
(:mod:`nbllm.runlog`: every generation, with its text and timings). :func:`replay` turns a replay on:
``%llm_load`` notes the model asked for and loads nothing (the stand-in loader of
:mod:`nbllm.loaders.replay`), and each request whose identity (:mod:`nbllm.identity`) equals a recorded
run's is answered with that run. Requests with the same identity take their runs in recorded order
(two unseeded samples of one prompt get their own texts); once all are taken the last one repeats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .engine import Engine, get_engine
from .errors import OptionError, ReplayError, missing_dependency
from .frontend import command
from .identity import differences, identity_key, model_identity, record_identity
from .loaders.replay import FORMAT, ReplayLoader, Run
from .options import LoadOptions
from .runlog import RunLog
from .source import ModelSource

FALLBACKS = ("error", "run")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class Recording:
    """The runs of one source, indexed by request identity."""

    source: Path
    runs: list[Run]
    _index: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _taken: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, run in enumerate(self.runs):
            drawn = run.record.get("seed_drawn")
            # A record that does not say whether its seed was drawn answers both kinds of request.
            for assumed in ((drawn,) if drawn is not None else (False, True)):
                self._index.setdefault(identity_key(record_identity(run.record, seed_drawn=assumed)), []).append(i)

    @classmethod
    def read(cls, source: str | Path, *, session: str | None = None) -> Recording:
        """The runs of a saved notebook (``.ipynb``) or a run log (an SQLite file); ``session`` keeps
        one kernel's runs of a run log."""
        path = Path(source).expanduser()
        if not path.is_file():
            raise ReplayError(f"there is no file {path} to replay", "give a saved notebook (.ipynb) or a run log")
        with path.open("rb") as f:
            is_log = f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
        if is_log:
            log = RunLog(path)
            found = cls(path, [_logged_run(row) for row in log.rows(session=session)])
            if not found.runs and session is not None:
                sessions = log.sessions()
                listed = ", ".join(sessions[-5:]) if sessions else "none"
                raise ReplayError(f"the run log {path} has no runs of session {session!r} (its latest sessions: "
                                  f"{listed})", f"give one of its sessions ({command('runs')} shows them), or drop --session")
        else:
            if session is not None:
                raise OptionError("--session picks runs of a run log, not of a notebook", "drop --session")
            found = cls(path, notebook_runs(path))
        if not found.runs:
            what = "run log" if is_log else "notebook"
            raise ReplayError(f"the {what} {path} holds no recorded runs, so there is nothing to replay",
                              "give a run log with runs, or a notebook saved with the outputs of %%llm cells")
        return found

    def __len__(self) -> int:
        return len(self.runs)

    def model_for(self, spec: str) -> tuple[dict[str, Any], str] | None:
        """The recorded model (its record's ``model`` dict) and loader that ``spec``, as typed after
        ``%llm_load``, names: the same path, file or folder name, hub id or server model id; the latest
        recorded one when several answer."""
        for run in reversed(self.runs):
            model = run.record.get("model") or {}
            if _answers_to(model, spec):
                return dict(model), str(run.record.get("loader", ""))
        return None

    def tool_calling_for(self, model: Mapping[str, Any]) -> dict[str, Any] | None:
        """How the recorded ``model`` (a record's ``model`` dict, less its adapters) took tools in a chat with
        tools (a record's ``tool_calling``: :class:`nbllm.tools.ToolCalling`); the latest such run's."""
        wanted = model_identity({k: v for k, v in model.items() if k != "adapters"})
        for run in reversed(self.runs):
            calling = run.record.get("tool_calling")
            recorded = {k: v for k, v in (run.record.get("model") or {}).items() if k != "adapters"}
            if isinstance(calling, Mapping) and model_identity(recorded) == wanted:
                return dict(calling)
        return None

    def adapter_for(self, spec: str) -> dict[str, Any] | None:
        """The recorded adapter (an entry of a record's ``model["adapters"]``) that ``spec``, as typed after
        ``%llm_lora add``, names: its path, its folder or file name, or its hub id (with or without its
        revision); the latest recorded one when several answer."""
        text = spec.strip().rstrip("/")
        if not text:
            return None
        for run in reversed(self.runs):
            for adapter in (run.record.get("model") or {}).get("adapters") or ():
                if isinstance(adapter, Mapping) and _adapter_answers_to(adapter, text):
                    return dict(adapter)
        return None

    def adapter_names(self) -> list[str]:
        """The names of the adapters the recorded runs used, in first-use order."""
        names: dict[str, None] = {}
        for run in self.runs:
            for adapter in (run.record.get("model") or {}).get("adapters") or ():
                if isinstance(adapter, Mapping) and adapter.get("name"):
                    names[str(adapter["name"])] = None
        return list(names)

    def take(self, identity: Mapping[str, Any]) -> Run | None:
        """The next recorded run with this identity (the last one again once all were taken)."""
        key = identity_key(identity)
        found = self._index.get(key)
        if not found:
            return None
        n = self._taken.get(key, 0)
        self._taken[key] = n + 1
        return self.runs[found[min(n, len(found) - 1)]]

    def closest(self, identity: Mapping[str, Any]) -> tuple[Run, list[str]] | None:
        """The recorded run nearest to ``identity`` (see :func:`distance`; the latest among equals), and
        what differs, in words."""
        best: tuple[int, int, Run, dict[str, Any]] | None = None
        for i, run in enumerate(self.runs):
            unsaid = run.record.get("seed_drawn") is None and identity.get("seed") is None
            recorded = record_identity(run.record, seed_drawn=True if unsaid else None)
            score = (distance(recorded, identity), -i)
            if best is None or score < (best[0], best[1]):
                best = (score[0], score[1], run, recorded)
        return None if best is None else (best[2], differences(best[3], identity))


def distance(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> int:
    """How far apart two identities are, for naming the closest recorded run: another model weighs most,
    then another prompt (or messages, or mode: the same cell run otherwise is what a user looks for),
    other adapters, another loader or other tools, then each option that differs; the seed least (a sweep cell that
    differs only in its seed is nearer than one with another prompt)."""
    def without_adapters(model: Any) -> Any:
        return {k: v for k, v in model.items() if k != "adapters"} if isinstance(model, Mapping) else model

    there_model, here_model = recorded.get("model") or {}, requested.get("model") or {}
    score = 0
    if without_adapters(there_model) != without_adapters(here_model):
        score += 10_000
    if (recorded.get("messages"), recorded.get("prompt")) != (requested.get("messages"), requested.get("prompt")):
        score += 2_000
    if there_model.get("adapters") != here_model.get("adapters"):
        score += 1_000
    if recorded.get("loader") != requested.get("loader"):
        score += 500
    if (recorded.get("tools"), recorded.get("tool_choice")) != (requested.get("tools"), requested.get("tool_choice")):
        score += 500
    for group in ("load_options", "generation_options"):
        there, here = recorded.get(group) or {}, requested.get(group) or {}
        score += 10 * sum(there.get(name) != here.get(name) for name in set(there) | set(here))
    if recorded.get("seed") != requested.get("seed"):
        score += 1
    return score


def _answers_to(model: Mapping[str, Any], spec: str) -> bool:
    text = spec.strip().rstrip("/")
    if not text:
        return False
    names = {str(model[k]) for k in ("name", "path", "url", "model_id", "repo_id") if model.get(k)}
    if text in names:
        return True
    tail = Path(text).name
    return bool(tail) and (tail == model.get("name") or (bool(model.get("path")) and Path(str(model["path"])).name == tail))


def _adapter_answers_to(adapter: Mapping[str, Any], text: str) -> bool:
    path = str(adapter.get("path") or "")
    repo, revision = adapter.get("repo_id"), adapter.get("revision")
    if text in (path, adapter.get("name")) or (repo and text in (repo, f"{repo}:{revision}")):
        return True
    return (bool(path) and str(Path(text).expanduser()) == path) or Path(text).name == adapter.get("name")


def _logged_run(row: Mapping[str, Any]) -> Run:
    return Run(
        record=row["record"],
        text=row["text"],
        finish_reason=row["finish_reason"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        timings={"time_to_first_token": row["time_to_first_token"], "total_seconds": row["total_seconds"],
                 "decode_tokens_per_second": row["tokens_per_second"]},
        where=f"run {row['id']}",
    )


def notebook_runs(path: str | Path) -> list[Run]:
    """The runs recorded in a saved notebook's outputs, in cell order.

    A notebook of format 4 (what Jupyter writes) is read as the JSON it is: importing nbformat costs
    seconds (its schema validator compiles grammars), more than replaying a whole notebook. Older
    formats go through nbformat's converter.
    """
    try:
        notebook = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(notebook, dict) or not isinstance(notebook.get("cells", notebook.get("worksheets")), list):
            raise ValueError("not a notebook")
    except (OSError, ValueError) as exc:
        why = "it has no list of cells" if str(exc) == "not a notebook" else type(exc).__name__
        raise ReplayError(f"{path} cannot be read as a notebook ({why})",
                          "give a saved notebook (.ipynb) or a run log") from None
    if notebook.get("nbformat", 4) < 4:
        try:
            import nbformat
        except ImportError:
            raise missing_dependency("nbformat (to read a notebook older than format 4)", "experiments") from None
        notebook = nbformat.reads(json.dumps(notebook), as_version=4)
    runs: list[Run] = []
    for number, cell in enumerate(notebook.get("cells", []), 1):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            metadata = output.get("metadata") or {}
            record = metadata.get("nbllm")
            if isinstance(record, Mapping) and "prompt" in record:
                outcome = dict(metadata.get("nbllm_result") or {})
                if "text" not in outcome:  # a %%llm output: the text is what it shows, less the [note] line
                    text = _text(output.get("data", {}).get("text/plain", ""))
                    note = outcome.get("note")
                    if note and text.endswith(f"\n[{note}]"):
                        text = text[: -len(f"\n[{note}]")]
                    outcome["text"] = text
                runs.append(_outcome_run(dict(record), outcome, f"cell {number}"))
            for row in metadata.get("nbllm_runs") or ():
                if isinstance(row, Mapping) and isinstance(row.get("record"), Mapping):
                    runs.append(_outcome_run(dict(row["record"]), dict(row.get("outcome") or {}), f"cell {number}"))
    return runs


def _outcome_run(record: dict[str, Any], outcome: Mapping[str, Any], where: str) -> Run:
    return Run(record, str(outcome.get("text", "")), outcome.get("finish_reason"), outcome.get("prompt_tokens"),
               outcome.get("completion_tokens"), outcome.get("timings"), where)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


class Replay:
    """A replay in progress on an engine: the recording, what to do at a miss, and how it went."""

    def __init__(self, recording: Recording, *, fallback: str = "error", engine: Engine | None = None) -> None:
        if fallback not in FALLBACKS:
            raise OptionError(f"--fallback {fallback!r} is not valid", f"use one of: {', '.join(FALLBACKS)}")
        self.recording = recording
        self.fallback = fallback
        self.engine = engine if engine is not None else get_engine()
        self.answered = 0
        """How many requests were answered from the recording."""
        self.fell_back = False
        """Whether a miss loaded the real model (``fallback="run"``); the replay is off since."""
        self.loader = cast(type[ReplayLoader], type("ReplayLoader", (ReplayLoader,), {"replay": self}))

    @property
    def on(self) -> bool:
        return self.engine.route == self._route

    def _route(self, spec: str, options: LoadOptions) -> tuple[ModelSource, type[ReplayLoader]]:
        return ModelSource(format=FORMAT, name=spec, url=str(self.recording.source)), self.loader

    def start(self) -> Replay:
        """Route the engine's loads to the recording; a model already loaded is released and the
        recording stands in for it."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self:
            _ACTIVE.stop()
        engine = self.engine
        status = engine.status()
        engine.route = self._route
        _ACTIVE = self
        if status.loaded and status.format != FORMAT and status.path:
            adapters = engine.adapters
            engine.load(status.path, LoadOptions.from_dict(status.options))
            if adapters:  # the stand-in keeps them, as the model had them
                engine.set_adapters(adapters)
        return self

    def stop(self) -> None:
        """Turn the replay off: loads load models again; the stand-in, if loaded, is unloaded."""
        global _ACTIVE
        if self.on:
            self.engine.route = None
        if self.engine.loaded and self.engine.loader.name == ReplayLoader.name:
            self.engine.unload()
        from .registry import models

        for name, engine in models().named().items():  # models loaded --as NAME while it was on
            if engine.route == self._route:
                engine.route = None
                if engine.loaded and engine.loader.name == ReplayLoader.name:
                    models().unload(name)
        if _ACTIVE is self:
            _ACTIVE = None

    def fell_back_with(self, adapters: list[dict[str, Any]]) -> None:
        """After a miss loaded the real model (``fallback="run"``): the replay is off; the adapters the
        stand-in had are applied to the model as recorded (their files must be here, with their weights)."""
        self.fell_back = True
        if adapters:
            from .lora import lora_restore

            lora_restore(adapters, engine=self.engine)

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "on" if self.on else ("off (the model was loaded at a miss)" if self.fell_back else "off")
        return (f"<nbllm.Replay of {self.recording.source}: {len(self.recording)} runs, {self.answered} "
                f"answered, {state}>")


_ACTIVE: Replay | None = None


def replay(source: str | Path | None, *, fallback: str = "error", session: str | None = None,
           engine: Engine | None = None) -> Replay | None:
    """Replay ``source`` (a saved notebook or a run log; ``nbllm.replay``): until it is turned off,
    loads load nothing and each request is answered from the recorded run it matches (one line naming
    the closest run when none does; ``fallback="run"`` loads the model at the first miss instead).
    ``replay(None)`` turns it off. Usable as a context manager."""
    if source is None or str(source) == "off":
        if _ACTIVE is not None:
            _ACTIVE.stop()
        return None
    return Replay(Recording.read(source, session=session), fallback=fallback, engine=engine).start()


def active_replay() -> Replay | None:
    """The replay that is on in this process, if any."""
    return _ACTIVE if _ACTIVE is not None and _ACTIVE.on else None

