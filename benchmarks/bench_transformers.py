"""Decode speed and time to first token of %%llm and nbllm.generate against model.generate.

Run: python benchmarks/bench_transformers.py [--params 100e6] [--tokens 64] [--rounds 5]

All three run side by side in one process on the same loaded model, interleaved round by round (the
order rotating from round to round), with
the same greedy options. Every call processes the whole prompt (raw prompts never reuse a kept
prefix), as model.generate does. Prints medians and the ratios against the direct call, with the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"


def load_ext_seconds() -> tuple[float, list[str]]:
    """Time of `%load_ext nbllm` in a fresh interpreter (IPython already imported), and heavy modules."""
    code = (
        "import sys, time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "sh = InteractiveShell.instance()\n"
        "t = time.perf_counter(); sh.run_line_magic('load_ext', 'nbllm'); t = time.perf_counter() - t\n"
        "print(t, ','.join(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))\n"
    )
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        runs.append(float(out[0]))
        heavy = out[1].split(",") if len(out) > 1 else []
    return statistics.median(runs), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    import torch
    from IPython.core.interactiveshell import InteractiveShell
    from transformers.generation.streamers import BaseStreamer

    import nbllm
    from nbllm.testing import count_params, model_for_params, tiny_transformers_model

    size = model_for_params(int(args.params))
    path = tiny_transformers_model(**size)
    nbllm.load(path, dtype="float32")
    engine = nbllm.get_engine()
    model, tok = engine.loader.model, engine.loader.tokenizer
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")
    n = args.tokens
    inputs = tok(PROMPT, return_tensors="pt")

    class Clock(BaseStreamer):
        """Records when each new token arrives (a function call per token, no decoding)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.first_put = True

        def put(self, value: torch.Tensor) -> None:
            if self.first_put:
                self.first_put = False
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def direct() -> tuple[float, float, list[int]]:
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=n, streamer=clock)
        ttft = clock.times[0] - start
        return ttft, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), out[0, inputs["input_ids"].shape[1]:].tolist()

    def api() -> tuple[float, float, list[int]]:
        r = nbllm.generate(PROMPT, temperature=0, max_new_tokens=n)
        return r.timings.time_to_first_token, r.timings.decode_tokens_per_second, r.token_ids

    def magic() -> tuple[float, float, list[int]]:
        with contextlib.redirect_stdout(io.StringIO()):
            shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens {n} -o _bench", PROMPT)
        r = shell.user_ns["_bench"]
        return r.timings.time_to_first_token, r.timings.decode_tokens_per_second, r.token_ids

    runs: dict[str, list[tuple[float, float]]] = {"model.generate": [], "nbllm.generate": [], "%%llm": []}
    direct(), api(), magic()  # warm up
    reference = None
    order = [("model.generate", direct), ("nbllm.generate", api), ("%%llm", magic)]
    for i in range(args.rounds):
        for name, fn in order[i % 3:] + order[: i % 3]:  # rotate who goes first: no position bias
            ttft, rate, ids = fn()
            reference = reference or ids
            assert ids == reference, f"{name} produced other tokens"
            runs[name].append((ttft, rate))

    print(f"model: {count_params(**size) / 1e6:.1f}M parameters, {n} new tokens, greedy, CPU "
          f"({torch.get_num_threads()} threads), {args.rounds} interleaved rounds, medians")
    base_ttft = statistics.median(t for t, _ in runs["model.generate"])
    base_rate = statistics.median(r for _, r in runs["model.generate"])
    print(f"{'':16} {'decode tok/s':>12} {'ratio':>6} {'TTFT ms':>8} {'overhead ms':>11}   ratio per round")
    for name, values in runs.items():
        ttft = statistics.median(t for t, _ in values)
        rate = statistics.median(r for _, r in values)
        per_round = [r / b for (_, r), (_, b) in zip(values, runs["model.generate"])]
        print(f"{name:16} {rate:12.1f} {rate / base_rate:6.3f} {ttft * 1000:8.1f} {(ttft - base_ttft) * 1000:11.1f}"
              f"   {min(per_round):.3f}..{max(per_round):.3f}")
    print("targets: decode ratio >= 0.97, TTFT overhead <= 30 ms")
    seconds, heavy = load_ext_seconds()
    print(f"%load_ext nbllm: {seconds * 1000:.0f} ms (target <= 300 ms); heavy modules imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
