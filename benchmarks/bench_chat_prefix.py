"""Chat prefix reuse: time to first token of turn 8 against turn 1, with a ~1,000-token system prompt.

Run: python benchmarks/bench_chat_prefix.py [--params 20e6] [--turns 8] [--system-tokens 1000]
                                            [--tokens 32] [--rounds 3] [--loader transformers|llama.cpp|both]

For each loader one built-in model (random weights, ~20M parameters by default; the Transformers
folder and the GGUF file hold the same weights) is loaded once. A conversation of ``--turns`` turns
is played through ``nbllm.chat.Conversation`` with the loader's prefix reuse on, then the same
conversation with it off, ``--rounds`` times (the order alternates), greedy, ``--tokens`` new tokens
per reply. Before each conversation one short unrelated generation replaces the loader's cache, so
turn 1 computes its whole prompt, as in a fresh chat.

Time to first token (TTFT) is counted from the ``send`` call: rendering the history through the
template, tokenizing it, and the model's pass over what is not cached, up to the first new token.
Without reuse turn N recomputes the whole history; with it, only the last reply and the new message.

Prints medians per turn side by side, and the turn-8 / turn-1 ratios against the target
(<= 1.5 with reuse on). A loader that cannot run here (llama.cpp loader or library missing) is
skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENTENCES = [
    "You are a patient assistant for people who run language models in Jupyter notebooks.",
    "Answer in plain words, give one short example when it helps, and say so when you are unsure.",
    "A notebook is made of cells; each cell holds code or text, and the kernel runs the code cells in order.",
    "The user loads a model once and then prompts it from any cell, so answers must be reproducible.",
    "When the user asks about memory, mention quantization, offloading and the context length.",
    "When the user writes in Portuguese, answer in Portuguese: por favor, responda com clareza.",
    "Never invent numbers; if a figure is needed, explain how to measure it on the user's machine.",
    "Format code in fenced blocks and keep every line of it shorter than eighty characters.",
]
MESSAGES = [
    "Hello! Can you help me load a model?",
    "What does --load-in-4bit do?",
    "And how much memory does a 7B model need in 4 bits?",
    "Olá! Como escolho o tamanho do contexto?",
    "What is a chat template?",
    "Why is the first answer slower than the next ones?",
    "Write a haiku about notebooks.",
    "Thanks, that is all for today.",
    "One more thing: how do I save this conversation?",
    "Bye!",
]


def system_prompt(loader: Any, tokens: int) -> str:
    """About ``tokens`` tokens of system prompt (whole sentences, repeated as needed)."""
    parts: list[str] = []
    i = 0
    while len(loader.tokenize(" ".join(parts), add_special=False)) < tokens:
        parts.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    return " ".join(parts)


def play(turns: int, system: str, reuse: bool, new_tokens: int) -> list[tuple[int, float]]:
    """One conversation; (prompt tokens, TTFT seconds) per turn."""
    import nbllm
    from nbllm.chat import Conversation

    engine = nbllm.get_engine()
    nbllm.generate("Unrelated.", temperature=0, max_new_tokens=1)  # a raw prompt: the kept chat state is dropped
    engine.reuse_prefix = reuse
    chat = Conversation(f"bench-{reuse}", system=system)
    out = []
    for message in (MESSAGES * (turns // len(MESSAGES) + 1))[:turns]:
        start = time.perf_counter()
        result = chat.send(message, temperature=0, max_new_tokens=new_tokens)
        prepared = time.perf_counter() - start  # render + tokenize; the engine times the rest
        _ = result.text
        assert result.timings.time_to_first_token is not None and not chat.left_out
        out.append((result.prompt_tokens, prepared + result.timings.time_to_first_token))
    engine.reuse_prefix = True
    return out


def bench(loader_name: str, path: Path, args: argparse.Namespace, describe: str) -> None:
    import nbllm

    status = nbllm.load(path)
    engine = nbllm.get_engine()
    system = system_prompt(engine.loader, args.system_tokens)
    system_tokens = len(engine.loader.tokenize(system, add_special=False))
    play(2, system, True, 4)  # warm up (and wait for the weights' sha256, hashed once for records)
    runs: dict[bool, list[list[tuple[int, float]]]] = {True: [], False: []}
    for i in range(args.rounds):
        for reuse in ((True, False) if i % 2 == 0 else (False, True)):
            runs[reuse].append(play(args.turns, system, reuse, args.tokens))
    nbllm.unload()
    load = os.getloadavg()[0]

    def median(reuse: bool, turn: int) -> float:
        return statistics.median(r[turn][1] for r in runs[reuse])

    print(f"\n== {loader_name}: {describe}")
    details = ", ".join(f"{k} {v}" for k, v in status.details.items() if k in ("attn_implementation", "dtype",
                                                                                  "n_ctx", "n_threads"))
    print(f"   {details + '; ' if details else ''}system prompt {system_tokens} tokens, {args.tokens} new tokens "
          f"per reply, greedy, {args.rounds} rounds, medians; 1-min load average after: {load:.1f}")
    print(f"   {'turn':>4} {'prompt tokens':>13} {'TTFT reuse on':>14} {'TTFT reuse off':>15}")
    for turn in range(args.turns):
        tokens = runs[True][0][turn][0]
        print(f"   {turn + 1:>4} {tokens:>13} {median(True, turn) * 1000:>11.1f} ms {median(False, turn) * 1000:>12.1f} ms")
    last = args.turns - 1
    on, off = median(True, last) / median(True, 0), median(False, last) / median(False, 0)
    verdict = "met" if on <= 1.5 else "NOT met"
    print(f"   turn {args.turns} / turn 1: reuse on {on:.2f}x, reuse off {off:.2f}x "
          f"(target <= 1.5x with reuse on: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=20e6, help="model size in parameters")
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--system-tokens", type=int, default=1000, help="system prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply")
    parser.add_argument("--rounds", type=int, default=3, help="conversations per setting")
    parser.add_argument("--loader", choices=("transformers", "llama.cpp", "both"), default="both")
    args = parser.parse_args()

    from nbllm.testing import count_params, model_for_params, tiny_gguf_model, tiny_transformers_model

    size = model_for_params(int(args.params))
    context = 4096
    model = (f"{count_params(**size) / 1e6:.1f}M parameters ({size['num_layers']} layers, hidden "
             f"{size['hidden_size']}), context {context}, fp32, CPU ({os.cpu_count()} logical CPUs)")
    print(f"Chat prefix reuse benchmark: {args.turns} turns, ~{args.system_tokens}-token system prompt")
    if args.loader in ("transformers", "both"):
        bench("Transformers", tiny_transformers_model(**size, max_position_embeddings=context), args, model)
    if args.loader in ("llama.cpp", "both"):
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            print("\n== llama.cpp: skipped (llama-cpp-python is not installed: pip install 'nbllm[llamacpp]')")
        elif not (Path(__file__).resolve().parents[1] / "nbllm" / "loaders" / "llamacpp.py").exists():
            print("\n== llama.cpp: skipped (nbllm's llama.cpp loader, nbllm/loaders/llamacpp.py, is not there yet)")
        else:
            import llama_cpp

            bench(f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                  tiny_gguf_model(**size, max_position_embeddings=context), args, model + ", GGUF f32")


if __name__ == "__main__":
    main()
