"""Several models side by side: the kernel's models by name.

Each name holds its own :class:`~nbllm.engine.Engine` — one model, with its own lock, owners and
lifecycle. The unnamed model is the kernel's engine of today (:func:`~nbllm.engine.get_engine`), also
reachable as ``default``: one model and no name behaves exactly as before. ::

    nbllm.load("org/base", name="base")
    nbllm.load("./finetune", name="tuned")
    nbllm.generate("Hi", model="tuned")
    nbllm.compare("Hi", models=["base", "tuned"])   # a DataFrame, one column per model

**Memory first.** Before a model is loaded beside others, :func:`nbllm.fit.estimate` says what it
needs on each device; with what the loaded ones use (their measured placement), that must fit the
machine's budget (:func:`nbllm.fit.estimate.device_budget`), else the load is refused in one line naming
what to unload, or ``replace=NAME``. ``Models.machine`` is the machine the budget is taken from (this
one, probed, when ``None``; a simulated :class:`~nbllm.fit.machine.Machine` sets a smaller budget).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import Engine, Status, get_engine
from .errors import LoadError, NbllmError, OptionError
from .frontend import command
from .memory import format_memory
from .options import LoadOptions
from .shown import ShownAsLines

if TYPE_CHECKING:
    from .fit.machine import Machine

DEFAULT = "default"
"""The name of the unnamed model (the one ``%llm_load MODEL`` loads without ``--as``)."""

_NAME = re.compile(r"^[A-Za-z_][\w.-]{0,63}$")


class UnknownModelError(NbllmError, KeyError):
    """A name that no loaded model has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class NotEnoughMemoryError(LoadError):
    """A model that would not fit beside those loaded (refused before anything is loaded)."""


