"""``%llm_serve`` / ``nbllm.serve``: the kernel's model as an OpenAI-compatible server, driven by the
official ``openai`` client and by nbllm's own remote loader (in a second process, and in this one).

A text loader defined here (``slow://``: words at a steady pace, every start and end logged) lets the
tests see, at the server, that a request waits its turn and that a client leaving stops its reply.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from IPython.core.error import UsageError

import nbllm
import nbllm.loaders
from nbllm.engine import Engine
from nbllm.loaders import Request, TextLoader
from nbllm.options import LoadOptions
from nbllm.serve import ServeOptions, create_app, current, stop
from nbllm.source import ModelSource

try:
    from servers import run_python
except ImportError:  # tests/ imported as a package
    from tests.servers import run_python

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")


class SlowLoader(TextLoader):
    """Claims ``slow://NAME``; answers ``w0 w1 w2 ...``, one word per 10 ms, logging starts and ends."""

    name: ClassVar[str] = "slow"
    formats: ClassVar[frozenset[str]] = frozenset({"slow"})
    renders_chat: ClassVar[bool] = True
    log: ClassVar[list[tuple[str, str]]] = []
    gate: ClassVar[threading.Event | None] = None
    """When set, the reply stops after its first word until this event is set."""

    @classmethod
    def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
        return ModelSource(format="slow", name=spec[7:], url=spec, model_id="slow") if spec.startswith("slow://") else None

    def load(self, source: ModelSource, options: LoadOptions) -> None:
        self.source, self.options = source, options

    def unload(self) -> None:
        self.source = None

    def generate_text(self, request: Request) -> Iterator[str]:
        said = request.messages[-1]["content"] if request.messages else request.prompt
        self.log.append(("start", said))
        try:
            for i in range(request.options.max_new_tokens):
                if request.cancel.wait(0.01):
                    return
                yield f"w{i} "
                if i == 0 and self.gate is not None:
                    while not self.gate.wait(0.01):
                        if request.cancel.is_set():
                            return
            self.finish_reason = "length"
        finally:
            self.log.append(("end", said))


@pytest.fixture
def slow(engine: Any) -> Iterator[Engine]:
    """An engine of its own holding the slow loader (the kernel's engine stays free for a client)."""
    nbllm.loaders.register(SlowLoader)
    SlowLoader.log, SlowLoader.gate = [], None
    served = Engine()
    served.load("slow://words")
    yield served
    if SlowLoader.gate is not None:
        SlowLoader.gate.set()
    served.unload()
    nbllm.loaders.unregister("slow")


@pytest.fixture
def stop_serving() -> Iterator[None]:
    yield
    stop()


def _client(url: str, key: str = "unused") -> Any:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def _stream_text(stream: Any, chat: bool) -> tuple[str, Any, Any]:
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content if chat else choice.text
            parts.append(text or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


# -------------------------------------------------------------------------------------------- the openai client
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_and_chat_through_the_openai_client_equal_nbllm_generate(
        engine: Any, tiny_gguf: Path, stream: bool, stop_serving: None) -> None:
    nbllm.load(tiny_gguf)
    server = nbllm.serve(port=0)
    client = _client(server.url)
    model = nbllm.status().model
    assert [m.id for m in client.models.list().data] == [model]

    for options in ({"temperature": 0, "max_tokens": 24},
                    {"temperature": 0.8, "top_p": 0.95, "max_tokens": 24, "seed": 11,
                     "extra_body": {"top_k": 30, "min_p": 0.02, "repetition_penalty": 1.15}}):
        extra = options.get("extra_body", {})
        mine = {"temperature": options["temperature"], "max_new_tokens": 24, "top_p": options.get("top_p", 0.9),
                "seed": options.get("seed"), **extra}
        local = nbllm.generate("Once upon a time", **mine)
        answer = client.completions.create(model=model, prompt="Once upon a time", stream=stream,
                                           **({"stream_options": {"include_usage": True}} if stream else {}), **options)
        text, finish, usage = _stream_text(answer, chat=False) if stream else (
            answer.choices[0].text, answer.choices[0].finish_reason, answer.usage)
        assert text == local.text and finish == "length"
        assert (usage.prompt_tokens, usage.completion_tokens) == (local.prompt_tokens, local.completion_tokens)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    local = nbllm.generate(messages, temperature=0, max_new_tokens=24)
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24,
                                            stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    text, finish, usage = _stream_text(answer, chat=True) if stream else (
        answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage)
    assert text == local.text and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (local.prompt_tokens, local.completion_tokens)
    if not stream:
        assert answer.system_fingerprint.startswith("nbllm-0.1.0-") and answer.model == model


def test_a_transformers_model_is_served_too(engine: Any, tiny_model: Path, stop_serving: None) -> None:
    pytest.importorskip("torch")
    nbllm.load(tiny_model)
    server = nbllm.serve(port=0)
    answer = _client(server.url).completions.create(model=nbllm.status().model, prompt="Hello there",
                                                     temperature=0, max_tokens=16)
    assert answer.choices[0].text == nbllm.generate("Hello there", temperature=0, max_new_tokens=16).text


def test_bad_requests_are_refused_with_the_apis_errors(engine: Any, tiny_gguf: Path, stop_serving: None) -> None:
    server = nbllm.serve(port=0)
    client = _client(server.url)
    with pytest.raises(openai.InternalServerError, match="no model is loaded in the kernel"):  # 503
        client.completions.create(model="x", prompt="Hi")
    nbllm.load(tiny_gguf)
    model = nbllm.status().model
    with pytest.raises(openai.NotFoundError, match=f"the model 'gpt-4' is not served here; it serves '{model}'"):
        client.completions.create(model="gpt-4", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="best_of is not supported by nbllm's server"):
        client.completions.create(model=model, prompt="Hi", best_of=2)
    with pytest.raises(openai.BadRequestError, match="temperature 9.0 is above 5.0"):
        client.completions.create(model=model, prompt="Hi", temperature=9)
    too_long = "word " * 3000
    with pytest.raises(openai.BadRequestError, match="the prompt is .* tokens and the model's context holds 2048"):
        client.completions.create(model=model, prompt=too_long)
    with pytest.raises(openai.APIError, match="the prompt is .* tokens and the model's context holds 2048"):
        list(client.completions.create(model=model, prompt=too_long, stream=True))  # after the 200: an error event
    with pytest.raises(openai.BadRequestError, match="message 1 needs a role"):
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]


