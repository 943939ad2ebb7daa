"""Decode speed and time to first token of %%llm and nbllm.generate against Llama.create_completion.

Run: python benchmarks/bench_llamacpp.py [--params 100e6] [--tokens 64] [--rounds 5] [--file-type f32]
     [--threads N] [--threads-batch N]

One built-in GGUF model (random weights, ~100M parameters by default) is loaded once by nbllm's
llama.cpp loader; the direct calls use the very same ``llama_cpp.Llama`` instance the loader holds, so
all three share weights, threads and options. They run interleaved, round by round, greedy, and every
run processes the whole prompt: nbllm's prefix reuse is switched off and the direct call's cache is
reset before it.

How the times are taken, the same way for all three:

* token arrival: nbllm's engine stamps each token as the loader yields it; the direct call stamps it in
  a ``stopping_criteria`` callback, which llama-cpp-python calls right after sampling each token;
* time to first token is counted from the call itself. For nbllm that is the engine's own first-token
  time plus everything the call does outside its generation loop (argument parsing, tokenizing, the
  record, displaying), measured as wall time minus the loop's time — so it is a slight over-estimate;
* decode tokens/s = (tokens - 1) / (last token's time - first token's time).

Prints medians and the ratios against the direct call, with the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="model size in parameters")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--file-type", choices=("f32", "f16"), default="f32", help="GGUF weights type")
    parser.add_argument("--threads", type=int, default=0, help="--threads of the load (0: llama.cpp's default)")
    parser.add_argument("--threads-batch", type=int, default=0, help="--threads-batch of the load")
    args = parser.parse_args()

    import llama_cpp
    from IPython.core.interactiveshell import InteractiveShell

    import nbllm
    from nbllm.testing import count_params, model_for_params, tiny_gguf_model

    size = model_for_params(int(args.params))
    built = time.perf_counter()
    path = tiny_gguf_model(**size, file_type=args.file_type)
    built = time.perf_counter() - built
    nbllm.load(path, threads=args.threads, threads_batch=args.threads_batch)
    engine = nbllm.get_engine()
    engine.loader.reuse_prefix = False  # every nbllm run evaluates the whole prompt
    llm = engine.loader.llm
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")
    n = args.tokens

    def direct() -> tuple[float, float, str]:
        stamps: list[float] = []

        def clock(input_ids: object, logits: object) -> bool:
            stamps.append(time.perf_counter())
            return False

        llm.reset()  # no cached prefix: the whole prompt is evaluated, as for nbllm
        start = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=n, temperature=0,
                                    stopping_criteria=llama_cpp.StoppingCriteriaList([clock]))
        text = out["choices"][0]["text"]  # type: ignore[index]
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), text

    def timed(run: Callable[[], nbllm.Result]) -> tuple[float, float, str]:
        start = time.perf_counter()
        r = run()
        wall = time.perf_counter() - start
        assert r.completion_tokens == n and r.timings.time_to_first_token is not None
        outside_loop = wall - r.timings.total_seconds
        rate = r.timings.decode_tokens_per_second or 0.0
        # llama-cpp-python drops bytes that are not UTF-8; nbllm shows them as U+FFFD
        return r.timings.time_to_first_token + outside_loop, rate, r.text.replace("\ufffd", "")

    def api() -> tuple[float, float, str]:
        return timed(lambda: nbllm.generate(PROMPT, temperature=0, max_new_tokens=n))

    def magic() -> tuple[float, float, str]:
        def run() -> nbllm.Result:
            with contextlib.redirect_stdout(io.StringIO()):  # the streamed text, written chunk by chunk
                shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens {n} -o _bench", PROMPT)
            return shell.user_ns["_bench"]  # type: ignore[no-any-return]

        return timed(run)

    methods = {"create_completion": direct, "nbllm.generate": api, "%%llm": magic}
    for fn in methods.values():  # warm up (and wait for the file's sha256, hashed once for records)
        fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    reference = None
    for i in range(args.rounds):
        order = list(methods.items())
        order = order[i % 3:] + order[: i % 3]  # rotate who goes first
        for name, fn in order:
            ttft, rate, text = fn()
            reference = reference if reference is not None else text
            assert text == reference, f"{name} produced other text"
            runs[name].append((ttft, rate))

    print(f"model: {count_params(**size) / 1e6:.1f}M parameters ({size['num_layers']} layers, hidden "
          f"{size['hidden_size']}), GGUF {args.file_type}, {path.stat().st_size / 1e6:.0f} MB"
          f"{f', built in {built:.0f} s' if built > 1 else ''}")
    print(f"llama-cpp-python {llama_cpp.__version__}, CPU ({os.cpu_count()} logical CPUs; threads "
          f"{llm.n_threads} decode / {llm.n_threads_batch} prompt), prompt {len(engine.loader.tokenize(PROMPT, add_special=True))} "
          f"tokens, {n} new tokens, greedy, {args.rounds} interleaved rounds, medians")
    base_ttft = statistics.median(t for t, _ in runs["create_completion"])
    base_rate = statistics.median(r for _, r in runs["create_completion"])
    print(f"{'':18} {'decode tok/s':>12} {'ratio':>6} {'TTFT ms':>8} {'overhead ms':>11}")
    for name, values in runs.items():
        ttft = statistics.median(t for t, _ in values)
        rate = statistics.median(r for _, r in values)
        print(f"{name:18} {rate:12.1f} {rate / base_rate:6.3f} {ttft * 1000:8.1f} {(ttft - base_ttft) * 1000:11.1f}")
    print("targets: decode ratio >= 0.97, TTFT overhead <= 30 ms")


if __name__ == "__main__":
    main()
