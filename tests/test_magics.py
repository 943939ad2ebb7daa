"""The magics in a real IPython shell: thin over the library, one-line errors."""

from __future__ import annotations

import _thread
import json
import re
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from nbllm.chat import conversation, conversations, forget
from nbllm.magics._common import interpolate
from nbllm.options import GenerationOptions, LoadOptions

try:
    from stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step
except ImportError:  # tests/ imported as a package
    from tests.stepping import count_steps, steps_once_the_generation_thread_is_free, stop_at_step

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def _no_conversations():
    yield
    for name in list(conversations()):
        forget(name)


def test_load_ext_imports_no_heavy_library():
    # nor the engine, the loaders' registry, the download package or the server's libraries: they are
    # imported by the first magic that needs them (benchmarks/bench_load_ext.py times %load_ext)
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().run_line_magic('load_ext', 'nbllm')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'ipywidgets', 'accelerate',"
        " 'bitsandbytes', 'huggingface_hub', 'nbllm.engine', 'nbllm.loaders', 'nbllm.download.transfer', 'nbllm.chat',"
        " 'nbllm.runlog', 'nbllm.recordings', 'starlette', 'uvicorn', 'pydantic') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_load_ext_imports_no_schema_result_or_server_module():
    # the options' schemas, results, the server and evaluation modules are imported when first used (a magic's
    # parser, nbllm.GenerationOptions...), and nbllm.serve / nbllm.evaluate stay callable whichever came first
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().run_line_magic('load_ext', 'nbllm')\n"
        "print(sorted(m for m in ('nbllm.options', 'nbllm.result', 'nbllm.identity', 'nbllm.serve', 'nbllm.evaluate',"
        " 'nbllm.lora', 'nbllm.download.options', 'nbllm.serve_guard') if m in sys.modules))\n"
        "import nbllm, nbllm.serve, nbllm.evaluate\n"
        "from nbllm.evaluate import Evaluation\n"
        "print(callable(nbllm.serve), callable(nbllm.evaluate), nbllm.evaluate_tasks.__module__,"
        " nbllm.GenerationOptions.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True True nbllm.evaluate nbllm.options"], out.stdout + out.stderr


def test_greedy_cell_output_equals_model_generate(shell, tiny_model, capsys):
    shell.run_line_magic("llm_load", f"{tiny_model} --attn sdpa")
    capsys.readouterr()
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 20 -o r", PROMPT + "\n")
    printed = capsys.readouterr().out
    r = shell.user_ns["r"]
    loader = shell.user_ns.get("_nbllm_loader") or __import__("nbllm").get_engine().loader
    ids = loader.tokenizer(PROMPT, return_tensors="pt")
    direct = loader.model.generate(**ids, do_sample=False, max_new_tokens=20)[0, ids["input_ids"].shape[1]:].tolist()
    assert r.token_ids == direct
    assert printed == r.text + "\n"
    assert r.prompt == PROMPT  # the cell's trailing newline is not part of the prompt


def test_load_prints_one_line_summary_and_options_reach_the_engine(shell, tiny_model_64, capsys):
    shell.run_line_magic("llm_load", f"{tiny_model_64} --load-in-4bit --quant-type fp4 --double-quant")
    out = capsys.readouterr().out
    assert out.startswith(f"Loaded {tiny_model_64.name} with transformers (cpu ")
    status = __import__("nbllm").status()
    assert status.options == {"load_in_4bit": True, "quant_type": "fp4", "double_quant": True}


def test_generation_flags_map_to_options(shell, tiny_model):
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.run_cell_magic(
        "llm",
        "--temperature 0.5 --top-p 0.8 --top-k 5 --min-p 0.1 --typical-p 0.9 --repetition-penalty 1.3 "
        "--max-new-tokens 7 --seed 11 --stop '###' --stop END -o r",
        "x",
    )
    opts = shell.user_ns["r"].record.generation_options
    assert opts == {**GenerationOptions(temperature=0.5, top_p=0.8, top_k=5, min_p=0.1, typical_p=0.9,
                                        repetition_penalty=1.3, max_new_tokens=7, stop=("###", "END")).to_dict(),
                    "seed": 11}