def test_every_named_model_is_served_by_its_name(shell: Any, tiny_model: Path, tiny_gguf: Path, capsys: Any,
                                                 stop_serving: None) -> None:
    pytest.importorskip("torch")
    from nbllm.registry import models

    greedy = {"temperature": 0, "max_new_tokens": 10}
    try:
        shell.run_line_magic("llm_load", f"{tiny_model} --as a")
        shell.run_line_magic("llm_load", f"{tiny_gguf} --as b")
        capsys.readouterr()
        shell.run_line_magic("llm_serve", "--port 0")
        server = current()
        assert server is not None
        assert capsys.readouterr().out == f"Serving a, b at {server.url} (OpenAI-compatible). Stop with %llm_serve --stop.\n"
        client = _client(server.url)
        assert [m.id for m in client.models.list().data] == ["a", "b"]
        assert client.models.retrieve("b").id == "b"
        a, b = models().engine("a"), models().engine("b")
        batches = len(a.scheduler.batch_sizes)
        for name, engine in (("a", a), ("b", b)):
            local = nbllm.generate("Once upon a time", model=name, **greedy)
            answer = client.completions.create(model=name, prompt="Once upon a time", temperature=0, max_tokens=10)
            assert answer.model == name and answer.choices[0].text == local.text
            served = engine.last_result
            assert served is not None and served.record is not None and served.record.model_name == name
            assert served.record.loader == ("transformers" if name == "a" else "llama.cpp")
            chat = [{"role": "user", "content": "Hi there"}]
            streamed = client.chat.completions.create(model=name, messages=chat, temperature=0, max_tokens=10, stream=True)
            assert _stream_text(streamed, chat=True)[0] == nbllm.generate(chat, model=name, **greedy).text
        assert len(a.scheduler.batch_sizes) == batches + 2  # a's requests went through a's queue
        with pytest.raises(openai.NotFoundError, match="the model 'c' is not served here; it serves 'a', 'b'"):
            client.completions.create(model="c", prompt="Hi")
        with pytest.raises(openai.BadRequestError, match=r"no unnamed model is loaded here: name one of the served "
                                                         r"models \('a', 'b'\) in the request's model field"):
            client.completions.create(model="", prompt="Hi")
        shell.run_line_magic("llm_load", str(tiny_gguf))  # the unnamed model joins, under its id
        default = nbllm.status().model
        assert [m.id for m in client.models.list().data] == [default, "a", "b"]
        answer = client.completions.create(model="", prompt="Hello", temperature=0, max_tokens=10)
        assert answer.model == default and answer.choices[0].text == nbllm.generate("Hello", **greedy).text
        served = nbllm.get_engine().last_result
        assert served is not None and served.record is not None and served.record.model_name is None
        models().unload("a")
        with pytest.raises(openai.NotFoundError, match=f"it serves '{default}', 'b'"):
            client.completions.create(model="a", prompt="Hi")
    finally:
        models().unload_all()


