"""Sweeps: every combination of some generation options over a set of prompts, as one table.

``nbllm.sweep(prompts, temperature=[0, 0.7], seed=[1, 2, 3])`` runs each prompt with each combination
and returns a pandas DataFrame, one row per run: the prompt, the options that vary, the text, its
tokens, tokens/s, why it ended and the record id (the run log's ``record_id``). Rows that share their
options except the seed go to the engine together (:meth:`~nbllm.engine.Engine.generate_batch`): a
loader that runs several prompts at once gets them as one padded batch; others run them one after
another. On a server (a loader with ``parallel_requests`` above 1) every row is its own request and up
to ``--max-concurrency`` of them run side by side (:meth:`~nbllm.engine.Engine.generate_rows`), whatever
their options. An interrupt keeps the finished rows.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .constraints import with_fields
from .engine import Engine, get_engine
from .errors import NbllmWarning, NoModelLoadedError, OptionError, pandas_module
from .options import GenerationOptions, decode_escapes
from .result import Result

if TYPE_CHECKING:
    import pandas

PromptLike = str | Sequence[Mapping[str, str]]


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"temperature=0,0.7 seed=1,2,3"`` → ``{"temperature": ["0", "0.7"], "seed": ["1", "2", "3"]}``
    (the line of ``%%llm --sweep``; ``max-new-tokens`` is ``max_new_tokens``; stop strings decode
    escapes as ``--stop`` does)."""
    grid: dict[str, list[str]] = {}
    for part in text.split():
        name, sep, values = part.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name or not values:
            raise OptionError(f"--sweep {part!r} is not NAME=VALUE,VALUE",
                              'write it as --sweep "temperature=0,0.7 seed=1,2,3"')
        if name == "model":  # the models loaded as these names (nbllm.registry), not a generation option
            grid[name] = values.split(",")
            continue
        spec = GenerationOptions.spec(name)
        if name in grid:
            raise OptionError(f"--sweep names {name} twice ({part!r} after {name}={','.join(grid[name])})",
                              f"give all of {name}'s values once, comma-separated: {name}=V1,V2,V3")
        grid[name] = [decode_escapes(v) if spec.escapes else v for v in values.split(",")]
    if not grid:
        raise OptionError("--sweep names no option to vary", 'write it as --sweep "temperature=0,0.7 seed=1,2,3"')
    return grid


