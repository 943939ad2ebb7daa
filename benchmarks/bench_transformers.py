"""Decode speed and time to first token of %%llm and nbllm.generate against model.generate.

Run: python benchmarks/bench_transformers.py [--params 0] [--tokens 64] [--rounds 15] [--threads 1]

One built-in Transformers model (``--params 0``: the smallest, where nbllm's own per-token work shows
most; e.g. ``--params 100e6`` for a bigger one) is loaded once by nbllm; the direct call runs the very
same model object. All three run interleaved, round by round (the order rotating), greedy, the same
tokens, and every call processes the whole prompt (raw prompts never reuse a kept prefix), as
model.generate does.

How the times are taken, the same way for all three (as bench_llamacpp.py takes them):

* each token is stamped when it arrives: for nbllm as the engine receives it from the loader (a thin
  wrapper around the loader's ``generate_tokens``), for the direct call in a streamer's ``put``, which
  generate calls right after each token is picked;
* time to first token is counted from the call itself (for nbllm: options, tokenizing, the record, the
  generation thread and the display are inside it);
* decode tokens/s = (tokens - 1) / (last token's stamp - first token's stamp);
* every stamp is taken twice: wall-clock time, and the CPU time of the whole process. With
  ``--threads 1`` (the default) torch computes in one thread, so process CPU time counts the work done,
  nbllm's own threads included, and is not disturbed by other processes on a shared machine;
  wall-clock time is what a user waits on an idle one.

Prints medians, the ratios against the direct call with the targets, and the fraction of the memory
bandwidth the direct call reaches; saves results/transformers-<size>.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
from collections.abc import Callable

import machine


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
    heavy: list[str] = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=machine.ROOT).stdout.split()
        runs.append(float(out[0]))
        heavy = out[1].split(",") if len(out) > 1 else []
    return statistics.median(runs), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=0, help="model size (0: the smallest built-in)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="compute threads (0: torch's default)")
    args = parser.parse_args()
    machine.set_threads(args.threads)

    import torch
    from IPython.core.interactiveshell import InteractiveShell
    from transformers.generation.streamers import BaseStreamer

    import nbllm
    from nbllm.testing import count_params, tiny_transformers_model

    if args.threads:
        torch.set_num_threads(args.threads)
    size = machine.model_size(args.params)
    path = tiny_transformers_model(**size)
    nbllm.load(path, dtype="float32", device="cpu")
    engine = nbllm.get_engine()
    loader = engine.loader
    model, tok = loader.model, loader.tokenizer
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")
    n = args.tokens
    inputs = tok(machine.PROMPT, return_tensors="pt")

    class Clock(BaseStreamer):
        """Stamps each new token as generate hands it over (the prompt comes first: not a token)."""

        def __init__(self) -> None:
            self.stamps: list[machine.Stamp] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                self.stamps.append(machine.now())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def direct() -> tuple[dict[str, float], list[int]]:
        clock = Clock()
        start = machine.now()
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=n, streamer=clock)
        return machine.measures(start, clock.stamps), out[0, inputs["input_ids"].shape[1]:].tolist()

    arrivals = machine.stamp_arrivals(loader)

    def timed(run: Callable[[], nbllm.Result]) -> tuple[dict[str, float], list[int]]:
        arrivals.clear()
        start = machine.now()
        r = run()
        assert r.completion_tokens == n == len(arrivals), (r.completion_tokens, len(arrivals))
        return machine.measures(start, arrivals), r.token_ids

    def api() -> tuple[dict[str, float], list[int]]:
        return timed(lambda: nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n))

    def magic() -> tuple[dict[str, float], list[int]]:
        def run() -> nbllm.Result:
            with contextlib.redirect_stdout(io.StringIO()):  # the streamed text, written chunk by chunk
                shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens {n} -o _bench", machine.PROMPT)
            result: nbllm.Result = shell.user_ns["_bench"]
            return result

        return timed(run)

    methods = {"model.generate": direct, "nbllm.generate": api, "%%llm": magic}
    for fn in methods.values():  # warm up
        fn()
    _ = engine.last_result.record if engine.last_result else None  # waits for the weights' hash, once
    runs = machine.interleaved(methods, args.rounds)
    reference = runs["model.generate"][0][1]
    for name, values in runs.items():
        assert all(ids == reference for _, ids in values), f"{name} produced other tokens"
    med = {name: machine.medians([v for v, _ in values]) for name, values in runs.items()}

    info = machine.describe(args.threads)
    bw = machine.bandwidth(args.threads)
    context = inputs["input_ids"].shape[1] + n / 2
    per_token = machine.transformers_bytes_per_token(model, context)["total"]
    label = f"{count_params(**size) / 1e6:.2f}M" if count_params(**size) < 1e6 else f"{count_params(**size) / 1e6:.0f}M"
    print(f"model: {label} parameters ({per_token / 1e6:.1f} MB read per token), float32, CPU, {args.threads or 'default'} "
          f"thread(s), {n} new tokens, greedy, the same tokens from all three, {args.rounds} interleaved rounds, medians")
    table: list[str] = []
    clocks = [("process CPU time", "cpu"), ("wall clock", "wall")] if args.threads == 1 else [("wall clock", "wall")]
    for clock_label, key in clocks:
        base = med["model.generate"]
        table += [f"| {label} Transformers, {clock_label} | decode tok/s | ratio | TTFT ms | overhead ms | ratio per round |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, m in med.items():
            per_round = [v[f"rate_{key}"] / b[f"rate_{key}"]
                         for (v, _), (b, _) in zip(runs[name], runs["model.generate"])]
            table.append(f"| {name} | {m[f'rate_{key}']:.1f} | {m[f'rate_{key}'] / base[f'rate_{key}']:.3f} | "
                         f"{m[f'ttft_{key}'] * 1000:.1f} | {(m[f'ttft_{key}'] - base[f'ttft_{key}']) * 1000:+.1f} | "
                         f"{min(per_round):.3f}..{max(per_round):.3f} |")
    for row in table:
        print(row)
    direct_rate = med["model.generate"][f"rate_{clocks[0][1]}"]
    frac = machine.fraction(direct_rate, per_token, bw["gb_per_s"])
    seconds, heavy = load_ext_seconds()
    notes = [
        f"Bandwidth: model.generate reads {direct_rate * per_token / 1e9:.1f} GB/s = {frac:.0%} of {bw['gb_per_s']:.1f} GB/s "
        f"({bw['by']}, {bw['clock']})" + (" — the model fits in the CPU's cache: not memory-bound" if per_token < 32e6 else "") + ".",
        "Targets: decode ratio ≥ 0.99 on the smallest model (≥ 0.97 elsewhere), TTFT overhead ≤ 30 ms.",
        f"%load_ext nbllm: {seconds * 1000:.0f} ms (target ≤ 100 ms: benchmarks/bench_load_ext.py); heavy modules imported: {', '.join(heavy) or 'none'}.",
    ]
    for note in notes:
        print(note)
    machine.save(f"transformers-{label}", info, table, {
        "model_params": count_params(**size), "tokens": n, "rounds": args.rounds, "bytes_per_token": per_token,
        "bandwidth": bw, "medians": med, "runs": {k: [v for v, _ in vs] for k, vs in runs.items()},
        "load_ext_seconds": seconds,
    }, notes)


if __name__ == "__main__":
    main()
