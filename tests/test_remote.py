"""The remote loader against a real OpenAI-compatible server: llama-cpp-python's own
(``python -m llama_cpp.server``) serving the built-in GGUF on 127.0.0.1.

Replies of the built-in random model hold bytes that are not UTF-8; nbllm shows each as U+FFFD, the
server drops them, so texts are compared without U+FFFD (:func:`visible`).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm.errors import GenerationError, LoadError, NbllmWarning, OptionError
from nbllm.loaders import Request
from nbllm.loaders.openai import SERVERS, OpenAILoader, identify, request_body
from nbllm.options import GenerationOptions, LoadOptions

try:
    from servers import CountingProxy, LlamaCppServer, SilentServer, free_port
except ImportError:  # tests/ imported as a package
    from tests.servers import CountingProxy, LlamaCppServer, SilentServer, free_port

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")  # llama-cpp-python's server extra
pytest.importorskip("sse_starlette")

pytestmark = pytest.mark.llamacpp

PROMPTS = ["Hello there", "Once upon a time", "The quick brown fox"]


def visible(text: str) -> str:
    return text.replace("\ufffd", "")


@pytest.fixture(autouse=True)
def _empty_engine(engine: Any) -> None:
    """Every test starts and ends with nothing loaded."""


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[LlamaCppServer]:
    """One llama-cpp-python server for the tests that leave it as it was."""
    s = LlamaCppServer(tiny_gguf)
    yield s
    s.stop()


@pytest.fixture
def own_server(tiny_gguf: Path) -> Iterator[LlamaCppServer]:
    """A server of the test's own (killed, or left busy, by it)."""
    s = LlamaCppServer(tiny_gguf)
    yield s
    s.stop()


# -------------------------------------------------------------------------------------------- invariants
def test_greedy_through_the_server_equals_the_llama_cpp_loader(shell: Any, server: LlamaCppServer,
                                                                tiny_gguf: Path, capsys: Any) -> None:
    shell.run_line_magic("llm_load", server.url)
    out = capsys.readouterr().out
    assert "Loaded tiny with openai" in out and f"served by llama-cpp-python at {server.url}" in out
    remote = {}
    for prompt in PROMPTS:
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 32 -o r", prompt)
        remote[prompt] = shell.user_ns["r"]
    record = remote[PROMPTS[0]].record.to_dict()

    shell.run_line_magic("llm_load", str(tiny_gguf))
    for prompt in PROMPTS:
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 32 -o r", prompt)
        local = shell.user_ns["r"]
        assert local.finish_reason == remote[prompt].finish_reason == "length"
        assert len(visible(local.text).strip()) > 10
        assert visible(remote[prompt].text) == visible(local.text), prompt

    assert record["loader"] == "openai" and record["mode"] == "raw" and record["prompt"] == PROMPTS[0]
    assert record["model"] == {"name": "tiny", "format": "openai", "url": server.url, "model_id": "tiny",
                               "server": "llama-cpp-python", "finish_reason": "length",
                               "completion_tokens_counted": "max_tokens (the server ended the reply at that limit)"}
    assert remote[PROMPTS[0]].completion_tokens == 32  # the server streams no usage
    assert record["generation_options"]["temperature"] == 0 and record["seed"] == remote[PROMPTS[0]].seed
    assert record["load_options"]["api_key_env"] == "OPENAI_API_KEY"
    assert set(record["versions"]) == {"python", "nbllm", "httpx"}


def test_chat_goes_to_the_chat_endpoint_and_the_conversation_goes_on(shell: Any, server: LlamaCppServer,
                                                                     capsys: Any) -> None:
    nbllm.load(server.url)
    shell.run_cell_magic("llm_chat", "remote --system 'Be brief.' --temperature 0 --max-new-tokens 16 -o a", "Hi there")
    shell.run_cell_magic("llm_chat", "remote --temperature 0 --max-new-tokens 16 -o b", "And then?")
    out = capsys.readouterr().out
    assert "note:" not in out  # the server renders the chat with the model's template: no fallback note
    a, b = shell.user_ns["a"], shell.user_ns["b"]
    assert visible(a.text).strip() and visible(b.text).strip()
    assert b.record.mode == "chat" and b.record.conversation == {"name": "remote", "turn": 2}
    assert b.record.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": a.text},
        {"role": "user", "content": "And then?"},
    ]
    # the same question as a raw prompt through the chat template is not the chat endpoint's reply
    raw = nbllm.generate("Hi there", temperature=0, max_new_tokens=16)
    chat = nbllm.generate("Hi there", temperature=0, max_new_tokens=16, chat=True)
    assert visible(raw.text) != visible(chat.text)


