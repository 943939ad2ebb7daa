"""The shared streaming helpers: windowed detokenization, stop-string hold-back, the worker thread."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbllm.streaming import IncrementalDecoder, StopHoldback, threaded_tokens

TEXTS = [
    "Olá, mundo! Ação e coração. 🤖🚀 ünïcödé — “quotes”",
    'def f(x):\n    return {"a": [1, 2]}\n',
    "日本語のテキスト and emoji 👩‍👩‍👧",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_whole_decoding_and_never_breaks_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = lambda xs: tokenizer.decode(xs, skip_special_tokens=True)  # noqa: E731
    dec = IncrementalDecoder(decode, context=tokenizer("Prompt:", add_special_tokens=True)["input_ids"])
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_decodes_small_windows_only(tokenizer):
    """Each step decodes a bounded window, not the whole output (which would be quadratic)."""
    ids = tokenizer("word " * 400, add_special_tokens=False)["input_ids"]
    longest = 0

    def decode(xs):
        nonlocal longest
        longest = max(longest, len(xs))
        return tokenizer.decode(xs, skip_special_tokens=True)

    dec = IncrementalDecoder(decode)
    text = "".join(dec.add(t) for t in ids) + dec.flush()
    assert text == "word " * 400
    assert len(ids) > 300 and longest <= 8


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tokenizer):
    ids = tokenizer("🤖", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level: the emoji spans several tokens
    dec = IncrementalDecoder(lambda xs: tokenizer.decode(xs))
    assert [dec.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.flush() == "\ufffd"


def _run_holdback(stops, chunks):
    h = StopHoldback(stops)
    out = "".join(h.feed(c) for c in chunks) + h.flush()
    return out, h.stopped


def test_stop_string_split_across_chunks_is_never_shown():
    out, stopped = _run_holdback(["###"], ["Answer: 4", "#", "#", "# more"])
    assert (out, stopped) == ("Answer: 4", True)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    h = StopHoldback(["</end>"])
    assert h.feed("a </e") == "a "
    assert h.feed("xtra") == "</extra"
    assert h.flush() == "" and not h.stopped


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab#</>x\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab#</>", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_holdback_output_is_the_text_cut_at_the_first_stop_for_any_chunking(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    firsts = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(firsts)] if firsts else text
    out, stopped = _run_holdback(stops, chunks)
    assert out == expected
    assert stopped == bool(firsts)


@pytest.mark.timeout(60)
def test_worker_exception_is_raised_in_the_consumer_not_a_hang():
    def run(emit):
        emit(1)
        emit(2)
        raise RuntimeError("boom in generate")

    got = []
    with pytest.raises(RuntimeError, match="boom in generate"):  # a hang would end at the test's timeout instead
        for t in threaded_tokens(run, threading.Event()):
            got.append(t)
    assert got == [1, 2]


def test_closing_the_consumer_cancels_and_waits_for_the_worker():
    cancel = threading.Event()
    finished = threading.Event()

    def run(emit):
        i = 0
        while not cancel.is_set():
            emit(i)
            i += 1
            time.sleep(0.001)
        finished.set()

    tokens = threaded_tokens(run, cancel)
    assert [next(tokens) for _ in range(3)] == [0, 1, 2]
    tokens.close()
    assert cancel.is_set() and finished.is_set()


def test_normal_end_does_not_set_cancel():
    cancel = threading.Event()
    assert list(threaded_tokens(lambda emit: [emit(i) for i in range(3)], cancel)) == [0, 1, 2]
    assert not cancel.is_set()


def test_a_stop_found_inside_a_longer_stop_still_being_written_waits_for_it():
    # hypothesis found it: '<' was cut at once although '><<', which begins earlier, was still being written
    assert _run_holdback(["<", "><<"], ["><", "<"]) == ("", True)
    assert _run_holdback(["<", "><<"], ["><", "x"]) == (">", True)
    h = StopHoldback(["<", "><<"])
    assert (h.feed("><"), h.flush(), h.stopped) == ("", ">", True)  # the end of the text settles it
