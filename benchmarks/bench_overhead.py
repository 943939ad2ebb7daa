"""nbllm's own CPU time per token, on its own: what the engine, the incremental decoder, the stop
hold-back, the generation thread's hand-over and the display add to each token.

Run: python benchmarks/bench_overhead.py [--tokens 256] [--rounds 7] [--pace-ms 1]

Side-by-side decode ratios (bench_transformers.py, bench_llamacpp.py) put nbllm's few microseconds per
token next to the model's milliseconds, and on a shared machine the model's time moves by more than
that from one round to the next. Here the model is taken out: the smallest built-in Transformers model
is loaded by nbllm as usual, and its loader's ``generate_tokens`` is replaced by a replay of that
model's own greedy tokens, emitted from nbllm's generation thread one every ``--pace-ms`` (sleeping, so the thread costs no CPU while
"computing", and the consumer waits for every token as it does for a real model). Everything else is
nbllm's real path. What is counted is CPU time per thread, so that the sleeping itself is not: the
reading thread's CPU time from the first token to the last (the engine, decoder, stop hold-back,
display, and its waits and wake-ups for the tokens), plus the generation thread's CPU time inside
nbllm's ``emit`` (the hand-over's other side). That is nbllm's overhead per token; with the direct
call's own time per token (``--direct-tok-s``, e.g. from bench_transformers.py's model.generate row) it
gives the ratio nbllm/direct it allows.

Also timed, to attribute it: the hand-over alone (a thread emitting into the same queue, a consumer
reading it), and the decoder and hold-back alone (no thread).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pace-ms", type=float, default=1.0, help="time between two tokens")
    parser.add_argument("--direct-tok-s", type=float, default=None,
                        help="decode speed of the direct call, for the ratio (default: read results/transformers-0.17M.json)")
    args = parser.parse_args()
    machine.set_threads(1)

    import json

    import torch
    from IPython.core.interactiveshell import InteractiveShell

    import nbllm
    from nbllm.loaders import Request
    from nbllm.streaming import IncrementalDecoder, StopHoldback, threaded_tokens
    from nbllm.testing import tiny_transformers_model

    torch.set_num_threads(1)
    nbllm.load(tiny_transformers_model(), dtype="float32", device="cpu")
    loader = nbllm.get_engine().loader
    n, pace = args.tokens, args.pace_ms / 1000
    tokens = nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n).token_ids
    assert len(tokens) == n
    _ = nbllm.get_engine().last_result.record  # waits for the weights' hash, once

    stamps: list[float] = []  # the reading thread's CPU time as each token reaches it
    emitted = [0.0, 0]  # the generation thread's CPU time inside emit, and how many tokens

    def paced(emit: Callable[[int], None], cancel: threading.Event, count: int) -> None:
        for token in tokens[:count]:
            time.sleep(pace)
            if cancel.is_set():
                return
            start = time.thread_time()
            emit(token)
            emitted[0] += time.thread_time() - start
            emitted[1] += 1

    def replay(request: Request) -> Iterator[int]:
        stream = threaded_tokens(lambda emit: paced(emit, request.cancel, request.options.max_new_tokens),
                                 request.cancel)
        try:
            for token in stream:
                stamps.append(time.thread_time())  # as the engine receives each token
                yield token
        finally:
            stream.close()

    loader.generate_tokens = replay  # type: ignore[method-assign]
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbllm")

    def cpu_per_token(fn: Callable[[], object]) -> float:
        """CPU time per token, from the first token to the last (what a decode rate counts: the
        per-generation work before the first token, tokenizing, the record, is not in it): the reading
        thread's, plus the generation thread's inside emit."""
        stamps.clear()
        emitted[:] = [0.0, 0]
        start = time.thread_time()
        fn()
        if len(stamps) < 2:  # no thread: the whole call
            return (time.thread_time() - start) / n
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1) + emitted[0] / max(emitted[1], 1)

    def api() -> object:
        r = nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n)
        assert r.token_ids == tokens
        return r

    def stop_strings() -> object:
        return nbllm.generate(machine.PROMPT, temperature=0, max_new_tokens=n, stop=["never appears 1", "nor this"])

    def magic() -> object:
        with contextlib.redirect_stdout(io.StringIO()):
            shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens {n} -o _bench", machine.PROMPT)
        return shell.user_ns["_bench"]

    def handover() -> object:
        for _ in threaded_tokens(lambda emit: paced(emit, threading.Event(), n), threading.Event()):
            stamps.append(time.thread_time())
        return None

    def decoding() -> object:
        decoder = IncrementalDecoder(loader.decode, context=[1, 2, 3, 4])
        holdback = StopHoldback(["never appears 1", "nor this"])
        return [holdback.feed(decoder.add(t)) for t in tokens]

    methods = {
        "hand-over alone (a sleep-paced thread emits, a consumer reads)": handover,
        "decoder + stop hold-back alone (no thread)": decoding,
        "nbllm.generate": api,
        "nbllm.generate with two stop strings": stop_strings,
        "%%llm (InteractiveShell)": magic,
    }
    for fn in methods.values():
        fn()
    runs = machine.interleaved({k: (lambda f=f: cpu_per_token(f)) for k, f in methods.items()}, args.rounds)
    med = {k: statistics.median(v) for k, v in runs.items()}

    direct = args.direct_tok_s
    source = "--direct-tok-s"
    if direct is None:
        saved = machine.RESULTS / "transformers-0.17M.json"
        if saved.exists():
            direct = json.loads(saved.read_text())["medians"]["model.generate"]["rate_cpu"]
            source = f"model.generate in {saved.relative_to(machine.ROOT)}"
    info = machine.describe(1)
    print(f"nbllm's own CPU time per token ({n} tokens replayed one every {args.pace_ms:g} ms, {args.rounds} "
          f"interleaved rounds, medians)")
    table = ["| path | CPU µs per token | ratio it allows |", "|---|---:|---:|"]
    for name, seconds in med.items():
        allowed = f"{1 / (1 + seconds * direct):.3f}" if direct and "alone" not in name else ""
        table.append(f"| {name} | {seconds * 1e6:.1f} | {allowed} |")
    for row in table:
        print(row)
    notes = ["CPU µs per token: the reading thread's CPU time per token plus the generation thread's inside emit "
             "(per-thread clocks: the pacing thread's sleeps and wake-ups are not counted). "
             f"Ratio it allows = 1 / (1 + that × direct decode speed), with the direct speed {direct:.0f} tok/s "
             f"({source}; the smallest built-in model, where overhead shows most)." if direct else
             "No direct decode speed given: run bench_transformers.py first, or pass --direct-tok-s."]
    for note in notes:
        print(note)
    machine.save("overhead", info, table, {"tokens": n, "pace_ms": args.pace_ms, "rounds": args.rounds,
                                            "direct_tok_s": direct, "runs": runs, "medians": med}, notes)


if __name__ == "__main__":
    main()