def test_a_seeded_sampled_reply_is_the_same_twice_and_a_recorded_seed_replays(server: LlamaCppServer) -> None:
    nbllm.load(server.url)
    sampled = {"temperature": 0.9, "top_k": 40, "repetition_penalty": 1.2, "max_new_tokens": 24}
    a = nbllm.generate("Once upon a time", seed=7, **sampled)
    b = nbllm.generate("Once upon a time", seed=7, **sampled)
    c = nbllm.generate("Once upon a time", seed=8, **sampled)
    assert visible(a.text) and a.text == b.text and a.text != c.text
    drawn = nbllm.generate("Once upon a time", **sampled)  # no seed: one is drawn and recorded
    replay = nbllm.generate("Once upon a time", seed=drawn.record.seed, **sampled)
    assert replay.text == drawn.text


def test_stop_closes_the_stream_and_keeps_the_partial_text(server: LlamaCppServer) -> None:
    nbllm.load(server.url)
    result = nbllm.stream("Once upon a time", temperature=0, max_new_tokens=24)
    pieces: list[str] = []
    first, stopped = threading.Event(), threading.Event()

    def read() -> None:  # the chat panel's way: another thread reads, Stop cancels
        for piece in result:
            pieces.append(piece)
            first.set()
            stopped.wait(30)

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(60)
    result.cancel()
    stopped.set()
    reader.join(30)
    assert not reader.is_alive()
    assert result.finish_reason == "cancelled" and result.interrupted
    assert pieces and result.text == "".join(pieces) and len(pieces) < 24
    # the model stays usable
    assert nbllm.generate("Hello there", temperature=0, max_new_tokens=4).finish_reason == "length"


