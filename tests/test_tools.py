"""Tools in chat (nbllm.tools): schemas, the template's rendering, parsing each format, running calls, and
the call loop end to end on real tiny models through both loaders, from Python and from the magic."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from IPython.core.error import UsageError

import nbllm.chat as chatlib
from nbllm.chat import Conversation
from nbllm.errors import ChatError, NbllmWarning
from nbllm.testing import TINY_CHAT_TEMPLATE, TINY_TOOLS_TEMPLATE, tiny_gguf_model, tiny_transformers_model
from nbllm.tools import (
    INTERRUPTED,
    NOT_RUN,
    Tool,
    ToolCall,
    ToolError,
    call_grammar,
    check_choice,
    parse_tool_calls,
    run_call,
    tool_format,
    tools_from,
    tools_named,
)

CALLS: list[Any] = []


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    CALLS.append((a, b))
    return a + b


def weather(city: Literal["Paris", "Lisbon"]) -> dict[str, Any]:
    """The weather in a city.

    Args:
        city: where
    """
    CALLS.append(city)  # type: ignore[arg-type]
    return {"city": city, "sky": "sunny"}


def fail(reason: Literal["timeout"]) -> str:
    """Always fails.

    Args:
        reason: why
    """
    raise RuntimeError("the service is down\nsecond line")


def lookup(city: Literal["Paris", "Lisbon"]) -> str:
    """Looks the weather up, slowly: the kernel is interrupted while it runs.

    Args:
        city: where
    """
    CALLS.append(city)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a kernel's (and pytest's) handler
    signal.raise_signal(signal.SIGINT)  # what interrupting the kernel sends while the function runs
    threading.Event().wait(60)
    raise AssertionError("the interrupt never came")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    CALLS.clear()
    yield
    for name in list(chatlib.conversations()):
        chatlib.forget(name)


# -- schemas and the template ------------------------------------------------------------------------


def test_a_function_becomes_transformers_own_schema() -> None:
    from transformers.utils import get_json_schema

    tool = Tool.of(add)
    assert tool.name == "add" and tool.schema == get_json_schema(add)
    assert tool.parameters["required"] == ["a", "b"]


def test_what_cannot_be_a_tool_is_one_line() -> None:
    def bare(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolError, match="cannot be described to the model") as info:
        Tool.of(bare)
    assert "\n" not in str(info.value)
    with pytest.raises(ToolError, match="not a function"):
        tools_named("x", {"x": 3})
    with pytest.raises(ToolError, match="not defined in the notebook"):
        tools_named("nothere", {})
    with pytest.raises(ToolError, match="two tools are called 'add'"):
        tools_from([add, add])
    with pytest.raises(ToolError, match="neither auto, none, required"):
        check_choice("sub", [Tool.of(add)])


def test_template_formats_are_detected() -> None:
    assert tool_format(TINY_TOOLS_TEMPLATE) == "hermes"
    assert tool_format(TINY_CHAT_TEMPLATE) is None
    assert tool_format(None) is None
    assert tool_format("{% if tools %}{{ tools }}{% endif %}[TOOL_CALLS]") == "mistral"
    assert tool_format('{% if tools %}{"name": x, "parameters": y}<|python_tag|>{% endif %}') == "llama3"


def test_our_render_with_tools_equals_the_tokenizers_own() -> None:
    from transformers import AutoTokenizer

    from nbllm.chat_template import render_chat

    tok = AutoTokenizer.from_pretrained(tiny_transformers_model(chat_template="tools"))
    call = ToolCall("add", {"a": 1, "b": 2}, "call_1", "3")
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "", "tool_calls": [call.message()]}, call.result_message()]
    ours = render_chat(tok.chat_template, messages, tools=[Tool.of(add).schema],
                       special_tokens={"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    assert ours == tok.apply_chat_template(messages, tools=[add], tokenize=False, add_generation_prompt=True)
    assert '"name": "add"' in ours and "<tool_response>\n3\n</tool_response>" in ours


# -- parsing each format ----------------------------------------------------------------------------


def test_hermes_calls_are_parsed() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' \
           '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me add."
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    assert parse_tool_calls("no call here", "hermes") == ("no call here", [])
    # cut off before the closing tag: the JSON is still read
    _, cut = parse_tool_calls('<tool_call>\n{"name":"add","arguments":{"a":0,"b":0}}\n</to', "hermes")
    assert cut[0].name == "add" and cut[0].arguments == {"a": 0, "b": 0}


def test_llama3_and_mistral_calls_are_parsed() -> None:
    content, calls = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "llama3")
    assert content == "" and (calls[0].name, calls[0].arguments) == ("add", {"a": 1, "b": 2})
    assert parse_tool_calls("Paris is the capital.", "llama3") == ("Paris is the capital.", [])
    content, calls = parse_tool_calls(
        'ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}, "id": "abc123xyz"}]', "mistral")
    assert content == "ok" and (calls[0].name, calls[0].arguments, calls[0].id) == ("add", {"a": 5, "b": 6}, "abc123xyz")


def test_unreadable_call_becomes_an_error_for_the_model() -> None:
    _, calls = parse_tool_calls("<tool_call>{not json</tool_call>", "hermes")
    run_call(calls[0], [Tool.of(add)])
    assert calls[0].error and "not JSON with a name" in calls[0].result  # type: ignore[operator]


# -- running calls ------------------------------------------------------------------------------------


def test_calls_run_and_bad_ones_answer_with_one_line() -> None:
    tools = tools_from([add, fail])
    good = run_call(ToolCall("add", {"a": 2, "b": 3}), tools)
    assert (good.result, good.error, CALLS) == ("5", False, [(2, 3)])
    unknown = run_call(ToolCall("sub", {"a": 1}), tools)
    assert unknown.error and unknown.result == "there is no tool named 'sub' (tools: add, fail)"
    wrong = run_call(ToolCall("add", {"a": "two", "b": 3}), tools)
    assert wrong.error and "do not fit its schema" in wrong.result and "'two' is not of type 'integer'" in wrong.result  # type: ignore[operator]
    raised = run_call(ToolCall("fail", {"reason": "timeout"}), tools)
    assert raised.error and raised.result == "RuntimeError: the service is down second line"
    assert CALLS == [(2, 3)]  # the bad calls ran nothing


def test_the_forced_call_grammar_holds_the_arguments_to_the_schema() -> None:
    from nbllm.constraints import Constraint

    grammar = call_grammar("hermes", tools_from([add, fail]), "required")
    Constraint("grammar", grammar).check()  # llguidance accepts it
    assert grammar.startswith('start: "<tool_call>\\n" call "\\n</tool_call>"')
    assert '"anyOf"' in grammar and '"additionalProperties": false' in grammar
    with pytest.raises(ToolError, match="cannot be enforced for the mistral"):
        call_grammar("mistral", tools_from([add]), "add")


# -- the loop, on real tiny models ----------------------------------------------------------------


@pytest.fixture(params=["transformers", "llama.cpp"])
def tools_model(request: pytest.FixtureRequest, engine: Any) -> Any:
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        engine.load(tiny_gguf_model(chat_template="tools"))
    else:
        engine.load(tiny_transformers_model(chat_template="tools"))
    return engine


def test_a_forced_call_runs_and_its_result_goes_back(tools_model: Any) -> None:
    seen: list[ToolCall] = []
    conv = Conversation("t")
    result = conv.send("Weather in Paris?", tools=[add, weather], tool_choice="weather", temperature=0,
                       max_new_tokens=60, on_tool_call=seen.append)
    final = result.text
    assert len(CALLS) == 1 and len(seen) == 1, (seen, CALLS)  # the function ran once, with the model's arguments
    call = seen[0]
    assert call.name == "weather" and call.arguments == {"city": CALLS[0]} and CALLS[0] in ("Paris", "Lisbon")
    assert json.loads(call.result) == {"city": CALLS[0], "sky": "sunny"} and not call.error  # type: ignore[arg-type]
    turn = conv.turns[0]
    assert turn.tool_calls == [call] and turn.reply is not None and turn.reply.content == final
    messages = conv.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": call.arguments}
    assert messages[2] == {"role": "tool", "tool_call_id": call.id, "name": "weather", "content": call.result}
    # the final reply was generated from a prompt holding the call and its result
    assert turn.reply.record is not None
    assert f"<tool_response>\n{call.result}\n</tool_response>" in turn.reply.record.prompt
    assert '"name": "weather"' in turn.reply.record.prompt and '"name": "add"' in turn.reply.record.prompt
    assert turn.steps[0].records[0].generation_options["grammar"].startswith("start:")


def test_a_tool_error_goes_back_and_the_chat_goes_on(tools_model: Any) -> None:
    conv = Conversation("t")
    _ = conv.send("Fail please", tools=[add, fail], tool_choice="fail", temperature=0, max_new_tokens=60).text
    call = conv.turns[0].tool_calls[0]
    assert call.error and call.result == "RuntimeError: the service is down second line"
    assert "RuntimeError: the service is down" in conv.turns[0].reply.record.prompt  # type: ignore[union-attr]
    _ = conv.send("And now?", max_new_tokens=5, temperature=0).text  # the conversation goes on
    assert len(conv.turns) == 2


def test_max_tool_calls_stops_running_calls(tools_model: Any) -> None:
    conv = Conversation("t")
    with pytest.warns(NbllmWarning, match="after the 0 calls allowed"):
        text = conv.send("Paris?", tools=[weather], tool_choice="weather", max_tool_calls=0, temperature=0,
                         max_new_tokens=60).text
    assert CALLS == [] and text.startswith("<tool_call>") and conv.turns[0].steps == []


def test_a_chat_with_tools_saves_and_loads(tools_model: Any, tmp_path: Path) -> None:
    conv = Conversation("t")
    _ = conv.send("Paris?", tools=[weather], tool_choice="required", temperature=0, max_new_tokens=60).text
    back = Conversation.load(conv.save(tmp_path / "c.json"))
    assert back.messages() == conv.messages()
    assert back.turns[0].tool_calls[0].to_dict() == conv.turns[0].tool_calls[0].to_dict()


def test_a_template_without_tools_says_so_in_one_line(engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    conv = Conversation("t")
    with pytest.raises(ChatError, match="has no tool format, so it cannot call tools") as info:
        conv.send("2+3?", tools=[add])
    assert "\n" not in str(info.value) and conv.turns == [] and not conv.generating
    assert conv.send("hello", max_new_tokens=3).text is not None  # the engine keeps its model


# -- the magic ------------------------------------------------------------------------------------


def test_the_magic_runs_notebook_functions(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_line_magic("llm_load", str(tiny_transformers_model(chat_template="tools")))
    shell.user_ns["weather"] = weather
    shell.user_ns["x"] = 3
    capsys.readouterr()
    shell.run_cell_magic("llm_chat", "w --tools weather --tool-choice required --temperature 0 --max-new-tokens 60 -o r",
                         "Weather in Paris?")
    out = capsys.readouterr().out
    city = CALLS[0]
    assert f'[tool] weather(city={city!r}) → {{"city": "{city}", "sky": "sunny"}}' in out
    assert shell.user_ns["r"].text in out
    assert chatlib.conversation("w").turns[0].tool_calls[0].arguments == {"city": city}
    with pytest.raises(UsageError, match="'x' is int, not a function"):
        shell.run_cell_magic("llm_chat", "w --tools x", "hi")
    with pytest.raises(UsageError, match="not defined in the notebook"):
        shell.run_cell_magic("llm_chat", "w --tools nothere", "hi")


# -- each reply of the loop streams -----------------------------------------------------------------


def test_on_reply_streams_each_reply_of_the_loop(tools_model: Any) -> None:
    """``on_reply`` gets each reply before it is read: the one that calls the tool, then (after the call ran)
    the final one; iterating each there streams it piece by piece."""
    events: list[Any] = []

    def on_reply(result: Any) -> None:
        assert not result.done  # handed over before it is read
        events.append(("reply", result, list(result)))

    conv = Conversation("t")
    final = conv.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0, max_new_tokens=60,
                      on_reply=on_reply, on_tool_call=lambda call: events.append(("call", call)))
    assert [e[0] for e in events] == ["reply", "call", "reply"]
    (_, step, step_pieces), (_, call), (_, last, last_pieces) = events
    assert len(step_pieces) > 1 and len(last_pieces) > 1  # streamed, not one block
    assert parse_tool_calls("".join(step_pieces), "hermes")[1][0].arguments == call.arguments == {"city": CALLS[0]}
    assert step.text == "".join(step_pieces) and step.record is conv.turns[0].steps[0].records[0]
    assert last is final and final.done and final.text == "".join(last_pieces) == conv.turns[0].reply.content  # type: ignore[union-attr]


def test_an_interrupted_reply_of_the_loop_is_kept_partial(tools_model: Any) -> None:
    def stop_after_two(result: Any) -> None:
        for i, _ in enumerate(result):
            if i == 1:
                raise KeyboardInterrupt

    conv = Conversation("t")
    with pytest.raises(KeyboardInterrupt):
        conv.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0, max_new_tokens=60,
                  on_reply=stop_after_two)
    turn = conv.turns[0]
    assert turn.reply is not None and turn.reply.partial and turn.reply.finish_reason == "interrupted"
    assert CALLS == [] and not conv.generating
    assert conv.send("Paris?", max_new_tokens=3, temperature=0).text is not None  # the chat goes on


def _three_calls(first: str, second: str, third: str) -> str:
    """A grammar (GBNF) holding the reply to three Hermes calls in order: weather in ``first``, ``second`` in
    Lisbon, weather in ``third``."""
    call = '<tool_call>\\n{{\\"name\\": \\"{}\\", \\"arguments\\": {{\\"city\\": \\"{}\\"}}}}\\n</tool_call>'
    return 'root ::= "' + "\\n".join(call.format(n, c) for n, c in [("weather", first), (second, "Lisbon"),
                                                                   ("weather", third)]) + '"'


def test_an_interrupt_while_a_tool_runs_keeps_the_turn(tools_model: Any, tmp_path: Path) -> None:
    """A kernel interrupt while a function runs (not while the model writes): the turn is kept, the calls
    before answered, the running one answered as interrupted, the one after as not run, and an empty reply
    marked partial; the conversation goes on (continue answers from the results, a next message too)."""
    seen: list[ToolCall] = []
    conv = Conversation("t")
    with pytest.raises(KeyboardInterrupt):
        conv.send("Weather in Paris?", tools=[weather, lookup], temperature=0, max_new_tokens=200,
                  grammar=_three_calls("Paris", "lookup", "Lisbon"), on_tool_call=seen.append)
    assert CALLS == ["Paris", "Lisbon"] and not conv.generating  # weather ran, lookup started, the last did not
    turn = conv.turns[0]
    done, stopped, after = turn.tool_calls
    assert seen == [done] and not done.error and json.loads(done.result or "") == {"city": "Paris", "sky": "sunny"}
    assert turn.interrupted_call is stopped and stopped.name == "lookup" and stopped.arguments == {"city": "Lisbon"}
    assert stopped.error and stopped.result == INTERRUPTED and str(stopped).endswith("→ error: " + INTERRUPTED)
    assert after.error and not after.interrupted and after.result == NOT_RUN and after.arguments == {"city": "Lisbon"}
    assert turn.reply is not None and turn.reply.content == "" and turn.reply.partial
    assert turn.reply.finish_reason == "interrupted" and turn.notes == ["partial: interrupted"]
    messages = conv.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    assert [m["content"] for m in messages[2:5]] == [done.result, INTERRUPTED, NOT_RUN]
    back = Conversation.load(conv.save(tmp_path / "c.json"))  # saved and loaded with its marks
    assert back.messages() == messages and back.turns[0].interrupted_call.to_dict() == stopped.to_dict()  # type: ignore[union-attr]
    more = conv.continue_reply(temperature=0, max_new_tokens=5)  # the model answers from the results
    _ = more.text
    assert f"<tool_response>\n{INTERRUPTED}\n</tool_response>" in more.record.prompt  # type: ignore[union-attr]
    assert turn.reply.content == more.text
    _ = conv.send("And now?", max_new_tokens=3, temperature=0).text
    assert len(conv.turns) == 2


def test_the_magic_says_a_tool_was_interrupted_and_keeps_the_turn(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_line_magic("llm_load", str(tiny_transformers_model(chat_template="tools")))
    shell.user_ns["lookup"] = lookup
    capsys.readouterr()
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("llm_chat", "w --tools lookup --tool-choice lookup --temperature 0 --max-new-tokens 60",
                             "Weather in Paris?")
    message = str(info.value)
    assert message.startswith("Interrupted while the tool lookup ran: the turn is kept") and "\n" not in message
    assert "nothing was generated" not in message and "%llm_chat w --continue" in message
    turn = chatlib.conversation("w").turns[0]
    call = turn.interrupted_call
    assert call is not None and call.arguments == {"city": CALLS[0]} and turn.reply is not None and turn.reply.partial
    out = capsys.readouterr().out
    assert out.startswith("<tool_call>") and out.endswith(f"\n[tool] lookup(city={CALLS[0]!r}) → error: {INTERRUPTED}\n")
    shell.run_line_magic("llm_chat", "w --continue --temperature 0 --max-new-tokens 5 -o more")
    assert turn.reply.content == shell.user_ns["more"].text  # the model answered from the results
    shell.run_cell_magic("llm_chat", "w --temperature 0 --max-new-tokens 3", "And now?")
    assert len(chatlib.conversation("w").turns) == 2


def test_the_magic_streams_each_reply_then_its_call_then_the_answer(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_line_magic("llm_load", str(tiny_transformers_model(chat_template="tools")))
    shell.user_ns["weather"] = weather
    capsys.readouterr()
    shell.run_cell_magic("llm_chat", "w --tools weather --tool-choice weather --temperature 0 --max-new-tokens 60 -o r",
                         "Weather in Paris?")
    out = capsys.readouterr().out
    turn = chatlib.conversation("w").turns[0]
    call, final = turn.tool_calls[0], shell.user_ns["r"]
    step = f'<tool_call>\n{{"name":"weather","arguments":{{"city":"{CALLS[0]}"}}}}'  # the forced call, compact
    assert out.startswith(step)
    shown_step = out[: out.index("\n[tool] ")]
    assert parse_tool_calls(shown_step, "hermes")[1][0].arguments == call.arguments
    assert out == f"{shown_step}\n[tool] {call}\n{final.text}\n"  # the step, its call and result, the answer


# -- request identity and replay of a chat with tools ------------------------------------------------


def test_identities_of_requests_without_tools_are_unchanged() -> None:
    """Old recordings keep matching: these keys were computed by the identity code before tools existed
    (a user message's ``name`` stayed out then, and still does)."""
    from nbllm.identity import identity_key, record_identity

    raw = {"model": {"name": "m", "format": "transformers", "sha256": {"model.safetensors": "ab"}},
           "loader": "transformers", "load_options": {"dtype": "float32"},
           "generation_options": {"temperature": 0.0, "max_new_tokens": 16, "seed": 3}, "seed": 3,
           "seed_drawn": True, "prompt": "Hello", "mode": "raw"}
    chat = {"model": {"name": "m", "format": "gguf"}, "loader": "llama.cpp", "load_options": {},
            "generation_options": {"temperature": 0.7, "stop": ["\n"]}, "seed": 5, "seed_drawn": False,
            "prompt": "<s>x", "mode": "chat",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ana"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}]}
    assert identity_key(record_identity(raw)) == "8f602ff6466bca7cb2b9"
    assert identity_key(record_identity(chat)) == "46d7ae98d77abf245204"
    assert set(record_identity(chat)) == {"model", "loader", "load_options", "generation_options", "seed", "messages"}


def test_identities_tell_tools_calls_and_results_apart() -> None:
    from nbllm.identity import differences, request_identity

    call = ToolCall("weather", {"city": "Paris"}, "call_1", "sunny")
    messages = [{"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call.message()]}, call.result_message()]
    schemas = [Tool.of(weather).schema]

    def identity(messages: Any = messages, tools: Any = schemas, tool_choice: Any = None) -> dict[str, Any]:
        return request_identity(model={"name": "m"}, loader="openai", load_options={}, generation_options={},
                                seed=None, prompt="", messages=messages, tools=tools, tool_choice=tool_choice)

    base = identity()
    assert base["tools"] == json.loads(json.dumps(schemas)) and "tool_choice" not in base
    assert base["messages"][1]["tool_calls"][0]["id"] == "call_1" and base["messages"][2]["tool_call_id"] == "call_1"
    other_result = [*messages[:2], {**messages[2], "content": "rainy"}]
    assert differences(base, identity(other_result)) == ["the result of tool call weather ('sunny' there, 'rainy' here)"]
    other_id = [messages[0], {**messages[1], "tool_calls": [{**call.message(), "id": "call_2"}]}, messages[2]]
    assert differences(base, identity(other_id)) == ["the tool calls of message 2"]
    assert differences(base, identity(tools=[Tool.of(add).schema])) == ["the tools (weather there, add here)"]
    assert differences(base, identity(tool_choice="weather")) == ["tool_choice (none given there, 'weather' here)"]


def test_call_ids_follow_what_the_reply_answered() -> None:
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' * 2
    first = [c.id for c in parse_tool_calls(text, "hermes", context="messages A")[1]]
    assert first == [c.id for c in parse_tool_calls(text, "hermes", context="messages A")[1]]
    assert first[0] != first[1] and first[0].startswith("call_")
    assert first != [c.id for c in parse_tool_calls(text, "hermes", context="messages B")[1]]
    given = '<tool_call>{"name": "add", "arguments": {}, "id": "srv_7"}</tool_call>'
    assert parse_tool_calls(given, "hermes", context="messages A")[1][0].id == "srv_7"  # a server's id is kept


def test_a_changed_tool_result_falls_back_to_the_model_midway(engine: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A local model's chat with tools, replayed from the run log with ``fallback="run"``: the call's
    request (with its grammar) replays; a tool result that changed misses, the model is loaded there and
    writes the answer from the new result."""
    import nbllm
    from nbllm.runlog import flush

    model = tiny_transformers_model(chat_template="tools")
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", str(tmp_path / "runs.sqlite"))
    engine.load(model)
    recorded = Conversation("t")
    final = recorded.send("Paris?", tools=[weather], tool_choice="weather", temperature=0, max_new_tokens=40).text
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    engine.unload()
    city = CALLS[0]

    def make(sky: str) -> Any:
        def weather(city: Literal["Paris", "Lisbon"]) -> dict[str, Any]:
            """The weather in a city.

            Args:
                city: where
            """
            return {"city": city, "sky": sky}
        return weather

    rainy = make("rainy")  # the same tool, another result
    assert Tool.of(rainy).schema == Tool.of(weather).schema
    with nbllm.replay(tmp_path / "runs.sqlite", fallback="run") as replay:
        engine.load(model)
        same = Conversation("same").send("Paris?", tools=[weather], tool_choice="weather", temperature=0,
                                         max_new_tokens=40)
        assert same.replayed and same.text == final and replay.answered == 2
        changed = Conversation("changed")
        with pytest.warns(NbllmWarning, match=r"differs in the result of tool call weather"):
            answer = changed.send("Paris?", tools=[rainy], tool_choice="weather", temperature=0, max_new_tokens=40)
        assert replay.answered == 3 and replay.fell_back  # the call replayed; the answer did not
    assert changed.turns[0].steps[0].records[0].replayed is not None
    assert not answer.replayed and answer.record.loader == "transformers" and answer.completion_tokens
    assert f'<tool_response>\n{{"city": "{city}", "sky": "rainy"}}\n</tool_response>' in answer.record.prompt
    assert '"name": "weather"' in answer.record.prompt  # the tools went on to the model loaded midway


def test_a_chat_with_tools_at_a_server_replays_from_the_run_log(engine: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded through the remote loader (the server holds the forced call: ``tool_choice`` goes with the
    request), replayed with the server gone: the same calls run again, the same answer comes back."""
    pytest.importorskip("llama_cpp")
    import nbllm
    from nbllm.engine import Engine
    from nbllm.runlog import flush
    from nbllm.serve import stop

    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", str(tmp_path / "runs.sqlite"))
    served = Engine()
    served.load(tiny_gguf_model(chat_template="tools"))
    server = nbllm.serve(port=0, engine=served)
    try:
        engine.load(server.url)
        conv = Conversation("t", engine=engine)
        final = conv.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0,
                          max_new_tokens=60).text
        recorded = conv.turns[0]
        flush()
    finally:
        stop()
        served.unload()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    first = recorded.steps[0].records[0]
    assert first.tool_choice == "weather" and first.tool_calling == {"format": "hermes", "server": True}
    assert first.generation_options.get("grammar") is None and recorded.reply.record.tool_choice == "auto"  # type: ignore[union-attr]
    engine.unload()
    CALLS.clear()
    with nbllm.replay(tmp_path / "runs.sqlite") as replay:
        engine.load(server.url)  # nothing is loaded: the recording stands in for the server
        again = Conversation("t", engine=engine)
        reply = again.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0,
                           max_new_tokens=60)
        assert reply.replayed and reply.text == final and replay.answered == 2
        assert [c.to_dict() for c in again.turns[0].tool_calls] == [c.to_dict() for c in recorded.tool_calls]
        assert CALLS == [recorded.tool_calls[0].arguments["city"]]  # the function ran again, here


# -- %llm_serve ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_serve_takes_tools_and_returns_tool_calls(engine: Any, stream: bool) -> None:
    openai = pytest.importorskip("openai")
    import nbllm
    from nbllm.serve import stop

    nbllm.load(tiny_gguf_model(chat_template="tools"))
    server = nbllm.serve(port=0)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        schema, model = Tool.of(weather).schema, nbllm.status().model
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
        answer = client.chat.completions.create(model=model, messages=messages, tools=[schema], tool_choice="required",
                                                temperature=0, max_tokens=60, stream=stream)
        if stream:
            calls, finish = [], None
            for chunk in answer:
                for choice in chunk.choices:
                    calls.extend(choice.delta.tool_calls or [])
                    finish = choice.finish_reason or finish
        else:
            calls, finish = answer.choices[0].message.tool_calls, answer.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        call = calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "weather" and args["city"] in ("Paris", "Lisbon")
        # the same request in the kernel: the same call
        local = Conversation("t")
        with pytest.warns(NbllmWarning, match="after the 0 calls allowed"):
            _ = local.send("Weather in Paris?", tools=[weather], tool_choice="required", temperature=0, max_new_tokens=60,
                       max_tool_calls=0).text
        assert json.loads(local.turns[0].reply.content.split("\n")[1])["arguments"] == args  # type: ignore[union-attr]
        # the client runs it and sends the result back: a final answer
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(weather(**args))}]
        final = client.chat.completions.create(model=model, messages=messages, tools=[schema], temperature=0, max_tokens=8)
        assert final.choices[0].finish_reason in ("length", "stop", "tool_calls")
        with pytest.raises(openai.BadRequestError, match="tool_choice 'nope' is neither"):
            client.chat.completions.create(model=model, messages=messages, tools=[schema], tool_choice={
                "type": "function", "function": {"name": "nope"}})
    finally:
        stop()


def test_serve_answers_a_chat_with_tools_from_a_replay(engine: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat with tools recorded in the kernel, then replayed: a client of ``%llm_serve`` sending the same
    requests (the tools, the forced call, then the call's result) is answered from the recording, call ids
    included, as the chat in the kernel is; nothing is loaded."""
    openai = pytest.importorskip("openai")
    import nbllm
    from nbllm.runlog import flush
    from nbllm.serve import stop

    model = tiny_transformers_model(chat_template="tools")
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", str(tmp_path / "runs.sqlite"))
    engine.load(model)
    recorded = Conversation("t")
    final = recorded.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0,
                          max_new_tokens=40).text
    flush()
    monkeypatch.setenv("NBLLM_RUN_LOG", "off")
    engine.unload()
    call = recorded.turns[0].tool_calls[0]
    with nbllm.replay(tmp_path / "runs.sqlite") as replay:
        engine.load(model)
        server = nbllm.serve(port=0)
        try:
            client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
            ask = {"model": nbllm.status().model, "tools": [Tool.of(weather).schema], "temperature": 0, "max_tokens": 40}
            messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
            first = client.chat.completions.create(messages=messages, tool_choice={
                "type": "function", "function": {"name": "weather"}}, **ask)
            got = first.choices[0].message.tool_calls or []
            assert first.choices[0].finish_reason == "tool_calls" and replay.answered == 1
            assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in got] == [
                (call.id, "weather", call.arguments)]
            messages += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": got[0].id, "type": "function",
                 "function": {"name": "weather", "arguments": got[0].function.arguments}}]},
                {"role": "tool", "tool_call_id": got[0].id, "content": call.result}]  # no name, as clients send it
            answer = client.chat.completions.create(messages=messages, **ask)
            assert answer.choices[0].message.content == final and replay.answered == 2
        finally:
            stop()
    assert not replay.fell_back and CALLS == [call.arguments["city"]]  # the recorded run only: none at the server


def test_serve_passes_tools_on_for_a_model_loaded_from_a_server(engine: Any) -> None:
    """``%llm_serve`` of a model loaded from a server (llama-cpp-python's, ``chatml-function-calling``): the
    remote loader says it passes tools on (``tool_calling()``), so a client's tools and forced call reach the
    upstream server and its call comes back as ``tool_calls``."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("llama_cpp.server")
    try:
        from servers import LlamaCppServer
    except ImportError:
        from tests.servers import LlamaCppServer
    import nbllm
    from nbllm.serve import stop

    upstream = LlamaCppServer(tiny_gguf_model(chat_template="tools"), chat_format="chatml-function-calling")
    try:
        engine.load(upstream.url)
        assert engine.loader.tool_calling().server
        server = nbllm.serve(port=0)
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(
            model=nbllm.status().model, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[Tool.of(weather).schema], tool_choice={"type": "function", "function": {"name": "weather"}},
            temperature=0, max_tokens=40)
        calls = answer.choices[0].message.tool_calls or []
        assert answer.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["weather"]
        assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Lisbon")
    finally:
        stop()
        upstream.stop()


def test_the_remote_loader_passes_tools_to_a_server_and_reads_its_calls(engine: Any) -> None:
    """A chat with tools on a model at a server (here nbllm's own, serving a second engine): the tools
    and tool_choice travel in the request, the server's tool_calls come back as calls that run here."""
    pytest.importorskip("llama_cpp")
    from nbllm.engine import Engine
    from nbllm.serve import stop

    served = Engine()
    served.load(tiny_gguf_model(chat_template="tools"))
    server = __import__("nbllm").serve(port=0, engine=served)
    try:
        engine.load(server.url)
        conv = Conversation("t", engine=engine)
        seen: list[ToolCall] = []
        _ = conv.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0, max_new_tokens=60,
                  on_tool_call=seen.append).text
        assert len(seen) == 1 and seen[0].name == "weather" and not seen[0].error
        assert CALLS == [seen[0].arguments["city"]]
        assert [m["role"] for m in conv.messages()] == ["user", "assistant", "tool", "assistant"]
        # the server held the first reply to the call as it does in the kernel: the same arguments
        local = Conversation("l", engine=served)
        with pytest.warns(NbllmWarning, match="after the 0 calls allowed"):
            _ = local.send("Weather in Paris?", tools=[weather], tool_choice="weather", temperature=0, max_new_tokens=60,
                       max_tool_calls=0).text
        assert parse_tool_calls(local.turns[0].reply.content, "hermes")[1][0].arguments == seen[0].arguments  # type: ignore[union-attr]
    finally:
        stop()
        served.unload()


def test_the_remote_loader_against_llama_cpp_pythons_server(engine: Any) -> None:
    """llama-cpp-python's server with its ``chatml-function-calling`` format: the tools and a forced
    tool_choice reach it, and its streamed ``tool_calls`` (the name repeated in every piece) come back as
    one call that runs here. (Its streamed ``auto`` reply after a tool result ends with no data on this
    version, so the whole loop is tested against nbllm's own server above.)"""
    pytest.importorskip("llama_cpp.server")
    try:
        from servers import LlamaCppServer
    except ImportError:
        from tests.servers import LlamaCppServer
    from nbllm.engine import Prompt

    server = LlamaCppServer(tiny_gguf_model(chat_template="tools"), chat_format="chatml-function-calling")
    try:
        engine.load(server.url)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        text = engine.stream_prompt(Prompt("", None, messages, tools=[Tool.of(weather).schema], tool_choice="weather"),
                                    {"temperature": 0, "max_new_tokens": 40}).text
        content, calls = parse_tool_calls(text, engine.loader.tool_calls_as)
        assert content == "" and len(calls) == 1 and calls[0].name == "weather", text
        run_call(calls[0], [Tool.of(weather)])
        assert not calls[0].error and CALLS == [calls[0].arguments["city"]] and CALLS[0] in ("Paris", "Lisbon")
    finally:
        server.stop()
