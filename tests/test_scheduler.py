"""The scheduler: concurrent requests to one model, batched where the loader can, each reply its
one-by-one text, delivered to its own caller (threads, and ``openai`` clients of a real ``nbllm.serve``).

Batching is seen through ``Scheduler.batch_sizes``, never through timings: the tests hold the queue
(``Scheduler.hold``), wait until every request is in it (``wait_queued``), then let it go.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.engine import Engine
from nbllm.errors import GenerationError
from nbllm.serve import stop

pytest.importorskip("torch")

PROMPTS = ["Once upon a time", "The capital of", "Hello there, how", "In the beginning"]


@pytest.fixture
def model(engine: Any, tiny_model: Path) -> Iterator[Engine]:
    engine.load(tiny_model)
    yield engine


def _together(calls: list[Callable[[], Any]], scheduler: Any, *, queued: int | None = None) -> list[Any]:
    """Run ``calls`` on threads while the queue is held, wait until ``queued`` requests are in it (all by
    default), let it go, and return what each call returned (or raised), in order."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[i] = exc

    with scheduler.hold():
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        assert scheduler.wait_queued(len(calls) if queued is None else queued, 60)
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    return out


def test_concurrent_greedy_requests_are_batched_and_equal_their_one_by_one_texts(model: Engine) -> None:
    alone = [model.generate(p, temperature=0, max_new_tokens=12) for p in PROMPTS]
    scheduler = model.scheduler
    before = list(scheduler.batch_sizes)
    results = _together([lambda p=p: scheduler.stream(p, temperature=0, max_new_tokens=12).text for p in PROMPTS],
                        scheduler)
    assert results == [r.text for r in alone]
    assert scheduler.batch_sizes[len(before):] == [len(PROMPTS)]
    last = model.last_result
    assert last is not None and last.record is not None and last.record.batch["size"] == len(PROMPTS)


def test_seeded_sampling_reproduces_each_request_and_other_options_run_in_their_own_batch(model: Engine) -> None:
    sampled = {"temperature": 0.9, "top_k": 20, "max_new_tokens": 10}
    alone = [model.generate(p, seed=100 + i, **sampled).text for i, p in enumerate(PROMPTS[:3])]
    greedy = model.generate(PROMPTS[3], temperature=0, max_new_tokens=6).text
    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    calls = [lambda i=i, p=p: scheduler.stream(p, seed=100 + i, **sampled).text for i, p in enumerate(PROMPTS[:3])]
    calls.append(lambda: scheduler.stream(PROMPTS[3], temperature=0, max_new_tokens=6).text)
    results = _together(calls, scheduler)
    assert results == [*alone, greedy]
    assert sorted(scheduler.batch_sizes[before:]) == [1, 3]  # the greedy request could not share the batch


def test_a_cancelled_request_ends_with_its_reason_while_the_others_finish(model: Engine) -> None:
    scheduler = model.scheduler
    alone = [model.generate(p, temperature=0, max_new_tokens=40).text for p in PROMPTS[:3]]
    results: list[Any] = []
    first_piece = threading.Event()
    before = len(scheduler.batch_sizes)

    def cancelled_after_its_first_piece() -> Any:
        result = scheduler.stream(PROMPTS[0], temperature=0, max_new_tokens=40)
        results.append(result)
        for _ in result:
            first_piece.set()
            result.cancel()
        return result

    calls: list[Callable[[], Any]] = [cancelled_after_its_first_piece]
    calls += [lambda p=p: scheduler.stream(p, temperature=0, max_new_tokens=40) for p in PROMPTS[1:3]]
    out = _together(calls, scheduler)
    assert first_piece.is_set()
    cancelled = out[0]
    assert cancelled.finish_reason == "cancelled" and alone[0].startswith(cancelled.text)
    assert len(cancelled.token_ids) < 40
    assert [r.text for r in out[1:]] == alone[1:]
    assert all(r.finish_reason in ("length", "eos") for r in out[1:])
    assert scheduler.batch_sizes[before:] == [3]


