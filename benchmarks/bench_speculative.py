"""Speculative decoding: decode tokens/s with ``--prompt-lookup`` and with ``--draft-model`` against plain
decoding, on input-grounded tasks (rewrite a paragraph or a function with one small change), both loaders.

Run: python benchmarks/bench_speculative.py [--tokens 120] [--rounds 3] [--threads 1] [--lookup 10]

The model is the real one (SmolLM2-135M-Instruct: ``real_model_gguf()`` Q4_1 for llama.cpp, its float32
dequantization ``real_model_transformers()`` for Transformers): random models do not copy their input, so
they would show no acceptance. Each round runs every arm once per task, back to back, the order rotating
(``machine.interleaved``); decode tok/s is the engine's own (tokens after the first over the time after the
first). The greedy text of every arm must equal the plain one (checked). Ratios: the median over rounds of
(arm tok/s) / (plain tok/s) of the same round.

Draft model: no pair of real models with a shared tokenizer and a 10x size gap is on this machine, so the
target is built from the real model (:mod:`speculative_pair`): SmolLM2-135M's 30 layers, then 342 more copied
from them with their output projections scaled by ``--draft-scale`` (0: the added layers add nothing, the
target's outputs are the draft's and every draft is accepted; above 0 the target moves away from the draft
and fewer are). The target is 10x the draft's parameters and reads all of them every step; the draft is
the real model. The table gives the acceptance with the ratio: read the ratio with it.
"""

from __future__ import annotations

import argparse
import statistics

import machine