# -------------------------------------------------------------------------------------------- bad input
def test_unreachable_server_is_one_line_and_the_previous_model_stays(shell: Any, tiny_gguf: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic("llm_load", url)
    assert str(caught.value) == (f"cannot reach the server at {url} (connection refused). Start the server, or "
                                 "check the host and port in the URL.")
    nbllm.load(tiny_gguf)
    with pytest.raises(LoadError, match=rf"cannot reach the server at {url} .*\({tiny_gguf.name} is loaded again\)"):
        nbllm.load(url)
    assert nbllm.status().loader == "llama.cpp"


def test_a_server_that_never_answers_times_out(shell: Any) -> None:
    silent = SilentServer()
    try:
        with pytest.raises(UsageError) as caught:
            shell.run_line_magic("llm_load", f"{silent.url} --timeout 0.5")
        assert str(caught.value) == (f"the server at {silent.url} did not answer within 0.5 s. Check that it is "
                                     "running and not overloaded, or allow more time with --timeout.")
    finally:
        silent.stop()


def test_the_server_killed_mid_reply_keeps_the_partial_text(shell: Any, own_server: LlamaCppServer) -> None:
    shell.run_line_magic("llm_load", own_server.url)
    result = nbllm.stream("Once upon a time", temperature=0, max_new_tokens=1500)
    shell.user_ns["r"] = result
    pieces = iter(result)
    first = next(pieces)
    own_server.kill()
    with pytest.raises(GenerationError) as caught:
        for _ in pieces:
            pass
    message = caught.value.message
    assert message.startswith(f"the connection to the server at {own_server.url} broke after ")
    assert message.endswith("The partial text is kept; check that the server is still running, then run the "
                            "prompt again.")
    assert "\n" not in message
    assert result.finish_reason == "error" and result.text.startswith(first) and result.text
    with pytest.raises(UsageError) as again:  # the next prompt: the server is gone
        shell.run_cell_magic("llm", "", "Hello")
    assert str(again.value).startswith(f"cannot reach the server at {own_server.url} (connection refused).")


def test_the_api_key_comes_from_the_environment_and_never_shows(shell: Any, tiny_gguf: Path, monkeypatch: Any,
                                                               capsys: Any) -> None:
    key = "sk-nbllm-" + secrets.token_hex(12)
    wrong = "sk-wrong-" + secrets.token_hex(12)
    server = LlamaCppServer(tiny_gguf, api_key=key)
    seen: list[str] = []
    try:
        monkeypatch.delenv("NBLLM_TEST_KEY", raising=False)
        with pytest.raises(UsageError) as caught:
            shell.run_line_magic("llm_load", f"{server.url} --api-key-env NBLLM_TEST_KEY")
        assert str(caught.value) == (
            f"the server at {server.url} needs an API key (401) and $NBLLM_TEST_KEY is not set. Put the key in the "
            "environment variable NBLLM_TEST_KEY before starting Jupyter, or name the variable that holds it with "
            "--api-key-env.")
        monkeypatch.setenv("NBLLM_TEST_KEY", wrong)
        with pytest.raises(UsageError) as refused:
            shell.run_line_magic("llm_load", f"{server.url} --api-key-env NBLLM_TEST_KEY")
        assert str(refused.value) == (
            f"the server at {server.url} refused the API key in $NBLLM_TEST_KEY (401: Invalid API key). Check the "
            "key in that variable, or name another with --api-key-env.")
        seen += [str(caught.value), str(refused.value)]

        monkeypatch.setenv("NBLLM_TEST_KEY", key)
        shell.run_line_magic("llm_load", f"{server.url} --api-key-env NBLLM_TEST_KEY")
        shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 8 -o r", "Hello there")
        r = shell.user_ns["r"]
        assert r.finish_reason == "length"
        status = nbllm.status()
        assert status.details["api key"] == "from $NBLLM_TEST_KEY"
        seen += [r.record.to_json(), str(status), repr(status.details), json.dumps(status.options), repr(r)]
    finally:
        server.stop()
    captured = capsys.readouterr()
    seen += [captured.out, captured.err]
    for text in seen:
        assert key not in text and wrong not in text


def test_an_unknown_model_id_lists_the_servers_models(shell: Any, server: LlamaCppServer) -> None:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic("llm_load", f"{server.url} --remote-model nope")
    assert str(caught.value) == (f"the server at {server.url} has no model 'nope'; it serves: tiny. Use "
                                 "--remote-model with one of them.")
    shell.run_line_magic("llm_load", f"{server.url} --remote-model tiny")
    assert nbllm.status().model == "tiny"


@pytest.mark.parametrize(("flag", "owner"), [("--load-in-4bit", "transformers"), ("--n-ctx 512", "llama.cpp"),
                                             ("--revision main", "transformers and llama.cpp")])
def test_a_load_option_that_means_nothing_for_a_server_is_refused(shell: Any, server: LlamaCppServer, flag: str,
                                                                 owner: str) -> None:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic("llm_load", f"{server.url} {flag}")
    assert str(caught.value).startswith(
        f"{flag.split()[0]} is a {owner} option and means nothing to the openai loader. Remove it")
    assert not nbllm.get_engine().loaded


def test_a_server_option_with_a_local_model_is_refused(shell: Any, tiny_gguf: Path) -> None:
    with pytest.raises(UsageError, match="--remote-model is a openai option and means nothing to the llama.cpp"):
        shell.run_line_magic("llm_load", f"{tiny_gguf} --remote-model x")


def test_a_url_with_a_password_is_refused_before_anything_is_sent(shell: Any) -> None:
    with pytest.raises(UsageError, match="the server URL holds a user name or password"):
        shell.run_line_magic("llm_load", "http://me:secret@127.0.0.1:1/v1")


# -------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize(("limit", "prompts"), [(2, 4), (3, 6)])
def test_generate_many_sends_up_to_max_concurrency_requests_at_once(server: LlamaCppServer, limit: int,
                                                                   prompts: int) -> None:
    proxy = CountingProxy(server.url.removesuffix("/v1"), hold_until=limit, anonymous=True)
    try:
        nbllm.load(proxy.url + "/v1", max_concurrency=limit)
        asked = [f"{PROMPTS[i % 3]} {i}" for i in range(prompts)]
        results = nbllm.generate_many(asked, temperature=0, max_new_tokens=8)
        assert proxy.peak == limit and proxy.seen == prompts  # overlapping, and never more than the limit
        assert [r.record.prompt for r in results] == asked and len({r.seed for r in results}) == prompts
        one_by_one = [nbllm.generate(p, temperature=0, max_new_tokens=8) for p in asked]
        assert [r.text for r in results] == [r.text for r in one_by_one]
    finally:
        proxy.stop()


def test_a_sweep_sends_its_rows_side_by_side_whatever_their_options(server: LlamaCppServer) -> None:
    # 2 prompts x 2 temperatures x 2 seeds: groups of 4 rows share their options; 6 in flight at once
    # proves the rows of different options overlap too
    proxy = CountingProxy(server.url.removesuffix("/v1"), hold_until=6, anonymous=True)
    try:
        nbllm.load(proxy.url + "/v1", max_concurrency=6)
        table = nbllm.sweep(PROMPTS[:2], temperature=[0, 0.8], seed=[1, 2], max_new_tokens=6, progress=False)
        assert proxy.peak == 6 and proxy.seen == 8
        assert len(table) == 8 and not table.attrs["interrupted"]
        assert [(r.prompt, r.temperature, r.seed) for r in table.itertuples()] == [
            (p, t, s) for p in PROMPTS[:2] for t in (0, 0.8) for s in (1, 2)]
        for row in table.itertuples():
            alone = nbllm.generate(row.prompt, temperature=row.temperature, seed=row.seed, max_new_tokens=6)
            assert (row.text, row.tokens, row.finish_reason) == (alone.text, alone.completion_tokens,
                                                                 alone.finish_reason)
    finally:
        proxy.stop()


def test_an_interrupted_remote_sweep_keeps_its_finished_rows(server: LlamaCppServer) -> None:
    import os
    import signal

    nbllm.load(server.url, max_concurrency=2)
    engine = nbllm.get_engine()
    finished: list[nbllm.Result] = []

    def interrupt_after_the_second(result: nbllm.Result) -> None:
        finished.append(result)
        if len(finished) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real interrupt, as the kernel sends it

    remove = engine.on_result(interrupt_after_the_second)
    try:
        with pytest.warns(NbllmWarning, match="the sweep was interrupted"):
            table = nbllm.sweep(PROMPTS, seed=[1, 2, 3, 4], temperature=0.7, max_new_tokens=48, progress=False)
    finally:
        remove()
    assert table.attrs["interrupted"] and 2 <= len(table) < 12
    assert set(table["finish_reason"]) <= {"length", "stop"}
    assert nbllm.generate("still there", max_new_tokens=2).finish_reason == "length"


def test_generate_many_on_a_local_model_runs_one_after_another(tiny_gguf: Path) -> None:
    nbllm.load(tiny_gguf)
    results = nbllm.generate_many(PROMPTS, temperature=0, max_new_tokens=8)
    assert [r.text for r in results] == [nbllm.generate(p, temperature=0, max_new_tokens=8).text for p in PROMPTS]


# -------------------------------------------------------------------------------------------- mapping (pure)
def _request(**options: Any) -> Request:
    return Request(prompt="Hi", prompt_ids=None, options=GenerationOptions(**options), seed=5, cancel=threading.Event())


def test_extra_samplers_go_under_the_name_each_server_reads() -> None:
    req = _request(temperature=0.5, top_k=0, min_p=0.1, typical_p=0.9, repetition_penalty=1.3, max_new_tokens=7)
    path, body, unsent = request_body(SERVERS["vllm"], "m", req)
    assert path == "completions" and unsent == ["typical_p"]
    assert {k: body[k] for k in ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "top_k", "min_p",
                                 "repetition_penalty")} == {
        "model": "m", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 5, "top_k": -1,
        "min_p": 0.1, "repetition_penalty": 1.3}
    assert "typical_p" not in body and "stop" not in body  # stop strings are the engine's
    _, body, unsent = request_body(SERVERS["llama-cpp-python"], "m", req)
    assert body["repeat_penalty"] == 1.3 and "repetition_penalty" not in body and body["top_k"] == 0
    assert unsent == ["typical_p"]
    _, body, unsent = request_body(SERVERS["llama.cpp"], "m", req)
    assert (body["repeat_penalty"], body["typical_p"], unsent) == (1.3, 0.9, [])
    path, body, unsent = request_body(SERVERS["ollama"], "m", req)  # its own API reads every sampler
    assert (path, unsent, body["raw"]) == ("api/generate", [], True)
    assert body["options"] == {"num_predict": 7, "temperature": 0.5, "seed": 5, "top_p": 0.9, "top_k": 0,
                               "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.3, "repeat_last_n": -1}
    chat = _request(temperature=0.5, min_p=0.1, repetition_penalty=1.3)
    chat.messages = [{"role": "user", "content": "Hi"}]
    _, body, unsent = request_body(SERVERS["tgi"], "m", chat)  # TGI's chat endpoint reads no extra sampler
    assert unsent == ["min_p", "repetition_penalty"] and "min_p" not in body and "repetition_penalty" not in body
    _, body, unsent = request_body(SERVERS["tgi"], "m", req)  # its /v1/completions reads repetition_penalty
    assert body["repetition_penalty"] == 1.3 and unsent == ["min_p", "typical_p"]
    _, body, _ = request_body(SERVERS["unknown"], "m", req)
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.3
    # defaults are always sent where read: a server's own (repeat_penalty 1.1) never applies unasked
    _, body, unsent = request_body(SERVERS["llama-cpp-python"], "m", _request())
    assert (body["repeat_penalty"], body["top_k"], body["min_p"], unsent) == (1.0, 0, 0.0, [])
    # greedy: samplers a server does not read make no note (they would do nothing)
    with pytest.warns(NbllmWarning, match="greedy"):
        greedy = _request(temperature=0, top_k=5)
    assert request_body(SERVERS["tgi"], "m", greedy)[2] == []


def test_chat_requests_carry_messages_and_continue_the_last_reply() -> None:
    req = _request()
    req.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    req.continue_final = True
    path, body, _ = request_body(SERVERS["vllm"], "m", req)
    assert path == "chat/completions" and body["messages"] == req.messages and "prompt" not in body
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert "max_completion_tokens" in request_body(SERVERS["openai"], "m", req)[1]


def test_the_server_kind_comes_from_what_it_says_of_itself() -> None:
    def probe(answers: dict[str, Any]) -> Any:
        return lambda path: answers.get(path)

    assert identify("vllm", probe({"version": {"version": "0.9.2"}}), "h") == ("vllm", "0.9.2")
    assert identify("llamacpp", probe({"props": {"build_info": "b5000"}}), "h") == ("llama.cpp", "b5000")
    assert identify("me", probe({}), "h") == ("llama-cpp-python", None)
    assert identify("sglang", probe({}), "h") == ("sglang", None)
    assert identify("library", probe({"api/version": {"version": "0.6.1"}}), "h") == ("ollama", "0.6.1")
    assert identify("x", probe({"info": {"model_id": "m", "version": "3.0"}}), "h") == ("tgi", "3.0")
    assert identify("x", probe({"v1/internal/model/info": {"model_name": "m"}}), "h") == ("text-generation-webui", None)
    assert identify("nbllm", probe({"version": {"server": "nbllm", "version": "0.1.0"}}), "h") == ("nbllm", "0.1.0")
    assert identify("system", probe({}), "api.openai.com") == ("openai", None)
    assert identify("x", probe({}), "h") == ("unknown", None)


def test_urls_are_claimed_as_api_base_urls() -> None:
    opts = LoadOptions()
    assert OpenAILoader.claim("./models/x.gguf", opts) is None
    source = OpenAILoader.claim("http://Host:8000", opts)
    assert source is not None and (source.url, source.format, source.model_id) == ("http://Host:8000/v1", "openai", None)
    source = OpenAILoader.claim("https://h/api/v1/", LoadOptions(remote_model="m"))
    assert source is not None and (source.url, source.name, source.model_id) == ("https://h/api/v1", "m", "m")
    with pytest.raises(OptionError, match="has a query"):
        OpenAILoader.claim("http://h/v1?key=1", opts)
