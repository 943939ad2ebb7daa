"""Sweeps: every combination of options over prompts as one table; Transformers rows run as padded
batches whose every row gives its one-by-one text; llama.cpp rows run one after another reusing the
shared prompt prefix; an interrupt keeps the finished rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm.sweeps import parse_grid

PROMPTS = [
    "Once",
    "The quick brown fox jumps over the lazy dog, and then",
    "A list of numbers: 1, 2, 3,",
    "def fibonacci(n):",
    "Translate to French: good morning, my friend. How are you today? I hope",
    "Q: What is a derivative?\nA:",
    "{\"json\": [1, 2",
    "Emoji and accents: café, naïve, 🙂 and",
]


def one_by_one(prompt: Any, **options: Any) -> nbllm.Result:
    return nbllm.generate(prompt, **options)


@pytest.mark.parametrize("options", [
    {"temperature": 0, "max_new_tokens": 16},
    {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 16},
    {"temperature": 1.3, "top_k": 30, "min_p": 0.05, "typical_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 16},
    {"temperature": 0.8, "max_new_tokens": 40, "stop": ["e", "\n"]},
])
def test_each_batched_row_gives_its_one_by_one_text(tiny_model: Path, engine: Any, options: dict[str, Any]) -> None:
    nbllm.load(tiny_model, dtype="float32")
    seeds = [11, 12]
    table = nbllm.sweep(PROMPTS, seed=seeds, **{k: [v] for k, v in options.items()})
    assert len(table) == len(PROMPTS) * len(seeds)
    for row in table.itertuples():
        alone = one_by_one(row.prompt, seed=row.seed, **options)
        assert (row.text, row.finish_reason, row.tokens) == (alone.text, alone.finish_reason, alone.completion_tokens)
    batches = {r["record"]["batch"]["id"] for r in _logged(table)}
    assert len(batches) == 1  # 16 rows sharing their options but the seed: one padded batch


def _logged(table: Any) -> list[dict[str, Any]]:
    from nbllm.runlog import RunLog, flush

    flush()
    by_id = {row["record_id"]: row for row in RunLog().rows()}
    return [by_id[i] for i in table["record_id"]]


def test_the_table_has_the_prompt_the_varied_options_and_the_outcome(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    table = nbllm.sweep(["One", "Two"], temperature=[0, 0.7], seed=[1, 2, 3], max_new_tokens=6, top_p=[0.9])
    assert list(table.columns) == ["prompt", "temperature", "seed", "text", "tokens", "tokens_per_second",
                                   "finish_reason", "record_id"]
    assert list(table["prompt"]) == ["One"] * 6 + ["Two"] * 6
    assert list(table["temperature"][:6]) == [0.0] * 3 + [0.7] * 3 and list(table["seed"][:3]) == [1, 2, 3]
    assert set(table["tokens"]) == {6} and set(table["finish_reason"]) == {"length"}
    assert (table["tokens_per_second"] > 0).all() and table["record_id"].is_unique
    records = [r["record"] for r in _logged(table)]
    assert [r["seed"] for r in records[:3]] == [1, 2, 3] and not any(r["seed_drawn"] for r in records)
    assert {r["batch"]["size"] for r in records} == {6}  # rows of both prompts share each temperature
    assert [r["batch"]["row"] for r in records[:3]] == [0, 1, 2]
    greedy = table[table["temperature"] == 0]
    assert greedy.groupby("prompt")["text"].nunique().eq(1).all()  # the seed does not change greedy text


def test_a_seeded_batch_replays_and_unseeded_rows_draw_and_record_their_seeds(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    first = nbllm.sweep(PROMPTS[:4], temperature=[0.9], seed=[5], max_new_tokens=12)
    again = nbllm.sweep(PROMPTS[:4], temperature=[0.9], seed=[5], max_new_tokens=12)
    assert list(first["text"]) == list(again["text"])
    drawn = nbllm.sweep(PROMPTS[:4], temperature=0.9, max_new_tokens=12)
    assert "seed" not in drawn.columns
    records = [r["record"] for r in _logged(drawn)]
    assert all(r["seed_drawn"] for r in records) and len({r["seed"] for r in records}) == 4
    for prompt, record, text in zip(PROMPTS[:4], records, drawn["text"]):
        assert one_by_one(prompt, temperature=0.9, max_new_tokens=12, seed=record["seed"]).text == text


def test_chat_message_lists_and_a_system_prompt(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "More please"}]]
    table = nbllm.sweep(chats, temperature=[0], max_new_tokens=[8])
    assert list(table["prompt"]) == ["Hi", "More please"] and table["messages"].tolist() == chats
    for chat, text in zip(chats, table["text"]):
        assert nbllm.generate(chat, temperature=0, max_new_tokens=8).text == text
    system = nbllm.sweep(["Hi"], system="Be brief.", temperature=[0], max_new_tokens=[8])
    assert system["text"][0] == nbllm.generate("Hi", system="Be brief.", temperature=0, max_new_tokens=8).text


def test_batch_false_runs_rows_alone_with_the_same_texts(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    batched = nbllm.sweep(PROMPTS, temperature=[0, 0.8], seed=[3], max_new_tokens=10)
    alone = nbllm.sweep(PROMPTS, temperature=[0, 0.8], seed=[3], max_new_tokens=10, batch=False)
    assert list(batched["text"]) == list(alone["text"])
    assert not any(r["record"].get("batch") for r in _logged(alone))


@pytest.mark.llamacpp
def test_llamacpp_runs_rows_one_after_another_reusing_the_shared_prefix(tiny_gguf: Path, engine: Any) -> None:
    pytest.importorskip("llama_cpp")
    nbllm.load(tiny_gguf, n_ctx=512)
    prompt = "A long shared prompt about rivers, lakes and the sea, " * 4
    table = nbllm.sweep([prompt], temperature=[0], seed=[1, 2, 3], max_new_tokens=8)
    records = [r["record"] for r in _logged(table)]
    assert records[0].get("batch") is None and all(r["reused_prefix_tokens"] > 0 for r in records[1:])
    assert set(table["text"]) == {nbllm.generate(prompt, temperature=0, max_new_tokens=8).text}


def test_the_sweep_magic_shows_a_table(shell: Any, tiny_model: Path, capsys: Any) -> None:
    shell.run_line_magic("llm_load", f"{tiny_model} --dtype float32")
    shell.user_ns["topic"] = "rivers"
    shell.run_cell_magic("llm", "--max-new-tokens 5 --sweep 'temperature=0,0.7 seed=1,2' -o t", "Tell me about {topic}")
    table = shell.user_ns["t"]
    assert list(table["prompt"]) == ["Tell me about rivers"] * 4 and list(table["seed"]) == [1, 2, 1, 2]
    assert "temperature" in capsys.readouterr().out  # shown
    shell.run_cell_magic("llm", "--chat --temperature 0 --max-new-tokens 5 --sweep 'max-new-tokens=3,5' -o c", "Hi")
    assert list(shell.user_ns["c"]["max_new_tokens"]) == [3, 5]
    assert shell.user_ns["c"]["text"][1] == nbllm.generate("Hi", chat=True, temperature=0, max_new_tokens=5).text
    with pytest.raises(UsageError, match=r"--sweep 'temperature' is not NAME=VALUE,VALUE"):
        shell.run_cell_magic("llm", "--sweep temperature", "x")
    with pytest.raises(UsageError, match=r"unknown option 'temprature'"):
        shell.run_cell_magic("llm", "--sweep temprature=0,1", "x")
    with pytest.raises(UsageError, match=r"--temperature -1.0 is below 0.0"):
        shell.run_cell_magic("llm", "--sweep temperature=0,-1", "x")


def test_grids_are_checked_by_the_option_schema(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    with pytest.raises(nbllm.NbllmError, match="unknown option 'temprature'"):
        nbllm.sweep("x", temprature=[0])
    with pytest.raises(nbllm.NbllmError, match="the sweep gives seed no value"):
        nbllm.sweep("x", seed=[])
    with pytest.raises(nbllm.NbllmError, match=r"--seed -3 is below 0"):
        nbllm.sweep("x", seed=[1, -3])
    with pytest.raises(nbllm.NbllmError, match="a sweep needs prompts"):
        nbllm.sweep([], temperature=[0])
    assert parse_grid("stop=\\n,. top-p=0.5") == {"stop": ["\n", "."], "top_p": ["0.5"]}


def test_an_interrupt_keeps_the_finished_rows(tiny_model: Path, engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    seen: list[nbllm.Result] = []

    def interrupt_at_the_third(result: nbllm.Result) -> None:
        seen.append(result)
        if len(seen) == 3:
            raise KeyboardInterrupt

    remove = engine.on_result(interrupt_at_the_third)
    try:
        # the third had finished when the interrupt came (in its on_result callback): it is kept too
        with pytest.warns(nbllm.errors.NbllmWarning, match="the sweep was interrupted: 3 of 6 runs finished"):
            table = nbllm.sweep(["a", "b"], seed=[1, 2, 3], temperature=0.5, max_new_tokens=4, batch=False)
    finally:
        remove()
    assert len(table) == 3 and table.attrs["interrupted"] and list(table["seed"]) == [1, 2, 3]
    assert set(table["finish_reason"]) == {"length"}
    assert nbllm.generate("still loaded", max_new_tokens=2).finish_reason == "length"


def test_generate_many_on_transformers_runs_one_padded_batch_with_the_one_by_one_texts(tiny_model: Path,
                                                                                      engine: Any) -> None:
    nbllm.load(tiny_model, dtype="float32")
    results = nbllm.generate_many(PROMPTS[:4], temperature=0.8, max_new_tokens=12)
    batches = {r.record.batch["id"] for r in results if r.record is not None and r.record.batch}
    assert len(batches) == 1 and len({r.seed for r in results}) == 4  # one batch; each row its own seed
    for prompt, result in zip(PROMPTS[:4], results):
        assert result.text == one_by_one(prompt, seed=result.seed, temperature=0.8, max_new_tokens=12).text


def test_generate_batch_on_a_loader_that_runs_one_prompt_at_a_time(engine: Any) -> None:
    from test_loader_contract import ReverseLoader

    nbllm.loaders.register(ReverseLoader)
    try:
        nbllm.load("reverse://mirror")
        prompts = [engine.prompt_for(p) for p in ("a b", "c d e")]
        results = engine.generate_batch(prompts, {"temperature": 0})
        assert [r.text for r in results] == ["b a", "e d c"] and all(r.done for r in results)
        with pytest.raises(nbllm.NbllmError, match="2 prompts and 1 seeds"):
            engine.generate_batch(prompts, seeds=[1])
    finally:
        engine.unload()
        nbllm.loaders.unregister("reverse")
