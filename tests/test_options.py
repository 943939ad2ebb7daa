"""The option schemas: one source for flags, help, validation and records."""

from __future__ import annotations

import argparse
import math
import re
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbllm.errors import OptionError
from nbllm.loaders import (
    LLAMACPP,
    TRANSFORMERS,
    loader_class,
    loader_classes,
    loader_refusals,
    option_loaders,
)
from nbllm.options import (
    SAMPLER_SWITCHES,
    GenerationOptions,
    LoadOptions,
    decode_escapes,
    encode_escapes,
    parse_gpu_split,
)

GUIDE_OPTIONS = [  # every load option the user's guide names, with text-generation-webui's flag
    "loader", "gpu_split", "load_in_8bit", "load_in_4bit", "compile", "flash_attn", "trust_remote_code",
    "cpu_memory", "alpha_value", "compute_dtype", "quant_type",
]


def test_every_option_of_the_guide_exists_with_help_and_a_flag():
    names = LoadOptions.names()
    for name in GUIDE_OPTIONS:
        assert name in names
        spec = LoadOptions.spec(name)
        assert spec.flag == "--" + name.replace("_", "-")
        assert len(spec.help) > 30


def test_every_option_has_a_known_panel_group_and_a_loader_that_understands_it():
    for schema in (LoadOptions, GenerationOptions):
        for s in schema.specs():
            assert s.group in schema.GROUPS, s.name
    for name in LoadOptions.names():
        if name != "loader":  # the choice of loader itself
            assert option_loaders(name), name
    for cls in loader_classes():  # a loader declares only options that exist
        assert cls.load_options <= set(LoadOptions.names()), cls.name