def test_an_interrupted_reader_stops_its_own_row_only(model: Engine) -> None:
    scheduler = model.scheduler
    alone = model.generate(PROMPTS[1], temperature=0, max_new_tokens=30).text

    def interrupted() -> Any:
        result = scheduler.stream(PROMPTS[0], temperature=0, max_new_tokens=30)
        pieces = iter(result)
        next(pieces)
        result.close()  # what a cell does after an interrupt between two pieces, and the server when a client left
        return result

    out = _together([interrupted, lambda: scheduler.stream(PROMPTS[1], temperature=0, max_new_tokens=30).text],
                    scheduler)
    assert out[0].finish_reason == "interrupted" and out[0].done
    assert out[1] == alone


def test_an_error_reaches_only_its_caller(model: Engine) -> None:
    scheduler = model.scheduler
    limit = model.loader.context_length
    assert limit is not None
    too_long = " ".join(["word"] * (limit + 10))
    alone = model.generate(PROMPTS[0], temperature=0, max_new_tokens=8).text
    out = _together([lambda: scheduler.stream(too_long, temperature=0, max_new_tokens=8).text,
                     lambda: scheduler.stream(PROMPTS[0], temperature=0, max_new_tokens=8).text],
                    scheduler, queued=1)
    assert isinstance(out[0], GenerationError) and "context holds" in str(out[0])
    assert out[1] == alone
    assert model.generate(PROMPTS[0], temperature=0, max_new_tokens=8).text == alone  # the model stays usable


def test_a_failing_batch_reaches_its_callers_only(model: Engine, monkeypatch: Any) -> None:
    scheduler = model.scheduler
    loader = model.loader
    real = type(loader).generate_batch
    alone = model.generate(PROMPTS[2], temperature=0, max_new_tokens=8).text

    def failing_for_sampled_rows(self: Any, requests: Any) -> Any:
        if requests[0].options.temperature > 0:
            raise RuntimeError("the sampled batch broke")
        return real(self, requests)

    monkeypatch.setattr(type(loader), "generate_batch", failing_for_sampled_rows)
    out = _together([lambda p=p: scheduler.stream(p, temperature=0.7, seed=1, max_new_tokens=8).text for p in PROMPTS[:2]]
                    + [lambda: scheduler.stream(PROMPTS[2], temperature=0, max_new_tokens=8).text], scheduler)
    assert all(isinstance(o, GenerationError) and "the sampled batch broke" in str(o) for o in out[:2])
    assert out[2] == alone


def test_requests_for_a_loader_that_cannot_batch_run_one_at_a_time(engine: Any, tiny_gguf: Path) -> None:
    engine.load(tiny_gguf)
    scheduler = engine.scheduler
    before = list(scheduler.batch_sizes)
    alone = [engine.generate(p, temperature=0, max_new_tokens=10).text for p in PROMPTS[:3]]
    threads_out: list[Any] = [None] * 3

    def run(i: int) -> None:
        threads_out[i] = scheduler.stream(PROMPTS[i], temperature=0, max_new_tokens=10).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert threads_out == alone and scheduler.batch_sizes == before  # never queued: each took its turn at the model


def test_serve_with_concurrent_openai_clients_batches_and_returns_one_by_one_texts(model: Engine) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    server = nbllm.serve(port=0)
    try:
        alone = [model.generate(p, temperature=0, max_new_tokens=12).text for p in PROMPTS]
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        name = nbllm.status().model
        scheduler = model.scheduler
        before = len(scheduler.batch_sizes)

        def ask(prompt: str, stream: bool) -> str:
            answer = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=12, stream=stream)
            if stream:
                return "".join(chunk.choices[0].text for chunk in answer if chunk.choices)
            return str(answer.choices[0].text)

        out = _together([lambda p=p, i=i: ask(p, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)], scheduler)
        assert out == alone
        assert scheduler.batch_sizes[before:] == [len(PROMPTS)]
    finally:
        stop()


