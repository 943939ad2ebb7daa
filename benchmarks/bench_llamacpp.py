"""Decode speed and time to first token of %%llm and nbllm.generate against Llama.create_completion.

Run: python benchmarks/bench_llamacpp.py [--params 0] [--tokens 64] [--rounds 15] [--file-type f32]
     [--threads 1] [--threads-batch 1]

One built-in GGUF model (random weights; ``--params 0``, the default, is the smallest, where nbllm's own
per-token work shows most; e.g. ``--params 100e6`` for a bigger one) is loaded once by nbllm's
llama.cpp loader; the direct calls use the very same ``llama_cpp.Llama`` instance the loader holds, so
all three share weights, threads and options. They run interleaved, round by round, greedy, and every
run processes the whole prompt: nbllm's raw prompts never reuse a kept prefix, and the direct call's
cache is reset before it.

How the times are taken, the same way for all three:

* each token is stamped when it arrives: for nbllm as the engine receives it from the loader (a thin
  wrapper around the loader's ``generate_tokens``), for the direct call in a ``stopping_criteria``
  callback, which llama-cpp-python calls right after sampling each token;
* time to first token is counted from the call itself (argument parsing, tokenizing, the record and
  the display are inside it for nbllm);
* decode tokens/s = (tokens - 1) / (last token's stamp - first token's stamp);
* every stamp is taken twice: wall-clock time, and the CPU time of the calling thread. With
  ``--threads 1 --threads-batch 1`` (the default here) llama.cpp computes in that thread, so CPU time
  counts exactly the work done and is not disturbed by other processes on a shared machine; wall-clock
  time is what a user waits on an idle one.

Prints medians and the ratios against the direct call, with the targets, and the fraction of the
memory-bandwidth limit the direct call reaches (llama.cpp's own decode counts as a lower bound of the
machine's bandwidth); saves results/llamacpp-<size>.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable, Iterator

import machine

PROMPT = machine.PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=0, help="model size in parameters (0: the smallest built-in)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--file-type", choices=("f32", "f16"), default="f32", help="GGUF weights type")
    parser.add_argument("--threads", type=int, default=1, help="--threads of the load (0: llama.cpp's default)")
    parser.add_argument("--threads-batch", type=int, default=1, help="--threads-batch of the load")
    args = parser.parse_args()
    machine.set_threads(args.threads)

    import llama_cpp
    from IPython.core.interactiveshell import InteractiveShell

    import nbllm
    from nbllm.loaders.llamacpp import LlamaCppLoader
    from nbllm.testing import count_params, tiny_gguf_model

    size = machine.model_size(args.params)
    built = time.perf_counter()
    path = tiny_gguf_model(**size, file_type=args.file_type)
    built = time.perf_counter() - built
    nbllm.load(path, threads=args.threads, threads_batch=args.threads_batch)
    engine = nbllm.get_engine()
    loader = engine.loader
    assert isinstance(loader, LlamaCppLoader)
    llm = loader.llm
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")
    n = args.tokens

    Stamp = tuple[float, float]

    def now() -> Stamp:
        return time.perf_counter(), time.thread_time()

    def measures(start: Stamp, stamps: list[Stamp]) -> list[float]:
        """[TTFT wall, TTFT cpu, decode tok/s wall, decode tok/s cpu]."""
        first, last = stamps[0], stamps[-1]
        return [first[0] - start[0], first[1] - start[1],
                (len(stamps) - 1) / (last[0] - first[0]), (len(stamps) - 1) / max(last[1] - first[1], 1e-9)]

    def direct() -> tuple[list[float], str]:
        stamps: list[Stamp] = []

        def clock(input_ids: object, logits: object) -> bool:
            stamps.append(now())
            return False

        llm.reset()  # no cached prefix: the whole prompt is evaluated, as for nbllm
        start = now()
        out = llm.create_completion(PROMPT, max_tokens=n, temperature=0,
                                    stopping_criteria=llama_cpp.StoppingCriteriaList([clock]))
        # create_completion calls stopping_criteria once more after its loop, and goes past max_tokens
        # to finish a UTF-8 character cut by the last token: only the first n tokens are timed
        assert len(stamps) > n, (len(stamps), n)
        return measures(start, stamps[:n]), out["choices"][0]["text"]

    def low_level() -> tuple[list[float], str]:
        """Llama.generate, the token generator nbllm's loader drives (create_completion adds its own
        per-token work on top: detokenizing, stop checks, the response)."""
        stamps: list[Stamp] = []
        ids: list[int] = []
        llm.reset()
        start = now()
        for token in llm.generate(llm.tokenize(PROMPT.encode()), temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                                  repeat_penalty=1.0, reset=True):
            stamps.append(now())
            ids.append(token)
            if len(ids) == n:
                break
        return measures(start, stamps), llm.detokenize(ids).decode("utf-8", errors="ignore")

    arrivals: list[Stamp] = []
    generate_tokens = loader.generate_tokens

    def stamped(*args: object, **kwargs: object) -> Iterator[int]:
        for token in generate_tokens(*args, **kwargs):  # type: ignore[arg-type]
            arrivals.append(now())
            yield token

    loader.generate_tokens = stamped  # type: ignore[method-assign]

    def timed(run: Callable[[], nbllm.Result]) -> tuple[list[float], str]:
        arrivals.clear()
        start = now()
        r = run()
        assert r.completion_tokens == n == len(arrivals)
        # llama-cpp-python drops bytes that are not UTF-8; nbllm shows them as U+FFFD
        return measures(start, arrivals), r.text.replace("\ufffd", "")

    def api() -> tuple[list[float], str]:
        return timed(lambda: nbllm.generate(PROMPT, temperature=0, max_new_tokens=n))

    def magic() -> tuple[list[float], str]:
        def run() -> nbllm.Result:
            with contextlib.redirect_stdout(io.StringIO()):  # the streamed text, written chunk by chunk
                shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens {n} -o _bench", PROMPT)
            result: nbllm.Result = shell.user_ns["_bench"]
            return result

        return timed(run)

    methods = {"create_completion": direct, "Llama.generate": low_level, "nbllm.generate": api, "%%llm": magic}
    for fn in methods.values():  # warm up (and wait for the file's sha256, hashed once for records)
        fn()
    runs: dict[str, list[list[float]]] = {name: [] for name in methods}
    texts: dict[str, set[str]] = {name: set() for name in methods}
    for i in range(args.rounds):
        order = list(methods.items())
        order = order[i % len(order):] + order[: i % len(order)]  # rotate who goes first
        for name, fn in order:
            values, text = fn()
            texts[name].add(text)
            runs[name].append(values)
    # the same greedy tokens everywhere (create_completion may add a token that completes a character)
    (ours,) = texts["nbllm.generate"] | texts["%%llm"] | texts["Llama.generate"]
    (theirs,) = texts["create_completion"]
    assert theirs.startswith(ours) and len(theirs) - len(ours) <= 1, (ours, theirs)

    params = count_params(**size)
    label = f"{params / 1e6:.2f}M" if params < 1e6 else f"{params / 1e6:.0f}M"
    print(f"model: {label} parameters ({size.get('num_layers', 2)} layers, hidden "
          f"{size.get('hidden_size', 64)}), GGUF {args.file_type}, {path.stat().st_size / 1e6:.1f} MB"
          f"{f', built in {built:.0f} s' if built > 1 else ''}")
    print(f"llama-cpp-python {llama_cpp.__version__}, CPU ({os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; threads {llm.n_threads} decode / {llm.n_threads_batch} prompt), prompt "
          f"{len(loader.tokenize(PROMPT, add_special=True))} tokens, {n} new tokens, greedy, the same text from "
          f"all three, {args.rounds} interleaved rounds, medians")
    med = {name: [statistics.median(v[k] for v in values) for k in range(4)] for name, values in runs.items()}
    base = med["create_completion"]
    table: list[str] = []
    for label_clock, ttft_k, rate_k in (("thread CPU time", 1, 3), ("wall clock", 0, 2)):
        table += [f"| {label} llama.cpp, {label_clock} | decode tok/s | ratio | TTFT ms | overhead ms |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in med.items():
            table.append(f"| {name} | {m[rate_k]:.1f} | {m[rate_k] / base[rate_k]:.3f} | {m[ttft_k] * 1000:.1f} | "
                         f"{(m[ttft_k] - base[ttft_k]) * 1000:+.1f} |")
    for row in table:
        print(row)
    context = len(loader.tokenize(PROMPT, add_special=True)) + n / 2
    per_token = machine.gguf_bytes_per_token(path, context)["total"]
    info = machine.describe(args.threads)
    bw = machine.bandwidth(args.threads)
    own = max(med["create_completion"][3], med["Llama.generate"][3])  # llama.cpp's own decode, thread CPU time
    achieved = own * per_token / 1e9
    limit = max(bw["gb_per_s"], achieved)
    notes = [
        f"Bandwidth: llama.cpp reads {per_token / 1e6:.1f} MB per token, {achieved:.1f} GB/s = "
        f"{achieved / limit:.0%} of {limit:.1f} GB/s (the best of {bw['gb_per_s']:.1f} GB/s measured by {bw['by']}, "
        f"{bw['clock']}, and llama.cpp's own {achieved:.1f} GB/s)"
        + (" — the model fits in the CPU's cache: not memory-bound" if per_token < 32e6 else "") + ".",
        "Targets: decode ratio ≥ 0.99 on the smallest model (≥ 0.97 elsewhere), TTFT overhead ≤ 30 ms.",
    ]
    for note in notes:
        print(note)
    machine.save(f"llamacpp-{label}", info, table, {
        "model_params": params, "file_type": args.file_type, "tokens": n, "rounds": args.rounds,
        "bytes_per_token": per_token, "bandwidth": bw, "limit_gb_per_s": limit,
        "medians": {k: dict(zip(("ttft_wall", "ttft_cpu", "rate_wall", "rate_cpu"), v)) for k, v in med.items()},
    }, notes)


if __name__ == "__main__":
    main()
