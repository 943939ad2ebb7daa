"""--compile against eager decoding, side by side in one process: same model, same text, interleaved.

Run: python benchmarks/bench_compile.py [--params 64e6] [--tokens 64] [--rounds 5] [--threads 1]
     [--device cpu|cuda] [--dtype float32]

One built-in Transformers model is loaded once by nbllm (eager). A compiled decoder is built on that
very model object and swapped in and out of the loader between calls, so both paths run the same
weights through the same engine (``nbllm.generate``), greedy, every call computing the whole prompt.
Inductor's cache starts empty (a temporary folder): the first compile is cold; a second decoder on
the same model then measures what a reload of the same model and options costs (inductor's cache).

Each token is stamped as the engine receives it. Decode tokens/s = (tokens - 1) / (last - first), by
process CPU time (with ``--threads 1`` it counts the work done, undisturbed by other processes on a
shared machine) and by wall-clock time; medians over the rounds. Prints the ratio, the fraction of
the memory-bandwidth limit each reaches, compile times and memory; saves results/compile-<device>.
"""

from __future__ import annotations

import argparse
import tempfile

import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=64e6, help="model size (0: the smallest built-in)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="compute threads (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 on a CPU, float16 on CUDA by default")
    args = parser.parse_args()
    machine.cuda_or_exit(args.device)
    machine.set_threads(args.threads)
    cache = tempfile.TemporaryDirectory(prefix="nbllm-bench-inductor-")
    machine.os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name

    import torch

    import nbllm
    from nbllm.loaders._compiled import CompiledDecoder
    from nbllm.testing import count_params, tiny_transformers_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    size = machine.model_size(args.params)
    path = tiny_transformers_model(**size, dtype="float32" if dtype == "float32" else "float16")
    nbllm.load(path, dtype=dtype, device=args.device)
    engine = nbllm.get_engine()
    loader = engine.loader
    model = loader.model
    n, on_cpu = args.tokens, args.device == "cpu"
    rss = machine.rss()

    arrivals = machine.stamp_arrivals(loader)

    def run(decoder: CompiledDecoder | None) -> tuple[dict[str, float], list[int], float | None]:
        loader._compiled = decoder
        arrivals.clear()
        start = machine.now()
        r = nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n)
        assert r.completion_tokens == n == len(arrivals), (r.completion_tokens, len(arrivals))
        return machine.measures(start, arrivals), r.token_ids, r.timings.compile_seconds

    _, reference, _ = run(None)
    _ = engine.last_result.record  # waits for the weights' hash (a background thread), once
    context = len(loader.tokenize(machine.PROMPT, add_special=True)) + n / 2
    decoders = {"compiled": CompiledDecoder(model, loader.context_length)}
    _, ids, cold = run(decoders["compiled"])
    assert ids == reference, "compiled greedy text differs from eager"
    rss_compiled = machine.rss()
    again = CompiledDecoder(model, loader.context_length)  # what a reload of the same model compiles
    _, ids, warm = run(again)
    assert ids == reference and cold is not None and warm is not None
    again.release()

    def eager() -> dict[str, float]:
        values, ids, _ = run(None)
        assert ids == reference
        return values

    def compiled() -> dict[str, float]:
        values, ids, seconds = run(decoders["compiled"])
        assert ids == reference and seconds is None  # compiled once, reused
        return values

    runs = machine.interleaved({"eager": eager, "--compile": compiled}, args.rounds)
    med = {name: machine.medians(values) for name, values in runs.items()}
    loader._compiled = None
    decoders.pop("compiled").release()
    rss_released = machine.rss()

    info = machine.describe(args.threads, args.device)
    bw = machine.bandwidth(args.threads, args.device)
    per_token = machine.transformers_bytes_per_token(model, context)["total"]
    clocks = [("process CPU time", "cpu"), ("wall clock", "wall")] if on_cpu and args.threads == 1 else [("wall clock", "wall")]
    title = (f"{count_params(**size) / 1e6:.1f}M-parameter built-in model ({dtype}, {per_token / 1e6:.0f} MB read per "
             f"token), {n} new tokens, greedy, same text, {args.rounds} interleaved rounds, medians")
    print(title)
    print(f"bandwidth limit: {bw['gb_per_s']:.1f} GB/s ({bw['by']}, {bw['clock']}; all: {bw['ways']})")
    table = [f"| {count_params(**size) / 1e6:.1f}M-parameter model, {dtype} | clock | decode tok/s | × eager | GB/s | of bandwidth ({bw['gb_per_s']:.1f} GB/s) |",
             "|---|---|---:|---:|---:|---:|"]
    result: dict[str, object] = {}
    for label, key in clocks:
        base = med["eager"][f"rate_{key}"]
        for name, m in med.items():
            rate = m[f"rate_{key}"]
            frac = machine.fraction(rate, per_token, bw["gb_per_s"])
            table.append(f"| {name} | {label} | {rate:.1f} | {rate / base:.2f} | {rate * per_token / 1e9:.1f} | {frac:.0%} |")
            result[f"{name} {key}"] = {"tokens_per_s": rate, "ratio": rate / base, "fraction": frac}
    for row in table:
        print(row)
    notes = [
        f"Compile: {cold:.1f} s the first time (empty inductor cache), {warm:.1f} s for a second compile of the same "
        f"model (what a reload with the same options costs: inductor's cache). Process memory "
        f"{rss / 2**20:.0f} MiB eager, {rss_compiled / 2**20:.0f} MiB with the compiled step "
        f"(packed weights), {rss_released / 2**20:.0f} MiB after dropping it.",
        "Target: --compile ≥ 1.3× eager decode (moonshot ≥ 70% of the bandwidth limit).",
    ]
    for note in notes:
        print(note)
    machine.save(f"compile-{args.device}", info, table, {
        "model_params": count_params(**size), "dtype": dtype, "tokens": n, "rounds": args.rounds,
        "bytes_per_token": per_token, "bandwidth": bw, "medians": med, "runs": runs, "results": result,
        "compile_seconds": {"cold": cold, "warm": warm},
        "rss_bytes": {"eager": rss, "compiled": rss_compiled, "released": rss_released},
    }, notes)


if __name__ == "__main__":
    main()
