"""Decode speed of the real model (SmolLM2-135M-Instruct) in both loaders against the direct library calls.

Run: python benchmarks/bench_real_model.py [--tokens 64] [--rounds 7] [--threads 1]

The same weights twice: the Q4_1 GGUF file that ``nbllm[demo]`` installs (llama.cpp) and its float32
dequantization (Transformers, :func:`nbllm.testing.real_model_transformers`). Two engines in one process
hold one each, so four ways of decoding run interleaved, round by round, the order rotating:

* ``create_completion``: llama-cpp-python's own call on the very ``Llama`` the llama.cpp loader holds;
* ``nbllm.generate (llama.cpp)``: the same model through nbllm;
* ``model.generate``: transformers' own call on the very model the Transformers loader holds;
* ``nbllm.generate (transformers)``: the same model through nbllm.

Greedy, the same prompt, every run computes the whole prompt. Each token is stamped as it arrives (for
nbllm as the engine receives it from the loader, for the direct calls in a stopping criterion / a
streamer's ``put``); decode tokens/s = (tokens - 1) / (last stamp - first stamp), by process CPU time
(with ``--threads 1`` the libraries compute in one thread, so CPU time counts the work and not the other
processes of a shared machine) and by wall clock.

Bandwidth: decoding reads every weight once per token, so tokens/s × bytes read per token ≤ the memory
bandwidth. Bytes per token are counted from what each loader holds: the Q4_1 file's tensors as stored
(one row of the embedding) plus llama.cpp's f16 KV cache; the float32 weights plus the float32 KV cache.
The limit is the best of the bandwidth measured here (machine.py) and what llama.cpp's own decode reached.
Saves results/real-model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import machine

PROMPT = machine.PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of both loaders (0: their default)")
    args = parser.parse_args()
    machine.set_threads(args.threads)

    import llama_cpp
    import torch
    import transformers
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    import nbllm
    from nbllm.testing import real_model_gguf, real_model_transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.tokens
    gguf, folder = real_model_gguf(), real_model_transformers()
    lc_engine, hf_engine = nbllm.Engine(), nbllm.Engine()
    threads = {"threads": args.threads, "threads_batch": args.threads} if args.threads else {}
    lc_engine.load(gguf, **threads)
    hf_engine.load(folder, dtype="float32", device="cpu")
    llm = lc_engine.loader.llm
    model, tokenizer = hf_engine.loader.model, hf_engine.loader.tokenizer
    lc_arrivals = machine.stamp_arrivals(lc_engine.loader)
    hf_arrivals = machine.stamp_arrivals(hf_engine.loader)

    def create_completion() -> tuple[dict[str, float], str]:
        stamps: list[machine.Stamp] = []

        def clock(input_ids: object, logits: object) -> bool:
            stamps.append(machine.now())
            return False

        llm.reset()  # no cached prefix: the whole prompt is computed, as for nbllm
        start = machine.now()
        out = llm.create_completion(PROMPT, max_tokens=n, temperature=0,
                                    stopping_criteria=llama_cpp.StoppingCriteriaList([clock]))
        assert len(stamps) >= n, (len(stamps), n)  # it calls the criterion once more after its loop
        return machine.measures(start, stamps[:n]), out["choices"][0]["text"]

    def model_generate() -> tuple[dict[str, float], str]:
        stamps: list[machine.Stamp] = []

        class Stamps(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if self.prompt_seen:
                    stamps.append(machine.now())
                self.prompt_seen = True

            def end(self) -> None:
                pass

        class Never(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **_: Any) -> Any:
                return torch.zeros((ids.shape[0],), dtype=torch.bool)

        start = machine.now()
        ids = tokenizer(PROMPT, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Stamps(),
                                 stopping_criteria=StoppingCriteriaList([Never()]), pad_token_id=tokenizer.eos_token_id)
        return machine.measures(start, stamps), tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def through(engine: nbllm.Engine, arrivals: list[machine.Stamp]) -> Callable[[], tuple[dict[str, float], str]]:
        def run() -> tuple[dict[str, float], str]:
            arrivals.clear()
            start = machine.now()
            with contextlib.redirect_stdout(io.StringIO()):
                r = engine.generate(PROMPT, temperature=0, max_new_tokens=n)
            assert r.completion_tokens == n == len(arrivals), (r.completion_tokens, len(arrivals), r.finish_reason)
            return machine.measures(start, arrivals), r.text

        return run

    methods = {
        "create_completion": create_completion,
        "nbllm.generate (llama.cpp)": through(lc_engine, lc_arrivals),
        "model.generate": model_generate,
        "nbllm.generate (transformers)": through(hf_engine, hf_arrivals),
    }
    for fn in methods.values():  # warm up (llama.cpp's first decode in a process is slow; the sha256 of the files)
        fn()
    runs = machine.interleaved(methods, args.rounds)
    texts = {name: {text.replace("\ufffd", "") for _, text in values} for name, values in runs.items()}
    for ours, theirs in (("nbllm.generate (llama.cpp)", "create_completion"),
                         ("nbllm.generate (transformers)", "model.generate")):
        (a,), (b,) = texts[ours], texts[theirs]
        assert b.startswith(a) and len(b) - len(a) <= 1, (ours, a, b)
    med = {name: machine.medians([m for m, _ in values]) for name, values in runs.items()}

    context = len(lc_engine.loader.tokenize(PROMPT, add_special=True)) + n / 2
    per_token = {"llama.cpp": machine.gguf_bytes_per_token(gguf, context)["total"],
                 "transformers": machine.transformers_bytes_per_token(model, context)["total"]}
    bw = machine.bandwidth(args.threads)
    key = "rate_cpu" if args.threads == 1 else "rate_wall"
    own = med["create_completion"][key] * per_token["llama.cpp"] / 1e9
    limit = max(bw["gb_per_s"], own)
    info = machine.describe(args.threads)

    print(f"model: SmolLM2-135M-Instruct; {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB) in llama.cpp, its float32 "
          f"dequantization ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) in transformers")
    print(f"llama-cpp-python {llama_cpp.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"CPU ({os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads or 'default'} "
          f"thread(s)), prompt {context - n / 2:.0f} tokens, {n} new tokens, greedy, {args.rounds} interleaved rounds, medians")
    table: list[str] = []
    for clock, ttft_k, rate_k in (("process CPU time", "ttft_cpu", "rate_cpu"), ("wall clock", "ttft_wall", "rate_wall")):
        table += [f"| real model, {clock} | decode tok/s | ratio to the direct call | TTFT ms | MB read per token | "
                  "GB/s | of the limit |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in med.items():
            lib = "llama.cpp" if name in ("create_completion", "nbllm.generate (llama.cpp)") else "transformers"
            base = med["create_completion" if lib == "llama.cpp" else "model.generate"]
            gbs = m[rate_k] * per_token[lib] / 1e9
            table.append(f"| {name} | {m[rate_k]:.1f} | {m[rate_k] / base[rate_k]:.3f} | {m[ttft_k] * 1000:.0f} | "
                         f"{per_token[lib] / 1e6:.1f} | {gbs:.1f} | {gbs / limit:.0%} |")
    for row in table:
        print(row)
    notes = [
        f"Limit: {limit:.1f} GB/s, the best of {bw['gb_per_s']:.1f} GB/s measured by {bw['by']} ({bw['clock']}) and "
        f"llama.cpp's own {own:.1f} GB/s. Bytes per token: the Q4_1 file's tensors as stored plus llama.cpp's f16 KV "
        f"cache at {context:.0f} tokens; the float32 weights plus the float32 KV cache.",
    ]
    for note in notes:
        print(note)
    machine.save("real-model", info, table, {
        "tokens": n, "rounds": args.rounds, "bytes_per_token": per_token, "bandwidth": bw, "limit_gb_per_s": limit,
        "medians": med, "texts": {k: sorted(v) for k, v in texts.items()},
    }, notes)


if __name__ == "__main__":
    main()