def sweep(
    prompts: PromptLike | Sequence[PromptLike],
    options: GenerationOptions | Mapping[str, Any] | None = None,
    *,
    chat: bool = False,
    system: str | None = None,
    batch: bool = True,
    progress: bool | None = None,
    engine: Engine | None = None,
    results: list[Result] | None = None,
    **grid: Any,
) -> pandas.DataFrame:
    """Run every prompt with every combination of the ``grid`` values and return the table.

    ``prompts``: a prompt, a list of prompts, or a list of chat message lists. ``grid``: generation
    options, each a list of values (a single value is fixed, not varied): ``temperature``, ``top_p``,
    ``seed``, ``max_new_tokens``, ``stop`` (each value a stop string or a list of them)... ``options``:
    the options the grid varies from (the engine's defaults otherwise). ``batch=False`` runs every row
    alone. ``progress``: a progress bar (default: shown when the sweep lasts over two seconds).
    ``results``: a list that receives the finished results of the rows, in row order.

    ``model``: the names of models loaded side by side (``%llm_load MODEL --as NAME``; ``default`` is the
    unnamed one), a list or ``"a,b"``: the sweep runs on each in turn and the table has a ``model``
    column (one block of rows per model; ``frame.pivot(...)`` puts them in columns).
    """
    pd = pandas_module()
    if "model" in grid:
        return _sweep_models(grid.pop("model"), prompts, options, chat=chat, system=system, batch=batch,
                             progress=progress, engine=engine, results=results, grid=grid)
    engine = engine if engine is not None else get_engine()
    items = _prompts(prompts)
    base = engine.generation_options(options)
    varied = _grid(grid)
    combos = [dict(zip(varied, values)) for values in itertools.product(*varied.values())]
    settings = [base.replace(**{k: v for k, v in combo.items() if k != "seed"}) for combo in combos]
    seeds = [GenerationOptions.from_dict(seed=combo["seed"]).seed if "seed" in combo else base.seed for combo in combos]
    ready = [engine.prompt_for(item, chat=chat or system is not None, system=system) for item in items]

    rows = [(p, c) for p in range(len(items)) for c in range(len(combos))]
    groups: dict[str, list[int]] = {}
    for n, (_, c) in enumerate(rows):
        key = json.dumps(settings[c].to_dict(), sort_keys=True, default=str)
        groups.setdefault(key, []).append(n)

    size = max(1, engine.loader.batch_size) if batch else 1
    side_by_side = max(1, engine.loader.parallel_requests) if batch else 1
    done: dict[int, Result] = {}
    interrupted = False
    stopped: str | None = None
    loader = engine.loader
    bar = _progress_bar()(total=len(rows), desc="sweep", unit="run", file=sys.stderr, disable=progress is False,
                          delay=0 if progress else 2.0)

    def model_gone() -> bool:
        """Whether the model was unloaded, or another loaded, since the sweep began (a replay's miss that
        loaded the recorded model is not a change: the sweep goes on with it)."""
        nonlocal loader
        if not engine.loaded:
            return True
        current = engine.loader
        if current is not loader and engine.stood_in_by is loader:
            loader = current
        return current is not loader

    def run(chunk: list[int], generate: Callable[..., list[Result]], *args: Any, **kwargs: Any) -> None:
        if model_gone():
            raise _ModelGone
        try:
            finished = generate(*args, **kwargs)
        except KeyboardInterrupt as exc:
            done.update((n, r) for n, r in zip(chunk, getattr(exc, "finished", [])) if r is not None)
            raise
        except NoModelLoadedError:
            raise _ModelGone from None
        gone = model_gone()  # a row superseded by the unload did not finish: dropped, as an interrupt does
        done.update((n, r) for n, r in zip(chunk, finished) if not (gone and r.superseded))
        bar.update(len(chunk))
        if gone:
            raise _ModelGone

    try:
        if side_by_side > 1:  # a server: every row is its own request, any options, that many at once
            for start in range(0, len(rows), 4 * side_by_side):  # in chunks, so the bar moves
                chunk = list(range(start, min(start + 4 * side_by_side, len(rows))))
                run(chunk, engine.generate_rows,
                    [(ready[rows[n][0]], settings[rows[n][1]].with_valid(seed=seeds[rows[n][1]])) for n in chunk])
        else:
            for members in groups.values():
                opts = settings[rows[members[0]][1]]
                for start in range(0, len(members), size):
                    chunk = members[start : start + size]
                    run(chunk, engine.generate_batch, [ready[rows[n][0]] for n in chunk], opts,
                        seeds=[seeds[rows[n][1]] for n in chunk])
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"the sweep was interrupted: {len(done)} of {len(rows)} runs finished (kept in the table)",
                      NbllmWarning, stacklevel=2)
    except _ModelGone:
        interrupted = True
        stopped = "the model was unloaded" if not engine.loaded else "another model was loaded"
        warnings.warn(f"the sweep stopped ({stopped} during it): {len(done)} of {len(rows)} runs finished (kept in "
                      "the table)", NbllmWarning, stacklevel=2)
    finally:
        bar.close()

    shown = [k for k, values in varied.items() if len(values) > 1 or k == "seed"]
    table = []
    for n, (p, c) in enumerate(rows):
        result = done.get(n)
        if result is None or result.record is None:
            continue
        row: dict[str, Any] = {"prompt": _prompt_text(items[p])}
        if not isinstance(items[p], str):
            row["messages"] = items[p]
        for name in shown:
            row[name] = result.seed if name == "seed" else getattr(settings[c], name)
        row.update(
            text=result.text,
            tokens=result.completion_tokens,
            tokens_per_second=result.timings.decode_tokens_per_second,
            finish_reason=result.finish_reason,
            record_id=result.record.id,
        )
        table.extend(with_fields(row, result))  # a JSON-constrained output: a column per field
    frame = pd.DataFrame(table)
    frame.attrs["interrupted"] = interrupted
    frame.attrs["stopped"] = stopped
    frame.attrs["runs"] = len(rows)
    if results is not None:
        results.extend(done[n] for n in sorted(done) if done[n].record is not None)
    return frame


