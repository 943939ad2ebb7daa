"""One prompt, several models: their replies side by side (``%%llm --compare a,b``, :func:`compare`).

Each model is a name loaded with ``%llm_load MODEL --as NAME`` (:mod:`nbllm.registry`; ``default`` is the
unnamed model), or a model to load for the comparison (a path, a hub id, a server URL), unloaded after.
Models that share a device run in turn (on one CPU, running them at once only splits its cores); models
on different devices, and servers, run at the same time. A model to load that does not fit beside the
others (:class:`~nbllm.registry.NotEnoughMemoryError`) is loaded after the others are unloaded, in
turn, and a note says so. A model that fails keeps its failure, in one line, in its column; the others'
columns are kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._callable import callable_as
from .engine import Engine
from .errors import NbllmError, OptionError, pandas_module
from .frontend import command
from .loaders import TextLoader
from .options import GenerationOptions
from .registry import NotEnoughMemoryError
from .registry import models as registry_models
from .result import Result

if TYPE_CHECKING:
    import pandas

PromptLike = str | Sequence[Mapping[str, str]]
Update = Callable[[str, str], None]
"""``update(name, text_so_far)``: a column's text grew (or its failure line was written)."""


@dataclass
class Comparison:
    """The replies of several models to one prompt."""

    prompt: PromptLike
    names: list[str]
    results: dict[str, Result] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """A model's failure, in one line (its column shows it instead of a reply)."""
    notes: list[str] = field(default_factory=list)

    def text(self, name: str) -> str:
        if name in self.errors:
            return f"[error: {self.errors[name]}]"
        result = self.results.get(name)
        return "".join(result.chunks) if result is not None else ""

    def columns(self) -> dict[str, str]:
        return {name: self.text(name) for name in self.names}

    def __repr__(self) -> str:
        return "\n\n".join(f"[{name}]\n{text}" for name, text in self.columns().items())


