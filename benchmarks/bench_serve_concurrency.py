"""``%llm_serve`` throughput: 8 concurrent ``openai`` clients against one client at a time.

Run: python benchmarks/bench_serve_concurrency.py [--params 16e6] [--clients 8] [--requests 16] [--tokens 32]
                                                  [--rounds 2] [--threads 1]

One built-in Transformers model (random weights, float32, CPU) is loaded once and served by
``nbllm.serve`` on 127.0.0.1 (the server ``%llm_serve`` starts). Each round sends the same ``--requests``
greedy completions (different prompts) with the official ``openai`` client both ways, interleaved (the
order alternates between rounds): one request after another from one client, and spread over
``--clients`` clients on their own threads, all at once. Every reply must equal its one-at-a-time text.
Prints completion tokens/s of each way (tokens the server counted / wall time), the batch sizes the
model's scheduler ran, and the ratio per round, then the median ratio against the target (>= 3x).

The clients run in a second process (a server's clients are other programs): in the server's process their
threads would compete with the model's for the interpreter, and spread the arrivals of requests sent at once
over more than a batch's gathering time. One compute thread by default, as the other benchmarks: torch's
two OpenMP threads on this 2-core machine wait for each other at every small operation, and any other
process on the machine (even at nice 19) makes those waits long, which drowned the batching's gain in
noise (ratios 0.66-2.5x at the same settings).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUBJECTS = ["rivers", "bread", "prime numbers", "the sky", "notebooks", "trains", "music", "chess",
            "volcanoes", "the moon", "coffee", "bicycles", "languages", "forests", "bridges", "clocks"]


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about {SUBJECTS[i % len(SUBJECTS)]}." + " again" * (i // len(SUBJECTS)) for i in range(n)]


def clients(url: str, name: str, texts: list[str], n: int, tokens: int) -> tuple[list[str], int, float]:
    """In the clients' process: ``texts`` sent by ``n`` ``openai`` clients on their own threads, each
    taking every n-th prompt in turn; the replies, the tokens the server counted and the wall time."""
    import openai

    out: list[tuple[str, int]] = [("", 0)] * len(texts)
    # made before the clock starts: each builds an HTTP client and its TLS context (tens of ms of CPU)
    made = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) for _ in range(n)]

    def client_loop(k: int) -> None:
        client = made[k]
        for i in range(k, len(texts), n):
            answer = client.completions.create(model=name, prompt=texts[i], temperature=0, max_tokens=tokens)
            out[i] = answer.choices[0].text, answer.usage.completion_tokens if answer.usage else 0

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [t for t, _ in out], sum(c for _, c in out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=16e6)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    args = parser.parse_args()
    import machine

    machine.set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NBLLM_RUN_LOG", "off")

    import torch

    import nbllm
    from nbllm.testing import model_for_params, tiny_transformers_model

    sizes = model_for_params(int(args.params))
    status = nbllm.load(tiny_transformers_model(**sizes), dtype="float32", device="cpu")
    engine = nbllm.get_engine()
    n_params = sum(p.numel() for p in engine.loader.model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters ({sizes}), float32 on CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; loaded in {status.load_seconds:.1f} s; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    server = nbllm.serve(port=0)
    name = nbllm.status().model
    texts = prompts(args.requests)

    pool = multiprocessing.get_context("spawn").Pool(1)  # the clients: another process, as a server's are

    def one_at_a_time() -> tuple[list[str], int, float]:
        return pool.apply(clients, (server.url, name, texts, 1, args.tokens))

    def concurrent() -> tuple[list[str], int, float]:
        return pool.apply(clients, (server.url, name, texts, args.clients, args.tokens))

    try:
        expected, _, _ = one_at_a_time()  # warm-up; the reference texts
        ratios = []
        for r in range(args.rounds):
            ways = [("one at a time", one_at_a_time), (f"{args.clients} clients", concurrent)]
            if r % 2:
                ways.reverse()
            rates: dict[str, float] = {}
            for label, way in ways:
                before = len(engine.scheduler.batch_sizes)
                got, tokens, seconds = way()
                assert got == expected, f"{label}: a reply differs from its one-at-a-time text"
                rates[label] = tokens / seconds
                print(f"round {r + 1}: {label:>14}: {tokens} tokens in {seconds:.2f} s = {rates[label]:.1f} tok/s; "
                      f"batches {engine.scheduler.batch_sizes[before:] or 'none (each request alone)'}")
            ratio = rates[f"{args.clients} clients"] / rates["one at a time"]
            ratios.append(ratio)
            print(f"round {r + 1}: ratio {ratio:.2f}x (load average {os.getloadavg()[0]:.2f})")
        print(f"median ratio over {args.rounds} rounds: {statistics.median(ratios):.2f}x (target >= 3x); "
              f"every reply equal to its one-at-a-time text")
    finally:
        pool.terminate()
        server.stop()


if __name__ == "__main__":
    main()
