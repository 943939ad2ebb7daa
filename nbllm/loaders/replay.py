"""The replay stand-in: a loader that "loads" a recording and answers prompts with recorded outputs.

While a replay is on (:mod:`nbllm.recordings`), the engine routes every load here: the model and
options a notebook asks for are noted and nothing is loaded (no torch is imported). Each request is
then answered by :meth:`ReplayLoader.answer` with the run whose identity (:mod:`nbllm.identity`)
equals the request's, streamed as it was shown, with its original record marked ``replayed``. A
request with no match fails with one line naming the closest recorded run and what differs; with
``--fallback run`` the engine loads the real model instead. A chat with tools asks the stand-in how the
recorded model took them (:meth:`ReplayLoader.tool_calling`, from the records), so it sends the requests
it sent then.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import GenerationError, NbllmWarning, ReplayError
from ..frontend import command
from ..identity import request_identity
from ..options import SAMPLER_SWITCHES, LoadOptions
from ..result import Record, Result, Timings
from ..source import ModelSource
from .base import LoadInstead, Request, TextLoader

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..tools import ToolCalling

FORMAT = "replay"


@dataclass
class Run:
    """One recorded generation: its record and what came out."""

    record: dict[str, Any]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: dict[str, Any] | None = None
    where: str = ""
    """Where it is in its source: ``run 12`` (a run log's row id) or ``cell 5`` (a notebook cell)."""


class Recorded(Protocol):
    """What the loader asks of a recording (:class:`nbllm.recordings.Recording` is one)."""

    source: Path

    def __len__(self) -> int: ...
    def model_for(self, spec: str) -> tuple[dict[str, Any], str] | None: ...
    def tool_calling_for(self, model: Mapping[str, Any]) -> dict[str, Any] | None: ...
    def take(self, identity: Mapping[str, Any]) -> Run | None: ...
    def closest(self, identity: Mapping[str, Any]) -> tuple[Run, list[str]] | None: ...
    def adapter_for(self, spec: str) -> dict[str, Any] | None: ...
    def adapter_names(self) -> list[str]: ...


class Replaying(Protocol):
    """What the loader reads and counts of the replay it stands in for (:class:`nbllm.recordings.Replay` is
    one). Protocols, so that this loader needs nothing from :mod:`nbllm.recordings`, which builds on it."""

    recording: Recorded
    fallback: str
    answered: int
    fell_back: bool

    def fell_back_with(self, adapters: list[dict[str, Any]]) -> None: ...


class ReplayLoader(TextLoader):
    """Stands in for the model a notebook loads while a replay is on. Each replay makes a subclass
    bound to itself (:attr:`replay`)."""

    name: ClassVar[str] = "replay"
    formats: ClassVar[frozenset[str]] = frozenset({FORMAT})
    format_words: ClassVar[str] = "a recorded run"
    load_options: ClassVar[frozenset[str]] = frozenset(LoadOptions.names())
    adapters: ClassVar[frozenset[str]] = frozenset({"peft", "gguf"})  # noted, as the model is: nothing is applied
    renders_chat: ClassVar[bool] = True  # requests carry the messages, as the recorded identities do
    structured_output: ClassVar[bool] = True  # a constraint is part of the identity a recorded run matches
    sampler_options = frozenset(SAMPLER_SWITCHES)  # so are the samplers
    replay: ClassVar[Replaying]

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, Any] = {}
        self.loader_name = "auto"
        self.spec = ""
        self.applied: list[Adapter] = []
        """The adapters ``%llm_lora`` applied to the stand-in: part of each request's identity."""
        self.recorded_tool_calling: dict[str, Any] | None = None
        """How the recorded model took tools (a record's ``tool_calling``), when a recorded chat used them."""

    def load(self, source: ModelSource, options: LoadOptions) -> None:
        self.source, self.options, self.spec = source, options, source.name
        recorded = self.replay.recording.model_for(self.spec)
        if recorded is None:
            self.model, self.loader_name = {"name": self.spec}, options.loader
            self.placement.notes.append(
                f"replay: {self.spec} has no recorded run in {self.replay.recording.source}; nothing was loaded"
            )
            return
        model, self.loader_name = recorded
        self.model = {k: v for k, v in model.items() if k != "adapters"}  # adapters come from %llm_lora, as recorded
        self.recorded_tool_calling = self.replay.recording.tool_calling_for(self.model)
        if options.loader != "auto":
            self.loader_name = options.loader
        self.placement.notes.append(f"replay: nothing was loaded; outputs come from {self.replay.recording.source}")

    def unload(self) -> None:
        self.source = None
        self.applied = []

    @property
    def takes_images(self) -> bool:
        return True  # a request's images are in its messages by sha256: they match as the messages do

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        self.applied = list(adapters)

    def tool_calling(self) -> ToolCalling:
        """The recorded model's way of taking tools (its format; a server that held a forced call, or a
        grammar), so a chat with tools sends the requests it sent when recorded."""
        from ..tools import ToolCalling, ToolError

        if self.recorded_tool_calling is None:
            raise ToolError(f"no recorded run of {self.spec or 'this model'} in {self.replay.recording.source} "
                            "chatted with tools, so there is nothing to replay them from",
                            f"run the cell as it was recorded, or turn the replay off ({command('replay off')}) "
                            "to chat with tools on the model")
        return ToolCalling.from_dict(self.recorded_tool_calling)

    def adapter(self, spec: str, *, scale: float) -> Adapter:
        """The adapter ``%llm_lora add SPEC`` names, as the recording holds it (its path, hub revision and
        sha256; no file is read), with ``scale``; an adapter the recording does not hold is read from its
        files when they are here (requests with it then miss, naming the adapters), else refused."""
        from ..adapters import Adapter, adapter_from_path

        recorded = self.replay.recording.adapter_for(spec)
        if recorded is not None:
            return Adapter(str(recorded["name"]), str(recorded["format"]), Path(str(recorded.get("path") or spec)),
                           scale, recorded.get("repo_id"), recorded.get("revision"), dict(recorded.get("sha256") or {}))
        path = Path(spec).expanduser()
        if path.exists():
            return adapter_from_path(path, scale=scale)
        names = self.replay.recording.adapter_names()
        raise ReplayError(f"no recorded run in {self.replay.recording.source} used an adapter {spec!r} (recorded: "
                          f"{', '.join(names) or 'none'})",
                          f"apply an adapter the recording used, or turn the replay off ({command('replay off')}) to apply others")

    def describe(self) -> dict[str, Any]:
        return {"replaying": str(self.replay.recording.source), "recorded runs": len(self.replay.recording)}

    def generate_text(self, request: Request) -> Iterator[str]:
        raise GenerationError("the replay answers from its recording and generates nothing", "turn the replay off")

    def answer(self, request: Request) -> Result:
        assert self.options is not None
        model = {**self.model, "adapters": [a.identity() for a in self.applied]} if self.applied else self.model
        wanted = request_identity(
            model=model,
            loader=self.loader_name,
            load_options=self.options.to_dict(),
            generation_options=request.options.to_dict(),
            seed=request.options.seed,
            prompt=request.prompt,
            messages=request.messages,
            tools=request.tools,
            tool_choice=request.tool_choice,
        )
        recording = self.replay.recording
        run = recording.take(wanted)
        if run is not None:
            self.replay.answered += 1
            return replayed_result(run, str(recording.source))
        closest = recording.closest(wanted)
        if closest is None:
            why = f"{recording.source} holds no recorded run"
        else:
            near, differs = closest
            why = (f"no recorded run in {recording.source} matches this request; the closest, {near.where}, differs in "
                   + _listed(differs))
        if self.replay.fallback == "run":
            warnings.warn(f"{why}: loading {self.spec} to run it (the replay is off from here on)",
                          NbllmWarning, stacklevel=2)
            adapters = [a.identity() for a in self.applied]
            raise LoadInstead(self.spec, self.options, loaded=lambda: self.replay.fell_back_with(adapters))
        raise ReplayError(why, "run the cell as it was recorded, or replay with --fallback run to load the model "
                               "for what changed")


def replayed_result(run: Run, source: str) -> Result:
    """A result that streams ``run``'s recorded text and ends as it ended, with its original record
    marked ``replayed``."""
    record = Record.from_dict({**run.record, "replayed": {"source": source, "run": run.where}})
    result = Result(record.prompt, record.seed, record)
    result.prompt_tokens = run.prompt_tokens  # None where the run's server did not say: unknown, as recorded
    result.counted_tokens = run.completion_tokens
    result.counts_unknown = run.completion_tokens is None
    known = {f.name for f in fields(Timings)}
    timings = Timings(**{k: v for k, v in (run.timings or {}).items() if k in known})

    def pieces() -> Iterator[str]:
        yield from re.findall(r"\s*\S+\s*|\s+", run.text)
        result.finish(run.finish_reason or "eos", timings)

    return result.attach(pieces())


def _listed(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items) or "nothing it records"
    return ", ".join(items[:-1]) + " and " + items[-1]
