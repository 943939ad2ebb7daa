"""Conversations: the model's own template, history, prefix reuse, regenerate/continue, truncation,
save/load, interrupts and failures, and the chat magics, on the built-in tiny models."""

from __future__ import annotations

import _thread
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need

import nbllm
from nbllm import chat as chatlib
from nbllm.chat import ChatNote, Conversation, conversation, render_continuation
from nbllm.chat_template import FALLBACK_TEMPLATE
from nbllm.errors import ChatError, GenerationError
from nbllm.frontend import using

try:
    from stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step
except ImportError:  # tests/ imported as a package
    from tests.stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step

GREEDY = {"temperature": 0.0, "max_new_tokens": 8}

# Other families' template shapes, to check the rendering beyond the tiny model's own template.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Brazil?"},
    ],
    [
        {"role": "system", "content": "Responda em português. 🤖"},
        {"role": "user", "content": "Olá, ação e coração!\nDuas linhas, {chaves} e {{ não é jinja }}."},
        {"role": "assistant", "content": "Crème brûlée, São Paulo, 🇧🇷 → ≤ ≥ …"},
        {"role": "user", "content": "  espaços  \n\tno fim  "},
    ],
]


@pytest.fixture(autouse=True)
def _empty_registry() -> Iterator[None]:
    yield
    for name in list(chatlib.conversations()):
        chatlib.forget(name)


@pytest.fixture
def loaded(engine: Any, tiny_model: Path) -> Any:
    engine.load(tiny_model)
    return engine


def _conversation_of(messages: list[dict[str, str]], name: str = "t") -> Conversation:
    """A conversation holding every message but the last, which must be a user message."""
    assert messages[-1]["role"] == "user"
    return Conversation.from_dict({"messages": messages[:-1]}, name=name)


def _spy_prompt_ids(monkeypatch: pytest.MonkeyPatch, loader: Any) -> list[list[int]]:
    """Record the token ids each generation receives."""
    seen: list[list[int]] = []
    original = loader.generate_tokens

    def generate_tokens(request: Any) -> Any:
        seen.append(list(request.prompt_ids))
        return original(request)

    monkeypatch.setattr(loader, "generate_tokens", generate_tokens)
    return seen


def _break_after(monkeypatch: pytest.MonkeyPatch, loader: Any, n: int, exc: BaseException) -> None:
    """Make the next generations raise ``exc`` after ``n`` tokens, as a failure of the loader's library would."""
    original = loader.generate_tokens

    def generate_tokens(*args: Any, **kwargs: Any) -> Iterator[int]:
        tokens = original(*args, **kwargs)

        def broken() -> Iterator[int]:
            try:
                for i, token in enumerate(tokens):
                    if i == n:
                        raise exc
                    yield token
            finally:
                tokens.close()

        return broken()

    monkeypatch.setattr(loader, "generate_tokens", generate_tokens)


# -- rendering ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [None, CHATML, LLAMA2, GEMMA_LIKE], ids=["own", "chatml", "llama2", "gemma"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "unicode"])
def test_prompt_equals_the_tokenizers_own_render(loaded: Any, template: str | None, messages: list[dict[str, str]]) -> None:
    tokenizer = loaded.loader.tokenizer
    if template is not None:
        tokenizer.chat_template = template
    conv = _conversation_of(messages)
    result = conv.send(messages[-1]["content"], max_new_tokens=1)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert result.prompt == expected
    _ = result.text
    assert result.record is not None and result.record.messages == messages
    assert conv.messages() == [*messages, {"role": "assistant", "content": result.text}]


@pytest.mark.parametrize("template", [None, CHATML, LLAMA2, GEMMA_LIKE], ids=["own", "chatml", "llama2", "gemma"])
def test_continuation_prompt_equals_continue_final_message(loaded: Any, template: str | None) -> None:
    tokenizer = loaded.loader.tokenizer
    if template is not None:
        tokenizer.chat_template = template
    for messages in CONVERSATIONS:
        partial = [*messages, {"role": "assistant", "content": "Sure, here  it is: 🤖 "}]
        expected = tokenizer.apply_chat_template(partial, continue_final_message=True, tokenize=False)
        ours = render_continuation(loaded.loader.chat_template, partial, special_tokens=loaded.loader.special_tokens)
        assert ours == expected