def test_same_seed_through_the_magic_gives_the_same_text(shell, tiny_model):
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.run_cell_magic("llm", "--seed 5 --temperature 1 --max-new-tokens 15 -o a", PROMPT)
    shell.run_cell_magic("llm", "--seed 5 --temperature 1 --max-new-tokens 15 -o b", PROMPT)
    assert shell.user_ns["a"].text == shell.user_ns["b"].text


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("Summarize {doc}", "Summarize A DOC"),
        ('Return JSON like {"a": {"b": [1, 2]}} for {doc}', 'Return JSON like {"a": {"b": [1, 2]}} for A DOC'),
        ("def f():\n    return {k: v for k, v in {}.items()}", "def f():\n    return {k: v for k, v in {}.items()}"),
        ("literal {{doc} and {undefined_name}", "literal {doc} and {undefined_name}"),
        ("f'{x!r}' {doc:>5} {0}", "f'{x!r}' {doc:>5} {0}"),
        ("Define {{term}} for {doc}", "Define {term} for A DOC"),
        ("{{doc}}{{nope}}", "{doc}{nope}"),
        ('{"a": {"b": {doc}}}', '{"a": {"b": A DOC}}'),
        ("The {{ answer }} and {{}} stay", "The {{ answer }} and {{}} stay"),
    ],
)
def test_interpolation_inserts_variables_and_leaves_other_braces(cell, expected):
    assert interpolate(cell, {"doc": "A DOC", "k": 1}) == expected


_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
_NO_OPEN_BRACE = st.text(st.characters(blacklist_characters="{", blacklist_categories=("Cs",)))


@settings(suppress_health_check=[HealthCheck.too_slow])  # a busy machine generates inputs slowly: not a failure
@given(st.lists(st.tuples(st.sampled_from(["text", "var", "escaped"]), _NO_OPEN_BRACE, _NAMES)),
       st.dictionaries(_NAMES, st.text()))
def test_interpolation_inserts_variables_writes_escaped_names_and_keeps_every_other_brace(parts, namespace):
    """A template of text (any closing braces), ``{name}`` and ``{{name}}`` comes out as the model says:
    values inserted once (never interpolated again), ``{{name}}`` as ``{name}``, the rest unchanged."""
    template = expected = ""
    for kind, text, name in parts:
        if kind == "text":
            template, expected = template + text, expected + text
        elif kind == "var":
            template += "{" + name + "}"
            expected += str(namespace[name]) if name in namespace else "{" + name + "}"
        else:
            template += "{{" + name + "}}"
            expected += "{" + name + "}"
    assert interpolate(template, namespace) == expected


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _NO_OPEN_BRACE,
    lambda inner: st.lists(inner) | st.dictionaries(_NO_OPEN_BRACE, inner),
)


@given(_JSON, st.dictionaries(_NAMES, st.text()))
def test_json_goes_through_unchanged(value, namespace):
    text = json.dumps(value, ensure_ascii=False)
    assert interpolate(text, namespace) == text


@given(st.text(alphabet="{}ab_1 \"':\n"))
def test_text_without_names_to_replace_is_unchanged(text):
    assume("{{" not in text)
    assert interpolate(text, {}) == text


def test_interpolation_through_the_magic(shell, tiny_model):
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.user_ns["topic"] = "RoPE"
    shell.run_cell_magic("llm", "--max-new-tokens 2 -o r", 'Explain {topic} as JSON {"k": [1]}')
    assert shell.user_ns["r"].prompt == 'Explain RoPE as JSON {"k": [1]}'


def test_chat_sends_the_cell_through_the_models_chat_template(shell, tiny_model):
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.run_cell_magic("llm", "--system 'Be brief.' --max-new-tokens 3 -o r", "Olá! 🤖")
    tok = __import__("nbllm").get_engine().loader.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Olá! 🤖"}]
    r = shell.user_ns["r"]
    assert r.prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.record.mode == "chat" and r.record.messages == messages
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert r.prompt_tokens == len(ids)  # one BOS, not two


