"""Decode speed with a LoRA adapter applied (unmerged, as nbllm applies it) vs merged into the weights vs none.

Run: python benchmarks/bench_lora.py [--params 100e6] [--rank 16] [--tokens 48] [--rounds 5] [--no-gguf]

One model is loaded once; each round measures, in turn: no adapter; the adapter applied with
``nbllm.lora_add`` (PEFT's LoRA layers compute x·Aᵀ·Bᵀ beside every adapted matrix); the same adapter
merged into the weights with PEFT's ``merge`` (what a merged checkpoint costs: nothing extra per token).
The adapter adapts every linear module of every layer (q, k, v, o, gate, up, down), as most fine-tunes do.
Speed is nbllm's own ``decode_tokens_per_second`` of greedy generations. With llama.cpp (the GGUF form of
the same model and adapter): no adapter vs applied (llama.cpp has no runtime merge). Prints median speeds
and the median of each round's ratio to no adapter (the states of one round run back to back, so a
machine shared with other work slows them alike; the order rotates from round to round).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decode_speed(tokens: int) -> float:
    import nbllm

    result = nbllm.generate(PROMPT, temperature=0, max_new_tokens=tokens)
    assert result.completion_tokens == tokens, result.finish_reason
    return float(result.timings.decode_tokens_per_second or 0.0)


def merge(model: Any, merged: bool) -> None:
    """Merge the applied LoRA into the weights (or take it out again), as PEFT's merge_and_unload does."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and module.merged != merged:
            module.merge() if merged else module.unmerge()


def measure(states: dict[str, Any], rounds: int, tokens: int) -> dict[str, list[float]]:
    """Each round: every state (a function that sets it up) then a generation, in a rotating order."""
    names = list(states)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            states[name]()
            speeds[name].append(decode_speed(tokens))
    return speeds


def report(title: str, speeds: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    for name, values in speeds.items():
        ratio = statistics.median(v / b for v, b in zip(values, speeds["none"], strict=True))
        print(f"  {name:<22} {statistics.median(values):7.1f} tok/s   {ratio:5.2f}× of none   (runs: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp part")
    args = parser.parse_args()

    import torch

    import nbllm
    from nbllm.testing import (
        count_params,
        model_for_params,
        tiny_gguf_adapter,
        tiny_gguf_model,
        tiny_peft_adapter,
        tiny_transformers_model,
    )

    size = model_for_params(int(args.params))
    lora = dict(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    print(f"model: {count_params(**size) / 1e6:.1f}M parameters {size}; adapter: rank {args.rank} on {', '.join(TARGETS)}; "
          f"torch threads {torch.get_num_threads()}; {args.tokens} tokens × {args.rounds} rounds")

    nbllm.load(tiny_transformers_model(**size), dtype="float32")
    adapter = tiny_peft_adapter(**size, **lora)
    model = nbllm.get_engine().loader.model
    decode_speed(8)  # warm up

    def merged() -> None:
        merge(model, False)
        nbllm.lora_add(adapter)
        merge(model, True)

    def unmerged() -> None:
        merge(model, False)
        nbllm.lora_add(adapter)

    def none() -> None:
        merge(model, False)
        nbllm.lora_clear()

    states = {"none": none, "applied (unmerged)": unmerged, "merged": merged}
    report("Transformers (float32, CPU)", measure(states, args.rounds, args.tokens))
    none()

    if args.no_gguf:
        return
    nbllm.load(tiny_gguf_model(**size))
    adapter = tiny_gguf_adapter(**size, **lora)
    decode_speed(8)
    states = {"none": lambda: nbllm.lora_clear(), "applied": lambda: nbllm.lora_add(adapter)}
    report("llama.cpp (f32 GGUF, CPU)", measure(states, args.rounds, args.tokens))
    nbllm.unload()


if __name__ == "__main__":
    main()
