"""Replay: a 50-cell notebook's outputs shown again from its saved copy, without the model or torch.

Run: python benchmarks/bench_replay.py [--cells 50] [--tokens 48] [--rounds 5]

A notebook of ``--cells`` cells (``%load_ext``, ``%llm_load`` and generating cells: raw, seeded,
unseeded, chat, conversation turns) is executed once in a real kernel on the built-in tiny model and
saved. Then, in a fresh Python process that imports no torch, an IPython shell runs the same cells
after ``%llm_replay saved.ipynb`` with the model's files removed, and times them from ``%llm_replay``
to the last cell (medians over rounds, each in a new process). Every replayed text must equal the saved
output. Target: under one second, with torch never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLAYER = r"""
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
cells, saved = json.loads(sys.argv[1]), sys.argv[2]
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "nbllm")
start = time.perf_counter()
with capture_output() as shown:
    shell.run_line_magic("llm_replay", saved)
    for cell in cells[1:]:
        result = shell.run_cell(cell)
        if not result.success:
            raise SystemExit(f"{cell!r} failed: {result.error_in_exec or result.error_before_exec}")
seconds = time.perf_counter() - start
texts = [shell.user_ns[f"r{i}"].text for i in range(len(cells)) if f"r{i}" in shell.user_ns]
print(json.dumps({"seconds": seconds, "texts": texts, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def study(model: Path, n: int, tokens: int) -> list[str]:
    """``n`` cells: the extension, the load, then generating cells of every kind, each into ``r<i>``."""
    cells = ["%load_ext nbllm", f"%llm_load {model} --dtype float32"]
    kinds = [
        "%%llm --temperature 0 --max-new-tokens {t} -o r{i}\nGreedy prompt number {i}",
        "%%llm --temperature 0.8 --seed {i} --max-new-tokens {t} -o r{i}\nSeeded prompt number {i}",
        "%%llm --temperature 0.9 --max-new-tokens {t} -o r{i}\nA sampled prompt, seed drawn",
        "%%llm --system 'Be brief.' --temperature 0 --max-new-tokens {t} -o r{i}\nChat prompt {i}",
        "%%llm_chat study --temperature 0 --max-new-tokens {t} -o r{i}\nTurn {i} of the conversation",
    ]
    for i in range(len(cells), n):
        cells.append(kinds[i % len(kinds)].format(i=i, t=tokens))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import nbformat
    from nbclient import NotebookClient

    from nbllm.testing import tiny_transformers_model

    with tempfile.TemporaryDirectory(prefix="nbllm-bench-replay-") as tmp:
        where = Path(tmp)
        model = where / "bench-model"
        shutil.copytree(tiny_transformers_model(), model)
        cells = study(model, args.cells, args.tokens)
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_code_cell(f"import os\nos.environ['NBLLM_RUN_LOG'] = 'off'\n{cells[0]}")] + [
            nbformat.v4.new_code_cell(c) for c in cells[1:]]
        NotebookClient(nb, timeout=600, kernel_name="python3").execute()
        saved = where / "study.ipynb"
        nbformat.write(nb, saved)
        recorded = [o["data"]["text/plain"] for c in nb.cells for o in c.outputs if "nbllm" in o.get("metadata", {})]
        shutil.rmtree(model)
        print(f"recorded a {len(cells)}-cell notebook ({len(recorded)} generated outputs of up to {args.tokens} "
              f"tokens) in a kernel; model files deleted")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NBLLM_RUN_LOG": "off"}
        times = []
        for round_ in range(args.rounds):
            out = subprocess.run([sys.executable, "-c", REPLAYER, json.dumps(cells), str(saved)], env=env,
                                 capture_output=True, text=True, check=True)
            report = json.loads(out.stdout.strip().splitlines()[-1])
            if report["texts"] != recorded:
                raise SystemExit("a replayed text differs from the saved output")
            if report["torch"] or report["transformers"]:
                raise SystemExit("the replay imported torch or transformers")
            times.append(report["seconds"])
            print(f"round {round_ + 1}: {len(cells) - 1} cells replayed in {report['seconds'] * 1000:.0f} ms; "
                  f"texts equal; torch imported: {report['torch']}")
        median = statistics.median(times)
        print(f"\nmedian: {median * 1000:.0f} ms for {len(cells)} cells (target < 1 s: "
              f"{'met' if median < 1 else 'NOT met'}); torch never imported")


if __name__ == "__main__":
    main()