def split_names(text: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → the names, each once, at least two."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if len(names) < 2:
        raise OptionError(f"a comparison needs at least two models, got {', '.join(names) or 'none'}",
                          f"name them comma-separated: {command('compare', 'base,tuned')} (loaded with "
                          f"{command('load as', 'MODEL', 'NAME')})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionError(f"the comparison names {', '.join(twice)} twice", "name each model once: --compare a,b")
    return names


def run_comparison(
    prompt: PromptLike,
    names: str | Sequence[str],
    options: GenerationOptions | Mapping[str, Any] | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    update: Update | None = None,
    tick: Callable[[], None] | None = None,
) -> Comparison:
    """Run ``prompt`` on each model of ``names`` (see the module); ``update`` is called as each column's
    text grows, from the thread running that model; ``tick`` every 50 ms on the calling thread while the
    models run (a front end shows the columns there). An interrupt stops every model, keeps what they
    wrote and propagates."""
    registry = registry_models()
    wanted = split_names(names)
    comparison = Comparison(prompt, wanted)
    loaded = set(registry.names())
    engines = {name: registry.engine(name) for name in wanted if name in loaded}
    to_load = [name for name in wanted if name not in loaded]
    lock = threading.Lock()
    running: list[Result] = []
    temporary: list[str] = []

    def tell(name: str) -> None:
        if update is not None:
            update(name, comparison.text(name))

    def fail(name: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, NbllmError) else f"{type(exc).__name__}: {exc}"
        comparison.errors[name] = (message.splitlines() or [""])[0]
        tell(name)

    def run_one(name: str, engine: Engine) -> None:
        try:
            result = engine.stream(prompt, options, chat=chat, system=system)
        except NbllmError as exc:
            fail(name, exc)
            return
        with lock:
            running.append(result)
            comparison.results[name] = result
        try:
            for _ in result:
                tell(name)
        except NbllmError as exc:
            fail(name, exc)
            return
        tell(name)

    def lane(members: list[str]) -> None:
        for name in members:
            run_one(name, engines[name])

    def load_temporary(spec: str) -> Engine | None:
        slot = f"compare-{len(temporary) + 1}"
        try:
            registry.load(spec, name=slot)
        except NotEnoughMemoryError:
            for other in list(temporary):  # alone, after the others: loaded in turn
                registry.unload(other)
                temporary.remove(other)
            comparison.notes.append(f"{spec} was loaded after the models before it were unloaded: they do not fit "
                                    "together, so they ran in turn")
            try:
                registry.load(spec, name=slot)
            except NbllmError as exc:
                fail(spec, exc)
                return None
        except NbllmError as exc:
            fail(spec, exc)
            return None
        temporary.append(slot)
        return registry.engine(slot)

    try:
        threads = [threading.Thread(target=lane, args=(members,), name=f"nbllm-compare-{i}", daemon=True)
                   for i, members in enumerate(lanes(engines))]
        for thread in threads:
            thread.start()
        _join(threads, running, lock, tick)
        for spec in to_load:  # models to load for the comparison: after those loaded, one at a time if need be
            engine = load_temporary(spec)
            if engine is not None:
                engines[spec] = engine
                thread = threading.Thread(target=run_one, args=(spec, engine), name="nbllm-compare-load", daemon=True)
                thread.start()
                _join([thread], running, lock, tick)
    finally:
        for slot in temporary:
            registry.unload(slot)
    return comparison


def _join(threads: list[threading.Thread], running: list[Result], lock: threading.Lock,
          tick: Callable[[], None] | None) -> None:
    """Wait for the lanes; an interrupt stops every reply (its text kept) and propagates."""
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.05)
                if tick is not None:
                    tick()
    except BaseException:
        with lock:
            for result in running:
                result.cancel()
        for thread in threads:
            thread.join()
        raise


def lanes(engines: Mapping[str, Engine]) -> list[list[str]]:
    """Which models run at the same time: each server alone in its lane (they run at once); models that
    share a device (the CPU) in one lane, in turn."""
    out: list[tuple[set[str], list[str]]] = []
    for name, engine in engines.items():
        loader = engine.loader
        if isinstance(loader, TextLoader) or loader.parallel_requests > 1:
            out.append(({f"server:{name}"}, [name]))
            continue
        devices = set(engine.status().placement.memory_bytes) or {"cpu"}
        for used, members in out:
            if used & devices:
                used |= devices
                members.append(name)
                break
        else:
            out.append((devices, [name]))
    return [members for _, members in out]


def compare(
    prompts: PromptLike | Sequence[PromptLike],
    models: str | Sequence[str],  # noqa: F811 (the registry's function is not needed here by that name)
    options: GenerationOptions | Mapping[str, Any] | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    results: list[Comparison] | None = None,
    **kwargs: Any,
) -> pandas.DataFrame:
    """Run each prompt on each of ``models`` and return a DataFrame: one row per prompt (the index), one
    column per model holding its text (a failure: ``[error: ...]``). Keyword arguments are
    :class:`GenerationOptions` fields, the same for every model. ``results`` receives the
    :class:`Comparison` of each prompt (their ``results`` hold each model's :class:`Result` and record)."""
    from .sweeps import _prompt_text, _prompts

    pd = pandas_module()
    if kwargs:
        options = GenerationOptions.from_dict({**(options.to_dict() if isinstance(options, GenerationOptions)
                                                  else dict(options or {})), **kwargs})
    done = [run_comparison(p, models, options, chat=chat, system=system) for p in _prompts(prompts)]
    if results is not None:
        results.extend(done)
    frame = pd.DataFrame([c.columns() for c in done], index=pd.Index([_prompt_text(c.prompt) for c in done], name="prompt"))
    frame.attrs["notes"] = [n for c in done for n in c.notes]
    frame.attrs["record_ids"] = [{n: r.record.id for n, r in c.results.items() if r.record is not None} for c in done]
    return frame


callable_as(__name__, compare)  # nbllm.compare(...) whether the attribute is this function or this module