def test_continuation_needs_a_reply_to_continue() -> None:
    with pytest.raises(ChatError, match="assistant"):
        render_continuation(None, [{"role": "user", "content": "hi"}], special_tokens={})


def test_bos_is_never_doubled(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = loaded.loader.tokenizer
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # the tokenizer adds one by itself...
    assert loaded.loader.chat_template.startswith("{{- bos_token }}")  # ...and so does the template
    seen = _spy_prompt_ids(monkeypatch, loaded.loader)
    conv = Conversation("bos", system="Be brief.")
    _ = conv.send("Hello", **GREEDY).text
    _ = conv.send("Again", **GREEDY).text
    _ = conv.regenerate(**GREEDY).text
    _ = conv.continue_reply(**GREEDY).text
    assert len(seen) == 4
    for ids in seen:
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == 1


def test_model_without_template_gets_the_fallback_and_a_note(engine: Any) -> None:
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(chat_template=False))
    tokenizer = engine.loader.tokenizer
    assert engine.loader.chat_template is None
    conv = Conversation("plain", system="Short answers.")
    with pytest.warns(ChatNote, match="no chat template"):
        result = conv.send("Hi there", **GREEDY)
    assert chatlib.FALLBACK_NOTE in conv.notes
    messages = [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "Hi there"}]
    expected = tokenizer.apply_chat_template(messages, chat_template=FALLBACK_TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
    assert result.prompt == expected
    assert "<|im_start|>system\nShort answers.<|im_end|>" in result.prompt
    _ = result.text
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChatNote)  # said once per conversation, not at every turn
        again = conv.send("Again", **GREEDY)
    assert conv.notes == [] and again.prompt.startswith(expected)


# -- turns --------------------------------------------------------------------------------------------
def test_turns_records_and_history(loaded: Any) -> None:
    conv = conversation("history")
    assert conversation("history") is conv
    conv.system = "You are terse."
    first = conv.send("One", **GREEDY)
    assert len(conv) == 0  # added when the reply ends
    text = first.text
    assert len(conv) == 1 and conv.turns[0].reply is not None and conv.turns[0].reply.content == text
    second = conv.send("Two", **GREEDY)
    _ = second.text
    assert [r.record.conversation for r in (first, second)] == [  # type: ignore[union-attr]
        {"name": "history", "turn": 1}, {"name": "history", "turn": 2}]
    assert second.record is not None and second.record.mode == "chat"
    assert second.record.messages == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "One"},
        {"role": "assistant", "content": text}, {"role": "user", "content": "Two"},
    ]
    reply = conv.turns[1].reply
    assert reply is not None and reply.seed == second.seed and reply.record is second.record and not reply.partial


def test_regenerate_keeps_earlier_versions(loaded: Any) -> None:
    conv = Conversation("regen")
    _ = conv.send("Tell me a story.", temperature=1.0, seed=1, max_new_tokens=12).text
    _ = conv.send("Another one.", temperature=1.0, seed=2, max_new_tokens=12).text
    before = conv.turns[-1].reply
    assert before is not None
    again = conv.regenerate(temperature=1.0, seed=3, max_new_tokens=12)
    assert again.prompt.endswith("<|user|>\nAnother one.</s>\n<|assistant|>\n")
    new = again.text
    assert len(conv) == 2
    turn = conv.turns[-1]
    assert turn.earlier == [before] and turn.reply is not None and turn.reply.content == new
    assert new != before.content  # another seed, another story
    assert [v.seed for v in turn.versions] == [2, 3]
    assert again.record is not None and again.record.conversation == {"name": "regen", "turn": 2}
    assert conv.messages()[-1] == {"role": "assistant", "content": new}
    with pytest.raises(ChatError, match="no reply to regenerate"):
        Conversation("empty").regenerate()


