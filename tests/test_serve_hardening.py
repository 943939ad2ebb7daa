"""``%llm_serve`` against what a client or a web page may send: every field checked with the API's types,
a reply cut short never passing for a whole one, a keyless server closed to web pages, and a cell
waiting behind a served request saying so. Real server, real HTTP clients (httpx, urllib)."""

from __future__ import annotations

import io
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
import nbllm.loaders
from nbllm.engine import Engine
from nbllm.frontend import command
from nbllm.serve import current, stop

try:  # the slow loader and its fixtures are test_serve's (the same served engine and server clean-up)
    from test_serve import SlowLoader, slow, stop_serving  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.test_serve import SlowLoader, slow, stop_serving  # noqa: F401

httpx = pytest.importorskip("httpx")
pytest.importorskip("pydantic")


def _post(url: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(url, content=json.dumps(body), headers={"Content-Type": "application/json", **headers},
                      timeout=60)


# ------------------------------------------------------------------------------------------- request fields
BAD_FIELDS = [
    ("completions", {"prompt": "Hi", "stop": 5}, "stop", "stop must be a string or a list of strings, not 5"),
    ("completions", {"prompt": "Hi", "stop": [1, 2]}, "stop", "stop must be a string or a list of strings, not [1, 2]"),
    ("completions", {"prompt": "Hi", "stop": {"a": 1}}, "stop", "stop must be a string or a list of strings"),
    ("completions", {"prompt": "Hi", "stop": [None]}, "stop", "stop must be a string or a list of strings, not [null]"),
    ("completions", {"prompt": "Hi", "stop": [""]}, "stop", "stop holds an empty string"),
    ("completions", {"prompt": "Hi", "max_tokens": True}, "max_tokens", "max_tokens must be an integer, not true"),
    ("completions", {"prompt": "Hi", "max_tokens": 2.5}, "max_tokens", "max_tokens must be an integer, not 2.5"),
    ("completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens", "max_tokens 0 is below 1"),
    ("completions", {"prompt": "Hi", "stream": "yes"}, "stream", 'stream must be true or false, not "yes"'),
    ("completions", {"prompt": "Hi", "temperature": "0.5"}, "temperature", 'temperature must be a number, not "0.5"'),
    ("completions", {"prompt": "Hi", "temperature": 9}, "temperature", "temperature 9.0 is above 5.0"),
    ("completions", {"prompt": "Hi", "top_p": 1.5}, "top_p", "top_p 1.5 is above 1.0"),
    ("completions", {"prompt": "Hi", "seed": -1}, "seed", "seed -1 is below 0"),
    ("completions", {"prompt": "Hi", "seed": "7"}, "seed", 'seed must be an integer, not "7"'),
    ("completions", {"prompt": "Hi", "stream_options": {"include_usage": "yes"}}, "stream_options",
     "stream_options must be an object"),
    ("completions", {"prompt": "Hi", "model": 3}, "model", "model must be a string, not 3"),
    ("completions", {"prompt": "Hi", "best_of": 2}, "best_of", "best_of is not supported by nbllm's server"),
    ("completions", {"prompt": "Hi", "n": 99}, "n", "n 99 is out of range"),
    ("completions", {}, "prompt", "prompt is missing"),
    ("completions", {"prompt": 5}, "prompt", "prompt must be a string or a list of strings"),
    ("completions", {"prompt": [[]]}, "prompt", "prompt must be a text, token ids, or a list"),
    ("completions", {"prompt": [[1, 2]]}, "prompt", "the slow loader takes no token ids"),
    ("chat/completions", {"messages": "Hi"}, "messages", "messages must be a list of messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages", "messages must be a list"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": True},
     "max_completion_tokens", "max_completion_tokens must be an integer, not true"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": 1}, "logprobs",
     "logprobs must be true or false, not 1"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages", "message 1 needs a role"),
]


def test_every_field_is_checked_with_the_apis_types_and_named_in_its_words(slow: Engine, stop_serving: None) -> None:
    server = nbllm.serve(port=0, engine=slow)
    for endpoint, body, param, message in BAD_FIELDS:
        answer = _post(f"{server.url}/{endpoint}", body)
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (400, param), (body, error)
        assert error["message"].startswith(message) and "--" not in error["message"], (body, error)
    assert SlowLoader.log == []  # none of them reached the model
    good = _post(f"{server.url}/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "stop": ["x"],
                                               "n": 1, "stream": False, "user": "someone", "unknown_field": 1})
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == "w0 w1 "


def test_a_body_that_is_not_a_json_object_is_one_line(slow: Engine, stop_serving: None) -> None:
    server = nbllm.serve(port=0, engine=slow)
    for raw in (b"{not json", b"[1, 2]"):
        answer = httpx.post(f"{server.url}/completions", content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] is None
        assert answer.json()["error"]["message"] in ("the request body is not JSON. Send a JSON object.",
                                                     "the request body must be a JSON object. Send a JSON object.")


# ------------------------------------------------------------------------------------------- cut short
def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_streamed_reply_cut_short_by_stop_ends_with_an_error_event(slow: Engine, stop_serving: None,
                                                                       chat: bool) -> None:
    SlowLoader.gate = threading.Event()  # after its first word the reply waits
    server = nbllm.serve(port=0, engine=slow)
    body: dict[str, Any] = {"max_tokens": 50, "stream": True}
    body.update({"messages": [{"role": "user", "content": "go"}]} if chat else {"prompt": "go"})
    events: list[dict[str, Any] | str] = []
    with httpx.stream("POST", f"{server.url}/{'chat/completions' if chat else 'completions'}", json=body,
                      timeout=60) as response:
        for event in _sse(response.iter_lines()):
            events.append(event)
            choices = event.get("choices") if isinstance(event, dict) else None
            if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                threading.Thread(target=stop).start()  # %llm_serve --stop, while the reply waits for its next word
    assert "[DONE]" not in events
    *pieces, last = events
    assert isinstance(last, dict) and last["error"]["code"] == "abort"
    assert last["error"]["message"].startswith("the reply was cut short after 1 pieces: the server was stopped")
    assert all(isinstance(e, dict) and e["choices"][0]["finish_reason"] is None for e in pieces)


def test_a_whole_reply_cut_short_by_stop_has_finish_reason_abort(slow: Engine, stop_serving: None) -> None:
    SlowLoader.gate = threading.Event()
    server = nbllm.serve(port=0, engine=slow)
    answer: dict[str, Any] = {}

    def ask() -> None:
        answer["reply"] = _post(f"{server.url}/completions", {"prompt": "go", "max_tokens": 50}).json()

    asker = threading.Thread(target=ask)
    asker.start()
    result = None
    while result is None or not result.chunks:  # the reply's first word is in; the next waits for the gate
        result = slow.last_result
        asker.join(0.01)
    stop()
    asker.join(60)
    choice = answer["reply"]["choices"][0]
    assert choice["finish_reason"] == "abort" and choice["text"] == "w0 "


def test_the_nbllm_client_sees_a_cut_short_reply_as_an_error(slow: Engine, stop_serving: None) -> None:
    SlowLoader.gate = threading.Event()
    server = nbllm.serve(port=0, engine=slow)
    client = Engine()
    try:
        client.load(server.url)
        result = client.stream("go", max_new_tokens=50)
        pieces = iter(result)
        assert next(pieces) == "w0 "
        threading.Thread(target=stop).start()
        with pytest.raises(nbllm.NbllmError, match="cut short"):
            list(pieces)
        assert "".join(result.chunks) == "w0 " and result.finish_reason == "error"
    finally:
        client.unload()


# ------------------------------------------------------------------------------------------- web pages
def _urllib(url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict[str, Any], Any]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_a_keyless_server_refuses_what_a_web_page_sends(slow: Engine, stop_serving: None) -> None:
    server = nbllm.serve(port=0, engine=slow)
    url, port = f"{server.url}/completions", server.port
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    # a cross-site form post: text/plain needs no preflight
    status, reply, _ = _urllib(url, body, {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403 and "http://evil.example" in reply["error"]["message"]
    status, reply, _ = _urllib(url, body, {"Content-Type": "text/plain"})
    assert status == 415 and reply["error"]["message"].startswith("the request body is text/plain, not application/json")
    status, reply, _ = _urllib(url, body, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403 and reply["error"]["message"] == (
        "requests from web pages of http://evil.example are refused by a server without a key. Allow that page with "
        f"{command('serve allow origin', 'http://evil.example')}, or serve with --api-key-env NAME.")
    # DNS rebinding: a page on evil.example, which resolves to 127.0.0.1, sends its own name as Host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        status, reply, _ = _urllib(url, body, {"Content-Type": "application/json", "Host": host})
        assert status == 403 and reply["error"]["message"].startswith(f"the request's Host '{host}' is not"), host
        status, reply, _ = _urllib(f"{server.url}/models", None, {"Host": host})
        assert status == 403, host
    assert SlowLoader.log == []  # nothing reached the model
    # what programs send, and the server's own pages, still work
    for headers in ({}, {"Host": f"localhost:{port}"}, {"Host": f"127.0.0.1:{port}"},
                    {"Origin": f"http://127.0.0.1:{port}"}, {"Origin": f"http://localhost:{port}"}):
        status, reply, _ = _urllib(url, body, {"Content-Type": "application/json; charset=utf-8", **headers})
        assert status == 200 and reply["choices"][0]["text"] == "w0 w1 ", headers


def test_allow_origin_lets_one_page_in_with_cors(shell: Any, slow: Engine, stop_serving: None) -> None:
    server = nbllm.serve(port=0, engine=slow, allow_origin=("http://localhost:3000",))
    url, body = f"{server.url}/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    preflight = httpx.options(url, headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    status, reply, headers = _urllib(url, body, {"Content-Type": "application/json", "Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, _, _ = _urllib(url, body, {"Content-Type": "application/json", "Origin": "http://localhost:3001"})
    assert status == 403
    stop()
    shell.run_line_magic("llm_serve", "--port 0 --allow-origin http://a.example --allow-origin http://b.example")
    running = current()
    assert running is not None and running.options.allow_origin == ("http://a.example", "http://b.example")


def test_with_a_key_the_page_guards_are_off(slow: Engine, monkeypatch: Any, stop_serving: None) -> None:
    monkeypatch.setenv("NBLLM_SERVE_KEY", "serve-key-123")
    server = nbllm.serve(port=0, engine=slow, api_key_env="NBLLM_SERVE_KEY")
    headers = {"Content-Type": "application/json", "Host": f"my-machine.lan:{server.port}", "Origin": "http://app.lan"}
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    status, _, _ = _urllib(f"{server.url}/completions", body, headers)
    assert status == 401  # no key: the key is what guards it
    status, reply, _ = _urllib(f"{server.url}/completions", body, {**headers, "Authorization": "Bearer serve-key-123"})
    assert status == 200 and reply["choices"][0]["text"] == "w0 w1 "


# ------------------------------------------------------------------------------------------- a cell behind it
def test_a_cell_waiting_behind_a_served_request_names_it_and_stops_waiting_in_one_line(
        shell: Any, engine: Any, stop_serving: None, monkeypatch: Any) -> None:
    from nbllm.magics._common import WAITING

    nbllm.loaders.register(SlowLoader)
    SlowLoader.log, SlowLoader.gate = [], threading.Event()
    try:
        shell.run_line_magic("llm_load", "slow://words")
        server = nbllm.serve(port=0)  # the kernel's engine: the cell and the request share the model
        first = threading.Event()
        remote: dict[str, str] = {}

        def ask() -> None:
            with httpx.stream("POST", f"{server.url}/completions", json={"prompt": "http", "max_tokens": 3,
                                                                          "stream": True}, timeout=60) as response:
                for event in _sse(response.iter_lines()):
                    if isinstance(event, dict) and event.get("choices") and event["choices"][0]["text"]:
                        remote["text"] = remote.get("text", "") + event["choices"][0]["text"]
                        first.set()

        asker = threading.Thread(target=ask)
        asker.start()
        assert first.wait(60)
        line = WAITING.format(owner="a served request")
        main = threading.get_ident()

        class Watched(io.StringIO):
            said = threading.Event()

            def write(self, text: str) -> int:
                n = super().write(text)
                if line in self.getvalue() and not self.said.is_set():
                    self.said.set()
                    signal.pthread_kill(main, signal.SIGINT)  # the kernel's interrupt, once the cell says it waits
                return n

        out = Watched()
        monkeypatch.setattr(sys, "stdout", out)
        with pytest.raises(UsageError) as caught:
            shell.run_cell_magic("llm", "--max-new-tokens 2", "cell")
        monkeypatch.undo()
        assert out.getvalue().startswith(line) and out.getvalue().endswith("[stopped waiting for a served request]\n")
        assert str(caught.value) == ("Stopped waiting for a served request to end; nothing was generated and the "
                                     "model is still loaded.")
        SlowLoader.gate.set()
        asker.join(60)
        assert remote["text"] == "w0 w1 w2 " and [said for _, said in SlowLoader.log] == ["http", "http"]
        shell.run_cell_magic("llm", "--max-new-tokens 2 -o r", "cell")  # the model is free and still loaded
        assert shell.user_ns["r"].text == "w0 w1 "
    finally:
        stop()
        nbllm.unload()
        nbllm.loaders.unregister("slow")
