"""``%%llm --compare``'s cost: a comparison against each model asked alone.

Run: python benchmarks/bench_compare.py [--params 30e6] [--tokens 32] [--rounds 5] [--threads 2]

* **one CPU**: a Transformers model and a GGUF of the same size (random weights, built here), loaded side
  by side as ``a`` and ``b``. ``nbllm.compare(prompt, models=["a", "b"])`` (they share the CPU, so they run
  in turn) against ``generate(model="a")`` + ``generate(model="b")``. Target: ratio <= 1.1.
* **two servers**: two llama-cpp-python servers (``python -m llama_cpp.server``, as tests/servers.py starts
  them), each loaded by URL as a name. The comparison (the servers answer at once) against the slower of
  the two asked alone. Target: ratio <= 1.1.

Rounds are interleaved (comparison, then each alone, order swapped every round), greedy, the same
prompt; the comparison's texts must equal each model's alone. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "In a notebook, a researcher loads two language models and asks both about"


def timed(step: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def measure(names: list[str], tokens: int, rounds: int, alone_is: str) -> tuple[float, float]:
    """Median seconds of the comparison and of the models alone (their sum, or the slower one)."""
    import nbllm

    options = {"temperature": 0, "max_new_tokens": tokens}

    def compared() -> dict[str, str]:
        frame = nbllm.compare(PROMPT, models=names, **options)
        return {n: frame.loc[PROMPT, n] for n in names}

    def alone() -> tuple[float, dict[str, str]]:
        seconds, texts = [], {}
        for name in names:
            t, result = timed(lambda name=name: nbllm.generate(PROMPT, model=name, **options))
            seconds.append(t)
            texts[name] = result.text  # type: ignore[attr-defined]
        return (sum(seconds) if alone_is == "sum" else max(seconds)), texts

    compared()
    alone()  # warm up
    together, apart = [], []
    for i in range(rounds):
        steps = [("compare", compared), ("alone", alone)]
        for what, step in steps[::-1] if i % 2 else steps:
            if what == "compare":
                t, texts = timed(step)
                together.append(t)
            else:
                t_alone, texts_alone = step()  # type: ignore[misc]
                apart.append(t_alone)
        assert texts == texts_alone, (texts, texts_alone)
    return statistics.median(together), statistics.median(apart)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=30e6, help="model size in parameters")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (local and servers)")
    parser.add_argument("--skip-servers", action="store_true", help="only the one-CPU part")
    args = parser.parse_args()

    import nbllm
    from nbllm.testing import model_for_params, tiny_gguf_model, tiny_transformers_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average before: {os.getloadavg()}")
    size = model_for_params(int(args.params))
    folder, gguf = tiny_transformers_model(**size), tiny_gguf_model(**size)

    nbllm.load(folder, name="a")
    nbllm.load(gguf, name="b", threads=args.threads, threads_batch=args.threads)
    together, apart = measure(["a", "b"], args.tokens, args.rounds, "sum")
    print(f"one CPU   : compare {together:.3f} s, a + b alone {apart:.3f} s, ratio {together / apart:.3f} "
          "(target <= 1.1)")
    nbllm.unload(all=True)

    if not args.skip_servers:
        from servers import LlamaCppServer

        servers = [LlamaCppServer(gguf), LlamaCppServer(gguf)]
        try:
            for name, server in zip(("left", "right"), servers):
                nbllm.load(server.url, name=name)
            together, apart = measure(["left", "right"], args.tokens, args.rounds, "max")
            print(f"2 servers : compare {together:.3f} s, slower alone {apart:.3f} s, ratio {together / apart:.3f} "
                  "(target <= 1.1)")
        finally:
            nbllm.unload(all=True)
            for server in servers:
                server.stop()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