# -------------------------------------------------------------------------------------------- the front ends
def test_a_thread_generate_and_a_served_client_share_one_batch(model: Engine) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    alone = [model.generate(p, temperature=0, max_new_tokens=12).text for p in PROMPTS[:2]]
    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    assert scheduler.idle
    at_finish: list[str] = []  # what the run log hears: each text as it is when its result finishes
    forget = model.on_result(lambda result: at_finish.append("".join(result.chunks)))
    server = nbllm.serve(port=0)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        name = nbllm.status().model

        def served() -> str:
            return str(client.completions.create(model=name, prompt=PROMPTS[1], temperature=0, max_tokens=12)
                       .choices[0].text)

        out = _together([lambda: nbllm.generate(PROMPTS[0], temperature=0, max_new_tokens=12), served], scheduler)
    finally:
        stop()
        forget()
    assert [out[0].text, out[1]] == alone
    assert sorted(at_finish) == sorted(alone)  # whole, though finished before their readers had read them
    assert scheduler.batch_sizes[before:] == [2]
    assert out[0].record.batch["size"] == 2 and out[0].finish_reason == "length"
    assert scheduler.idle  # and the next one alone runs directly again, as before
    assert model.generate(PROMPTS[0], temperature=0, max_new_tokens=12).text == alone[0]
    assert scheduler.batch_sizes[before:] == [2]


def test_a_cell_joins_the_batch_of_other_callers_and_alone_runs_as_before(shell: Any, model: Engine) -> None:
    alone = [model.generate(p, temperature=0, max_new_tokens=10).text for p in PROMPTS[:2]]
    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o r", PROMPTS[0])
    assert shell.user_ns["r"].text == alone[0] and shell.user_ns["r"].record.batch is None
    assert len(scheduler.batch_sizes) == before  # a cell alone: never queued

    def cell() -> Any:
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 10 -o joined", PROMPTS[0])
        return shell.user_ns["joined"]

    out = _together([cell, lambda: scheduler.stream(PROMPTS[1], temperature=0, max_new_tokens=10).text], scheduler)
    assert [out[0].text, out[1]] == alone
    assert scheduler.batch_sizes[before:] == [2] and out[0].record.batch["size"] == 2


def test_a_chat_reuses_its_history_alone_and_joins_a_batch_beside_others(model: Engine) -> None:
    chat = nbllm.Chat("beside", system="Be brief.")
    first = chat.send("Hello there", temperature=0, max_new_tokens=8).text
    second = chat.send("And then?", temperature=0, max_new_tokens=8)
    assert second.text and second.record.reused_prefix_tokens > 0  # alone: the history's state reused, as before
    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    again = nbllm.Chat("again", system="Be brief.")
    assert again.send("Hello there", temperature=0, max_new_tokens=8).text == first

    def turn_two() -> Any:
        result = again.send("And then?", temperature=0, max_new_tokens=8)
        _ = result.text
        return result

    out = _together([turn_two, lambda: scheduler.stream(PROMPTS[0], temperature=0, max_new_tokens=8).text], scheduler)
    joined = out[0]
    assert joined.text == second.text and out[1] == model.generate(PROMPTS[0], temperature=0, max_new_tokens=8).text
    assert scheduler.batch_sizes[before:] == [2]
    record = joined.record
    assert record.batch["size"] == 2 and record.conversation == {"name": "again", "turn": 2}
    assert record.mode == "chat" and record.reused_prefix_tokens == 0  # a batch computes the whole prompt
    def replies(c: Any) -> list[Any]:
        return [(t.user, t.reply.content, t.reply.finish_reason) for t in c.turns if t.reply is not None]

    assert replies(again) == replies(chat) and len(again.turns) == 2  # the turn kept as the lone chat's