def test_continue_extends_the_last_reply(loaded: Any) -> None:
    conv = Conversation("cont", system="Be verbose.")
    first = conv.send("Count to ten.", temperature=0, max_new_tokens=5)
    start = first.text
    assert first.finish_reason == "length"
    more = conv.continue_reply(temperature=0, max_new_tokens=6)
    assert more.prompt.endswith("<|assistant|>\n" + start)
    assert "</s>" not in more.prompt[-len(start) - 1 :]
    added = more.text
    reply = conv.turns[-1].reply
    assert reply is not None and reply.content == start + added
    assert [r.seed for r in reply.records] == [first.seed, more.seed]
    assert more.record is not None and more.record.conversation == {"name": "cont", "turn": 1}
    assert len(conv) == 1 and conv.continue_ == conv.continue_reply


def test_reset_keeps_the_system_prompt(loaded: Any) -> None:
    conv = Conversation("reset", system="Sys.")
    _ = conv.send("a", **GREEDY).text
    _ = conv.send("b", **GREEDY).text
    assert conv.reset() == 2
    assert conv.turns == [] and conv.messages() == [{"role": "system", "content": "Sys."}]
    result = conv.send("c", **GREEDY)
    assert result.prompt == "<s><|system|>\nSys.</s>\n<|user|>\nc</s>\n<|assistant|>\n"
    _ = result.text
    assert result.record is not None and result.record.conversation == {"name": "reset", "turn": 1}


# -- prefix reuse -------------------------------------------------------------------------------------
def _chat_transcript(engine: Any, reuse: bool) -> list[str]:
    """Greedy replies of a conversation of several turns, a regeneration and a continuation."""
    engine.reuse_prefix = reuse
    conv = Conversation(f"reuse-{reuse}", system="You are a helpful assistant. " * 8)
    replies = []
    for message in ["Hello!", "What is a notebook?", "Olá! Tudo bem? 🤖", "Write a haiku about the sea.", "Thanks."]:
        replies.append(conv.send(message, temperature=0, max_new_tokens=16).text)
    replies.append(conv.regenerate(temperature=0, max_new_tokens=16).text)
    replies.append(conv.continue_reply(temperature=0, max_new_tokens=8).text)
    return replies


def _computed_per_generation(monkeypatch: pytest.MonkeyPatch, loader: Any) -> tuple[list[int], Callable[[], None]]:
    """How many prompt tokens the first model pass of each generation computes: the whole prompt
    without prefix reuse, only the part not already in the cache with it."""
    computed: list[int] = []
    fresh = [True]

    def seen(n: int) -> None:
        if fresh[0]:
            computed.append(n)
            fresh[0] = False

    original = loader.generate_tokens

    def generate_tokens(*args: Any, **kwargs: Any) -> Any:
        fresh[0] = True
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "generate_tokens", generate_tokens)
    if hasattr(loader, "llm"):  # llama.cpp: Llama.generate evaluates what its cache lacks
        evaluate = loader.llm.eval

        def eval_tokens(tokens: Any) -> Any:
            seen(len(tokens))
            return evaluate(tokens)

        monkeypatch.setattr(loader.llm, "eval", eval_tokens)
        return computed, lambda: None
    # Transformers: the model's first forward pass gets the prompt tokens not in the cache
    handle = loader.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen(int(kwargs["input_ids"].shape[1])), with_kwargs=True
    )
    return computed, handle.remove