# -------------------------------------------------------------------------------------------- %llm_serve
def test_llm_serve_starts_says_where_and_stops(shell: Any, tiny_gguf: Path, capsys: Any, stop_serving: None) -> None:
    shell.run_line_magic("llm_load", str(tiny_gguf))
    capsys.readouterr()
    shell.run_line_magic("llm_serve", "--port 0")
    server = current()
    assert server is not None
    name = nbllm.status().model
    assert capsys.readouterr().out == (f"Serving {name} at {server.url} (OpenAI-compatible). "
                                       "Stop with %llm_serve --stop.\n")
    with pytest.raises(UsageError, match=f"the kernel's model is already served at {server.url}"):
        shell.run_line_magic("llm_serve", "--port 0")
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 8 -o r", "Hello")  # cells keep working
    assert shell.user_ns["r"].finish_reason == "length"
    shell.run_line_magic("llm_serve", "--stop")
    assert capsys.readouterr().out.endswith(f"Stopped serving at {server.url}.\n")
    shell.run_line_magic("llm_serve", "--stop")
    assert capsys.readouterr().out == "No server was running.\n"
    assert not server.running


def test_binding_beyond_loopback_needs_a_key(shell: Any, tiny_gguf: Path, monkeypatch: Any, stop_serving: None) -> None:
    with pytest.raises(UsageError) as caught:
        shell.run_line_magic("llm_serve", "--host 0.0.0.0 --port 0")
    assert str(caught.value) == ("--host 0.0.0.0 is reachable from other machines and no key protects it. Add "
                                 "--api-key-env NAME (a variable holding the key clients must send), or serve on "
                                 "127.0.0.1.")
    monkeypatch.delenv("NBLLM_SERVE_KEY", raising=False)
    with pytest.raises(UsageError, match=r"\$NBLLM_SERVE_KEY is not set \(or empty\)"):
        shell.run_line_magic("llm_serve", "--host 0.0.0.0 --port 0 --api-key-env NBLLM_SERVE_KEY")
    assert current() is None

    monkeypatch.setenv("NBLLM_SERVE_KEY", "serve-key-123")
    nbllm.load(tiny_gguf)
    shell.run_line_magic("llm_serve", "--host 0.0.0.0 --port 0 --api-key-env NBLLM_SERVE_KEY")
    server = current()
    assert server is not None
    url = f"http://127.0.0.1:{server.port}/v1"
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").models.list()
    model = nbllm.status().model
    answer = _client(url, "serve-key-123").completions.create(model=model, prompt="Hi", temperature=0, max_tokens=4)
    assert answer.choices[0].text == nbllm.generate("Hi", temperature=0, max_new_tokens=4).text
    # nbllm's remote loader with the key from its own environment variable
    monkeypatch.setenv("NBLLM_CLIENT_KEY", "serve-key-123")
    client = Engine()
    try:
        client.load(url, api_key_env="NBLLM_CLIENT_KEY")
        assert client.generate("Hi", temperature=0, max_new_tokens=4).text == answer.choices[0].text
    finally:
        client.unload()


def test_nbllm_in_a_second_process_against_llm_serve(shell: Any, tiny_gguf: Path, stop_serving: None) -> None:
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_line_magic("llm_serve", "--port 0")
    server = current()
    assert server is not None
    code = f"""
import json, nbllm
status = nbllm.load({server.url!r})
out = {{"status": [status.loader, status.model, status.details["server"]]}}
r = nbllm.generate("Once upon a time", temperature=0, max_new_tokens=24)
out["greedy"] = [r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.record.to_dict()["model"]]
s = nbllm.generate("Once upon a time", temperature=0.8, top_k=30, seed=5, max_new_tokens=24)
out["sampled"] = s.text
c = nbllm.Chat(system="Be brief.")
out["chat"] = [c.send("Hi there", temperature=0, max_new_tokens=16).text, c.send("More?", temperature=0, max_new_tokens=16).text]
out["streamed"] = "".join(nbllm.stream("Hello", temperature=0, max_new_tokens=12))
out["many"] = [m.text for m in nbllm.generate_many(["a", "b", "c"], temperature=0, max_new_tokens=8)]
print(json.dumps(out))
"""
    out = json.loads(run_python(code).strip().splitlines()[-1])
    name = nbllm.status().model
    assert out["status"] == ["openai", name, "nbllm 0.1.0"]
    local = nbllm.generate("Once upon a time", temperature=0, max_new_tokens=24)
    text, finish, prompt_tokens, completion_tokens, model = out["greedy"]
    assert (text, finish, prompt_tokens, completion_tokens) == (local.text, "length", local.prompt_tokens, 24)
    assert model["server"] == "nbllm 0.1.0" and model["system_fingerprint"].startswith("nbllm-0.1.0-")
    assert out["sampled"] == nbllm.generate("Once upon a time", temperature=0.8, top_k=30, seed=5, max_new_tokens=24).text
    chat = nbllm.Chat(system="Be brief.")
    assert out["chat"] == [chat.send("Hi there", temperature=0, max_new_tokens=16).text,
                           chat.send("More?", temperature=0, max_new_tokens=16).text]
    assert out["streamed"] == nbllm.generate("Hello", temperature=0, max_new_tokens=12).text
    assert out["many"] == [nbllm.generate(p, temperature=0, max_new_tokens=8).text for p in "abc"]


