"""Time to the first token of the first prompt after a load: nbllm against the library's own first call.

Run: python benchmarks/bench_first_prompt.py [--params 64e6] [--rounds 5]

Each round, for each loader, in one process, the order alternating from round to round:
- nbllm: ``nbllm.load(model)``, then the first ``nbllm.generate(prompt, max_new_tokens=1)``, timed from the
  call to its return. The weights' sha256 index is emptied before the load (a fresh ``NBLLM_CACHE_DIR``),
  so the record's hashing really runs in the background during that first prompt.
- direct: the same model loaded by the library itself (``AutoModelForCausalLM.from_pretrained`` /
  ``llama_cpp.Llama``), then its first ``generate(max_new_tokens=1)`` / ``create_completion(max_tokens=1)``,
  timed the same way.
Greedy, same prompt. Prints the medians and nbllm's overhead in milliseconds (target: at most 30 ms).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"
TARGET_MS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=64e6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import nbllm
    from nbllm.testing import model_for_params, tiny_gguf_model, tiny_transformers_model

    size = model_for_params(int(args.params))
    folder, gguf = tiny_transformers_model(**size), tiny_gguf_model(**size)
    cache = os.environ.get("NBLLM_CACHE_DIR")

    def fresh_hash_index() -> None:
        os.environ["NBLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="nbllm-bench-")

    def restore() -> None:
        if cache is None:
            os.environ.pop("NBLLM_CACHE_DIR", None)
        else:
            os.environ["NBLLM_CACHE_DIR"] = cache

    def nbllm_first(model: object, **load: object) -> float:
        fresh_hash_index()
        nbllm.load(model, **load)  # type: ignore[arg-type]
        start = time.perf_counter()
        result = nbllm.generate(PROMPT, temperature=0, max_new_tokens=1)
        seconds = time.perf_counter() - start
        assert result.completion_tokens == 1
        _ = result.record.to_dict()  # the record completes (waits for the hash) after the clock stopped
        nbllm.unload()
        restore()
        return seconds

    def transformers_first() -> float:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        start = time.perf_counter()
        inputs = tok(PROMPT, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        seconds = time.perf_counter() - start
        assert out.shape[1] == inputs["input_ids"].shape[1] + 1
        del model, tok
        gc.collect()
        return seconds

    def llamacpp_first() -> float:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, verbose=False)
        start = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=1, temperature=0)
        seconds = time.perf_counter() - start
        assert out["choices"][0]["text"] is not None
        llm.close()
        del llm
        gc.collect()
        return seconds

    cases = {
        "transformers": (lambda: nbllm_first(folder, dtype="float32"), transformers_first),
        "llama.cpp": (lambda: nbllm_first(gguf, n_ctx=2048), llamacpp_first),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"nbllm": [], "direct": []} for k in cases}
    for round_ in range(args.rounds + 1):  # round 0 warms up imports and caches; not counted
        for loader, (ours, direct) in cases.items():
            order = [("nbllm", ours), ("direct", direct)]
            for name, run in order if round_ % 2 else order[::-1]:
                seconds = run()
                if round_:
                    times[loader][name].append(seconds)

    print(f"First prompt after a load, time to the first token (medians of {args.rounds} rounds, "
          f"~{args.params / 1e6:.0f}M parameters, CPU):")
    for loader, t in times.items():
        ours, direct = statistics.median(t["nbllm"]), statistics.median(t["direct"])
        overhead = (ours - direct) * 1000
        verdict = "ok" if overhead <= TARGET_MS else "OVER"
        print(f"  {loader:<13} nbllm {ours * 1000:7.1f} ms   direct {direct * 1000:7.1f} ms   "
              f"overhead {overhead:+6.1f} ms  (target <= {TARGET_MS:.0f} ms: {verdict})")


if __name__ == "__main__":
    main()