def _check_prefix_reuse(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    computed, remove_hook = _computed_per_generation(monkeypatch, engine.loader)
    try:
        with_reuse = _chat_transcript(engine, True)
        reused = list(computed)
        computed.clear()
        without = _chat_transcript(engine, False)
    finally:
        remove_hook()
        engine.reuse_prefix = True
    assert with_reuse == without
    # Without reuse every prompt is computed whole; with it, turns 2+ compute only what is new.
    assert reused[0] == computed[0]
    assert all(a < b for a, b in zip(reused[1:], computed[1:], strict=True)), (reused, computed)
    assert reused[5] == 1  # regenerating: the whole prompt is cached but its last token


def test_greedy_replies_are_the_same_with_and_without_prefix_reuse(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_prefix_reuse(loaded, monkeypatch)


# -- truncation ---------------------------------------------------------------------------------------
def test_oldest_turns_are_left_out_when_the_context_is_full(engine: Any) -> None:
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(max_position_embeddings=128))
    assert engine.loader.context_length == 128
    conv = Conversation("small", system="Keep me.")
    sent = []
    notes: list[str] = []
    for i in range(8):
        message = f"Message number {i}: the quick brown fox jumps over the lazy dog."
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = conv.send(message, temperature=0, max_new_tokens=16)
        _ = result.text
        notes += [str(w.message) for w in caught if issubclass(w.category, ChatNote)]
        sent.append((result, conv.left_out, list(conv.notes)))
    assert len(conv) == 8  # the conversation keeps everything; only the prompt leaves turns out
    last, left_out, _ = sent[-1]
    assert left_out > 0
    assert notes and all("oldest turn" in n for n in notes) and notes == [n for _, _, said in sent for n in said]
    assert any(f"the {left_out} oldest turns are left out" in n for n in notes)
    assert last.prompt_tokens <= 128 - 16
    messages = last.record.messages  # type: ignore[union-attr]
    assert messages[0] == {"role": "system", "content": "Keep me."}
    assert messages[-1]["content"].startswith("Message number 7")
    assert messages[1] == {"role": "user", "content": conv.turns[left_out].user}
    # the fewest turns are left out: one more turn would not fit
    fuller = [messages[0]]
    for turn in conv.turns[left_out - 1 : 7]:
        fuller += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply.content}]
    ids = engine.prompt_for([*fuller, messages[-1]], chat=True).ids
    assert len(ids) > 128 - 16
    assert sent[0][1] == 0 and sent[0][2] == []


def test_a_message_too_long_for_the_context_fails_and_adds_nothing(engine: Any) -> None:
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(max_position_embeddings=64))
    conv = Conversation("toolong")
    with pytest.raises(GenerationError, match="context holds 64"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatNote)
        conv.send("many words " * 60, max_new_tokens=4)
    assert len(conv) == 0 and not conv.generating
    _ = conv.send("short", **GREEDY).text
    assert len(conv) == 1


# -- save and load ------------------------------------------------------------------------------------
def test_save_load_round_trip(loaded: Any, tmp_path: Path) -> None:
    conv = Conversation("saved", system="Sistema: olá 🤖")
    _ = conv.send("Primeira mensagem — ação!", temperature=0.8, seed=7, max_new_tokens=6).text
    _ = conv.send("Second", temperature=0.8, seed=8, max_new_tokens=6).text
    _ = conv.regenerate(temperature=0.8, seed=9, max_new_tokens=6).text
    path = conv.save(tmp_path / "chat.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "nbllm.conversation" and data["name"] == "saved"
    assert data["messages"] == conv.messages()
    assert data["model"]["name"] == loaded.status().model and data["options"]["seed"] == 9
    assert [t["reply"]["seeds"] for t in data["turns"]] == [[7], [9]]
    assert data["turns"][1]["earlier"][0]["seeds"] == [8]
    assert "ação" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes

    back = Conversation.load(path)
    assert back.name == "saved" and back.system == conv.system and back.messages() == conv.messages()
    assert back.turns == conv.turns
    again = back.to_dict()
    original = conv.to_dict()
    again.pop("saved"), original.pop("saved")
    assert again == original
    # the loaded conversation goes on, from its whole history
    third = back.send("Third", **GREEDY)
    _ = third.text
    assert third.record is not None and third.record.messages == [*conv.messages(), {"role": "user", "content": "Third"}]
    assert len(back) == 3 and back.turns[-1].reply is not None and back.turns[-1].reply.content == third.text

    registered = chatlib.load_conversation(path, "renamed")
    assert conversation("renamed") is registered and registered.name == "renamed"


def test_load_plain_messages_and_bad_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(CONVERSATIONS[1]), encoding="utf-8")
    conv = Conversation.load(plain, name="p")
    assert conv.messages() == CONVERSATIONS[1] and conv.turns[-1].reply is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ChatError, match="not valid JSON"):
        Conversation.load(bad)
    with pytest.raises(ChatError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"role": "assistant", "content": "hi"}]), encoding="utf-8")
    with pytest.raises(ChatError, match="message 1"):
        Conversation.load(wrong)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
         "message 2 is a user message right after another user message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
         "message 2: 'content' is null, not text"),
        ([{"role": "user", "content": 5}], "message 1: 'content' is a number, not text"),
        ([{"role": "user"}], "message 1 has no 'content'"),
        ([{"role": "robot", "content": "x"}], "message 1: 'role' is 'robot', not one of system, user, assistant, tool"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
         "message 2 is a system message that is not the first message"),
        (["hello"], "message 1 is text, not an object"),
        ("hello", "the file is text, not an object"),
        ({"format": "nbllm.conversation", "version": 99, "turns": []},
         "the file is in version 99 of the conversation format; this nbllm reads up to version 1"),
        ({"version": "1", "turns": []}, "'version' is '1', not a format version"),
        ({"name": "x"}, "the file holds neither 'messages' nor 'turns'"),
        ({"turns": [{"user": "a", "reply": None}, {"user": "b", "reply": None}]},
         "turn 1 has no reply, but turn 2 follows it (two user messages in a row)"),
        ({"turns": [{"user": "a", "reply": {"content": None}}]}, "turn 1, reply: 'content' is null, not text"),
        ({"turns": [{"user": None}]}, "turn 1: 'user' is null, not text"),
        ({"turns": [{"user": "a", "reply": {"content": "b", "partial": "no"}}]},
         "turn 1, reply: 'partial' is text, not true or false"),
        ({"turns": [{"user": "a", "reply": {"content": "b"}, "earlier": [{"content": []}]}]},
         "turn 1, earlier reply 1: 'content' is a list, not text"),
        ({"turns": [{"user": "a", "reply": {"content": "b", "records": [{"seed": 1}]}}]},
         "turn 1, reply, record 1 has no 'model'"),
        ({"turns": "many"}, "the file: 'turns' is text, not a list"),
        ({"system": 3, "turns": []}, "the file: 'system' is a number, not text"),
        ({"turns": [{"user": "a", "reply": {"content": "b"}}],
          "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "edited"}]},
         "'messages' and 'turns' disagree at message 2"),
    ],
)
def test_a_bad_file_is_one_line_naming_what_and_where(tmp_path: Path, data: Any, message: str) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ChatError) as info:
        Conversation.load(path)
    assert info.value.message.startswith(f"{path}: {message}. ")
    assert "\n" not in info.value.message and info.value.fix


