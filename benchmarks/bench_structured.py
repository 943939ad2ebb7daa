"""Decode speed with a constraint (structured output) against the same generation without one.

Run: python benchmarks/bench_structured.py [--params 64e6] [--tokens 64] [--rounds 5] [--threads 1]
     [--loaders transformers,llama.cpp]

One built-in model (random weights, ~64M parameters by default) per loader, loaded once by nbllm. Each
round runs, interleaved (the order rotating), the same prompt through ``nbllm.generate``:

* **free**: greedy, no constraint;
* **json**: greedy, held to a JSON schema whose one string field must be at least 2000 characters long
  (so the random model cannot end early: every run decodes ``--tokens`` tokens, all through the
  llguidance mask);
* **regex**: greedy, held to ``[a-z ]{2000,}``.

Then, alone, the JSON mask's own CPU time per token (thread CPU time, which other processes on a
shared machine do not move): the matcher's allowed set as the boolean mask the loaders apply, and
consuming a token.

Two rates per run: decode tokens/s, the engine's own (``r.timings.decode_tokens_per_second``: tokens
after the first over the wall-clock time between the first and the last), and tokens per second of
process CPU time over the whole call (all threads' work; on a machine shared with other work, the
clock those do not move). With ``--threads 1`` (the default) the model computes in one thread, so the
ratios are the constraint's cost per token against one token's compute. The constraint is compiled once before the rounds (its compile time is printed; it is cached
per constraint and tokenizer afterwards, ``r.timings.grammar_seconds`` 0). Prints medians and the
ratios constrained/free (target: at least 0.9); saves results/structured-<size>.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from typing import Any

import machine

SCHEMA = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 2000}}, "required": ["notes"],
          "additionalProperties": False}
REGEX = "[a-z ]{2000,}"


def once(engine: Any, options: dict[str, Any]) -> tuple[float, float]:
    """One generation: its decode tokens/s (wall clock, the engine's own) and its tokens per second of
    process CPU time (the whole call, prompt included: all threads' work, which other processes on a
    shared machine do not move). Every run must decode all it was asked."""
    import time

    cpu = time.process_time()
    r = engine.generate(machine.PROMPT, **options)
    cpu = time.process_time() - cpu
    assert r.completion_tokens == options["max_new_tokens"], (r.completion_tokens, r.finish_reason)
    assert r.timings.decode_tokens_per_second is not None
    return r.timings.decode_tokens_per_second, r.completion_tokens / cpu


MASK_STEPS = 200


def mask_cost(engine: Any, schema: dict[str, Any]) -> float:
    """CPU seconds (this thread) per token of the constraint's own work: one matcher computing the next
    token's allowed set, turned into the boolean mask the loaders apply, then consuming an allowed
    token, over ``MASK_STEPS`` steps (a clock that other processes on the machine do not move)."""
    import time

    from nbllm.constraints import Constraint

    compiled = engine.loader.constraints.compile(Constraint("json_schema", json.dumps(schema)))
    matcher = compiled.matcher()
    start = time.thread_time()
    for _ in range(MASK_STEPS):
        allowed = matcher.allowed()
        matcher.consume(int(allowed.nonzero()[0][-1]))
    return (time.thread_time() - start) / MASK_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=64e6, help="model size in parameters (0: the smallest built-in)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="compute threads (0: the library's default)")
    parser.add_argument("--loaders", default="transformers,llama.cpp")
    args = parser.parse_args()
    machine.set_threads(args.threads)

    import nbllm
    from nbllm.testing import count_params, tiny_gguf_model, tiny_transformers_model

    size = machine.model_size(args.params)
    table = ["| loader | run | decode tok/s, wall (median) | vs free | tok per CPU second (median) | vs free | tokens |",
             "|---|---|---|---|---|---|---|"]
    data: dict[str, dict[str, object]] = {}
    for loader in args.loaders.split(","):
        if loader == "transformers":
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            nbllm.load(tiny_transformers_model(**size), dtype="float32")
        else:
            nbllm.load(tiny_gguf_model(**size), threads=args.threads, threads_batch=args.threads)
        engine = nbllm.get_engine()
        n = args.tokens
        common = {"temperature": 0, "max_new_tokens": n}
        warm = {"json": engine.generate(machine.PROMPT, json_schema=SCHEMA, **common),
                "regex": engine.generate(machine.PROMPT, regex=REGEX, **common)}
        engine.generate(machine.PROMPT, **common)
        compile_seconds = {k: r.timings.grammar_seconds for k, r in warm.items()}
        print(f"{loader}: constraint compile seconds (first request) {compile_seconds}", file=sys.stderr)

        runs = {"free": {}, "json": {"json_schema": SCHEMA}, "regex": {"regex": REGEX}}
        results = machine.interleaved({name: functools.partial(once, engine, {**common, **extra})
                                       for name, extra in runs.items()}, args.rounds)
        mask = mask_cost(engine, SCHEMA)
        print(f"{loader}: the JSON mask costs {mask * 1e6:.0f} us of CPU time per token", file=sys.stderr)
        rates = {name: statistics.median(rate for rate, _ in runs) for name, runs in results.items()}
        cpu_rates = {name: statistics.median(rate for _, rate in runs) for name, runs in results.items()}
        for name, rate in rates.items():
            table.append(f"| {loader} | {name} | {rate:.1f} | {rate / rates['free']:.3f} | {cpu_rates[name]:.1f} | "
                         f"{cpu_rates[name] / cpu_rates['free']:.3f} | {n} |")
        table.append(f"| {loader} | JSON mask alone | | | {mask * 1e6:.0f} us CPU per token | | {MASK_STEPS} |")
        data[loader] = {"rates": rates, "cpu_rates": cpu_rates, "all": results,
                        "compile_seconds": compile_seconds, "mask_cpu_seconds_per_token": mask}
        nbllm.unload()
    params = count_params(**size)
    print("\n".join(table))
    label = f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e6:.2f}M"
    machine.save(f"structured-{label}", machine.describe(args.threads), table, data,
                 notes=[f"greedy, {args.tokens} new tokens, {args.rounds} interleaved rounds, prompt {machine.PROMPT!r}"])


if __name__ == "__main__":
    main()
