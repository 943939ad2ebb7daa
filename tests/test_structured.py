"""Structured output: constraints read from the options, enforced in both loaders, parsed into data,
passed to servers in their dialects, and accepted by nbllm's own server."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from nbllm import constraints
from nbllm.constraints import (
    Constraint,
    ConstraintError,
    ParseError,
    request_fields,
    server_options,
    short_schema,
)
from nbllm.errors import NbllmWarning
from nbllm.options import GenerationOptions

need("llguidance")

# -- the schemas every loader must satisfy (random tiny model: each output must parse and fit) ---------

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                         "zip": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]}}, "required": ["mood"],
             "additionalProperties": False},
    "bounded_array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                               "minItems": 1, "maxItems": 3}},
                      "required": ["tags"], "additionalProperties": False},
    "ranged_numbers": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                                                        "score": {"type": "number", "minimum": 0, "maximum": 1}},
                       "required": ["age", "score"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["a"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["code"], "additionalProperties": False},
    "unicode": {"type": "object", "properties": {"grüße": {"enum": ["héllo", "日本語", "😀"]}, "ß": {"const": "Ω"}},
                "required": ["grüße", "ß"], "additionalProperties": False},
}


# -- reading what the user gave: no model ------------------------------------------------------------


def test_short_schema_is_simonw_llms_syntax():
    assert short_schema("name, age int, bio: one sentence") == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "bio": {"type": "string", "description": "one sentence"}},
        "required": ["name", "age", "bio"],
        "additionalProperties": False,
    }
    lines = short_schema("name: the full name, with title\nscore float", multi=True)
    item = lines["properties"]["items"]["items"]
    assert item["properties"]["name"]["description"] == "the full name, with title"  # newlines: commas are text
    assert item["properties"]["score"] == {"type": "number"}
    assert lines["required"] == ["items"]


def test_json_schema_from_a_dict_a_file_and_a_pydantic_class(tmp_path: Path):
    pydantic = need("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert json.loads(GenerationOptions(json_schema=schema).json_schema) == schema
    file = tmp_path / "s.json"
    file.write_text(json.dumps(schema))
    assert json.loads(GenerationOptions(json_schema=str(file)).json_schema) == schema
    from_class = GenerationOptions(json_schema=Person)
    assert json.loads(from_class.json_schema)["properties"]["age"]["type"] == "integer"
    # the record keeps text (replayable), and parsing gives the class back
    parsed = Constraint.from_options(from_class).parse('{"name":"Ann","age":3}', "eos")
    assert isinstance(parsed, Person) and parsed.age == 3
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    assert GenerationOptions(grammar=str(grammar)).grammar.startswith("root ::=")


@pytest.mark.parametrize(("options", "says"), [
    ({"json_schema": '{"type": "object",\n "x": }'}, r"not valid JSON at line 2, column 7"),
    ({"regex": "a(b"}, r"--regex is invalid at position 1"),
    ({"regex": "(?=a)b"}, r"--regex cannot be used: at position 0: look-around"),
    ({"grammar": 'root ::= "a\n  x ::= ("b"'}, r"not valid GBNF: Unexpected end of input at line 2"),
    ({"grammar": "root ::= missing"}, r"Rule 'missing' not found"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, r'Unimplemented keys: \["uniqueItems"\]'),
    ({"json_schema": {"type": "object", "if": {"required": ["a"]}}}, r'Unimplemented keys: \["if"\]'),
    ({"json_schema": {"type": "strng"}}, r"Invalid type: strng"),
    ({"json": True, "regex": "a"}, r"--json and --regex cannot be used together"),
    ({"schema": "name, age integer"}, r"unknown type 'integer'"),
    ({"schema_multi": True}, r"--schema-multi needs --schema or --json-schema"),
    ({"choice": ("a", "")}, r"--choice needs non-empty strings"),
])
def test_bad_constraints_are_one_line_naming_the_position_or_keyword(options: dict[str, Any], says: str):
    with pytest.raises(ConstraintError) as caught:
        GenerationOptions(**options)
    assert re.search(says, caught.value.message), caught.value.message
    assert "\n" not in caught.value.message


def test_the_constraint_is_part_of_the_request_identity():
    from nbllm.identity import request_identity

    def identity(**options: Any) -> dict[str, Any]:
        return request_identity(model={"name": "m"}, loader="x", load_options={}, seed=1, prompt="p",
                                generation_options=GenerationOptions(**options).to_dict())

    assert identity(json_schema=SCHEMAS["enum"]) != identity(json_schema=SCHEMAS["pattern"])
    assert identity(choice=("a", "b")) != identity(choice=("a", "c")) != identity()
    assert identity(json_schema=SCHEMAS["enum"])["generation_options"]["json_schema"] == json.dumps(SCHEMAS["enum"])


# -- parsing -------------------------------------------------------------------------------------------


def test_parse_validates_against_the_schema_and_names_a_cut_off_output():
    constraint = Constraint("json_schema", json.dumps(SCHEMAS["ranged_numbers"]))
    assert constraint.parse('{"age":20,"score":0.5}', "eos") == {"age": 20, "score": 0.5}
    with pytest.raises(ParseError, match=r"does not fit the schema: at age: 70 is greater than the maximum of 65"):
        constraint.parse('{"age":70,"score":0.5}', "eos")
    with pytest.raises(ParseError, match=r"reached the token limit \(length\).*larger --max-new-tokens"):
        constraint.parse('{"age":2', "length")


# -- models at a server: each dialect ----------------------------------------------------------------


@pytest.mark.parametrize(("server", "options", "fields"), [
    ("openai", {"json_schema": {"type": "object"}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True}}}),
    ("openai", {"json": True}, {"response_format": {"type": "json_object"}}),
    ("vllm", {"regex": "[0-9]+"}, {"structured_outputs": {"regex": "[0-9]+"}}),
    ("vllm", {"choice": ("yes", "no")}, {"structured_outputs": {"choice": ["yes", "no"]}}),
    ("vllm", {"grammar": 'root ::= "a"'}, {"structured_outputs": {"grammar": 'root ::= "a"'}}),
    ("llama.cpp", {"json_schema": {"type": "object"}}, {"json_schema": {"type": "object"}}),
    ("llama.cpp", {"choice": ("a\"b", "c")}, {"grammar": 'root ::= "a\\"b" | "c"'}),
    ("llama-cpp-python", {"grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
    ("text-generation-webui", {"grammar": 'root ::= "a"'}, {"grammar_string": 'root ::= "a"'}),
    ("ollama", {"json_schema": {"type": "object"}}, {"format": {"type": "object"}}),
    ("ollama", {"json": True}, {"format": "json"}),
    ("tgi", {"regex": "a+"}, {"response_format": {"type": "regex", "value": "a+"}}),
    ("nbllm", {"choice": ("x", "y")}, {"choice": ["x", "y"]}),
])
def test_request_fields_speak_each_servers_dialect(server: str, options: dict[str, Any], fields: dict[str, Any]):
    assert request_fields(server, GenerationOptions(**options), chat=True) == fields


@pytest.mark.parametrize(("server", "options"), [("openai", {"regex": "a"}), ("ollama", {"grammar": 'root ::= "a"'}),
                                                  ("text-generation-webui", {"json": True}), ("llama.cpp", {"regex": "a"})])
def test_a_server_without_that_constraint_refuses_in_one_line(server: str, options: dict[str, Any]):
    with pytest.raises(ConstraintError, match=rf"the {re.escape(server)} server cannot constrain output"):
        request_fields(server, GenerationOptions(**options), chat=True)


def test_server_options_read_response_format_and_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    asked = server_options({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}})
    assert json.loads(asked["json_schema"]) == schema
    assert server_options({"response_format": {"type": "json_object"}}) == {"json": True}
    assert server_options({"response_format": {"type": "text"}}) == {}
    assert server_options({"grammar": 'root ::= "a"'}) == {"grammar": 'root ::= "a"'}
    with pytest.raises(ConstraintError, match="response_format type 'xml' is not supported"):
        server_options({"response_format": {"type": "xml"}})


# -- local models: every output valid -------------------------------------------------------------------


def _check_all_schemas(engine: Any, **extra: Any) -> None:
    for name, schema in SCHEMAS.items():
        result = engine.generate("Fill in:", json_schema=schema, temperature=0, max_new_tokens=200, **extra)
        assert result.finish_reason == "eos", (name, result.text, result.finish_reason)
        value = result.parsed
        assert constraints.schema_problem(value, schema) is None, (name, result.text)
        assert result.timings.grammar_seconds is not None


def test_transformers_every_schema_gives_valid_json(engine: Any, tiny_model: Path):
    engine.load(tiny_model)
    _check_all_schemas(engine)
    again = engine.generate("Fill in:", json_schema=SCHEMAS["enum"], temperature=0, max_new_tokens=50)
    assert again.timings.grammar_seconds == 0.0  # compiled once per (constraint, tokenizer)


def test_transformers_regex_choice_grammar_and_sampling(engine: Any, tiny_model: Path):
    engine.load(tiny_model)
    r = engine.generate("Number:", regex="[0-9]{3}-[a-z]{2}", temperature=0, max_new_tokens=30)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.text) and r.parsed == r.text
    r = engine.generate("Pick:", choice=("yes", "no", "maybe so"), temperature=1.0, seed=3, max_new_tokens=30)
    assert r.text in ("yes", "no", "maybe so") and r.finish_reason == "eos"
    r = engine.generate("Say:", grammar='root ::= "a" ("b" | "c")+ "."', temperature=0.9, top_p=0.5, seed=1, max_new_tokens=40)
    assert re.fullmatch(r"a[bc]+\.", r.text), r.text
    r = engine.generate("JSON:", json=True, temperature=0, max_new_tokens=200)
    assert r.finish_reason != "eos" or isinstance(r.parsed, dict)


def test_transformers_padded_batch_has_one_matcher_per_row(engine: Any, tiny_model: Path):
    from nbllm import generate_many, table

    engine.load(tiny_model)
    prompts = ["a", "a much longer prompt than the first one", "mid length"]
    results = generate_many(prompts, json_schema=SCHEMAS["nested"], temperature=0.8, max_new_tokens=200, engine=engine)
    assert [r.pending_record.batch["size"] for r in results] == [3, 3, 3]
    for prompt, result in zip(prompts, results):
        alone = engine.generate(prompt, json_schema=SCHEMAS["nested"], temperature=0.8, seed=result.seed, max_new_tokens=200)
        assert constraints.schema_problem(result.parsed, SCHEMAS["nested"]) is None
        assert result.text == alone.text  # the same draws as alone
    frame = table(results)
    assert list(frame.columns) == ["prompt", "text", "finish_reason", "record_id", "name", "address"]
    assert frame["name"].tolist() == [r.parsed["name"] for r in results]


def test_transformers_compile_routes_constrained_requests_around_the_compiled_step(engine: Any, tiny_model: Path):
    engine.load(tiny_model, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = engine.generate("x", choice=("left", "right"), temperature=0, max_new_tokens=10)
    assert r.text in ("left", "right")
    assert any("runs without the compiled step" in str(w.message) for w in caught if issubclass(w.category, NbllmWarning))


def test_max_new_tokens_before_the_json_closes(engine: Any, tiny_model: Path):
    engine.load(tiny_model)
    r = engine.generate("x", json_schema=SCHEMAS["nested"], temperature=0, max_new_tokens=3)
    assert r.finish_reason == "length" and r.text  # the text is kept
    with pytest.raises(ParseError, match=r"reached the token limit \(length\) before the JSON schema was complete"):
        _ = r.parsed


def test_sweep_with_a_schema_has_a_column_per_field(engine: Any, tiny_model: Path):
    import nbllm

    engine.load(tiny_model)
    schema = {"type": "object", "properties": {"mood": {"enum": ["up", "down"]}, "level": {"type": "integer", "minimum": 0,
                                                                                         "maximum": 9}},
              "required": ["mood", "level"], "additionalProperties": False}
    frame = nbllm.sweep(["one", "two"], engine=engine, json_schema=schema, max_new_tokens=60,
                        temperature=1.0, seed=[1, 2], progress=False)
    assert len(frame) == 4 and {"mood", "level"} <= set(frame.columns)
    for _, row in frame.iterrows():
        assert json.loads(row["text"]) == {"mood": row["mood"], "level": row["level"]}


def test_many_items_per_input_give_a_row_per_item_and_a_cut_off_output_says_why():
    from nbllm import table
    from nbllm.result import Record, Result, Timings

    def finished(text: str, reason: str, **options: Any) -> Result:
        record = Record({}, "x", {}, GenerationOptions(**options).to_dict(), 1, "the prompt")
        result = Result("the prompt", 1, record)
        result.chunks.append(text)
        result.finish(reason, Timings())
        return result

    many = finished('{"items":[{"name":"a","age":1},{"name":"b","age":2}]}', "eos", schema="name, age int", schema_multi=True)
    cut = finished('{"name":"a","ag', "length", schema="name, age int")
    frame = table([many, cut])
    assert frame["name"].tolist()[:2] == ["a", "b"] and frame["age"].tolist()[:2] == [1, 2]
    assert frame["record_id"].tolist()[0] == frame["record_id"].tolist()[1]
    assert "reached the token limit (length)" in frame["parse_error"].tolist()[2]


def test_llamacpp_every_schema_gives_valid_json(engine: Any, tiny_gguf: Path):
    need("llama_cpp")
    engine.load(tiny_gguf)
    _check_all_schemas(engine)
    r = engine.generate("Number:", regex="[0-9]{3}-[a-z]{2}", temperature=0, max_new_tokens=30)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.text)
    r = engine.generate("Say:", grammar='root ::= "a" ("b" | "c")+ "."', temperature=0.9, seed=2, max_new_tokens=40)
    assert re.fullmatch(r"a[bc]+\.", r.text), r.text
    r = engine.generate("Pick:", choice=("yes", "no"), temperature=1.0, seed=5, max_new_tokens=10)
    assert r.text in ("yes", "no")


def test_real_model_fills_a_simple_schema_sensibly(engine: Any):
    need("llama_cpp")
    from nbllm.testing import real_model_gguf

    engine.load(real_model_gguf())
    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 30},
                                               "capital": {"type": "string", "maxLength": 30}},
              "required": ["country", "capital"], "additionalProperties": False}
    r = engine.generate("What is the capital of France? Answer as JSON.", chat=True, json_schema=schema,
                        temperature=0, max_new_tokens=60)
    assert r.finish_reason == "eos" and r.parsed["capital"] == "Paris", r.text
    assert r.parsed["country"].lower() == "france"
    r = engine.generate("Alice is 31 years old. What is her name and age?", chat=True, schema="name, age int",
                        temperature=0, max_new_tokens=40)
    assert r.parsed == {"name": "Alice", "age": 31}, r.text


# -- %llm_serve, with the official openai client; and nbllm's remote loader against it ------------------


def test_openai_client_response_format_against_llm_serve(engine: Any, tiny_gguf: Path):
    need("llama_cpp")
    openai = need("openai")
    import nbllm
    from nbllm.serve import stop

    nbllm.load(tiny_gguf)
    server = nbllm.serve(port=0)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        model = nbllm.status().model
        schema = SCHEMAS["nested"]
        messages = [{"role": "user", "content": "Fill in a person."}]
        answer = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
        text = answer.choices[0].message.content
        assert constraints.schema_problem(json.loads(text), schema) is None
        assert text == nbllm.generate(messages, json_schema=schema, temperature=0, max_new_tokens=200).text
        answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40,
                                                response_format={"type": "json_object"})
        text = answer.choices[0].message.content  # a random model's object may run past 40 tokens
        assert text.startswith("{") and text == nbllm.generate(messages, json=True, temperature=0, max_new_tokens=40).text
        assert answer.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
        streamed = client.completions.create(model=model, prompt="Pick", temperature=0, max_tokens=20, stream=True,
                                             extra_body={"grammar": 'root ::= "left" | "right"'})
        assert "".join(c.choices[0].text for c in streamed if c.choices) in ("left", "right")
        with pytest.raises(openai.BadRequestError, match=r'Unimplemented keys: \["uniqueItems"\]'):
            client.chat.completions.create(model=model, messages=messages, max_tokens=5, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})

        # nbllm's own OpenAI loader passes the constraint on in nbllm's dialect
        remote = nbllm.Engine()
        remote.load(server.url)
        got = remote.generate("Pick", choice=("yes", "no"), temperature=0, max_new_tokens=10)
        assert got.text in ("yes", "no") and got.parsed == got.text
        got = remote.generate(messages, json_schema=schema, temperature=0, max_new_tokens=200)
        assert constraints.schema_problem(got.parsed, schema) is None
        remote.unload()
    finally:
        stop()


def test_llama_cpp_pythons_own_server_gets_its_dialect(engine: Any, tiny_gguf: Path):
    """A real llama-cpp-python server (``python -m llama_cpp.server``): a JSON schema goes as its
    ``response_format`` with ``schema``, a choice as a GBNF ``grammar``; its outputs fit."""
    need("llama_cpp")
    need("sse_starlette")
    try:
        from servers import LlamaCppServer
    except ImportError:
        from tests.servers import LlamaCppServer

    server = LlamaCppServer(tiny_gguf)
    try:
        engine.load(server.url)
        assert engine.loader.kind.name == "llama-cpp-python"
        messages = [{"role": "user", "content": "Fill in:"}]
        r = engine.generate(messages, json_schema=SCHEMAS["enum"], temperature=0, max_new_tokens=60)
        assert constraints.schema_problem(json.loads(r.text), SCHEMAS["enum"]) is None, r.text
        r = engine.generate("Pick:", choice=("left", "right"), temperature=0, max_new_tokens=10)
        assert r.text in ("left", "right")
        with pytest.raises(ConstraintError, match="the llama-cpp-python server cannot constrain output to the regex"):
            engine.generate("x", regex="[0-9]+", max_new_tokens=5)
        assert engine.loaded  # the model stays
    finally:
        engine.unload()
        server.stop()


def test_magic_flags_in_a_real_shell(shell: Any, tiny_gguf: Path):
    need("llama_cpp")
    shell.run_line_magic("llm_load", str(tiny_gguf))
    shell.run_cell_magic("llm", "--choice yes --choice 'no way' --temperature 0 -o r", "Answer:")
    r = shell.user_ns["r"]
    assert r.text in ("yes", "no way") and r.parsed == r.text
    shell.user_ns["schema"] = SCHEMAS["enum"]  # a dict in the notebook: "$schema" expands to its Python form
    shell.run_cell_magic("llm", '--json-schema "$schema" --temperature 0 -o r', "Mood:")
    assert shell.user_ns["r"].parsed["mood"] in ("happy", "sad", "calm")
    shell.run_cell_magic("llm", "--regex '[0-9]{{4}}' --temperature 0 -o r", "Year:")  # IPython reads {4} as Python
    assert re.fullmatch("[0-9]{4}", shell.user_ns["r"].text)
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"--regex is invalid at position 1"):
        shell.run_cell_magic("llm", "--regex 'a(b'", "x")


def test_the_settings_panel_sets_a_short_schema_or_choices_as_defaults(engine: Any, tiny_gguf: Path, tmp_path: Path):
    need("ipywidgets")
    need("llama_cpp")
    from nbllm.widgets.settings import SettingsPanel

    panel = SettingsPanel(models_dir=tmp_path)
    try:
        engine.load(tiny_gguf)
        field = panel.gen_fields["schema"]
        field.input.value = "name, age integer"
        assert field.messages.error_text.startswith("the short schema field 'age' has unknown type 'integer'")
        assert engine.defaults.schema is None  # nothing else changed
        field.input.value = "mood, level int"
        assert field.messages.error_text == "" and engine.defaults.schema == "mood, level int"
        field.input.value = ""
        panel.gen_fields["choice"].input.value = "yes\nno"
        assert engine.defaults.choice == ("yes", "no") and engine.defaults.schema is None
        r = engine.generate("Answer:", temperature=0, max_new_tokens=10)  # the panel's defaults hold
        assert r.text in ("yes", "no")
    finally:
        panel.close()


def test_a_loader_that_does_not_declare_structured_output_refuses_a_constraint():
    """The engine asks the loader's declaration (a loader of its own here: the unit is the engine)."""
    from collections.abc import Iterator
    from typing import ClassVar

    import nbllm
    from nbllm.loaders import Request, TextLoader
    from nbllm.options import LoadOptions
    from nbllm.source import ModelSource

    class Echo(TextLoader):
        name: ClassVar[str] = "echo"
        formats: ClassVar[frozenset[str]] = frozenset({"echo"})
        renders_chat: ClassVar[bool] = True

        @classmethod
        def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
            return ModelSource(format="echo", name=spec, url=spec, model_id="echo") if spec.startswith("echo://") else None

        def load(self, source: ModelSource, options: LoadOptions) -> None:
            self.source, self.options = source, options

        def unload(self) -> None:
            self.source = None

        def generate_text(self, request: Request) -> Iterator[str]:
            yield "free text"

    nbllm.loaders.register(Echo)
    engine = nbllm.Engine()
    try:
        engine.load("echo://x")
        assert engine.generate("hi", max_new_tokens=3).text == "free text"
        with pytest.raises(ConstraintError, match=r"the echo loader cannot hold its output to a constraint"):
            engine.generate("hi", json=True)
        with pytest.raises(ConstraintError, match=r"the echo loader cannot hold its output to a constraint"):
            engine.generate_batch([engine.prompt_for("hi")], {"choice": ("a", "b")})
        assert engine.loaded
    finally:
        engine.unload()
        nbllm.loaders.unregister("echo")