@pytest.fixture(params=["transformers", "llama.cpp"])
def either_loaded(request: pytest.FixtureRequest, engine: Any) -> Any:
    engine.load(request.getfixturevalue("tiny_model" if request.param == "transformers" else "tiny_gguf"))
    return engine


def test_a_file_ending_in_a_user_message_is_answered_never_doubled(either_loaded: Any, tmp_path: Path) -> None:
    path = tmp_path / "open.json"
    path.write_text(json.dumps(CONVERSATIONS[1]), encoding="utf-8")
    conv = chatlib.load_conversation(path, "open")
    with using("notebook"), pytest.raises(ChatError, match=r"has no reply yet, so a new one would make two user messages in a row\. "
                                        r"Answer it first with regenerate \(%llm_chat open --regenerate\)"):
        conv.send("Another question", **GREEDY)
    assert len(conv) == 2 and not conv.generating
    answer = conv.reply(regenerate=True, **GREEDY)
    _ = answer.text
    assert answer.record is not None and answer.record.messages == CONVERSATIONS[1]
    reply = conv.turns[-1].reply
    assert reply is not None and reply.content == answer.text and conv.turns[-1].earlier == []
    nxt = conv.send("Another question", **GREEDY)
    _ = nxt.text
    assert nxt.record is not None
    roles = [m["role"] for m in nxt.record.messages or []]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]


# -- the rules of a reply live in the conversation ------------------------------------------------------
def test_reply_rules(loaded: Any) -> None:
    conv = Conversation("rules")
    for message in ("", "   ", "\n\t \n"):
        with pytest.raises(ChatError, match=r"^the message is empty\. Write the message to send\.$"):
            conv.reply(message)
        with pytest.raises(ChatError, match="the message is empty"):
            conv.send(message)
    with pytest.raises(ChatError, match="the message is empty"):
        conv.reply()
    with pytest.raises(ChatError, match="^regenerate and continue cannot be used together. Choose one of them.$"):
        conv.reply(regenerate=True, continue_=True)
    with pytest.raises(ChatError, match="no reply to regenerate"):
        conv.reply(regenerate=True)
    assert len(conv) == 0 and not conv.generating
    first = conv.reply("Hello", system="Be brief.", **GREEDY)
    _ = first.text
    assert conv.system == "Be brief." and first.record is not None
    assert first.record.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    for flag in ("regenerate", "continue_"):
        with pytest.raises(ChatError, match=f"^{flag.rstrip('_')} takes no message"):
            conv.reply("more", **{flag: True})
    again = conv.reply(regenerate=True, **GREEDY)
    _ = again.text
    assert len(conv.turns[-1].earlier) == 1
    more = conv.reply(continue_=True, system="", **GREEDY)
    _ = more.text
    assert conv.system == "" and conv.turns[-1].reply is not None
    assert conv.turns[-1].reply.content == again.text + more.text


