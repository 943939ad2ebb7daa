"""Evaluation from the notebook: EleutherAI's lm-evaluation-harness run as a library on the kernel's loaded
model (``nbllm.evaluate``, ``%llm_eval``), through an nbllm model class registered with lm-eval as ``nbllm``.

Its tasks run on whatever the engine holds — Transformers, llama.cpp — because the model class asks the
engine (:mod:`nbllm.scoring`'s token scores for ``loglikelihood`` and ``loglikelihood_rolling``,
:meth:`Engine.generate` for ``generate_until``). lm-eval is the ``[eval]`` extra; nothing here imports it
until an evaluation runs.
"""

from __future__ import annotations

import html
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._callable import callable_as
from .errors import OptionError, missing_dependency
from .result import Record

if TYPE_CHECKING:  # the engine is imported when an evaluation runs, not by ``import nbllm``
    from .engine import Engine


@dataclass
class Evaluation:
    """What :func:`evaluate` gives: each task's metrics (``frame()``), its per-sample rows (``samples(task)``),
    the versions and few-shot counts lm-eval reports, and the record."""

    results: dict[str, dict[str, Any]]
    versions: dict[str, Any]
    n_shot: dict[str, Any]
    sample_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    record: Record | None = None
    replayed: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """One dict per task and metric: ``task``, ``metric``, ``filter``, ``value``, ``stderr``, ``version``,
        ``n_shot``."""
        out = []
        for task, metrics in self.results.items():
            for key, value in metrics.items():
                if key == "alias" or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                out.append({"task": task, "metric": metric, "filter": filt or "none", "value": value,
                            "stderr": stderr if isinstance(stderr, (int, float)) else None,
                            "version": self.versions.get(task), "n_shot": self.n_shot.get(task)})
        return out

    def frame(self) -> Any:
        from .errors import pandas_module

        return pandas_module().DataFrame(self.rows(), columns=["task", "metric", "filter", "value", "stderr",
                                                                "version", "n_shot"])

    def samples(self, task: str) -> Any:
        """The per-sample rows of ``task`` as a DataFrame (doc id, target, the model's answers, each metric)."""
        from .errors import pandas_module

        if task not in self.sample_rows:
            raise OptionError(f"no samples of {task!r}", f"use one of: {', '.join(self.sample_rows) or 'none kept'}")
        return pandas_module().DataFrame(self.sample_rows[task])

    def to_json(self) -> str:
        return json.dumps({"results": self.results, "versions": self.versions, "n_shot": self.n_shot,
                           "sample_rows": self.sample_rows}, ensure_ascii=False, default=str)

    def __str__(self) -> str:
        lines = [f"{'task':<24} {'metric':<16} {'value':>8} {'stderr':>8}"]
        for r in self.rows():
            stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
            lines.append(f"{r['task']:<24} {r['metric']:<16} {r['value']:>8.4f} {stderr:>8}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['metric'])}</td><td>{r['value']:.4f}</td>"
            f"<td>{'' if r['stderr'] is None else format(r['stderr'], '.4f')}</td><td>{r['n_shot']}</td></tr>"
            for r in self.rows())
        return ("<table><thead><tr><th>task</th><th>metric</th><th>value</th><th>stderr</th><th>shots</th></tr>"
                f"</thead><tbody>{body}</tbody></table>")


def _lm_eval() -> Any:
    if importlib.util.find_spec("lm_eval") is None:
        raise missing_dependency("lm-eval (lm-evaluation-harness)", "eval")
    import lm_eval

    return lm_eval


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None) -> Any:
    """lm-eval's ``TaskManager`` with its own tasks and those of ``include_path`` (a folder of task YAML files)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(include_path)] if isinstance(include_path, (str, Path)) else [str(p) for p in include_path or ()]
    return TaskManager(include_path=paths or None)


def evaluate(tasks: str | Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
             seed: int = 1234, include_path: str | Path | Sequence[str | Path] | None = None,
             engine: Engine | None = None) -> Evaluation:
    """Run lm-evaluation-harness ``tasks`` (names, or one comma-separated string) on the loaded model
    (``nbllm.evaluate``): ``limit`` samples per task (a fraction below 1 is a share), ``num_fewshot`` examples,
    ``seed`` for every random choice lm-eval makes, ``include_path`` a folder of your own task YAML files.
    Recorded in the run log (task names and versions, few-shot count, seed, limit) and answered from the
    recording while a replay is on."""
    from .engine import get_engine
    from .scoring import _log, _replayed

    engine = engine or get_engine()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise OptionError("no task was named", "name one or more lm-eval tasks, e.g. nbllm.evaluate('hellaswag')")
    if limit is not None and limit <= 0:
        raise OptionError(f"limit {limit} is not above 0", "give a number of samples (or a share below 1)")
    if num_fewshot is not None and num_fewshot < 0:
        raise OptionError(f"num_fewshot {num_fewshot} is below 0", "give 0 or more examples")
    inputs = {"tasks": names, "limit": limit, "num_fewshot": num_fewshot, "seed": seed}
    replayed = _replayed(engine, "eval", ",".join(names), inputs)
    if replayed is not None:
        data = json.loads(replayed[0])
        return Evaluation(data["results"], data["versions"], data["n_shot"], data.get("sample_rows", {}),
                          replayed[1], replayed=True)
    lm_eval = _lm_eval()
    manager = task_manager(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise OptionError(f"lm-eval has no task {unknown[0]!r}",
                          "list the tasks with nbllm.evaluate_tasks() (or lm-eval --tasks list); your own YAML "
                          "files go in include_path")
    loader = engine.loader  # no model: one line before lm-eval starts
    from ._lmeval_model import NbllmLM

    lm = NbllmLM(engine)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    results = {t: _plain(v) for t, v in (out.get("results") or {}).items()}
    samples = {t: [_sample_row(s) for s in rows] for t, rows in (out.get("samples") or {}).items()}
    evaluation = Evaluation(results, _plain(out.get("versions") or {}), _plain(out.get("n-shot") or {}), samples)
    evaluation.record = _log(engine, loader, "eval", ",".join(names), inputs, evaluation.to_json(), 0)
    return evaluation


def evaluate_tasks(include_path: str | Path | None = None) -> list[str]:
    """The names of the tasks lm-eval knows (with those of ``include_path``)."""
    return sorted(task_manager(include_path).all_tasks)


def _sample_row(sample: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in sample.items() if k not in ("doc", "arguments", "resps", "doc_hash", "prompt_hash",
                                                         "target_hash")}
    return _plain(keep)


def _plain(value: Any) -> Any:
    """lm-eval's values as plain JSON ones (numpy numbers, tuples)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


callable_as(__name__, evaluate)  # nbllm.evaluate(...) whether the attribute is this function or this module