def _progress_bar() -> Any:
    """tqdm's bar, writing its final line once. tqdm's ``close()`` writes the final line again (with the
    overall rate) after the last ``update()`` wrote it: a terminal overwrites it (``\\r``), a notebook
    keeps both lines. Here the last update only counts, and ``close()`` writes the line, also when the
    bar was never shown but its delay has passed (a sweep of one batch)."""
    from tqdm import tqdm

    class SweepBar(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            if not self.disable and self.total is not None and self.n + (n or 0) >= self.total:
                self.n += n or 0  # the last rows: close() shows them
                return None
            return super().update(n)

        def close(self) -> None:
            shown_at = float(getattr(self, "last_print_t", 0.0))  # unset on a disabled bar
            if not self.disable and shown_at < self.start_t + self.delay <= self._time():
                self.last_print_t = self.start_t + self.delay  # never shown, and due: close() shows the final line
            super().close()

    return SweepBar


def _sweep_models(names: Any, prompts: PromptLike | Sequence[PromptLike], options: Any, *, engine: Engine | None,
                  grid: dict[str, Any], **kwargs: Any) -> pandas.DataFrame:
    """A sweep whose ``model`` axis names models side by side: one sweep per model, one table."""
    from .registry import engine_for

    pd = pandas_module()
    if engine is not None:
        raise OptionError("a sweep gets either engine= or a model axis, not both", "give model=['a', 'b'] alone")
    listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else list(names)) if n.strip()]
    if not listed:
        raise OptionError("the sweep gives model no value", "give the names of loaded models: model=['a', 'b']")
    engines = {name: engine_for(name) for name in listed}  # an unknown name: one line before anything runs
    frames: list[pandas.DataFrame] = []
    interrupted, stopped, runs = False, None, 0
    for name, each in engines.items():
        frame = sweep(prompts, options, engine=each, **kwargs, **grid)
        frame.insert(0, "model", name)
        frames.append(frame)
        runs = frame.attrs["runs"] * len(engines)
        if frame.attrs["interrupted"]:
            interrupted, stopped = True, frame.attrs["stopped"] and f"{name}: {frame.attrs['stopped']}"
            break
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(interrupted=interrupted, stopped=stopped, runs=runs)
    return out


class _ModelGone(Exception):
    """The model the sweep began with was unloaded or replaced: stop, keeping the finished rows."""



def _prompts(prompts: PromptLike | Sequence[PromptLike]) -> list[PromptLike]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(m, Mapping) for m in items):  # one chat: a list of messages
        return [items]
    if not items or not all(isinstance(p, str) or (isinstance(p, Sequence) and all(isinstance(m, Mapping) for m in p))
                            for p in items):
        raise OptionError("a sweep needs prompts: text, a list of texts, or a list of chat message lists",
                          'for example: nbllm.sweep(["Hi", "Hello"], temperature=[0, 0.7])')
    return items


def _grid(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each option's values: a list or tuple gives one value per item (``stop=["\\n", "."]`` is two
    settings, ``stop=[["\\n", "."]]`` one with two stop strings); anything else is one fixed value."""
    out: dict[str, list[Any]] = {}
    for name, values in grid.items():
        GenerationOptions.spec(name)  # an unknown name is one line listing the valid ones
        listed = list(values) if isinstance(values, (list, tuple)) else [values]
        if not listed:
            raise OptionError(f"the sweep gives {name} no value", f"give {name} a list of at least one value")
        out[name] = listed
    return out


def _prompt_text(item: PromptLike) -> str:
    if isinstance(item, str):
        return item
    users = [m["content"] for m in item if m.get("role") == "user"]
    return users[-1] if users else (item[-1]["content"] if item else "")