def test_a_conversation_reply_follows_its_constraint_and_parses(engine: Any, tiny_gguf: Path):
    need("llama_cpp")
    import nbllm
    from nbllm.chat import forget

    engine.load(tiny_gguf)
    forget("structured-test")
    chat = nbllm.Chat("structured-test", engine=engine)
    first = chat.send("Pick one.", choice=("red", "blue"), temperature=0, max_new_tokens=10)
    assert first.text in ("red", "blue") and first.parsed == first.text
    second = chat.send("Now as JSON.", json_schema=SCHEMAS["enum"], temperature=0, max_new_tokens=40)
    assert second.parsed["mood"] in ("happy", "sad", "calm")
    assert second.pending_record.conversation is not None  # a chat turn, recorded with its constraint
    assert json.loads(second.record.generation_options["json_schema"]) == SCHEMAS["enum"]
    forget("structured-test")


def test_a_constraint_given_for_one_request_replaces_the_defaults_constraint(shell: Any, engine: Any, tiny_gguf: Path):
    need("llama_cpp")
    engine.load(tiny_gguf)
    engine.defaults = GenerationOptions(schema="mood, level int", schema_multi=True)  # e.g. from the panel
    r = engine.generate("x", choice=("a", "b"), temperature=0, max_new_tokens=5)
    assert r.text in ("a", "b") and r.record.generation_options["schema"] is None
    shell.run_cell_magic("llm", "--regex '[0-9]' --temperature 0 -o r", "Digit:")
    assert re.fullmatch("[0-9]", shell.user_ns["r"].text)
    assert engine.defaults.schema == "mood, level int"  # the defaults keep theirs
    with pytest.raises(ConstraintError, match="--json and --regex cannot be used together"):
        engine.generate("x", json=True, regex="a")  # two in one request is still refused


def test_a_record_with_choices_reads_back_from_json_as_it_was():
    from nbllm.result import Record

    record = Record({"name": "m"}, "x", {}, GenerationOptions(choice=("a", "b")).to_dict(), 1, "p")
    back = Record.from_dict(json.loads(record.to_json()))
    assert back.generation_options["choice"] == ("a", "b") and back.to_dict() == record.to_dict()
