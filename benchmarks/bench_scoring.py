"""Scoring and perplexity against the libraries' own ways, side by side in one process, interleaved.

Run: python benchmarks/bench_scoring.py [--questions 20] [--rounds 3] [--threads 1]

* **Multiple choice**: ``--questions`` questions of four choices each, scored by ``nbllm.score`` (one batched
  forward pass per question) and by lm-eval's own ``hf`` model (``HFLM.loglikelihood``, its defaults:
  batch size 1), on the same weights (a random model of SmolLM2-135M's shape, float32, each side its own
  copy). Their log-likelihoods are checked equal (1e-3) before timing.
* **Perplexity**: ``nbllm.perplexity`` against transformers' perplexity guide's loop run directly on the
  very model nbllm holds (max_length 512, stride 256, a text of about 2000 tokens); numbers checked equal.

Prints seconds and the ratio (target: nbllm at least as fast: ratio >= 1.0) and saves results/scoring.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import machine

WORDS = ("the of and to in is was for on that with as by at from his her an which one all were they this had "
         "city river music model paper light water garden history market winter school number table").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    machine.set_threads(args.threads)
    os.environ["NBLLM_RUN_LOG"] = os.path.join(tempfile.mkdtemp(), "runs.sqlite")

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import nbllm
    from nbllm.testing import tiny_transformers_model

    torch.set_num_threads(max(args.threads, 1))
    path = tiny_transformers_model(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                   intermediate_size=1536, vocab_size=49152)
    nbllm.load(path)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1)
    rng = random.Random(0)
    questions = [(" ".join(rng.choice(WORDS) for _ in range(40)).capitalize() + ". Answer:",
                  [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)])
                 for _ in range(args.questions)]
    requests = [Instance("loglikelihood", {}, (q, c), i) for q, cs in questions for i, c in enumerate(cs)]

    def ours() -> list[float]:
        return [c.logprob for q, cs in questions for c in nbllm.score(q, cs)]

    def theirs() -> list[float]:
        return [ll for ll, _ in hf.loglikelihood(requests, disable_tqdm=True)]

    a, b = ours(), theirs()
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3, "the log-likelihoods differ"
    timed = machine.interleaved({"nbllm.score": lambda: _seconds(ours), "lm-eval hf": lambda: _seconds(theirs)},
                                args.rounds)
    score_ours, score_theirs = statistics.median(timed["nbllm.score"]), statistics.median(timed["lm-eval hf"])

    text = " ".join(rng.choice(WORDS) for _ in range(1800))
    model = nbllm.get_engine().loader.model  # type: ignore[attr-defined]
    ids = nbllm.get_engine().tokenize(text, add_special=True)

    def guide() -> float:
        nll_sum, n_tokens, prev_end = 0.0, 0, 0
        enc = torch.tensor([ids])
        for begin in range(0, len(ids), 256):
            end = min(begin + 512, len(ids))
            trg = end - prev_end
            input_ids = enc[:, begin:end]
            target = input_ids.clone()
            target[:, :-trg] = -100
            with torch.no_grad():
                loss = model(input_ids, labels=target).loss
            n = int((target != -100).sum()) - 1
            nll_sum += float(loss) * n
            n_tokens += n
            prev_end = end
            if end == len(ids):
                break
        return float(torch.exp(torch.tensor(nll_sum / n_tokens)))

    def ppl() -> float:
        return nbllm.perplexity(text, max_length=512, stride=256, progress=False).perplexity

    assert abs(guide() - ppl()) / guide() < 1e-4, "the perplexities differ"
    timed_ppl = machine.interleaved({"nbllm.perplexity": lambda: _seconds(ppl), "guide loop": lambda: _seconds(guide)},
                                    args.rounds)
    ppl_ours, ppl_theirs = statistics.median(timed_ppl["nbllm.perplexity"]), statistics.median(timed_ppl["guide loop"])
    n_choices = len(requests)
    table = [
        "| task | nbllm | the library's way | ratio (theirs / ours time) |", "|---|---:|---:|---:|",
        f"| {args.questions} questions × 4 choices | nbllm.score {score_ours:.2f} s ({n_choices / score_ours:.1f} choices/s) "
        f"| lm-eval hf {score_theirs:.2f} s ({n_choices / score_theirs:.1f} choices/s) | {score_theirs / score_ours:.2f} |",
        f"| perplexity, {len(ids)} tokens, window 512, stride 256 | {len(ids) / ppl_ours:.0f} tok/s "
        f"| guide loop {len(ids) / ppl_theirs:.0f} tok/s | {ppl_theirs / ppl_ours:.2f} |",
    ]
    notes = ["Same weights (a random model of SmolLM2-135M's shape, float32, CPU); results checked equal before "
             "timing; medians of interleaved rounds. Target: ratio >= 1.0."]
    print("\n".join(table + notes))
    machine.save("scoring", machine.describe(args.threads), table,
                 {"score_seconds": timed, "perplexity_seconds": timed_ppl, "tokens": len(ids)}, notes)


def _seconds(call: object) -> float:
    start = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