# -------------------------------------------------------------------------------------------- the engine's turn
def test_requests_wait_their_turn_behind_the_engine(slow: Engine, stop_serving: None) -> None:
    server = nbllm.serve(port=0, engine=slow)
    first = threading.Event()
    remote: dict[str, Any] = {}

    def ask() -> None:
        stream = _client(server.url).completions.create(model="words", prompt="http", max_tokens=30, stream=True)
        parts = []
        for chunk in stream:
            parts.append(chunk.choices[0].text)
            first.set()
        remote["text"] = "".join(parts)

    asker = threading.Thread(target=ask)
    asker.start()
    assert first.wait(30)
    local = slow.generate("cell", max_new_tokens=5)  # waits until the request's reply has ended
    asker.join(30)
    assert local.text == "w0 w1 w2 w3 w4 " and local.finish_reason == "length"
    assert remote["text"] == "".join(f"w{i} " for i in range(30))
    assert SlowLoader.log == [("start", "http"), ("end", "http"), ("start", "cell"), ("end", "cell")]


def test_stop_at_the_client_stops_the_reply_at_the_server(slow: Engine, monkeypatch: Any, stop_serving: None) -> None:
    # no keep-alive comments: only the connection's shutdown can wake the client's read
    monkeypatch.setattr(sys.modules["nbllm.serve"], "KEEPALIVE_SECONDS", 3600.0)
    SlowLoader.gate = threading.Event()  # after its first word the reply waits: the client blocks in a read
    server = nbllm.serve(port=0, engine=slow)
    client = Engine()
    try:
        client.load(server.url)
        result = client.stream("stop me", max_new_tokens=500, temperature=0)
        pieces: list[str] = []
        first = threading.Event()

        def read() -> None:
            for piece in result:
                pieces.append(piece)
                first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(30)  # the first word came; the next one will not until the gate opens
        served = slow.last_result
        assert served is not None and not served.done
        result.cancel()  # Stop, while the client waits for the next word
        reader.join(30)
        assert not reader.is_alive() and result.finish_reason == "cancelled"
        assert served.wait(30) and served.finish_reason == "cancelled"  # the server stopped generating
        assert result.text == "".join(pieces) and served.text.startswith(result.text) and len(served.text) < 500 * 3
    finally:
        client.unload()


def test_interrupting_a_cell_closes_the_stream_and_the_server_stops(shell: Any, slow: Engine,
                                                                    stop_serving: None) -> None:
    SlowLoader.gate = threading.Event()  # one word, then the reply waits: the cell blocks in a read
    server = nbllm.serve(port=0, engine=slow)
    shell.run_line_magic("llm_load", server.url)
    main = threading.get_ident()
    waiting = threading.Event()

    def interrupt_once_the_first_word_is_in() -> None:
        for _ in range(3000):
            result = nbllm.get_engine().last_result
            if result is not None and result.chunks:
                signal.pthread_kill(main, signal.SIGINT)  # what the kernel's interrupt does
                return
            waiting.wait(0.01)

    interrupter = threading.Thread(target=interrupt_once_the_first_word_is_in)
    interrupter.start()
    with pytest.raises(UsageError) as caught:
        shell.run_cell_magic("llm", "--max-new-tokens 500 -o r", "go on")
    interrupter.join(30)
    # a server's reply cut short comes without a token count: nbllm says what it knows (pieces), never a guess
    assert str(caught.value) == ("Generation interrupted after 1 pieces; the partial text is kept and the model "
                                 "is still loaded.")
    r = shell.user_ns["r"]
    assert r.finish_reason == "interrupted" and r.text == "w0 "
    served = slow.last_result
    assert served is not None and served.wait(30) and served.finish_reason == "cancelled"


def test_the_create_app_serves_any_engine_and_the_options_class_checks_ports() -> None:
    with pytest.raises(nbllm.NbllmError, match="--port 70000 is above 65535"):
        ServeOptions(port=70000)
    assert create_app(Engine()) is not None