PARAGRAPH = (
    "Repeat the following paragraph exactly, changing only the word 'Tuesday' to 'Friday':\n\n"
    "The library opens at nine on Tuesday. Readers may borrow up to five books at a time, and each loan lasts "
    "three weeks. Books returned late cost ten cents a day. The reading room is quiet, and the children's corner "
    "hosts a story hour every Tuesday afternoon."
)
CODE = (
    "Rewrite this Python function with the variable 'total' renamed to 'acc'. Output only the code.\n\n"
    "def mean(values):\n"
    "    total = 0\n"
    "    count = 0\n"
    "    for value in values:\n"
    "        total += value\n"
    "        count += 1\n"
    "    if count == 0:\n"
    "        return 0.0\n"
    "    return total / count\n"
)
TASKS = {"paragraph": PARAGRAPH, "code": CODE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lookup", type=int, default=10, help="--prompt-lookup N")
    parser.add_argument("--draft-max", type=int, default=4)
    parser.add_argument("--loaders", default="llama.cpp,transformers")
    parser.add_argument("--arms", default="lookup,draft", help="which of the two to measure")
    parser.add_argument("--draft-factor", type=float, default=10.0, help="target parameters / draft parameters")
    parser.add_argument("--draft-scale", type=float, default=0.0, help="scale of the added layers' output projections")
    parser.add_argument("--draft-tokens", type=int, default=60, help="new tokens of the draft-model arms")
    args = parser.parse_args()
    machine.set_threads(args.threads)

    from speculative_pair import gguf_target, transformers_target

    import nbllm
    from nbllm.testing import real_model_gguf, real_model_transformers

    threads = {"threads": args.threads, "threads_batch": args.threads}
    models = {
        "llama.cpp": (real_model_gguf(), threads),
        "transformers": (real_model_transformers(), {}),
    }
    table = ["| loader | task | arm | decode tok/s | plain tok/s | ratio | accepted / drafted |",
             "|---|---|---|---:|---:|---:|---|"]
    data: dict[str, object] = {}
    texts: dict[str, str] = {}
    counts: dict[str, tuple[int, int]] = {}

    pairs = {"llama.cpp": gguf_target, "transformers": transformers_target}

    def run(loader: str, task: str, arm: str, model: str = "real", tokens: int | None = None) -> float:
        """One greedy generation of ``task`` with ``arm`` (plain, lookup, draft: the model loaded for it)."""
        extra = {"prompt_lookup": args.lookup} if arm == "lookup" else {}
        r = nbllm.generate([{"role": "user", "content": TASKS[task]}], temperature=0,
                           max_new_tokens=tokens or args.tokens, **extra)
        key = f"{loader}/{model}/{task}"
        texts.setdefault(key, r.text)  # every arm's text is the first one's
        assert r.text == texts[key], f"{loader} {task} {arm}: the text differs from plain decoding"
        if r.timings.draft_tokens is not None:
            counts[f"{loader}/{task}/{arm}"] = (r.timings.accepted_tokens or 0, r.timings.draft_tokens)
        return r.timings.decode_tokens_per_second or 0.0

    def report(loader: str, arm: str, label: str, rates: dict[str, list[float]]) -> None:
        for task in TASKS:
            plain, other = rates[f"{task}/plain"], rates[f"{task}/{arm}"]
            ratio = statistics.median(b / a for a, b in zip(plain, other, strict=True))
            acc = counts.get(f"{loader}/{task}/{arm}", (0, 0))
            table.append(f"| {loader} | {task} | {label} | {statistics.median(other):.1f} | "
                         f"{statistics.median(plain):.1f} | {ratio:.2f} | {acc[0]} / {acc[1]} |")
            data[f"{loader}/{task}/{arm}"] = {"plain": plain, arm: other, "accepted_drafted": acc, "ratio": ratio}
            print(table[-1], flush=True)

    for loader in args.loaders.split(","):
        path, load = models[loader]
        if "lookup" in args.arms:  # prompt lookup is per request: both arms on one load, interleaved
            nbllm.load(path, **load)
            for task in TASKS:
                run(loader, task, "plain")
                run(loader, task, "lookup")  # warm both paths
            methods = {f"{task}/{arm}": (lambda t=task, a=arm, lo=loader: run(lo, t, a))
                       for task in TASKS for arm in ("plain", "lookup")}
            report(loader, "lookup", f"--prompt-lookup {args.lookup}", machine.interleaved(methods, args.rounds))
            nbllm.unload()
        if "draft" not in args.arms:
            continue
        # a draft model is loaded with the model: each round loads the target with and without it, in turn
        draft, target, facts = pairs[loader](args.draft_factor, args.draft_scale)
        data[f"{loader}/pair"] = facts
        rates: dict[str, list[float]] = {}
        for n in range(args.rounds):
            for arm in (("draft", "plain") if n % 2 == 0 else ("plain", "draft")):
                drafting = {"draft_model": str(draft), "draft_max": args.draft_max} if arm == "draft" else {}
                nbllm.load(target, **load, **drafting)
                nbllm.generate("Hello", temperature=0, max_new_tokens=4)  # the first decode after a load is slower
                for task in TASKS:
                    rates.setdefault(f"{task}/{arm}", []).append(run(loader, task, arm, "pair", args.draft_tokens))
                nbllm.unload()
        ratio_size = facts["target_params"] / facts["draft_params"]
        report(loader, "draft", f"--draft-model (target {ratio_size:.1f}x the draft, scale {args.draft_scale:g}), "
                                f"--draft-max {args.draft_max}", rates)
    notes = [f"--prompt-lookup {args.lookup}; --draft-max {args.draft_max}; greedy, {args.tokens} new tokens at most; "
             f"{args.threads} thread(s) (llama.cpp: --threads and --threads-batch).",
             f"draft-model arms: {args.draft_tokens} new tokens at most; the target is SmolLM2-135M plus added layers "
             "(benchmarks/speculative_pair.py), the draft SmolLM2-135M.",
             "ratio: the median of each round's (arm tok/s) / (plain tok/s). Targets: prompt lookup >= 1.5x; a draft "
             "model >= 1.3x where it is >= 10x smaller.",
             "accepted / drafted: the last round's counts, as the result's timings give them."]
    print("\n".join(table + notes))
    name = "speculative" if args.draft_scale == 0 or "draft" not in args.arms else f"speculative-scale-{args.draft_scale:g}"
    machine.save(name, machine.describe(args.threads), table, data, notes)


if __name__ == "__main__":
    main()
