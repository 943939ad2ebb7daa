"""How close each loader decodes to the memory-bandwidth limit, for the built-in model sizes.

Run: python benchmarks/bench_bandwidth.py [--sizes 0,64e6,100e6] [--tokens 64] [--rounds 5] [--threads 1]
     python benchmarks/bench_bandwidth.py --device cuda [--sizes 100e6,1e9]     (make bench-gpu)

Decoding reads every weight once per token (and the KV cache so far), so tokens/s × bytes read per
token ≤ the memory bandwidth. For each size and loader configuration this loads the built-in model
with nbllm (``nbllm.load``, the options as a user gives them), warms it up (``--compile`` compiles
then), generates ``--tokens`` greedy tokens ``--rounds`` times through ``nbllm.generate`` and takes the
median decode speed: on a CPU with ``--threads 1`` by process CPU time (robust on a shared machine),
else by wall clock. The limit is the best of the bandwidth measured here (a large matrix-vector product
and a streaming read, see machine.py) and, on a CPU, what llama.cpp's own decode reached (a decode that
reads those bytes proves the machine delivers them). On CUDA: device memory, and the variants float16,
bfloat16, bitsandbytes 4-bit nf4 and 8-bit, sdpa against flash-attention 2, eager against --compile
(CUDA graphs), llama.cpp with every layer on the GPU.

Configurations run one after another (each is its own load), not interleaved; bench_compile.py and
bench_transformers.py / bench_llamacpp.py compare side by side. Saves results/bandwidth-<device>.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated parameter counts (0: the smallest built-in); "
                        "default 0,64e6,100e6 on a CPU, 100e6,1e9 on CUDA")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="compute threads on a CPU (0: the libraries' default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    args = parser.parse_args()
    machine.cuda_or_exit(args.device)
    machine.set_threads(args.threads if args.device == "cpu" else 0)

    import torch

    import nbllm
    from nbllm.testing import count_params, tiny_gguf_model, tiny_transformers_model

    on_cpu = args.device == "cpu"
    if on_cpu and args.threads:
        torch.set_num_threads(args.threads)
    sizes = [float(s) for s in (args.sizes or ("0,64e6,100e6" if on_cpu else "100e6,1e9")).split(",")]
    key = "rate_cpu" if on_cpu and args.threads == 1 else "rate_wall"
    engine = nbllm.get_engine()
    n = args.tokens

    def configurations(size: dict[str, Any]) -> list[tuple[str, str, Path, dict[str, Any]]]:
        """(loader, configuration, model path, load options)."""
        if on_cpu:
            hf = tiny_transformers_model(**size)
            gguf = tiny_gguf_model(**size)
            threads = {"threads": args.threads, "threads_batch": args.threads} if args.threads else {}
            return [
                ("transformers", "float32 eager", hf, {"dtype": "float32", "device": "cpu"}),
                ("transformers", "float32 --compile", hf, {"dtype": "float32", "device": "cpu", "compile": True}),
                ("llama.cpp", "f32 GGUF", gguf, threads),
            ]
        hf16 = tiny_transformers_model(**size, dtype="float16")
        out = [
            ("transformers", "float16 sdpa eager", hf16, {"dtype": "float16", "attn": "sdpa"}),
            ("transformers", "float16 sdpa --compile (CUDA graphs)", hf16, {"dtype": "float16", "attn": "sdpa", "compile": True}),
            ("transformers", "bfloat16 sdpa eager", hf16, {"dtype": "bfloat16", "attn": "sdpa"}),
            ("transformers", "float16 flash-attention 2 eager", hf16, {"dtype": "float16", "attn": "flash_attention_2"}),
            ("transformers", "4-bit nf4 (bitsandbytes), compute float16", hf16, {"load_in_4bit": True, "quant_type": "nf4"}),
            ("transformers", "8-bit (bitsandbytes)", hf16, {"load_in_8bit": True}),
            ("llama.cpp", "f16 GGUF, all layers on the GPU", tiny_gguf_model(**size, file_type="f16"), {"n_gpu_layers": -1}),
        ]
        return out

    def skip_reason(config: str, options: dict[str, Any]) -> str | None:
        if options.get("attn") == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        if "load_in_4bit" in options or "load_in_8bit" in options:
            if importlib.util.find_spec("bitsandbytes") is None:
                return "bitsandbytes is not installed"
        if options.get("n_gpu_layers") == -1:
            import llama_cpp

            if not llama_cpp.llama_supports_gpu_offload():
                return "this llama-cpp-python was built without GPU support (CMAKE_ARGS=-DGGML_CUDA=on)"
        return None

    def measure(path: Path, options: dict[str, Any]) -> dict[str, Any]:
        engine.load(path, **options)
        loader = engine.loader
        arrivals = machine.stamp_arrivals(loader)

        def once() -> tuple[dict[str, float], Any]:
            arrivals.clear()
            start = machine.now()
            r = nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n)
            assert len(arrivals) == n, (len(arrivals), n)
            return machine.measures(start, arrivals), r

        _, first = once()  # warm-up: --compile compiles here
        _ = first.record  # and the weights' hash is waited for, once
        runs = [once() for _ in range(args.rounds)]
        context = len(loader.tokenize(machine.PROMPT, add_special=True)) + n / 2
        if loader.name == "llama.cpp":
            per_token = machine.gguf_bytes_per_token(path, context)
        else:
            per_token = machine.transformers_bytes_per_token(loader.model, context)
        result = {
            "medians": machine.medians([m for m, _ in runs]), "bytes_per_token": per_token,
            "compile_seconds": first.timings.compile_seconds, "tokens": runs[0][1].token_ids,
        }
        engine.unload()
        return result

    info = machine.describe(args.threads if on_cpu else 0, args.device)
    bw = machine.bandwidth(args.threads if on_cpu else 0, args.device)
    print(f"bandwidth measured: {bw['gb_per_s']:.1f} GB/s ({bw['by']}, {bw['clock']}; all: {bw['ways']})")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for params in sizes:
        size = machine.model_size(params)
        label = f"{count_params(**size) / 1e6:.2f}M" if count_params(**size) < 1e6 else f"{count_params(**size) / 1e6:.0f}M"
        for loader_name, config, path, options in configurations(size):
            if args.only and args.only not in config:
                continue
            why = skip_reason(config, options)
            if why:
                skipped.append(f"{label} {loader_name} {config}: skipped, {why}")
                print(skipped[-1])
                continue
            m = measure(path, options)
            rate = m["medians"][key]
            rows.append({"size": label, "params": count_params(**size), "loader": loader_name, "config": config,
                         "tokens_per_s": rate, "bytes_per_token": m["bytes_per_token"]["total"],
                         "compile_seconds": m["compile_seconds"], "medians": m["medians"]})
            print(f"{label} {loader_name} {config}: {rate:.1f} tok/s, {m['bytes_per_token']['total'] / 1e6:.1f} MB/token, "
                  f"{rate * m['bytes_per_token']['total'] / 1e9:.1f} GB/s"
                  + (f" (compiled in {m['compile_seconds']:.0f} s)" if m["compile_seconds"] else ""))
    llama_gb_s = max((r["tokens_per_s"] * r["bytes_per_token"] / 1e9 for r in rows if r["loader"] == "llama.cpp"
                      and r["bytes_per_token"] > 64e6), default=0.0)
    limit = max(bw["gb_per_s"], llama_gb_s) if on_cpu else bw["gb_per_s"]
    clock = "process CPU time" if key == "rate_cpu" else "wall clock"
    table = [f"| model | loader | configuration | decode tok/s | MB read per token | GB/s | of the limit ({limit:.1f} GB/s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gb_s = r["tokens_per_s"] * r["bytes_per_token"] / 1e9
        cached = r["bytes_per_token"] < 32e6
        table.append(f"| {r['size']} | {r['loader']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {gb_s:.1f} | {gb_s / limit:.0%}{' (in cache)' if cached else ''} |")
    for row in table:
        print(row)
    notes = [
        f"{n} new tokens, greedy, {args.rounds} rounds, medians, {clock}"
        + (f", {args.threads} compute thread" if on_cpu and args.threads else "") + ". Limit: the best of "
        f"{bw['gb_per_s']:.1f} GB/s measured ({bw['by']}; all: {', '.join(f'{k} {v}' for k, v in bw['ways'].items())} GB/s, "
        f"{bw['clock']})" + (f" and llama.cpp's own decode, {llama_gb_s:.1f} GB/s" if on_cpu else "") + ".",
        "Models under ~32 MB fit in this CPU's L3 cache: their 'fraction' can pass 100% and says nothing about memory."
        if on_cpu else "", *skipped,
    ]
    notes = [x for x in notes if x]
    for note in notes:
        print(note)
    machine.save(f"bandwidth-{args.device}", info, table, {"bandwidth": bw, "limit_gb_per_s": limit, "rows": rows,
                                                           "tokens": n, "rounds": args.rounds}, notes)


if __name__ == "__main__":
    main()