@pytest.mark.parametrize(
    ("magic", "line", "cell", "message"),
    [
        ("llm_load", "/no/such/model", None, "no model at /no/such/model. "),
        ("llm_load", "{model} --quant-type int3", None, "argument --quant-type"),
        ("llm_load", "{model} --load-in-4bit --load-in-8bit", None, "cannot be used together. Choose one"),
        ("llm_load", "{model} --n-ctx 100", None, "--n-ctx is a llama.cpp option"),
        ("llm_load", "{model} --cpu-memory lots", None, "--cpu-memory expects a number"),
        ("llm_load", "{model} --no-such-flag", None, "unrecognized arguments: --no-such-flag"),
        ("llm", "--temperature 9", "hi", "--temperature 9.0 is above 5.0"),
        ("llm", "--max-new-tokens many", "hi", "--max-new-tokens expects a whole number"),
    ],
)
def test_user_mistakes_are_one_line_usage_errors(shell, tiny_model, magic, line, cell, message):
    shell.run_line_magic("llm_load", str(tiny_model))
    line = line.format(model=tiny_model)
    with pytest.raises(UsageError) as info:
        if cell is None:
            shell.run_line_magic(magic, line)
        else:
            shell.run_cell_magic(magic, line, cell)
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip()
    assert __import__("nbllm").status().model == tiny_model.name  # the model it had


def test_prompt_without_a_model(shell):
    with pytest.raises(UsageError, match="no model is loaded. Load one first: %llm_load MODEL"):
        shell.run_cell_magic("llm", "", "hi")


def test_errors_in_run_cell_show_no_traceback(shell, capsys):
    shell.run_cell("%llm_load /no/such/model")
    err = capsys.readouterr()
    text = err.out + err.err
    assert "UsageError: no model at /no/such/model" in text
    assert "Traceback" not in text


def test_status_and_unload(shell, tiny_model, capsys):
    shell.run_line_magic("llm_load", f"{tiny_model} --attn eager")
    status = shell.run_line_magic("llm_status", "")
    assert "--attn eager" in str(status) and "placement: cpu: 2" in str(status)
    capsys.readouterr()
    shell.run_line_magic("llm_unload", "")
    assert capsys.readouterr().out.startswith(f"Unloaded {tiny_model.name}; process memory")
    shell.run_line_magic("llm_unload", "")
    assert "No model was loaded." in capsys.readouterr().out
    assert "No model loaded" in str(shell.run_line_magic("llm_status", ""))


def test_help_lists_every_option_with_its_explanation(shell, capsys):
    from nbllm.magics._common import magic_help
    from nbllm.magics.core import CoreMagics

    shell.run_cell("%llm_load?")
    shell.run_cell("%%llm?")
    shown = capsys.readouterr().out
    for spec in LoadOptions.specs():
        assert spec.flag in magic_help(CoreMagics.llm_load)
        assert spec.flag in shown
    for spec in GenerationOptions.specs():
        assert spec.flag in magic_help(CoreMagics.llm)
    assert "Quantize the weights to 4 bits" in shown and "--chat" in shown


def test_interrupt_stops_within_a_step_keeps_the_partial_text_and_the_model(shell, tiny_model, capsys):
    shell.run_line_magic("llm_load", str(tiny_model))
    capsys.readouterr()
    engine = __import__("nbllm").get_engine()
    loader = engine.loader
    steps, counting = count_steps(loader.model)
    at, stopping = stop_at_step(engine, 10, _thread.interrupt_main)  # a kernel interrupt at the 10th step
    try:
        with pytest.raises(UsageError, match=r"^Generation interrupted after 9 tokens; the partial text is kept"):
            shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 2000 -o r", PROMPT)
    finally:
        stopping.remove()
        counting.remove()
    r = shell.user_ns["r"]
    out = capsys.readouterr().out
    assert at.get("told") and r.interrupted and r is at["result"]
    # Within a step: the step under way ends, no other starts, nothing runs after; its token is not shown.
    assert len(steps) == 10 and steps_once_the_generation_thread_is_free(steps) == 10
    assert r.completion_tokens == at["tokens"] == 9
    assert out.startswith(r.text) and "[interrupted after 9 tokens]" in out
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 5 -o again", PROMPT)
    assert shell.user_ns["again"].token_ids == r.token_ids[:5] and engine.loader is loader