def test_defaults_are_valid_and_documented():
    LoadOptions().validate()
    g = GenerationOptions()
    g.validate()
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.min_p, g.typical_p, g.repetition_penalty,
            g.stop, g.seed) == (512, 0.7, 0.9, 0, 0.0, 1.0, 1.0, (), None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "--load-in-8bit and --load-in-4bit cannot be used together"),
        ({"alpha_value": 2.0, "compress_pos_emb": 2.0}, "--alpha-value and --compress-pos-emb cannot"),
        ({"flash_attn": True, "attn": "eager"}, "--flash-attn contradicts --attn eager"),
        ({"quant_type": "int3"}, "--quant-type 'int3' is not valid"),
        ({"dtype": "float8"}, "--dtype 'float8' is not valid"),
        ({"alpha_value": 0.5}, "--alpha-value 0.5 is below 1.0"),
        ({"cpu_memory": -1}, "--cpu-memory -1.0 is below 0"),
        ({"gpu_split": "20,x"}, "--gpu-split '20,x' is not a list of numbers"),
        ({"gpu_split": "20,0"}, "not positive"),
        ({"device": "cpu", "gpu_split": "10"}, "--gpu-split needs --device cuda"),
        ({"disk_offload": True, "device": "cpu"}, "--disk-offload on the CPU needs a limit"),
        ({"n_ctx": -5}, "--n-ctx -5 is below 0"),
        ({"load_in_4bit": "maybe"}, "--load-in-4bit expects true or false"),
        ({"alpha_value": float("nan")}, "must be a finite number"),
        ({"no_such_option": 1}, "unknown option no_such_option"),
    ],
)
def test_invalid_values_and_combinations_give_one_line_with_a_fix(values, message):
    with pytest.raises(OptionError) as info:
        LoadOptions.from_dict(values)
    text = info.value.message
    assert message in text
    assert "\n" not in text
    assert info.value.fix  # every error says what to do


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": -0.1}, "--temperature -0.1 is below 0.0"),
        ({"top_p": 1.5}, "--top-p 1.5 is above 1.0"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0 is below 1"),
        ({"seed": -1}, "--seed -1 is below 0"),
        ({"stop": ("",)}, "--stop '' is empty"),
        ({"top_k": 2.5}, "--top-k expects a whole number"),
        ({"typical_p": 0}, "--typical-p 0.0 is not above 0.0"),
        ({"seed": "none"}, "--seed expects a whole number, not 'none'. For example: --seed 1234, or leave --seed out."),
    ],
)
def test_invalid_generation_options(values, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        GenerationOptions.from_dict(values)


def test_ineffective_combinations_warn():
    with pytest.warns(UserWarning, match="only affects --load-in-4bit"):
        LoadOptions.from_dict({"quant_type": "fp4"})
    with pytest.warns(UserWarning, match="greedy decoding; top_k has no effect"):
        GenerationOptions.from_dict({"temperature": 0, "top_k": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoadOptions.from_dict({"load_in_4bit": True, "quant_type": "fp4", "double_quant": True})


def test_strings_from_a_panel_or_json_are_coerced():
    o = LoadOptions.from_dict({"load_in_4bit": "true", "cpu_memory": "8", "alpha_value": "2.5"})
    assert (o.load_in_4bit, o.cpu_memory, o.alpha_value) == (True, 8.0, 2.5)
    g = GenerationOptions.from_dict({"stop": "###", "max_new_tokens": "16"})
    assert g.stop == ("###",) and g.max_new_tokens == 16


def test_argparse_flags_are_derived_and_keep_only_what_was_typed():
    parser = argparse.ArgumentParser()
    for flags, kwargs in LoadOptions.argparse_arguments():
        parser.add_argument(*flags, **kwargs)
    ns = parser.parse_args(["--load-in-4bit", "--quant-type", "fp4", "--gpu-split", "20,7", "--alpha-value", "2"])
    o = LoadOptions.from_namespace(ns)
    assert o.changed() == {"load_in_4bit": True, "quant_type": "fp4", "gpu_split": "20,7", "alpha_value": 2.0}
    assert o.gpu_split_values == (20.0, 7.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quant-type", "int2"])


def test_generation_flags_layer_over_base_defaults():
    parser = argparse.ArgumentParser()
    for flags, kwargs in GenerationOptions.argparse_arguments():
        parser.add_argument(*flags, **kwargs)
    base = GenerationOptions(temperature=0.2, max_new_tokens=50)
    o = GenerationOptions.from_namespace(parser.parse_args(["--max-new-tokens", "9", "--stop", "a", "--stop", "b"]), base)
    assert (o.temperature, o.max_new_tokens, o.stop) == (0.2, 9, ("a", "b"))


def test_options_that_mean_nothing_to_a_loader_are_named():
    llamacpp, transformers = loader_class(LLAMACPP), loader_class(TRANSFORMERS)
    refused = loader_refusals(LoadOptions(load_in_4bit=True, n_ctx=2048), llamacpp)
    assert refused == ["--load-in-4bit is a transformers option and means nothing to the llama.cpp loader"]
    assert loader_refusals(LoadOptions(n_ctx=2048), transformers) == [
        "--n-ctx is a llama.cpp option and means nothing to the transformers loader"
    ]
    assert loader_refusals(LoadOptions(alpha_value=2.0, flash_attn=True), llamacpp) == []


def test_gpu_split_parsing():
    assert parse_gpu_split("20, 7") == (20.0, 7.0)
    assert parse_gpu_split(None) == ()


# -- a wrong value's fix suggests a value that is accepted ---------------------------------------------
@pytest.mark.parametrize("schema", [LoadOptions, GenerationOptions])
def test_a_value_of_the_wrong_type_suggests_one_that_is_accepted(schema):
    for spec in schema.specs():
        if spec.type not in (int, float):
            continue
        with pytest.raises(OptionError) as info:
            schema.from_dict({spec.name: "abc"})
        fix = info.value.fix
        assert fix and "none" not in fix.split(), fix
        suggested = re.match(rf"for example: {spec.flag} (\S+?),? ", fix + " ")
        if suggested:  # the value it suggests is valid
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                schema.from_dict({spec.name: suggested.group(1)})
        else:
            assert fix == f"give {'a whole number' if spec.type is int else 'a number'}, or leave {spec.flag} out"
    if schema is GenerationOptions:
        assert info.value.message.endswith("For example: --seed 1234, or leave --seed out.")


# -- ranges: one rule in the schema, the strictest loader's ------------------------------------------
def test_typical_p_must_be_above_zero():
    with pytest.raises(OptionError, match=r"--typical-p 0\.0 is not above 0\.0\. Use a value above 0\.0 and at most 1\.0"):
        GenerationOptions(typical_p=0)
    assert GenerationOptions(typical_p=1e-9).typical_p == 1e-9


def _extremes() -> list[tuple[str, float]]:
    """The lowest and highest value the schema accepts for every numeric generation option."""
    out = []
    for s in GenerationOptions.specs():
        if s.type not in (int, float):
            continue
        if s.minimum is not None:
            out.append((s.name, math.nextafter(s.minimum, math.inf) if s.minimum_exclusive else s.minimum))
        if s.maximum is not None:
            out.append((s.name, s.maximum))
    return out


@pytest.fixture(params=["transformers", "llama.cpp"])
def any_loaded(request, engine):
    model = request.getfixturevalue("tiny_model" if request.param == "transformers" else "tiny_gguf")
    engine.load(model)
    return engine


def test_every_value_the_schema_accepts_generates_in_both_loaders(any_loaded):
    """Validation is done once, in the schema: a value it accepts never fails inside a loader library."""
    extremes = _extremes()
    assert {name for name, _ in extremes} >= {"temperature", "top_p", "top_k", "min_p", "typical_p",
                                              "repetition_penalty", "seed", "max_new_tokens"}
    pairs = {"dynatemp_low": ("dynatemp_high", 5.0), "dynatemp_high": ("dynatemp_low", 0.0)}  # low <= high
    applies = any_loaded.loader.sampler_options
    for name, value in extremes:
        values = {"temperature": 1.0, "max_new_tokens": 2, name: value}
        if name in pairs:
            values[pairs[name][0]] = pairs[name][1]
        if name in SAMPLER_SWITCHES and name not in applies and value != GenerationOptions.spec(name).default:
            with pytest.raises(OptionError, match=f"cannot apply {GenerationOptions.spec(name).flag}"):
                any_loaded.generate("Hello", values)
            continue
        result = any_loaded.generate("Hello", values)
        assert result.finish_reason in ("length", "eos"), (name, value)


# -- stop strings: escapes typed in a magic line or a panel --------------------------------------------
@pytest.mark.parametrize(
    ("typed", "text"),
    [
        (r"\n", "\n"),
        (r"\t", "\t"),
        (r"\r\n", "\r\n"),
        (r"a\\nb", "a\\nb"),
        (r"\\", "\\"),
        (r"say \"hi\" \'x\'", "say \"hi\" 'x'"),
        (r"\u00e9\u2603", "é☃"),
        (r"\d \u12 C:\path", r"\d \u12 C:\path"),  # not an escape: kept as written
        ("###", "###"),
    ],
)
def test_stop_escapes(typed, text):
    assert decode_escapes(typed) == text
    parser = argparse.ArgumentParser()
    for flags, kwargs in GenerationOptions.argparse_arguments():
        parser.add_argument(*flags, **kwargs)
    assert GenerationOptions.from_namespace(parser.parse_args(["--stop", typed])).stop == (text,)


def test_python_strings_are_taken_as_they_are():
    g = GenerationOptions(stop=("\\n", "a\\tb"))
    assert g.stop == ("\\n", "a\\tb") and g.replace(seed=1).stop == g.stop  # never decoded, not even twice


@given(st.text())
def test_escaping_round_trips(text):
    shown = encode_escapes(text)
    assert decode_escapes(shown) == text
    assert "\n" not in shown and "\t" not in shown  # one line per stop string in the panel


# -- presets ---------------------------------------------------------------------------------------------
def test_presets_are_named_option_values():
    assert GenerationOptions.presets() == {
        "deterministic": {"temperature": 0.0, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
        "balanced": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
        "creative": {"temperature": 1.0, "top_p": 0.95, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.1},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no preset contradicts itself
        for name, values in GenerationOptions.presets().items():
            options = GenerationOptions.preset(name)
            assert {k: getattr(options, k) for k in values} == values
    balanced = GenerationOptions.preset("balanced")
    assert balanced == GenerationOptions()  # nbllm's default


def test_a_preset_applies_over_a_base_and_under_what_was_typed():
    base = GenerationOptions(max_new_tokens=77, seed=5, stop=("END",), top_k=3)
    options = GenerationOptions.preset("creative", base, temperature=0.3)
    assert (options.temperature, options.top_p, options.min_p, options.repetition_penalty) == (0.3, 0.95, 0.05, 1.1)
    assert (options.max_new_tokens, options.seed, options.stop, options.top_k) == (77, 5, ("END",), 0)
    GenerationOptions.presets()["creative"]["temperature"] = 9  # a copy: the presets stay as they are
    assert GenerationOptions.preset("creative").temperature == 1.0


def test_an_unknown_preset_lists_the_names():
    with pytest.raises(OptionError) as info:
        GenerationOptions.preset("wild")
    assert info.value.message == "unknown preset 'wild'. Use one of: deterministic, balanced, creative."