def check_name(name: str) -> str:
    """A model name: letters, digits, ``_ . -``, starting with a letter or ``_`` (``--as NAME``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise OptionError(f"{name!r} is not a model name",
                          "use letters, digits, _ . - (starting with a letter), e.g. --as base")
    return name


class Models:
    """The kernel's loaded models by name (one per kernel: :func:`models`)."""

    def __init__(self) -> None:
        self._named: dict[str, Engine] = {}
        self._lock = threading.RLock()
        self.machine: Machine | None = None
        """The machine whose memory the models must fit beside one another (``None``: this one, probed)."""

    # -- names -----------------------------------------------------------------------------------
    @property
    def default(self) -> Engine:
        return get_engine()

    def engines(self) -> dict[str, Engine]:
        """Every model that is loaded, by name (``default`` first when it is loaded)."""
        with self._lock:
            out = {DEFAULT: self.default} if self.default.loaded else {}
            out.update((n, e) for n, e in self._named.items() if e.loaded)
            return out

    def named(self) -> dict[str, Engine]:
        """The named engines (loaded or being loaded), without the unnamed one."""
        with self._lock:
            return dict(self._named)

    def named_loaded(self) -> list[str]:
        """The names of the models loaded --as NAME (without the unnamed one)."""
        with self._lock:
            return [n for n, e in self._named.items() if e.loaded]

    def names(self) -> list[str]:
        return list(self.engines())

    def engine(self, name: str | None = None) -> Engine:
        """The engine of the model loaded as ``name`` (``None`` or ``default``: the unnamed one, as today,
        loaded or not). An unknown name is one line listing the loaded ones."""
        if name is None or name == DEFAULT:
            return self.default
        with self._lock:
            engine = self._named.get(name)
        if engine is None or not engine.loaded:
            raise self.unknown(name)
        return engine

    def unknown(self, name: str) -> UnknownModelError:
        loaded = self.names()
        return UnknownModelError(
            f"no model is loaded as {name!r}" + (f" (loaded: {', '.join(loaded)})" if loaded else " (none is loaded)"),
            f"load it first: {command('load as', 'MODEL', name)}",
        )

    def _slot(self, name: str) -> Engine:
        """The engine for ``name``, made (empty) if it has none yet."""
        if name == DEFAULT:
            return self.default
        with self._lock:
            engine = self._named.get(name)
            if engine is None:
                from .runlog import log_results

                engine = self._named[name] = Engine()
                engine.name = name
                log_results(engine)
            return engine

    # -- lifecycle -------------------------------------------------------------------------------
    def load(
        self,
        model: str | Path,
        options: LoadOptions | Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        replace: str | None = None,
        fit: bool = False,
        save_settings: bool = False,
        **kwargs: Any,
    ) -> Status:
        """Load ``model`` as ``name`` (``None``: the unnamed model, replacing it as today). Loading into a
        name that holds a model replaces that model (:meth:`Engine.load`). Beside other loaded models it
        must fit with them (see the module), else one line names what to unload; ``replace`` unloads
        that model first."""
        target = check_name(name) if name is not None else DEFAULT
        opts = options if isinstance(options, LoadOptions) else LoadOptions.from_dict({**dict(options or {}), **kwargs})
        if isinstance(options, LoadOptions) and kwargs:
            opts = options.replace(**kwargs)
        if replace is not None and replace != target:
            self.engine(replace)  # an unknown name: one line, nothing unloaded
        engine = self._slot(target)
        default_route = self.default.route
        if target != DEFAULT and engine.route is not default_route:
            engine.route = default_route  # a replay on: every name's loads are routed to the recording
        if engine.route is None:
            self._check_fits(target, model, opts, replace=replace)
        if replace is not None and replace != target:
            self.unload(replace)
        return engine.load(model, opts, fit=fit, save_settings=save_settings)

    def unload(self, name: str | None = None) -> bool:
        """Unload the model loaded as ``name`` (``None``: the unnamed one). A stream reading it ends
        (its text so far kept, ``finish_reason`` ``superseded``); a sweep on it stops, keeping its
        finished rows. An unknown name is one line."""
        if name is None or name == DEFAULT:
            return self.default.unload()
        engine = self.engine(name)
        with self._lock:
            self._named.pop(name, None)
        return engine.unload()

    def unload_all(self) -> list[str]:
        """Unload every model; returns their names."""
        names = self.names()
        for name in names:
            self.unload(name)
        return names

    def statuses(self) -> dict[str, Status]:
        """Every loaded model's status, by name."""
        return {name: engine.status() for name, engine in self.engines().items()}

    # -- memory first ----------------------------------------------------------------------------
    def _check_fits(self, target: str, model: str | Path, opts: LoadOptions, *, replace: str | None) -> None:
        others = {n: e for n, e in self.engines().items() if n not in (target, replace)}
        if not others:
            return  # alone (or replacing the only one): as today
        from .fit.estimate import device_budget, estimate, probe_cached

        machine = self.machine if self.machine is not None else probe_cached()
        try:
            needed = estimate(model, opts, machine)
        except Exception:  # nothing to estimate from (a server, a stand-in...): it takes no memory here
            return
        used: dict[str, dict[str, int]] = {}
        for name, engine in others.items():
            for device, size in engine.status().placement.memory_bytes.items():
                used.setdefault(_device(device), {})[name] = size
        for device, memory in needed.devices.items():
            budget = device_budget(machine, device)
            beside = used.get(_device(device), {})
            if budget is None or memory.total + sum(beside.values()) <= budget:
                continue
            holders = sorted(beside, key=beside.__getitem__, reverse=True)
            what = ", ".join(f"{n} {format_memory(beside[n])}" for n in holders) or "nothing"
            first = holders[0] if holders else next(iter(others))
            in_place = (command("load in place as", str(model), target, first) if target != DEFAULT
                        else command("load in place", str(model), first))
            raise NotEnoughMemoryError(
                f"{Path(str(model)).name} needs about {format_memory(memory.total)} of {device} and does not fit "
                f"beside {what} (budget {format_memory(budget)})",
                f"unload one first ({command('unload', first)}), or load it in its place: {in_place}",
            )


class Listing(ShownAsLines):
    """``%llm_status`` with several models: each model's name, what it is and the memory it uses, then
    each one's full status."""

    def __init__(self, statuses: Mapping[str, Status]) -> None:
        self.statuses = dict(statuses)

    def lines(self) -> list[str]:
        out = [f"{len(self.statuses)} models loaded:"]
        for name, status in self.statuses.items():
            memory = ", ".join(f"{d} {format_memory(b)}" for d, b in status.placement.memory_bytes.items()) or "n/a"
            out.append(f"  {name:<12} {status.model} ({status.loader}) — memory: {memory}")
        for name, status in self.statuses.items():
            out.append("")
            out.append(f"[{name}]")
            out.extend(status.lines())
        return out



def _device(name: str) -> str:
    return "cuda:0" if name in ("cuda", "gpu") else name  # llama.cpp says gpu


_MODELS: Models | None = None
_MODELS_LOCK = threading.Lock()


def models() -> Models:
    """This kernel's models (one registry per process; its unnamed model is :func:`get_engine`'s)."""
    global _MODELS
    with _MODELS_LOCK:
        if _MODELS is None:
            _MODELS = Models()
        return _MODELS


def engine_for(name: str | None) -> Engine:
    """The engine of the model loaded as ``name`` (``None``: the unnamed model)."""
    return models().engine(name)
