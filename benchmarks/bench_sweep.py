"""Sweeps: 16 different prompts x 32 new tokens as one batched sweep against one by one.

Run: python benchmarks/bench_sweep.py [--params 64e6] [--prompts 16] [--tokens 32] [--rounds 2]
                                      [--temperature 0] [--seed 1]

One built-in Transformers model (random weights, ~64M parameters by default, float32, CPU) is loaded
once. Each round generates the same prompts both ways, side by side in this process (the order
alternates between rounds): ``nbllm.sweep(prompts, ...)`` (one padded batch: the rows share their
options) and ``nbllm.generate`` for each prompt in turn. Every row of the sweep must give the text it
gives alone. Prints tokens/s of each way (new tokens / wall time) and their ratio per round, then the
medians, against the target (>= 3x). ``--temperature 0.8 --seed 1`` checks seeded sampling the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBJECTS = ["rivers", "bread", "prime numbers", "the sky", "notebooks", "trains", "music", "chess",
            "volcanoes", "the moon", "coffee", "bicycles", "languages", "forests", "bridges", "clocks"]
FORMS = ["Write one sentence about {}.", "Q: What should a child know about {}?\nA:",
         "A short list of facts about {}:\n1.", "Once upon a time, in a land of {},"]


def prompts(n: int) -> list[str]:
    """``n`` different prompts of different lengths."""
    return [FORMS[i % len(FORMS)].format(SUBJECTS[i % len(SUBJECTS)]) + " " * (i // len(SUBJECTS)) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=64e6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NBLLM_RUN_LOG", "off")

    import torch

    import nbllm
    from nbllm.testing import model_for_params, tiny_transformers_model

    sizes = model_for_params(int(args.params))
    path = tiny_transformers_model(**sizes)
    status = nbllm.load(path, dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in nbllm.get_engine().loader.model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters ({sizes}), float32 on CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; loaded in {status.load_seconds:.1f} s")
    texts = prompts(args.prompts)
    options = {"temperature": args.temperature, "max_new_tokens": args.tokens, "seed": args.seed}
    print(f"{len(texts)} prompts x {args.tokens} new tokens, temperature {args.temperature}, seed {args.seed}; "
          f"batch size {nbllm.get_engine().loader.batch_size}")
    nbllm.generate(texts[0], **options)  # warm-up

    rates: dict[str, list[float]] = {"sweep (batched)": [], "one by one": []}
    ratios: list[float] = []
    for round_ in range(args.rounds):
        order = ["sweep (batched)", "one by one"] if round_ % 2 == 0 else ["one by one", "sweep (batched)"]
        outputs: dict[str, list[str]] = {}
        for way in order:
            start = time.perf_counter()
            if way == "one by one":
                results = [nbllm.generate(t, **options) for t in texts]
                outputs[way] = [r.text for r in results]
                tokens = sum(r.completion_tokens for r in results)
            else:
                table = nbllm.sweep(texts, **{k: [v] for k, v in options.items()}, progress=False)
                outputs[way] = list(table["text"])
                tokens = int(table["tokens"].sum())
            seconds = time.perf_counter() - start
            rates[way].append(tokens / seconds)
            print(f"round {round_ + 1}: {way:<16} {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:6.1f} tok/s")
        same = sum(a == b for a, b in zip(outputs["sweep (batched)"], outputs["one by one"]))
        ratios.append(rates["sweep (batched)"][-1] / rates["one by one"][-1])
        print(f"round {round_ + 1}: ratio {ratios[-1]:.2f}x; texts equal in {same} of {len(texts)} rows")
        if same != len(texts):
            raise SystemExit("a batched row differs from its one-by-one text")
    batched, alone = statistics.median(rates["sweep (batched)"]), statistics.median(rates["one by one"])
    ratio = statistics.median(ratios)
    print(f"\nmedian tok/s: sweep (batched) {batched:.1f}, one by one {alone:.1f}; median of the rounds' ratios "
          f"{ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); every row's text equal")


if __name__ == "__main__":
    main()
