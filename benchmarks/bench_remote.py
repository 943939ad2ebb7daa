"""The HTTP path's cost: nbllm's remote loader through %llm_serve against the local engine, same model;
and 8 concurrent clients against one.

Run: python benchmarks/bench_remote.py [--params 100e6] [--tokens 64] [--rounds 5] [--threads 1]

A second process loads a built-in GGUF (random weights, ~100M parameters by default) with the llama.cpp
loader and serves it with ``nbllm.serve`` (what ``%llm_serve`` runs). This process loads the same file
into a local engine, and the server's URL into a remote engine (the OpenAI-compatible loader). They run
interleaved, round by round, greedy, the same prompt; the texts must be equal.

* local: ``Engine.generate`` on the file; remote: ``Engine.generate`` on the URL (SSE stream, JSON
  pieces, the server's engine, its worker thread and event loop, loopback TCP);
* decode tokens/s = (tokens - 1) / (last piece's arrival - first piece's arrival); end to end =
  tokens / the whole call; time to first token from the call;
* concurrency: ``generate_many`` of 8 prompts with ``--max-concurrency 8`` against ``--max-concurrency 1``
  (nbllm's server runs one generation at a time, so this measures how well the HTTP work of the waiting
  requests overlaps with the running one, not batching: servers that batch, such as vLLM, gain more).

Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"
SERVE = """
import sys, nbllm
nbllm.load(sys.argv[1], threads=int(sys.argv[2]), threads_batch=int(sys.argv[2]))
server = nbllm.serve(port=0)
print(server.url, flush=True)
sys.stdin.read()  # serve until the benchmark closes our stdin
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="model size in parameters")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads, both processes (0: its default)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests in the concurrency part")
    args = parser.parse_args()

    import llama_cpp

    from nbllm import generate_many
    from nbllm.engine import Engine
    from nbllm.testing import count_params, model_for_params, tiny_gguf_model

    size = model_for_params(int(args.params))
    path = tiny_gguf_model(**size)
    n = args.tokens
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(path), str(args.threads)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url:
            raise SystemExit("the serving process did not start")
        local, remote = Engine(), Engine()
        local.load(path, threads=args.threads, threads_batch=args.threads)
        remote.load(url, max_concurrency=args.clients)

        def run(engine: Engine) -> tuple[list[float], str]:
            start = time.perf_counter()
            r = engine.generate(PROMPT, temperature=0, max_new_tokens=n)
            total = time.perf_counter() - start
            assert r.completion_tokens == n and r.timings.decode_tokens_per_second and r.timings.time_to_first_token
            return [r.timings.decode_tokens_per_second, n / total, r.timings.time_to_first_token], r.text

        engines = {"local engine": local, "%llm_serve + remote": remote}
        for engine in engines.values():
            run(engine)  # warm up
        results: dict[str, list[list[float]]] = {name: [] for name in engines}
        texts: dict[str, set[str]] = {name: set() for name in engines}
        for i in range(args.rounds):
            order = list(engines.items())[::-1] if i % 2 else list(engines.items())
            for name, engine in order:
                values, text = run(engine)
                results[name].append(values)
                texts[name].add(text)
        assert texts["local engine"] == texts["%llm_serve + remote"] and len(texts["local engine"]) == 1

        prompts = [f"{PROMPT} topic {i}" for i in range(args.clients)]
        batches: dict[int, list[float]] = {args.clients: [], 1: []}
        outputs: dict[int, list[str]] = {}
        for i in range(args.rounds):
            for width in (sorted(batches) if i % 2 else sorted(batches, reverse=True)):
                remote.load(url, max_concurrency=width)
                start = time.perf_counter()
                many = generate_many(prompts, temperature=0, max_new_tokens=n, engine=remote)
                batches[width].append(sum(r.completion_tokens for r in many) / (time.perf_counter() - start))
                outputs[width] = [r.text for r in many]
        assert outputs[1] == outputs[args.clients]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)

    print(f"model: {count_params(**size) / 1e6:.1f}M parameters ({size['num_layers']} layers, hidden "
          f"{size['hidden_size']}), GGUF f32, llama-cpp-python {llama_cpp.__version__}, {args.threads} thread(s) "
          f"per process; {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"greedy, {n} new tokens, the same text both ways, {args.rounds} interleaved rounds, medians\n")
    med = {name: [statistics.median(v[k] for v in values) for k in range(3)] for name, values in results.items()}
    base = med["local engine"]
    print(f"{'':22} {'decode tok/s':>12} {'ratio':>6} {'end-to-end tok/s':>16} {'ratio':>6} {'TTFT ms':>8} "
          f"{'overhead ms':>11}")
    for name, m in med.items():
        print(f"{name:22} {m[0]:12.1f} {m[0] / base[0]:6.3f} {m[1]:16.1f} {m[1] / base[1]:6.3f} {m[2] * 1000:8.1f} "
              f"{(m[2] - base[2]) * 1000:11.1f}")
    one, many_rate = statistics.median(batches[1]), statistics.median(batches[args.clients])
    print(f"\n{args.clients} prompts through generate_many: --max-concurrency 1 {one:.1f} tok/s, "
          f"--max-concurrency {args.clients} {many_rate:.1f} tok/s, ratio {many_rate / one:.3f}")


if __name__ == "__main__":
    main()