def test_an_exception_in_the_generating_thread_is_one_line_in_the_cell(shell, tiny_model, capsys):
    """The loader's library fails inside the generation thread (a CUDA assert, say): the cell shows one
    line, the partial result says why it ended, and the model stays loaded and usable."""
    shell.run_line_magic("llm_load", str(tiny_model))
    engine = __import__("nbllm").get_engine()
    loader = engine.loader
    model = loader.model
    forward, calls, threads = model.forward, [0], set()

    def failing_forward(*args, **kwargs):
        calls[0] += 1
        threads.add(threading.current_thread().name)
        if calls[0] == 4:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    try:
        with pytest.raises(UsageError) as err:
            shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 50 -o r", PROMPT)
    finally:
        model.forward = forward
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("generation failed in transformers: RuntimeError: CUDA error: device-side assert "
                              "triggered. The model is still loaded")
    assert threads == {"nbllm-generate_0"}  # it really failed in the generating thread
    r = shell.user_ns["r"]
    assert r.finish_reason == "error" and r.completion_tokens == 3
    capsys.readouterr()
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 6 -o again", PROMPT)
    assert engine.loader is loader and shell.user_ns["again"].completion_tokens == 6
    assert capsys.readouterr().out == shell.user_ns["again"].text + "\n"


def test_ineffective_options_are_one_note_line(shell, tiny_model, capsys):
    shell.run_line_magic("llm_load", f"{tiny_model} --quant-type fp4")
    out = capsys.readouterr()
    assert "note: --quant-type only affects --load-in-4bit; it is ignored here\n" in out.out
    assert "UserWarning" not in out.out + out.err
    shell.run_cell_magic("llm", "--temperature 0 --top-k 5 --max-new-tokens 2", "hi")
    assert capsys.readouterr().out.startswith("note: temperature 0 is greedy decoding; top_k has no effect\n")


# -- the line: one parser (shell quoting), usage lines, $ ----------------------------------------------------
def test_usage_lines_name_the_cell_magics(shell, capsys):
    shell.run_cell("%%llm?")
    shell.run_cell("%%llm_chat?")
    shown = capsys.readouterr().out
    assert re.search(r"^  %%llm \[--preset NAME\]", shown, re.M)
    assert re.search(r"^  %%llm_chat \[--preset NAME\]", shown, re.M)
    assert not re.search(r"^  %llm(_chat)? \[", shown, re.M)


def test_every_magic_parses_its_line_with_shell_quoting(shell, tiny_model, tmp_path, capsys):
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.run_cell_magic("llm_chat", "'my chat' --system 'Be brief.' --max-new-tokens 2 -o r", "hi")
    chat = conversation("my chat", create=False)
    assert chat.system == "Be brief." and len(chat) == 1
    target = tmp_path / "a chat.json"
    shell.run_line_magic("llm_history", f"'my chat' --save '{target}'")
    assert target.exists()
    assert shell.run_line_magic("llm_history", "'my chat'") is chat
    panel = shell.run_line_magic("llm_chat_panel", "'my chat'")
    assert panel.chat is chat
    panel.close()
    capsys.readouterr()
    shell.run_line_magic("llm_chat_reset", "'my chat'")
    assert capsys.readouterr().out.startswith("Conversation 'my chat' reset (1 turn forgotten)")


