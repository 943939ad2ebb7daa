"""Token log-probabilities, scoring, perplexity and evaluation of a model at a server: llama-cpp-python's own
server (``python -m llama_cpp.server``) serving the built-in GGUF on 127.0.0.1, each against the same GGUF
loaded here through the llama.cpp loader (same library, same default f16 KV cache: equal within float
tolerance)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbllm
from nbllm.errors import NbllmError
from nbllm.scoring import _windows

try:
    from servers import LlamaCppServer
except ImportError:  # tests/ imported as a package
    from tests.servers import LlamaCppServer

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")  # llama-cpp-python's server extra
pytest.importorskip("sse_starlette")

pytestmark = pytest.mark.llamacpp

PROMPT = "Once upon a time"
CONTEXT = "The capital of France is"
CHOICES = [" Paris", " Lyon", " Rome of old"]
TEXT = ("The quick brown fox jumps over the lazy dog. A second sentence follows the first one, and a third "
        "one follows that, so that the text is longer than a few windows.")


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[LlamaCppServer]:
    s = LlamaCppServer(tiny_gguf)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _empty_engine(engine: Any) -> None:
    """Every test starts and ends with nothing loaded."""


def _local(tiny_gguf: Path, work: Any) -> Any:
    """``work(engine)`` run on the same GGUF loaded here through the llama.cpp loader."""
    engine = nbllm.get_engine()
    engine.load(tiny_gguf)
    return work(engine)


def test_logprobs_at_the_server_equal_the_llama_cpp_loaders(engine: Any, server: LlamaCppServer,
                                                             tiny_gguf: Path) -> None:
    engine.load(server.url)
    remote = engine.generate(PROMPT, temperature=0, max_new_tokens=12, logprobs=3)
    entries = list(remote.tokens)
    assert remote.record.logprobs == entries  # all in the record
    # llama-cpp-python's server goes on past max_tokens while the text ends inside a UTF-8 character (this
    # random model's reply does): one entry per token it made, 12 or a few more
    assert 12 <= len(entries) <= 15
    local = _local(tiny_gguf, lambda e: e.generate(PROMPT, temperature=0, max_new_tokens=12, logprobs=3))
    entries = entries[:12]
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in local.tokens], abs=1e-3)
    for got, want in zip(entries, local.tokens, strict=True):
        assert got["id"] is None  # a server names tokens by text
        # the server keys alternatives by text: those of one text (bytes of a character, all '') come as one
        assert 1 <= len(got["top"]) <= 3 and got["top"][0][2] == pytest.approx(want["top"][0][2], abs=1e-3)
        for _t, _i, lp in got["top"]:
            assert min(abs(lp - w) for _w, _j, w in want["top"]) < 1e-3
    frame = remote.tokens.frame()
    assert list(frame["logprob"]) == [e["logprob"] for e in remote.tokens] and (frame["rank"] == 1).all()  # greedy
    assert remote.tokens.html().count("class='nbllm-token'") == len(remote.tokens)


def test_chat_logprobs_at_the_server(engine: Any, server: LlamaCppServer) -> None:
    engine.load(server.url)
    r = engine.generate("Hi", chat=True, temperature=0, max_new_tokens=5, logprobs=2)
    assert len(r.tokens) == 5 and all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in r.tokens)
    assert all(e["top"][0][2] >= e["logprob"] - 1e-6 for e in r.tokens)  # greedy: the drawn token is the most likely


def test_after_the_samplers_is_refused_at_a_server_in_one_line(engine: Any, server: LlamaCppServer) -> None:
    engine.load(server.url)
    with pytest.raises(NbllmError, match="not those after the samplers"):
        engine.generate(PROMPT, max_new_tokens=3, logprobs=2, logprobs_after_samplers=True)
    assert engine.loaded and engine.generate(PROMPT, temperature=0, max_new_tokens=2).text is not None


def test_score_at_the_server_equals_the_llama_cpp_loaders(engine: Any, server: LlamaCppServer, shell: Any,
                                                           tiny_gguf: Path) -> None:
    engine.load(server.url)
    remote = nbllm.score(CONTEXT, CHOICES)
    shell.run_cell_magic("llm", "--choices ' Paris| Lyon' -o s", CONTEXT)  # the cell form too
    cell = shell.user_ns["s"]
    assert [c.logprob for c in cell] == pytest.approx([c.logprob for c in remote][:2], abs=1e-6)
    local = _local(tiny_gguf, lambda e: nbllm.score(CONTEXT, CHOICES))
    for got, want in zip(remote, local, strict=True):
        assert got.token_ids == want.token_ids and got.tokens == want.tokens
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-3)
        assert got.is_greedy == want.is_greedy
    assert [c.continuation for c in remote.ranked()] == [c.continuation for c in local.ranked()]
    assert remote.record is not None and remote.record.loader == "openai"


def test_perplexity_at_the_server_leaves_out_only_the_first_token(engine: Any, server: LlamaCppServer,
                                                                   tiny_gguf: Path) -> None:
    """llama-cpp-python's echo gives null for a prompt's first token, and the server puts its BOS before every
    prompt: the server's perplexity is the guide's sliding-window method over every token but the first, each
    window after a BOS, its numbers those of the local loader on the same windows."""
    engine.load(server.url)
    remote = nbllm.perplexity(TEXT, max_length=16, stride=8, progress=False)

    def expected(e: Any) -> tuple[float, int]:
        with e.model_held() as loader:
            ids = loader.tokenize(TEXT, add_special=True)
            total = counted = 0.0
            for begin, end, targets in _windows(len(ids), 16, 8):
                first = max(1, end - begin - targets)
                skip = 1 if first == 1 else 0  # the first window: the text's first token is not scored
                bos = [] if begin == 0 else ids[:1]  # the server's BOS before a window inside the text
                got = loader.token_scores([bos + ids[begin:end]], [first + skip + len(bos)])[0]
                weight = targets - 1 - skip
                total += -sum(got.logprobs) / len(got.logprobs) * weight
                counted += weight
        return total / counted, int(counted)

    nll, counted = _local(tiny_gguf, expected)
    assert remote.windows > 2 and remote.scored == counted
    assert remote.nll == pytest.approx(nll, abs=1e-4) and remote.perplexity == pytest.approx(math.exp(nll), rel=1e-4)


def test_evaluate_a_multiple_choice_task_at_the_server(engine: Any, server: LlamaCppServer, tiny_gguf: Path,
                                                      tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    import json

    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": 0}) for q, c in [
        ("The capital of France is", [" Paris", " Lyon"]), ("Water is", [" wet", " dry"])]))
    (tmp_path / "nbllm_remote_mc.yaml").write_text(f"""task: nbllm_remote_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    engine.load(server.url)
    remote = nbllm.evaluate("nbllm_remote_mc", include_path=tmp_path)
    local = _local(tiny_gguf, lambda e: nbllm.evaluate("nbllm_remote_mc", include_path=tmp_path))

    def lls(result: Any) -> list[float]:
        samples = sorted(result.sample_rows["nbllm_remote_mc"], key=lambda s: s["doc_id"])
        return [float(r[0]) for s in samples for r in s["filtered_resps"]]

    assert lls(remote) == pytest.approx(lls(local), abs=1e-3) and len(lls(remote)) == 4


