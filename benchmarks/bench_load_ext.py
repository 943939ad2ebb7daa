"""How long ``%load_ext nbllm`` takes in a fresh process, and what it imports.

Run: python benchmarks/bench_load_ext.py [--rounds 9]

Each round is a new Python process that starts an IPython shell (not timed: a kernel has one already),
then times ``%load_ext nbllm``. Prints the median (target: at most 0.1 s), and from one more process run
with ``python -X importtime`` the modules of nbllm's that took longest, with their cumulative time.
Heavy libraries (torch, transformers, llama_cpp) must not be imported at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TARGET_S = 0.1
HEAVY = ("torch", "transformers", "llama_cpp", "nbllm.engine", "nbllm.loaders", "nbllm.download", "starlette",
         "uvicorn", "pydantic")

CHILD = f"""
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
start = time.perf_counter()
shell.run_line_magic("load_ext", "nbllm")
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    seconds, heavy = [], set()
    for _ in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        answer = json.loads(out.stdout.strip().splitlines()[-1])
        seconds.append(answer["seconds"])
        heavy.update(answer["heavy"])
    median = statistics.median(seconds)
    print(f"%load_ext nbllm in a fresh process: median {median * 1000:.1f} ms of {args.rounds} "
          f"(min {min(seconds) * 1000:.1f}, max {max(seconds) * 1000:.1f}; target <= {TARGET_S * 1000:.0f} ms: "
          f"{'ok' if median <= TARGET_S else 'OVER'})")
    print("  imported by it: " + (", ".join(sorted(heavy)) or "none of " + ", ".join(HEAVY)))
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip().startswith("nbllm"):
            rows.append((int(parts[1]), parts[2].strip()))
    print("  slowest nbllm modules (cumulative import time, -X importtime):")
    for cumulative, name in sorted(rows, reverse=True)[:8]:
        print(f"    {cumulative / 1000:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