def test_a_front_end_request_in_a_batch_is_cancelled_or_interrupted_alone(model: Engine) -> None:
    scheduler = model.scheduler
    alone = model.generate(PROMPTS[1], temperature=0, max_new_tokens=40).text
    before = len(scheduler.batch_sizes)
    first_piece = threading.Event()

    def cancelled() -> Any:
        result = model.stream(PROMPTS[0], temperature=0, max_new_tokens=40)
        for _ in result:
            first_piece.set()
            result.cancel()
        return result

    def interrupted() -> Any:
        result = nbllm.stream(PROMPTS[2], temperature=0, max_new_tokens=40)
        next(iter(result))
        result.close()  # what a cell does after an interrupt between two pieces
        return result

    out = _together([cancelled, interrupted, lambda: model.stream(PROMPTS[1], temperature=0, max_new_tokens=40)],
                    scheduler)
    assert first_piece.is_set() and scheduler.batch_sizes[before:] == [3]
    assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) < 40
    assert out[1].finish_reason == "interrupted" and out[1].done
    assert out[2].text == alone and out[2].finish_reason in ("length", "eos")
    assert model.loaded and scheduler.idle
    assert model.generate(PROMPTS[1], temperature=0, max_new_tokens=40).text == alone  # the model stays usable


def test_an_interrupt_stops_a_cell_read_from_a_batch_and_the_model_stays(shell: Any, model: Engine) -> None:
    from IPython.core.error import UsageError

    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    long = {"temperature": 0, "max_new_tokens": 2000}
    held, other = threading.Event(), []

    def beside_the_cell() -> None:  # holds the queue until the cell and this request are in it
        with scheduler.hold():
            held.set()
            other.append(scheduler.stream(PROMPTS[1], **long))
            assert scheduler.wait_queued(2, 60)

    helper = threading.Thread(target=beside_the_cell)
    helper.start()
    assert held.wait(60)
    main, stop_polling = threading.get_ident(), threading.Event()

    def interrupt_once_the_cell_has_text() -> None:
        while not stop_polling.wait(0.01):
            result = shell.user_ns.get("cut")
            if result is not None and result.chunks:
                signal.pthread_kill(main, signal.SIGINT)  # what the kernel's interrupt does
                return

    interrupter = threading.Thread(target=interrupt_once_the_cell_has_text)
    interrupter.start()
    try:
        with pytest.raises(UsageError, match="Generation interrupted after .* tokens; the partial text is kept"):
            shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 2000 -o cut", PROMPTS[0])
    finally:
        stop_polling.set()
        interrupter.join(30)
        helper.join(60)
    r = shell.user_ns["cut"]
    assert r.finish_reason == "interrupted" and r.record.batch["size"] == 2 and 0 < len(r.token_ids) < 2000
    other[0].cancel()
    assert other[0].wait(120) and other[0].finish_reason == "cancelled"  # the other row went on until told
    assert scheduler.batch_sizes[before:] == [2]
    alone = model.generate(PROMPTS[0], temperature=0, max_new_tokens=len(r.token_ids))
    assert model.loaded and alone.token_ids == r.token_ids  # the model stays, and answers


def test_a_sweep_beside_other_callers_joins_their_batch(model: Engine) -> None:
    prompts = [model.prompt_for(p) for p in PROMPTS[:2]]
    alone = [model.generate(p, temperature=0, max_new_tokens=10).text for p in PROMPTS[:3]]
    scheduler = model.scheduler
    before = len(scheduler.batch_sizes)
    rows = model.generate_batch(prompts, {"temperature": 0, "max_new_tokens": 10})  # alone: its own batch, as before
    assert [r.text for r in rows] == alone[:2] and len(scheduler.batch_sizes) == before
    out = _together([lambda: model.generate_batch(prompts, {"temperature": 0, "max_new_tokens": 10}),
                     lambda: scheduler.stream(PROMPTS[2], temperature=0, max_new_tokens=10).text], scheduler, queued=3)
    assert [r.text for r in out[0]] == alone[:2] and out[1] == alone[2]
    assert scheduler.batch_sizes[before:] == [3]
    assert {r.record.batch["size"] for r in out[0]} == {3}
