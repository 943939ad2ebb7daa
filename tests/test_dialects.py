"""The remote loader against each server's dialect (``dialects.py``: vLLM, SGLang, TGI, llama.cpp's
llama-server, Ollama, text-generation-webui, each reproduced from its source), and against the real
llama-cpp-python server where its own behaviour is the point (``servers.py``)."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm.errors import GenerationError, LoadError, NbllmWarning, OptionError

try:
    from dialects import DIALECTS, DialectServer
    from servers import LlamaCppServer, free_port
except ImportError:  # tests/ imported as a package
    from tests.dialects import DIALECTS, DialectServer
    from tests.servers import LlamaCppServer, free_port

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(autouse=True)
def _empty_engine(engine: Any) -> None:
    """Every test starts and ends with nothing loaded."""


@pytest.fixture
def dialect_server(request: Any) -> Iterator[DialectServer]:
    server = DialectServer(request.param)
    yield server
    server.stop()


def served(dialect: str, **kwargs: Any) -> DialectServer:
    return DialectServer(dialect, **kwargs)


# ------------------------------------------------------------------------------------------ every dialect
@pytest.mark.parametrize("dialect_server", DIALECTS, indirect=True)
def test_each_server_is_recognized_and_answers_raw_prompts_and_chats(dialect_server: DialectServer) -> None:
    name = dialect_server.dialect
    nbllm.load(dialect_server.url)
    status = nbllm.status()
    assert status.details["server"].split()[0] == name
    raw = nbllm.generate("Hello there", temperature=0, max_new_tokens=5)
    assert (raw.text, raw.finish_reason) == ("w0 w1 w2 w3 w4 ", "length")
    chat = nbllm.generate([{"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=3)
    assert chat.text == "w0 w1 w2 " and chat.record.mode == "chat"
    path, body = dialect_server.requests[-1]
    assert path == ("/api/chat" if name == "ollama" else "/v1/chat/completions")
    # a greedy request carries none of the samplers greedy decoding ignores (servers check them anyway)
    sent = body.get("options", body)
    assert not {"top_p", "top_k", "min_p", "typical_p"} & set(sent) or name == "ollama"
    if name == "text-generation-webui":  # it sends no usage (here): a reply at the limit is max_tokens long...
        assert (raw.completion_tokens, raw.prompt_tokens) == (5, None)
        assert raw.record.model["completion_tokens_counted"].startswith("max_tokens")
        ended = nbllm.generate("Go [eos]", temperature=0, max_new_tokens=5)  # ...another one's count is unknown
        assert ended.completion_tokens is None and ended.timings.decode_tokens_per_second is None
        assert "tokens: unknown" in ended.summary() and ended.text == "w0 w1 w2 "
    else:
        assert (raw.completion_tokens, raw.prompt_tokens) == (5, 2)


@pytest.mark.parametrize("dialect_server", DIALECTS, indirect=True)
def test_a_sampled_reply_sends_every_sampler_the_server_reads_and_the_record_is_true(
        dialect_server: DialectServer) -> None:
    name = dialect_server.dialect
    nbllm.load(dialect_server.url)
    opts = {"temperature": 0.8, "top_p": 0.95, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
            "max_new_tokens": 4, "seed": 11}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nbllm.generate("Once upon a time", **opts)
    notes = [str(w.message) for w in caught if issubclass(w.category, NbllmWarning)]
    path, body = dialect_server.requests[-1]
    expected = {
        "vllm": {"top_p": 0.95, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2},
        "sglang": {"top_p": 0.95, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2},
        "tgi": {"top_p": 0.95, "repetition_penalty": 1.2},  # its /v1/completions reads repetition_penalty
        "llama.cpp": {"top_p": 0.95, "top_k": 5, "min_p": 0.05, "repeat_penalty": 1.2, "repeat_last_n": -1},
        "text-generation-webui": {"top_p": 0.95, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2},
        "ollama": {"top_p": 0.95, "top_k": 5, "min_p": 0.05, "repeat_penalty": 1.2, "repeat_last_n": -1,
                   "temperature": 0.8, "seed": 11, "num_predict": 4},
    }[name]
    sent = body["options"] if name == "ollama" else body
    assert {k: sent.get(k) for k in expected} == expected
    if name == "ollama":  # through its own API (its OpenAI layer reads no top_k, min_p or repeat_penalty)
        assert path == "/api/generate" and body["raw"] is True
    if name == "tgi":  # TGI reads no top_k or min_p: said once each, not sent, not pretended
        assert notes == ["the tgi server does not read top_k; it is not sent",
                         "the tgi server does not read min_p; it is not sent"]
        assert "top_k" not in body and "min_p" not in body
    assert result.record.generation_options["top_k"] == 5


def test_sglang_ignores_the_seed_unless_deterministic_and_the_record_says_so() -> None:
    server = served("sglang")
    try:
        nbllm.load(server.url)
        with pytest.warns(NbllmWarning, match="SGLang ignores the seed unless it was started with "
                                              "--enable-deterministic-inference"):
            a = nbllm.generate("Once", temperature=0.9, seed=5, max_new_tokens=12)
        b = nbllm.generate("Once", temperature=0.9, seed=5, max_new_tokens=12)
        assert a.text != b.text  # the dialect reproduces it: the seed does not decide the draws
        assert a.record.model["seed_reproducible"] is False and b.record.model["seed_reproducible"] is False
        assert nbllm.status().details["seed"].startswith("ignored for sampled replies")
        greedy = nbllm.generate("Once", temperature=0, max_new_tokens=3)
        assert "seed_reproducible" not in greedy.record.model
        assert "repetition_penalty_applied" not in greedy.record.model
        with pytest.warns(NbllmWarning, match="SGLang accepts repetition_penalty but some of its versions and modes "
                                              "do not apply it"):
            penalized = nbllm.generate("Once", temperature=0, repetition_penalty=1.3, max_new_tokens=3)
        assert penalized.record.model["repetition_penalty_applied"] == "unverified"
        assert nbllm.status().details["repetition penalty"].startswith("sent, but may not apply")
    finally:
        server.stop()
    deterministic = served("sglang", deterministic=True)
    try:
        nbllm.load(deterministic.url)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NbllmWarning)
            a = nbllm.generate("Once", temperature=0.9, seed=5, max_new_tokens=12)
        assert a.text == nbllm.generate("Once", temperature=0.9, seed=5, max_new_tokens=12).text
        assert "seed_reproducible" not in a.record.model and "seed" not in nbllm.status().details
    finally:
        deterministic.stop()


# ------------------------------------------------------------------------------------------ ranges
def test_tgi_takes_top_p_1_as_off_and_its_own_check_would_refuse_it() -> None:
    server = served("tgi")
    try:
        refused = httpx.post(server.url + "/chat/completions", json={
            "model": server.model, "messages": [{"role": "user", "content": "Hi"}], "top_p": 1.0, "stream": True})
        assert refused.status_code == 422 and refused.json()["error"] == "`top_p` must be > 0.0 and < 1.0"
        nbllm.load(server.url)
        for temperature in (0.0, 0.7):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NbllmWarning)  # greedy: top_p has no effect
                result = nbllm.generate("Hi", temperature=temperature, top_p=1.0, max_new_tokens=3)
            assert result.finish_reason == "length" and "top_p" not in server.requests[-1][1]
    finally:
        server.stop()


@pytest.mark.parametrize(("dialect", "options", "message"), [
    ("vllm", {"temperature": 3.0}, "--temperature 3 is outside what vLLM accepts (temperature in [0, 2])"),
    ("vllm", {"top_p": 0.0}, "--top-p 0 is outside what vLLM accepts (top_p in (0, 1])"),
    ("tgi", {"top_p": 0.0}, "--top-p 0 is outside what TGI accepts (top_p in (0, 1))"),
    ("sglang", {"repetition_penalty": 2.5}, "--repetition-penalty 2.5 is outside what SGLang accepts "
                                            "(repetition_penalty in [0, 2])"),
])
def test_a_value_the_server_would_refuse_is_refused_before_sending(shell: Any, dialect: str,
                                                                   options: dict[str, Any], message: str) -> None:
    server = served(dialect)
    try:
        # the dialect itself refuses it (so this test fails if nbllm sent it)
        body = {"model": server.model, "prompt": "Hi", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, **options}
        assert httpx.post(server.url + "/completions", json=body).status_code in (400, 422)
        asked = len(server.requests)
        shell.run_line_magic("llm_load", server.url)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
        with pytest.raises(UsageError) as caught:
            shell.run_cell_magic("llm", f"{flags} --max-new-tokens 3", "Hi")
        assert str(caught.value).startswith(message + ". Give a value in that range")
        assert len(server.requests) == asked  # nothing was sent
        assert nbllm.generate("Hi", temperature=0, max_new_tokens=2).text == "w0 w1 "  # the model stays
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ how replies end
@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
def test_an_aborted_reply_is_never_a_normal_end(dialect: str) -> None:
    server = served(dialect)
    try:
        nbllm.load(server.url)
        result = nbllm.stream("Go [abort]", temperature=0, max_new_tokens=10)
        with pytest.raises(GenerationError, match="ended the reply with finish reason 'abort' after 2 pieces"):
            _ = result.text
        assert result.finish_reason == "error" and "".join(result.chunks) == "w0 w1 "
        assert result.record.model["finish_reason"] == "abort"
        assert nbllm.generate("Go", temperature=0, max_new_tokens=2).finish_reason == "length"
    finally:
        server.stop()


def test_the_model_ending_its_reply_is_eos_whatever_the_server_calls_it() -> None:
    for dialect in ("tgi", "vllm", "llama.cpp", "ollama"):
        server = served(dialect)
        try:
            nbllm.load(server.url)
            result = nbllm.generate("Go [eos]", temperature=0, max_new_tokens=10)
            assert (result.text, result.finish_reason) == ("w0 w1 w2 ", "eos"), dialect
            assert result.record.model["finish_reason"] == ("eos_token" if dialect == "tgi" else "stop")
        finally:
            server.stop()


@pytest.mark.parametrize("dialect", ["vllm", "sglang", "llama.cpp", "ollama"])
def test_reasoning_is_kept_apart_from_the_reply(dialect: str) -> None:
    server = served(dialect)
    try:
        nbllm.load(server.url)
        result = nbllm.generate([{"role": "user", "content": "Think [think]"}], temperature=0, max_new_tokens=2)
        assert (result.text, result.reasoning) == ("w0 w1 ", "hmm hmm hmm ")
        assert result.completion_tokens == 5  # the server's count includes the reasoning
        assert result.outcome()["reasoning"] == "hmm hmm hmm " and result.to_dict()["reasoning"] == "hmm hmm hmm "
    finally:
        server.stop()


def test_ollamas_error_after_the_headers_is_shown() -> None:
    # its OpenAI layer (an unrecognized Ollama is spoken to through it) writes the error as a plain JSON line
    server = served("ollama", says_what_it_is=False)
    try:
        nbllm.load(server.url)
        assert nbllm.status().details["server"] == "unknown"
        result = nbllm.stream("Go [fail]", temperature=0, max_new_tokens=10)
        with pytest.raises(GenerationError, match="stopped the reply: llama runner process has terminated"):
            _ = result.text
        assert "".join(result.chunks) == "w0 w1 "  # the text before the error is kept
    finally:
        server.stop()
    native = served("ollama")
    try:
        nbllm.load(native.url)
        with pytest.raises(GenerationError, match="stopped the reply: llama runner process has terminated"):
            nbllm.generate("Go [fail]", temperature=0, max_new_tokens=10)
    finally:
        native.stop()


@pytest.mark.parametrize("dialect", ["tgi", "text-generation-webui"])
def test_keep_alive_comments_are_no_answer_and_timeout_applies(shell: Any, dialect: str) -> None:
    server = served(dialect)
    try:
        shell.run_line_magic("llm_load", f"{server.url} --timeout 0.5")
        result = nbllm.stream("Wait [stall]", temperature=0, max_new_tokens=10)
        with pytest.raises(GenerationError) as caught:
            _ = result.text
        assert caught.value.message.startswith(f"the server at {server.url} sent nothing of the reply for 0.5 s "
                                               "after 1 pieces of the reply (keep-alive pings are no answer)")
        assert result.text == "w0 " and result.finish_reason == "error"
        assert nbllm.generate("Go", temperature=0, max_new_tokens=2).text == "w0 w1 "
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ small things
def test_continuing_a_reply_uses_each_servers_own_field() -> None:
    fields = {"sglang": {"continue_final_message": True}, "text-generation-webui": {"continue_": True},
              "vllm": {"continue_final_message": True, "add_generation_prompt": False}, "llama.cpp": {}}
    for dialect, expected in fields.items():
        server = served(dialect)
        try:
            nbllm.load(server.url)
            conversation = nbllm.Conversation()
            assert conversation.send("Hi", temperature=0, max_new_tokens=2).text == "w0 w1 "
            assert conversation.reply(continue_=True, temperature=0, max_new_tokens=2).text
            body = server.requests[-1][1]
            assert {k: body[k] for k in ("continue_final_message", "add_generation_prompt", "continue_")
                    if k in body} == expected, dialect
        finally:
            server.stop()


def test_a_server_answering_version_is_not_taken_for_vllm() -> None:
    from nbllm.loaders.openai import identify

    assert identify("someone", lambda path: {"version": "1.2"} if path == "version" else None, "h") == ("unknown", None)
    assert identify("vllm", lambda path: {"version": "0.11.0"}, "h") == ("vllm", "0.11.0")


def test_a_failed_load_after_a_failed_restore_says_the_previous_model_is_gone(tiny_gguf: Path,
                                                                             tmp_path: Path) -> None:
    copy = tmp_path / "gone.gguf"
    shutil.copy(tiny_gguf, copy)
    nbllm.load(copy)
    copy.unlink()  # it cannot be loaded again
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LoadError) as caught:
        nbllm.load(url)
    assert caught.value.message.startswith(f"cannot reach the server at {url} (connection refused) (and gone.gguf, "
                                           "the model loaded before, could not be loaded again: no model is "
                                           "loaded now).")
    assert not nbllm.get_engine().loaded


def test_options_a_server_would_refuse_are_checked_before_any_request_pure() -> None:
    import threading

    from nbllm.loaders import Request
    from nbllm.loaders.openai import SERVERS, request_body
    from nbllm.options import GenerationOptions

    def req(**options: Any) -> Request:
        return Request(prompt="Hi", prompt_ids=None, options=GenerationOptions(**options), seed=1,
                       cancel=threading.Event())

    with pytest.raises(OptionError, match="outside what vLLM accepts"):
        request_body(SERVERS["vllm"], "m", req(temperature=2.5))
    assert request_body(SERVERS["vllm"], "m", req(temperature=2.0))[1]["temperature"] == 2.0
    with pytest.warns(NbllmWarning, match="greedy"):
        greedy = req(temperature=0, top_p=0.0)
    assert "top_p" not in request_body(SERVERS["vllm"], "m", greedy)[1]  # greedy: left out, not refused
    assert "top_p" not in request_body(SERVERS["tgi"], "m", req(top_p=1.0))[1]
    assert request_body(SERVERS["llama.cpp"], "m", req())[1]["repeat_last_n"] == -1


# ------------------------------------------------------------------------------------------ the real server
@pytest.mark.llamacpp
def test_a_sweep_at_a_default_llama_cpp_python_server_keeps_every_row(tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette")
    server = LlamaCppServer(tiny_gguf, interrupt_requests=True)  # its default: a new request cuts the running one
    try:
        nbllm.load(server.url, max_concurrency=4)
        assert nbllm.status().details["requests"].startswith("one at a time (the server runs one")
        table = nbllm.sweep(["Hello there", "Once upon a time"], seed=[1, 2, 3], temperature=0.8,
                            max_new_tokens=12, progress=False)
        assert len(table) == 6 and not table.attrs["interrupted"]
        assert set(table["finish_reason"]) <= {"length", "eos"}
        results = nbllm.generate_many(["a", "b", "c"], temperature=0, max_new_tokens=6)
        assert [r.finish_reason for r in results] == ["length"] * 3
    finally:
        server.stop()


@pytest.mark.llamacpp
def test_token_counts_without_usage_come_from_the_servers_tokenizer() -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette")
    from nbllm.testing import real_model_gguf

    model = real_model_gguf()
    server = LlamaCppServer(model, alias="smollm2")
    try:
        nbllm.load(server.url)  # llama-cpp-python's server streams no usage
        remote = nbllm.generate("The capital of Portugal is", temperature=0, max_new_tokens=24)
        assert remote.record.model["completion_tokens_counted"].startswith("by the server's tokenizer")
        nbllm.load(model)
        local = nbllm.generate("The capital of Portugal is", temperature=0, max_new_tokens=24)
        assert remote.text == local.text and remote.text.startswith(" Lisbon")
        assert remote.completion_tokens == local.completion_tokens
    finally:
        server.stop()


def test_the_magic_shows_the_reasoning_apart_from_the_reply(shell: Any, capsys: Any) -> None:
    server = served("vllm")
    try:
        shell.run_line_magic("llm_load", server.url)
        capsys.readouterr()
        shell.run_cell_magic("llm_chat", "think --temperature 0 --max-new-tokens 2 -o r", "Why? [think]")
        out = capsys.readouterr().out
        assert out.startswith("w0 w1 ") and out.rstrip().endswith("[reasoning]\nhmm hmm hmm")
        assert shell.user_ns["r"].text == "w0 w1 "
    finally:
        server.stop()


def test_pieces_that_came_at_once_give_no_speed_rather_than_a_wrong_one() -> None:
    server = served("vllm")
    try:
        nbllm.load(server.url)
        burst = nbllm.generate("Go [burst]", temperature=0, max_new_tokens=40)
        assert (burst.text, burst.completion_tokens) == ("".join(f"w{i} " for i in range(40)), 40)
        assert burst.timings.decode_tokens_per_second is None and "tok/s" not in burst.summary()
    finally:
        server.stop()