# -- interrupts and failures --------------------------------------------------------------------------
def test_interrupted_reply_is_kept_as_partial(loaded: Any) -> None:
    conv = Conversation("interrupt")
    _ = conv.send("Before", **GREEDY).text
    steps, counting = count_steps(loaded.loader.model)
    at, stopping = stop_at_step(loaded, 4, _thread.interrupt_main)  # a kernel interrupt at the 4th step
    result = conv.send("Tell me everything.", temperature=0, max_new_tokens=20)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in result:
                pass
    finally:
        stopping.remove()
        counting.remove()
    assert at.get("told") and at["result"] is result
    assert result.finish_reason == "interrupted" and result.completion_tokens == at["tokens"] == 3
    assert len(steps) == 4 and steps_once_the_generation_thread_is_free(steps) == 4  # stopped within a step
    assert len(conv) == 2 and not conv.generating
    reply = conv.turns[-1].reply
    assert reply is not None and reply.partial and reply.finish_reason == "interrupted"
    assert reply.content == "".join(result.chunks)
    assert "[partial: interrupted]" in str(conv) and "partial: interrupted" in conv._repr_html_()
    more = conv.continue_reply(temperature=0, max_new_tokens=4)
    _ = more.text
    assert not reply.partial and reply.finish_reason == "length" and reply.content.endswith(more.text)


def test_cancelled_reply_is_kept_as_partial(loaded: Any) -> None:
    conv = Conversation("cancel")
    result = conv.send("Go on and on.", temperature=0, max_new_tokens=200)
    for i, _ in enumerate(result):
        if i == 1:
            result.cancel()
    assert result.finish_reason == "cancelled"
    reply = conv.turns[-1].reply
    assert reply is not None and reply.partial and reply.content == result.text