def test_streamed_logprobs_of_both_forms_keep_the_k_most_likely() -> None:
    """A server adds the drawn token to its alternatives when it is not among the K most likely: left out."""
    from nbllm.loaders._remote_scores import entries

    legacy = {"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.5, -3.0],
                           "top_logprobs": [{"a": -0.5, "c": -1.5}, {"d": -0.2, "e": -1.0, "b": -3.0}]}}
    assert entries(legacy, 2, chat=False) == [
        {"id": None, "token": "a", "logprob": -0.5, "top": [["a", None, -0.5], ["c", None, -1.5]]},
        {"id": None, "token": "b", "logprob": -3.0, "top": [["d", None, -0.2], ["e", None, -1.0]]}]
    chat = {"logprobs": {"content": [{"token": "x", "logprob": -0.1, "bytes": [120],
                                      "top_logprobs": [{"token": "x", "logprob": -0.1}, {"token": "y", "logprob": -2.5}]}]}}
    assert entries(chat, 1, chat=True) == [{"id": None, "token": "x", "logprob": -0.1, "top": [["x", None, -0.1]]}]
    assert entries({"logprobs": None}, 3, chat=False) == [] and entries({}, 3, chat=True) == []


@pytest.mark.parametrize("kind", ["nbllm", "ollama", "tgi"])
def test_a_server_without_streamed_logprobs_is_one_line(kind: str) -> None:
    from nbllm.loaders._remote_scores import NO_STREAMED_LOGPROBS
    from nbllm.loaders.openai import SERVERS, OpenAILoader
    from nbllm.scoring import _scorer
    from nbllm.tokens import logprobs_refusal

    loader = OpenAILoader()
    loader.kind = SERVERS[kind]
    loader.logprobs_why = NO_STREAMED_LOGPROBS[kind]  # what load() sets for that kind of server
    why, fix = logprobs_refusal(loader)
    assert why == NO_STREAMED_LOGPROBS[kind] and "drop --logprobs" in fix
    with pytest.raises(NbllmError, match=f"{SERVERS[kind].label} gives nbllm no log-probabilities of given tokens"):
        _scorer(loader)


def test_scoring_at_a_server_that_went_away_is_one_line(engine: Any, tiny_gguf: Path) -> None:
    gone = LlamaCppServer(tiny_gguf)
    try:
        engine.load(gone.url)
    finally:
        gone.stop()
    with pytest.raises(NbllmError, match=f"the request to the server at {gone.url} failed"):
        nbllm.score(CONTEXT, CHOICES)
    assert engine.loaded