def test_a_dollar_in_a_magic_line_is_written_twice(shell, tiny_model):
    """IPython expands $name in a magic's line (not inside single quotes); $$ writes one $."""
    shell.run_line_magic("llm_load", str(tiny_model))
    shell.user_ns["word"] = "END"
    cell = "%%llm --stop \"price: $$5\" --stop \"$word\" --stop 'cost: $word' --max-new-tokens 2 -o r\nhi"
    shell.run_cell(cell).raise_error()
    assert shell.user_ns["r"].record.generation_options["stop"] == ("price: $5", "END", "cost: $word")


@pytest.fixture(params=["tiny_model", "tiny_gguf"])
def model_path(request):
    return request.getfixturevalue(request.param)


def test_stop_escapes_in_the_line_stop_at_the_real_text(shell, model_path):
    shell.run_line_magic("llm_load", str(model_path))
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 30 -o full", PROMPT)
    text = shell.user_ns["full"].text
    char = next(c for c in text[len(text) // 2:] if c.strip() and ord(c) < 0x10000)
    shell.run_cell_magic("llm", f"--temperature 0 --max-new-tokens 30 --stop '\\u{ord(char):04x}' --stop '\\n' -o cut",
                         PROMPT)
    cut = shell.user_ns["cut"]
    assert cut.record.generation_options["stop"] == (char, "\n")
    assert cut.text == text[: min(text.index(c) for c in (char, "\n") if c in text)]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("name", ["1abc", "a.b", "'my var'", "class", "x-y"])
@pytest.mark.parametrize("magic", ["llm", "llm_chat"])
def test_output_names_must_be_python_variables(shell, tiny_model, engine, magic, name):
    shell.run_line_magic("llm_load", str(tiny_model))
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic(magic, f"-o {name}", "hi")
    message = str(info.value)
    assert "is not a Python variable name" in message and "\n" not in message
    assert engine.last_result is None  # refused before generating
    assert not [k for k in shell.user_ns if "my" in k or k[:1].isdigit() or "." in k]


@pytest.mark.parametrize("cell", ["", "   ", "\n\n", " \t\n ", "{blank}"])
def test_an_empty_or_blank_cell_is_refused(shell, model_path, engine, cell):
    shell.run_line_magic("llm_load", str(model_path))
    shell.user_ns["blank"] = "  \n"
    for magic in ("llm", "llm_chat"):
        with pytest.raises(UsageError) as info:
            shell.run_cell_magic(magic, "--max-new-tokens 2", cell)
        assert "empty" in str(info.value) and "\n" not in str(info.value)
    assert engine.last_result is None and len(conversation()) == 0


def test_a_wrong_seed_suggests_one_that_works(shell, tiny_model):
    shell.run_line_magic("llm_load", str(tiny_model))
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("llm", "--seed abc", "hi")
    suggested = re.search(r"For example: (--seed \S+?),", str(info.value))
    assert suggested, str(info.value)
    shell.run_cell_magic("llm", f"{suggested.group(1)} --max-new-tokens 2 -o r", "hi")
    assert shell.user_ns["r"].seed == 1234


# -- presets ------------------------------------------------------------------------------------------------
def test_preset_flag_under_typed_flags_over_the_defaults(shell, tiny_model, engine):
    shell.run_line_magic("llm_load", str(tiny_model))
    engine.defaults = GenerationOptions(max_new_tokens=3)
    creative = GenerationOptions.presets()["creative"]
    shell.run_cell_magic("llm", "--preset creative --temperature 0.3 -o r", "hi")
    options = shell.user_ns["r"].record.generation_options
    assert {k: options[k] for k in creative} == {**creative, "temperature": 0.3}
    assert options["max_new_tokens"] == 3
    shell.run_cell_magic("llm_chat", "--preset deterministic -o c", "hi")
    assert shell.user_ns["c"].record.generation_options["temperature"] == 0.0
    for magic in ("llm", "llm_chat"):
        with pytest.raises(UsageError) as info:
            shell.run_cell_magic(magic, "--preset wild", "hi")
        assert str(info.value) == "unknown preset 'wild'. Use one of: deterministic, balanced, creative."
