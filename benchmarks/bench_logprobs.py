"""What ``--logprobs 5`` costs in decode speed, in both loaders, against the same generation without it.

Run: python benchmarks/bench_logprobs.py [--tokens 64] [--rounds 7] [--threads 1]

Models with a real vocabulary (49152 tokens: the per-token cost is a log-softmax and a top-k over it):
llama.cpp runs SmolLM2-135M-Instruct (``nbllm.testing.real_model_gguf()``, Q4_1); Transformers a random
model of SmolLM2-135M's shape (576 wide, 30 layers, vocabulary 49152, float32). Each round generates greedy
``--tokens`` tokens with and without ``logprobs=5`` (interleaved, the order rotating); decode tokens/s is
the engine's own (tokens after the first over the time after the first). Prints the medians and the ratio
(target: at least 0.90) and saves results/logprobs.
"""

from __future__ import annotations

import argparse
import statistics

import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    machine.set_threads(args.threads)

    import nbllm
    from nbllm.testing import real_model_gguf, tiny_transformers_model

    models = {
        "llama.cpp (SmolLM2-135M Q4_1)": (real_model_gguf(), {"threads": args.threads, "threads_batch": args.threads}),
        "transformers (SmolLM2-135M shape, f32)": (tiny_transformers_model(
            hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152), {}),
    }
    table = ["| loader | plain decode tok/s | --logprobs 5 tok/s | ratio |", "|---|---:|---:|---:|"]
    data = {}
    for name, (path, load) in models.items():
        nbllm.load(path, **load)

        def run(k: int | None) -> float:
            r = nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=args.tokens, logprobs=k)
            assert r.completion_tokens == args.tokens, r.finish_reason
            return r.timings.decode_tokens_per_second or 0.0

        run(None)
        run(5)  # warm both paths
        rates = machine.interleaved({"plain": lambda: run(None), "logprobs": lambda: run(5)}, args.rounds)
        plain, kept = statistics.median(rates["plain"]), statistics.median(rates["logprobs"])
        ratios = [b / a for a, b in zip(rates["plain"], rates["logprobs"], strict=True)]
        table.append(f"| {name} | {plain:.1f} | {kept:.1f} | {statistics.median(ratios):.3f} |")
        data[name] = {"plain": rates["plain"], "logprobs": rates["logprobs"], "ratio_per_round": ratios}
        print(table[-1], flush=True)
        nbllm.unload()
    notes = ["ratio: the median of each round's (--logprobs 5 tok/s) / (plain tok/s), the two run back to back. "
             "Target: at least 0.90 (--logprobs 5 costs at most 10% of decode speed)."]
    print("\n".join(table + notes))
    machine.save("logprobs", machine.describe(args.threads), table, data, notes)


if __name__ == "__main__":
    main()