def test_failed_generation_adds_no_turn(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    conv = Conversation("fail")
    _ = conv.send("ok", **GREEDY).text
    _break_after(monkeypatch, loaded.loader, 2, RuntimeError("boom"))
    result = conv.send("this one breaks", **GREEDY)
    with pytest.raises(GenerationError, match="boom"):
        _ = result.text
    assert len(conv) == 1 and not conv.generating
    with pytest.raises(GenerationError):
        _ = conv.regenerate(**GREEDY).text
    assert conv.turns[-1].earlier == []
    monkeypatch.undo()
    _ = conv.send("works again", **GREEDY).text
    assert [t.user for t in conv.turns] == ["ok", "works again"]


def test_one_reply_at_a_time_and_sending_from_a_worker_thread(loaded: Any) -> None:
    conv = Conversation("threads")
    unread = conv.send("first", **GREEDY)
    with pytest.raises(ChatError, match="still being generated"):
        conv.send("second", **GREEDY)
    _ = unread.text

    results: list[str] = []
    errors: list[BaseException] = []

    def panel() -> None:
        try:
            results.append(conv.send("from the panel", **GREEDY).text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    other = Conversation("main")
    worker = threading.Thread(target=panel)
    worker.start()
    main_text = other.send("from the notebook", **GREEDY).text
    worker.join(timeout=60)
    assert not errors and len(results) == 1
    assert [t.user for t in conv.turns] == ["first", "from the panel"]
    # Neither reply was disturbed by the other: each is what its conversation gives alone.
    assert main_text == Conversation("alone").send("from the notebook", **GREEDY).text
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": unread.text}]
    assert results[0] == nbllm.get_engine().generate([*history, {"role": "user", "content": "from the panel"}],
                                                     **GREEDY).text


# -- magics -------------------------------------------------------------------------------------------
@pytest.fixture
def chat_shell(shell: Any, loaded: Any) -> Any:
    from nbllm.magics.chat import ChatMagics

    shell.register_magics(ChatMagics)
    return shell


def test_chat_magics(chat_shell: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from IPython.core.error import UsageError

    sh = chat_shell
    sh.user_ns["topic"] = "the sea"
    sh.run_cell_magic("llm_chat", "poet --system 'You write poems.' --temperature 0 --max-new-tokens 8 -o r",
                      "Write about {topic}.\n")
    first = sh.user_ns["r"]
    conv = conversation("poet")
    assert conv.system == "You write poems." and conv.turns[0].user == "Write about the sea."
    assert first.record.conversation == {"name": "poet", "turn": 1}
    assert first.text in capsys.readouterr().out

    # the magic gives what the library gives
    library = Conversation("lib", system="You write poems.").send("Write about the sea.", temperature=0,
                                                                  max_new_tokens=8).text
    assert first.text == library

    sh.run_cell_magic("llm_chat", "poet --temperature 0 --max-new-tokens 8 -o r2", "Again.")
    assert len(conv) == 2 and sh.user_ns["r2"].record.conversation["turn"] == 2
    sh.run_line_magic("llm_chat", "poet --regenerate --temperature 0.9 --seed 5 --max-new-tokens 8")
    assert len(conv.turns[-1].earlier) == 1
    before = conv.turns[-1].reply.content
    sh.run_line_magic("llm_chat", "poet --continue --temperature 0 --max-new-tokens 4 -o r3")
    assert conv.turns[-1].reply.content == before + sh.user_ns["r3"].text

    with pytest.raises(UsageError, match="regenerate takes no message"):
        sh.run_cell_magic("llm_chat", "poet --regenerate", "a message")
    with pytest.raises(UsageError, match="empty"):
        sh.run_cell_magic("llm_chat", "poet", "\n")
    with pytest.raises(UsageError, match="empty"):
        sh.run_line_magic("llm_chat", "poet")
    with pytest.raises(UsageError, match="no reply to continue"):
        sh.run_line_magic("llm_chat", "fresh --continue")
    with pytest.raises(UsageError, match="temperature"):
        sh.run_cell_magic("llm_chat", "poet --temperature 9", "hi")
    assert len(conv) == 2

    shown = sh.run_line_magic("llm_history", "poet")
    assert shown is conv
    html = shown._repr_html_()
    assert "You write poems." in html and "Write about the sea." in html and "version 2 of 2" in html
    with pytest.raises(UsageError, match="no conversation named 'nope'"):
        sh.run_line_magic("llm_history", "nope")

    path = tmp_path / "poet.json"
    sh.run_line_magic("llm_history", f"poet --save {path}")
    assert "Saved conversation 'poet'" in capsys.readouterr().out
    sh.run_line_magic("llm_chat_reset", "poet")
    assert "2 turns forgotten" in capsys.readouterr().out
    assert len(conv) == 0 and conv.system == "You write poems."
    loaded_conv = sh.run_line_magic("llm_history", f"--load {path}")
    assert loaded_conv is conversation("poet") and len(loaded_conv) == 2
    assert loaded_conv.messages()[1]["content"] == "Write about the sea."
    copy = sh.run_line_magic("llm_history", f"copy --load {path}")
    assert copy.name == "copy" and conversation("copy") is copy


def test_chat_magic_interrupt_keeps_a_partial_turn(chat_shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.error import UsageError

    engine = nbllm.get_engine()
    at, stopping = stop_at_step(engine, 5, _thread.interrupt_main)  # a kernel interrupt at the 5th step
    try:
        with pytest.raises(UsageError, match="interrupted after 4 tokens"):
            chat_shell.run_cell_magic("llm_chat", "--temperature 0 --max-new-tokens 30", "Talk.")
    finally:
        stopping.remove()
    assert at.get("told")
    reply = conversation().turns[-1].reply
    assert reply is not None and reply.partial and reply.finish_reason == "interrupted"
    assert reply.content == "".join(at["result"].chunks)
    assert "interrupted after 4 tokens" in capsys.readouterr().out


def _notes(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("note: ")]


def test_chat_magic_shows_each_note_once_as_one_note_line(shell: Any, engine: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Notes reach the user through one channel, the ChatNote warning, shown by the magic as `note:`."""
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(max_position_embeddings=128))
    said: list[str] = []
    for i in range(6):
        capsys.readouterr()
        shell.run_cell_magic("llm_chat", "small --temperature 0 --max-new-tokens 16",
                             f"Turn {i}: the quick brown fox jumps over the lazy dog.")
        out = capsys.readouterr().out
        said += _notes(out)
        assert "[the conversation" not in out  # not printed a second way
    assert said and all("oldest turn" in n for n in said) and len(said) == len(set(said))  # each said once

    engine.load(tiny_transformers_model(chat_template=False))
    for text in ("Hi", "Again"):
        capsys.readouterr()
        shell.run_cell_magic("llm_chat", "plain --temperature 0 --max-new-tokens 4", text)
        notes = _notes(capsys.readouterr().out)
        assert notes == ([f"note: {chatlib.FALLBACK_NOTE}"] if text == "Hi" else [])


# -- llama.cpp ----------------------------------------------------------------------------------------
def _gguf_template(path: Path) -> tuple[str, dict[str, str]]:
    llama_cpp = need("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    special = {
        "bos_token": llm._model.token_get_text(llm.token_bos()),
        "eos_token": llm._model.token_get_text(llm.token_eos()),
    }
    return template, special


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "unicode"])
def test_gguf_template_renders_as_llama_cpp_renders_it(tiny_gguf: Path, messages: list[dict[str, str]]) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from nbllm.chat_template import render_chat

    template, special = _gguf_template(tiny_gguf)
    formatter = Jinja2ChatFormatter(template=template, bos_token=special["bos_token"], eos_token=special["eos_token"])
    assert render_chat(template, messages, special_tokens=special) == formatter(messages=messages).prompt


@pytest.fixture
def gguf_loaded(engine: Any, tiny_gguf: Path) -> Any:
    need("llama_cpp")
    engine.load(tiny_gguf)
    return engine


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "unicode"])
def test_gguf_chat_prompt_equals_llama_cpp_rendering(gguf_loaded: Any, tiny_gguf: Path,
                                                      messages: list[dict[str, str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template, special = _gguf_template(tiny_gguf)
    formatter = Jinja2ChatFormatter(template=template, bos_token=special["bos_token"], eos_token=special["eos_token"])
    seen = _spy_prompt_ids(monkeypatch, gguf_loaded.loader)
    result = _conversation_of(messages).send(messages[-1]["content"], max_new_tokens=1)
    assert result.prompt == formatter(messages=messages).prompt
    _ = result.text
    bos = gguf_loaded.loader.tokenize(special["bos_token"], add_special=False)[0]
    assert seen[0][0] == bos and seen[0].count(bos) == 1


def test_gguf_greedy_replies_are_the_same_with_and_without_prefix_reuse(gguf_loaded: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _check_prefix_reuse(gguf_loaded, monkeypatch)


def test_reply_never_read_before_an_unload_is_superseded_and_adds_nothing(loaded: Any, tiny_model: Path) -> None:
    conv = Conversation("unloaded")
    result = conv.send("hello", **GREEDY)
    loaded.unload()
    loaded.load(tiny_model)
    assert result.done and result.finish_reason == "superseded"
    assert result.text == "" and len(conv) == 0 and not conv.generating
    _ = conv.send("hello again", **GREEDY).text
    assert len(conv) == 1


def test_chat_records_say_how_much_of_the_prompt_was_reused(loaded: Any) -> None:
    conv = Conversation("reuse-record", system="You are a helpful assistant.")
    first = conv.send("Hello!", temperature=0, max_new_tokens=8)
    _ = first.text
    second = conv.send("And then?", temperature=0, max_new_tokens=8)
    _ = second.text
    assert first.record is not None and second.record is not None
    assert first.record.reused_prefix_tokens == 0
    assert 0 < second.record.reused_prefix_tokens < second.prompt_tokens
    loaded.reuse_prefix = False
    try:
        third = conv.send("Off now.", temperature=0, max_new_tokens=8)
        _ = third.text
        assert third.record is not None and third.record.reused_prefix_tokens == 0
    finally:
        loaded.reuse_prefix = True
