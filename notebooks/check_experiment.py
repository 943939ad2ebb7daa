"""Run notebooks/experiment.ipynb three times and check that it reproduces (``make experiment``).

1. Run it on the built-in model (models folder and run log under OUT/), keeping its run log.
2. Run it again: every greedy and seeded output must be identical (cells tagged ``drawn-seed`` show
   what a drawn seed gave, and ``varies`` says where and how fast things ran: those are skipped).
3. Run it with ``NBLLM_REPLAY`` set to the first run's log, an empty models folder and an empty
   tiny-model cache: every output (all but the ``varies`` cells) must equal the first run's, the
   models folder must stay empty and torch must never be imported.

Usage: python notebooks/check_experiment.py [OUT]   (default OUT: build/experiment)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent / "experiment.ipynb"
SKIP_AGAIN = {"varies", "drawn-seed"}
SKIP_REPLAY = {"varies"}


def execute(out: Path, name: str, env: dict[str, str], extra: list[str] = ()) -> nbformat.NotebookNode:  # type: ignore[assignment]
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in extra)
    saved = dict(os.environ)
    os.environ.update(env)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    nbformat.write(nb, out / f"{name}.ipynb")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    if errors:
        raise SystemExit(f"{name}: a cell failed: {errors[0]['ename']}: {errors[0]['evalue']}")
    print(f"{name}: ran in {time.perf_counter() - start:.1f} s")
    return nb


def shown(cell: Any, *, runs_only: bool = False) -> list[tuple[str, Any]]:
    """What a cell shows: stdout text, and the text and images of its displays (stderr left out:
    progress bars). ``runs_only``: a sweep table counts by its rows' texts and endings (its
    tokens/s and record ids are new on every run; a replay shows the recorded ones)."""
    out: list[tuple[str, Any]] = []
    for o in cell.get("outputs", []):
        rows = o.get("metadata", {}).get("nbllm_runs")
        if o["output_type"] == "stream":
            if o["name"] == "stdout":  # one entry per run of stdout text (the kernel splits it as it likes)
                if out and out[-1][0] == "stdout":
                    out[-1] = ("stdout", out[-1][1] + o["text"])
                else:
                    out.append(("stdout", o["text"]))
        elif runs_only and rows is not None:
            out.append(("runs", [(r["outcome"]["text"], r["outcome"]["finish_reason"]) for r in rows]))
        elif o["output_type"] in ("display_data", "execute_result"):
            for kind in ("text/plain", "image/png"):
                if kind in o["data"]:
                    out.append((kind, o["data"][kind]))
    return out


def compare(first: Any, other: Any, skip: set[str], what: str, *, runs_only: bool = False) -> int:
    """Check every cell's outputs are equal (cells tagged with ``skip`` aside); return how many
    generation outputs (with a record) were compared."""
    compared = 0
    for n, (a, b) in enumerate(zip(first.cells, other.cells), 1):
        if a.cell_type != "code" or skip & set(a.metadata.get("tags", [])):
            continue
        before, now = shown(a, runs_only=runs_only), shown(b, runs_only=runs_only)
        if before != now:
            raise SystemExit(f"{what}: cell {n} differs:\n{a.source}\n--- first run ---\n{before}\n--- now ---\n{now}")
        compared += sum(1 for o in a.get("outputs", []) if "nbllm" in o.get("metadata", {}) or
                        "nbllm_runs" in o.get("metadata", {}))
    return compared


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    (out / "empty-models").mkdir(parents=True)
    (out / "empty-cache").mkdir()
    base = {"HF_HUB_OFFLINE": "1", "NBLLM_MODELS_DIR": str(out / "models")}
    first = execute(out, "run1", {**base, "NBLLM_RUN_LOG": str(out / "run1.sqlite")})
    again = execute(out, "run2", {**base, "NBLLM_RUN_LOG": str(out / "run2.sqlite")})
    n = compare(first, again, SKIP_AGAIN, "second run", runs_only=True)
    print(f"second run: every greedy and seeded output identical ({n} generation outputs compared)")
    replay = {"NBLLM_MODELS_DIR": str(out / "empty-models"), "NBLLM_CACHE_DIR": str(out / "empty-cache"),
              "NBLLM_RUN_LOG": str(out / "run3.sqlite"), "NBLLM_REPLAY": str(out / "run1.sqlite"), "HF_HUB_OFFLINE": "1"}
    replayed = execute(out, "run3-replay", replay, extra=["import sys\nprint('torch' in sys.modules)"])
    n = compare(first, replayed, SKIP_REPLAY, "replay")
    if shown(replayed.cells[-1]) != [("stdout", "False\n")]:
        raise SystemExit("replay: torch was imported")
    if any((out / "empty-models").iterdir()) or any((out / "empty-cache").iterdir()):
        raise SystemExit("replay: model files were written")
    print(f"replay of run 1 without model files or torch: every output identical ({n} generation outputs compared)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/experiment").resolve())
