"""The panels without a browser: set their widgets, ``click()`` their buttons, check the engine.

Real components throughout: the built-in tiny models loaded for real, a real models folder, the real
download code against the local hub server, a real IPython shell for the magics.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need

need("ipywidgets")

from nbllm import GenerationOptions, models  # noqa: E402
from nbllm.chat import conversation, forget  # noqa: E402
from nbllm.errors import OptionError  # noqa: E402
from nbllm.widgets import ChatPanel, SettingsPanel  # noqa: E402
from nbllm.widgets.settings import field_text  # noqa: E402

try:
    from hubserver import HubServer, hub  # noqa: F401 - `hub` is a fixture
except ImportError:  # tests/ imported as a package
    from tests.hubserver import HubServer, hub  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy (tests wait on conditions, not on sleeps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def long_model() -> Path:
    """A bigger tiny model with a long context: slow enough (~100-300 tokens/s here) to stop mid-reply."""
    from nbllm.testing import tiny_transformers_model

    return tiny_transformers_model(hidden_size=256, num_layers=8, num_heads=4, max_position_embeddings=8192)


@pytest.fixture
def folder(tmp_path: Path, tiny_model: Path, tiny_gguf: Path) -> Iterator[Path]:
    """A models folder laid out like text-generation-webui's: a Transformers subfolder and a GGUF file."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "org_tiny").symlink_to(tiny_model, target_is_directory=True)
    (root / "tiny.gguf").symlink_to(tiny_gguf)
    models.set_models_dir(None)
    yield root


@pytest.fixture
def settings(folder: Path, engine: Any) -> Iterator[SettingsPanel]:
    panel = SettingsPanel(models_dir=folder)
    yield panel
    panel.close()


@pytest.fixture
def chat(engine: Any) -> Iterator[ChatPanel]:
    forget("widgets-test")
    panel = ChatPanel("widgets-test")
    yield panel
    panel.stop()
    panel.wait(30)
    panel.close()
    forget("widgets-test")


def select(panel: SettingsPanel, name: str) -> None:
    panel.model.value = next(v for label, v in panel.model.options if label.startswith(name + " "))


def shown(panel: SettingsPanel) -> set[str]:
    return {name for name, f in panel.load_fields.items() if f.shown}


# ---------------------------------------------------------------------------------------- settings


def test_every_panel_option_comes_from_the_schema_with_its_help(settings: SettingsPanel) -> None:
    from nbllm.options import LoadOptions

    assert list(settings.load_fields) == [s.name for s in LoadOptions.specs() if s.panel]
    for name, field in settings.load_fields.items():
        assert html.escape(LoadOptions.spec(name).help) in field.help.value  # help shown under it
        assert field.spec.group in LoadOptions.GROUPS
    assert [b.description for b in settings.preset_buttons.values()] == list(GenerationOptions.presets())


def _descendants(widget: Any) -> Iterator[Any]:
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)


def test_every_generation_option_with_a_panel_flag_is_in_the_panel_in_its_samplers_section(
        settings: SettingsPanel) -> None:
    """A generation option added to the schema with a panel flag shows in the panel without a line here:
    in the open fields or in one of the samplers' sections (text-generation-webui's groups), with its help."""
    from nbllm.options import SAMPLER_OPTIONS
    from nbllm.widgets.settings import GENERATION_FIELDS, SAMPLER_SECTIONS

    in_panel = {id(w) for w in _descendants(settings)}
    for spec in GenerationOptions.specs():
        if spec.panel:
            assert spec.name in settings.gen_fields, spec.name
    for name, field in settings.gen_fields.items():
        assert id(field) in in_panel, name
        assert html.escape(GenerationOptions.spec(name).help) in field.help.value
    assert set(SAMPLER_OPTIONS) <= set(settings.gen_fields)
    assert "prompt_lookup" in GENERATION_FIELDS and "draft_model" in settings.load_fields
    # Each section holds its group's fields, closed until opened; titles are text-generation-webui's.
    for key, (section_title, names) in SAMPLER_SECTIONS.items():
        box = settings.sampler_sections[key]
        assert box.titles == (section_title,) and box.selected_index is None
        inside = {id(w) for w in _descendants(box)}
        assert all(id(settings.gen_fields[n]) in inside for n in names), key
    # docs/panels.md's table of the sections says the same
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in
            (Path(__file__).parent.parent / "docs" / "panels.md").read_text().splitlines() if line.count("|") == 3}
    for section_title, names in SAMPLER_SECTIONS.values():
        assert [n for n in rows[section_title].replace(",", " ").split() if n in settings.gen_fields] == list(names)
    assert [f.spec.name for f in settings.gen_fields.values() if f.slider is not None and
            any(id(f) in {id(w) for w in _descendants(b)} for b in settings.sampler_sections.values())]


def test_dry_set_in_the_panel_reaches_the_next_cell_and_a_bad_value_is_one_line(
        settings: SettingsPanel, engine: Any, shell: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    dry = settings.gen_fields["dry_multiplier"]
    dry.input.value = "0.8"  # typed in the Repetition suppression section
    settings.gen_fields["dry_allowed_length"].input.value = "3"
    assert engine.defaults.dry_multiplier == 0.8 and engine.defaults.dry_allowed_length == 3
    assert "custom" in settings.preset_label.value
    shell.run_cell("%%llm --max-new-tokens 4 --seed 1\nHello").raise_error()
    record = engine.last_result.record
    assert record.generation_options["dry_multiplier"] == 0.8
    assert record.generation_options["dry_allowed_length"] == 3
    # What the schema refuses stays in the field, red, with one line; the default in use stays.
    breakers = settings.gen_fields["dry_sequence_breakers"]
    dry.input.value = "-1"
    assert dry.messages.error_text == "dry_multiplier -1 is below 0.0. Use a value at least 0.0. In use: 0.8."
    assert engine.defaults.dry_multiplier == 0.8
    breakers.input.value = "not quoted"
    assert breakers.messages.error_text.startswith("dry_sequence_breakers 'not quoted' is not a list of quoted")
    assert "\n" not in breakers.messages.error_text and engine.defaults.dry_sequence_breakers == (
        GenerationOptions.spec("dry_sequence_breakers").default)
    assert not breakers.valid and breakers.messages.error_text.endswith('In use: "\\n", ":", "\\"", "*".')
    priority = settings.gen_fields["sampler_priority"]  # the other fields still work, their errors their own
    priority.input.value = "temperature\nnot_a_sampler"
    assert "not_a_sampler" in priority.messages.error_text and "breakers" not in priority.messages.error_text
    assert engine.defaults.sampler_priority == ()
    priority.input.value = "temperature\ndry"
    assert engine.defaults.sampler_priority == ("temperature", "dry") and priority.messages.error_text == ""


def test_a_user_preset_fills_the_samplers_fields(in_folder: Path, engine: Any) -> None:
    presets = in_folder.parent / "presets"
    presets.mkdir()
    (presets / "dry-mirostat.yaml").write_text("temperature: 0.9\ndry_multiplier: 0.8\ndry_base: 2\n"
                                               "mirostat_mode: 2\nmirostat_tau: 4\nsampler_priority:\n"
                                               "- temperature\n- dry\n")
    panel = SettingsPanel(models_dir=in_folder)
    try:
        panel.gen_fields["xtc_probability"].value = 0.5  # a sampler the preset does not name: off after it
        panel.preset_buttons["dry-mirostat"].click()
        fields = panel.gen_fields
        assert (fields["dry_multiplier"].value, fields["dry_base"].value, fields["mirostat_mode"].value) == (0.8, 2.0, 2)
        assert fields["mirostat_tau"].input.value == "4" and fields["temperature"].value == 0.9
        assert fields["sampler_priority"].input.value == "temperature\ndry"
        assert fields["xtc_probability"].value == 0.0 and fields["top_p"].value == 1.0  # neutral, as in TGW
        assert engine.defaults.dry_multiplier == 0.8 and engine.defaults.mirostat_mode == 2
        assert "dry-mirostat" in panel.preset_label.value
    finally:
        panel.close()


def test_models_folder_listing_and_loader_auto_shows_only_its_options(settings: SettingsPanel, folder: Path) -> None:
    labels = [label for label, _ in settings.model.options]
    assert [label.split()[0] for label in labels] == ["org_tiny", "tiny.gguf"]
    select(settings, "org_tiny")
    assert settings.loader == "transformers"
    assert {"load_in_4bit", "cpu_memory", "device"} <= shown(settings)
    assert not {"n_ctx", "n_gpu_layers", "cache_type"} & shown(settings)
    select(settings, "tiny.gguf")
    assert settings.loader == "llama.cpp"
    assert {"n_ctx", "n_gpu_layers", "cache_type", "flash_attn", "alpha_value"} <= shown(settings)
    assert not {"load_in_4bit", "device", "trust_remote_code"} & shown(settings)
    # An explicit loader wins over the format.
    settings.load_fields["loader"].value = "transformers"
    assert "load_in_4bit" in shown(settings)
    # The refresh button lists what appeared since.
    (folder / "other_model").symlink_to(Path(settings.model.options[0][1]).resolve(), target_is_directory=True)
    settings.refresh_button.click()
    assert [label.split()[0] for label, _ in settings.model.options] == ["org_tiny", "other_model", "tiny.gguf"]


def test_load_and_unload_buttons_drive_the_engine(settings: SettingsPanel, engine: Any, tiny_model: Path) -> None:
    select(settings, "org_tiny")
    settings.load_fields["dtype"].value = "float32"
    settings.load_button.click()
    assert settings.wait(60)
    assert settings.messages.error_text == ""
    assert engine.loaded
    status = engine.status()
    assert Path(status.path).resolve() == tiny_model.resolve()
    assert status.options == {"dtype": "float32"}
    assert "Loaded org_tiny with transformers" in settings.status.value
    assert "layers: 2 on cpu" in settings.status.value
    settings.unload_button.click()
    assert not engine.loaded
    assert "No model loaded." in settings.status.value


def test_load_errors_show_in_one_line_and_keep_the_loaded_model(settings: SettingsPanel, engine: Any) -> None:
    select(settings, "org_tiny")
    settings.load_button.click()
    assert settings.wait(60) and engine.loaded
    settings.load_fields["load_in_8bit"].value = True
    settings.load_fields["load_in_4bit"].value = True
    settings.load_button.click()
    expected = OptionError("--load-in-8bit and --load-in-4bit cannot be used together", "choose one of them").message
    assert settings.messages.error_text == expected
    assert "\n" not in settings.messages.error_text
    assert settings.messages.error.layout.display is None  # visible
    assert engine.loaded and engine.status().options == {}  # the first model is still loaded, unchanged
    # An ineffective option is a note, not an error.
    settings.load_fields["load_in_8bit"].value = False
    settings.load_fields["load_in_4bit"].value = False
    settings.load_fields["quant_type"].value = "fp4"
    settings.load_button.click()
    assert settings.wait(60)
    assert settings.messages.error_text == ""
    assert "quant_type only affects load_in_4bit" in settings.messages.note_text  # the panel's words


def test_a_second_load_during_a_load_is_refused_with_a_note_and_the_first_one_ends(
    settings: SettingsPanel, engine: Any, tiny_model: Path
) -> None:
    select(settings, "org_tiny")
    first = settings.model.value
    with engine._cond:  # the engine is busy (as during a long load): the panel's load waits on its worker
        settings.load_button.click()
        assert settings.loading
        assert settings.load_button.description == "Loading…" and settings.load_button.disabled
        assert settings.model.disabled and settings.unload_button.disabled
        assert "Loading org_tiny… Load, Unload and the model choice are back when it has loaded." in settings.status.value
        settings.refresh()  # a cell ran meanwhile: the line still says it is loading
        assert "Loading org_tiny…" in settings.status.value
        settings.load_button.click()  # a second click (a script's, or a page that missed the update)
        assert settings.messages.note_text == "org_tiny is still loading: Load is back when it has loaded."
        settings.unload_button.click()
        assert "still loading: Unload is back" in settings.messages.note_text
    assert settings.wait(60)
    assert engine.loaded and Path(engine.status().path).resolve() == tiny_model.resolve()
    assert settings.model.value == first and not settings.model.disabled
    assert settings.load_button.description == "Load" and not settings.load_button.disabled
    assert "Loaded org_tiny with transformers" in settings.status.value
    settings.load_button.click()  # the same model with the same options: said, not silently ignored
    assert settings.wait(60)
    assert "org_tiny is already loaded with these options; nothing was done" in settings.messages.note_text


@pytest.mark.parametrize(
    "group, name, typed, error",
    [
        ("gen", "top_k", "2.5", "the top_k field expects a whole number, not '2.5'. For example: 0. In use: 0."),
        ("gen", "max_new_tokens", "1e3",
         "the max_new_tokens field expects a whole number, not '1e3'. For example: 512. In use: 512."),
        ("gen", "max_new_tokens", "0", "max_new_tokens 0 is below 1. Use a value at least 1. In use: 512."),
        ("gen", "max_new_tokens", "-5", "max_new_tokens -5 is below 1. Use a value at least 1. In use: 512."),
        ("gen", "temperature", "9", "temperature 9 is above 5.0. Use a value from 0.0 to 5.0. In use: 0.7."),
        ("gen", "seed", "-1", "seed -1 is below 0. Use a value from 0 to 4294967295. In use: unset."),
        ("load", "alpha_value", "0.5", "alpha_value 0.5 is below 1.0. Use a value at least 1.0. In use: 1."),
        ("load", "n_batch", "0", "n_batch 0 is below 1. Use a value at least 1. In use: 512."),
        ("load", "n_ctx", "-5", "n_ctx -5 is below 0. Use a value at least 0. In use: 0."),
        ("load", "n_ctx", "abc", "the n_ctx field expects a whole number, not 'abc'. For example: 0. In use: 0."),
        ("load", "n_ctx", "", "the n_ctx field is empty. Type a whole number, for example 0. In use: 0."),
        ("load", "cpu_memory", "-3", "cpu_memory -3 is below 0. Use a value at least 0. In use: unset."),
    ],
)
def test_number_fields_take_what_the_schema_takes_and_say_why_not_next_to_the_field(
    settings: SettingsPanel, engine: Any, group: str, name: str, typed: str, error: str
) -> None:
    select(settings, "tiny.gguf" if name in ("n_batch", "n_ctx", "alpha_value") else "org_tiny")
    fields = settings.gen_fields if group == "gen" else settings.load_fields
    field = fields[name]
    before, defaults = field.value, engine.defaults
    field.input.value = typed
    assert field.messages.error_text == error
    assert field.input.value == typed and not field.valid  # kept as typed, marked invalid
    assert "nbllm-invalid" in field.input._dom_classes
    assert field.value == before and engine.defaults == defaults  # nothing else changed
    assert settings.messages.error_text == ""  # the error is next to the field, not at the top
    if group == "load":  # Load uses only valid values: it refuses, and says which field to correct
        settings.load_button.click()
        assert settings.messages.error_text == (
            f"{name} holds a value the option does not take. Correct it as the message under the field says, then "
            "click Load.")
        assert not settings.loading and not engine.loaded
    field.input.value = field_text(field.spec, before) if before is not None else ""
    assert field.valid and field.messages.error_text == "" and "nbllm-invalid" not in field.input._dom_classes


def test_number_fields_accept_what_the_schema_accepts(settings: SettingsPanel, engine: Any) -> None:
    fields = settings.gen_fields
    for name, typed, value in [("top_k", " 40 ", 40), ("max_new_tokens", "1000", 1000), ("seed", "7", 7),
                               ("temperature", "0.35", 0.35), ("min_p", "0.05", 0.05), ("seed", "", None)]:
        fields[name].input.value = typed
        assert fields[name].messages.error_text == "", name
        assert fields[name].value == value and getattr(engine.defaults, name) == value
    assert fields["temperature"].slider is not None and fields["temperature"].slider.value == 0.35
    fields["temperature"].slider.value = 1.25  # the slider writes into the field
    assert fields["temperature"].input.value == "1.25" and engine.defaults.temperature == 1.25
    # A combination the schema warns about: the note is under the field edited, not at the top.
    fields["temperature"].input.value = "0"
    assert "temperature 0 is greedy decoding; top_k, min_p have no effect" in fields["temperature"].messages.note_text
    assert settings.messages.note_text == ""


def test_load_uses_the_fields_values_and_a_long_context_gets_a_rope_note(
    settings: SettingsPanel, engine: Any
) -> None:
    pytest.importorskip("llama_cpp")
    select(settings, "tiny.gguf")
    settings.load_fields["n_batch"].input.value = "0"
    settings.load_fields["n_batch"].input.value = "64"
    settings.load_fields["n_ctx"].input.value = "100000"
    settings.load_button.click()
    assert settings.wait(60)
    assert settings.messages.error_text == ""
    assert engine.status().options == {"n_batch": 64, "n_ctx": 100000}
    assert ("n_ctx 100000 is 48.8x the 2048 tokens the model was trained on: past 2048 tokens it needs RoPE scaling, "
            "--compress-pos-emb 48.8") in settings.messages.note_text


def test_each_loader_keeps_its_choices_and_empty_groups_have_no_heading(
    settings: SettingsPanel, engine: Any
) -> None:
    pytest.importorskip("llama_cpp")
    select(settings, "org_tiny")
    settings.load_fields["dtype"].value = "float32"
    settings.load_fields["alpha_value"].input.value = "2"  # options both loaders take ...
    settings.load_fields["gpu_split"].input.value = "7.5,8"  # (GiB per GPU here, proportions in llama.cpp)
    settings.load_fields["flash_attn"].value = True
    assert settings.option_groups["quantization"].layout.display is None
    select(settings, "tiny.gguf")
    assert settings.option_groups["quantization"].layout.display == "none"  # llama.cpp has no such option
    assert all(g.layout.display is None for k, g in settings.option_groups.items() if k not in ("quantization", "remote"))
    # ... but llama.cpp, shown for the first time, starts from its own defaults: nothing carried over
    assert settings.load_fields["alpha_value"].value == 1.0 and settings.load_fields["alpha_value"].input.value == "1"
    assert settings.load_fields["gpu_split"].value is None and settings.load_fields["flash_attn"].value is None
    settings.load_fields["alpha_value"].input.value = "1.5"  # now llama.cpp's own choice
    settings.load_button.click()  # loading the GGUF shows its options; the Transformers ones stay
    assert settings.wait(60) and settings.messages.error_text == ""
    assert engine.status().options == {"alpha_value": 1.5}
    select(settings, "org_tiny")
    assert settings.load_fields["dtype"].value == "float32"
    assert settings.load_fields["alpha_value"].value == 2.0 and settings.load_fields["gpu_split"].value == "7.5,8"
    assert settings.load_fields["flash_attn"].value is True
    select(settings, "tiny.gguf")
    assert settings.load_fields["alpha_value"].value == 1.5


def test_a_three_state_option_goes_back_to_auto(settings: SettingsPanel) -> None:
    select(settings, "org_tiny")
    field = settings.load_fields["flash_attn"]
    assert field.value is None and field.input.label == "auto"
    field.input.value = "off"  # as a user picks it in the list
    assert field.value is False and settings.load_options().flash_attn is False
    field.value = None  # back to auto: the list shows it (not an empty list), and no choice is passed
    assert field.input.label == "auto" and field.value is None and settings.load_options().flash_attn is None


def test_a_second_panel_starts_the_other_loader_from_its_defaults_not_the_loaded_models(
    settings: SettingsPanel, engine: Any, folder: Path
) -> None:
    engine.load(folder / "org_tiny", alpha_value=2.0)
    second = SettingsPanel(models_dir=folder)
    try:
        assert second.load_fields["alpha_value"].value == 2.0  # the loaded model's, for its loader
        select(second, "tiny.gguf")
        assert second.load_fields["alpha_value"].value == 1.0  # llama.cpp's own default
    finally:
        second.close()


def test_load_with_no_model_in_the_folder_says_what_to_do(tmp_path: Path, engine: Any) -> None:
    panel = SettingsPanel(models_dir=tmp_path / "empty")
    panel.load_button.click()
    assert panel.messages.error_text.startswith("no model is selected.")
    assert not engine.loaded
    panel.close()


def test_presets_and_fields_set_the_engine_defaults(settings: SettingsPanel, engine: Any) -> None:
    settings.preset_buttons["creative"].click()
    for key, value in GenerationOptions.presets()["creative"].items():
        assert getattr(engine.defaults, key) == value
    assert "creative" in settings.preset_label.value
    settings.preset_buttons["deterministic"].click()
    assert engine.defaults.temperature == 0.0 and engine.defaults.greedy
    assert settings.messages.note_text == ""  # no "has no effect" warning: the preset is consistent
    settings.gen_fields["max_new_tokens"].value = 77
    settings.gen_fields["seed"].value = "1234"
    assert engine.defaults.max_new_tokens == 77 and engine.defaults.seed == 1234
    assert engine.generation_options().max_new_tokens == 77  # what %%llm gets with no flag
    settings.gen_fields["temperature"].value = 0.5
    assert "custom" in settings.preset_label.value
    # A bad value is refused next to its field, in panel words; the defaults stay as they were.
    settings.gen_fields["seed"].input.value = "not a number"
    assert settings.gen_fields["seed"].messages.error_text == (
        "the seed field expects a whole number, not 'not a number'. For example: 1234, or leave the field empty. "
        "In use: 1234.")
    assert engine.defaults.seed == 1234
    # Defaults set elsewhere show in the panel on refresh.
    engine.defaults = GenerationOptions(temperature=1.5, max_new_tokens=9)
    settings.refresh()
    assert settings.gen_fields["temperature"].value == 1.5
    assert settings.gen_fields["max_new_tokens"].value == 9


def test_stop_field_takes_one_text_per_line_with_escapes(settings: SettingsPanel, engine: Any) -> None:
    stop = settings.gen_fields["stop"]
    stop.value = ("\n", "END")  # shown as typed: one per line, a newline as \n
    assert stop.input.value == "\\n\nEND" and engine.defaults.stop == ("\n", "END")
    stop.input.value = "\\n\\n\n\n###\nC:\\\\path\n"  # what a user types, blank lines ignored
    assert engine.defaults.stop == ("\n\n", "###", "C:\\path")
    engine.defaults = GenerationOptions(stop=("a\tb", "\\"))
    settings.refresh()
    assert stop.input.value == "a\\tb\n\\\\" and stop.value == ("a\tb", "\\")
    stop.input.value = ""
    assert engine.defaults.stop == ()


def test_a_model_loaded_with_the_magic_shows_in_the_panel(settings: SettingsPanel, shell: Any, folder: Path) -> None:
    from nbllm.widgets import _common

    _common.track(settings)  # the panel was built before the shell existed in this process
    result = shell.run_cell(f"%llm_load {folder / 'org_tiny'} --dtype float32")
    result.raise_error()
    assert "Loaded org_tiny with transformers" in settings.status.value  # refreshed after the cell
    assert settings.model.value == str(folder / "org_tiny")
    assert settings.load_fields["dtype"].value == "float32"
    shell.run_cell("%llm_unload").raise_error()
    assert "No model loaded." in settings.status.value


def test_download_field_downloads_lists_and_selects_the_model(
    hub: HubServer, tiny_model: Path, tmp_path: Path, engine: Any
) -> None:
    hub.add_repo("org/panel-tiny", {p.name: p for p in tiny_model.iterdir() if p.is_file()})
    root = tmp_path / "models"
    panel = SettingsPanel(models_dir=root)
    panel.download_id.value = "org/panel-tiny"
    panel.download_button.click()
    assert panel.messages.error_text == ""
    assert "Downloaded org/panel-tiny" in panel.messages.note_text
    assert panel.model.value == str(root / "org_panel-tiny")
    panel.load_button.click()
    assert panel.wait(60)
    assert engine.loaded and engine.status().model == "org_panel-tiny"
    panel.download_id.value = "org/missing"
    panel.download_button.click()
    assert "org/missing" in panel.messages.error_text and "\n" not in panel.messages.error_text
    panel.close()


# -------------------------------------------------------------------------------------------- chat


def test_send_without_a_model_shows_the_error_and_keeps_the_message(chat: ChatPanel) -> None:
    chat.input.value = "hello"
    chat.send_button.click()
    assert chat.messages.error_text == ("no model is loaded. Load one with the Load button of the settings panel "
                                        "(%llm_settings), or with %llm_load MODEL in a cell.")  # panel words
    assert chat.input.value == "hello"
    assert not chat.generating and len(chat.chat) == 0


def test_an_empty_message_is_refused_by_the_conversation(chat: ChatPanel, engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    chat.input.value = "  \n "
    chat.send_button.click()
    assert chat.messages.error_text == "the message is empty. Write the message to send."
    assert not chat.generating and len(chat.chat) == 0 and engine.last_result is None


def test_chat_notes_show_once_in_the_panels_note_line(chat: ChatPanel, engine: Any) -> None:
    from nbllm.chat_template import FALLBACK_NOTE
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(chat_template=False))
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=3)
    chat.send("Hi")
    assert chat.wait(30)
    assert chat.messages.note_text == FALLBACK_NOTE
    chat.send("Again")
    assert chat.wait(30)
    assert chat.messages.note_text == "" and len(chat.chat) == 2  # said once per conversation


def test_reply_streams_into_the_panel_and_joins_the_conversation(chat: ChatPanel, engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=24)
    chat.system.value = "Be brief."
    chat.input.value = "Hello there"
    chat.send_button.click()
    assert chat.input.value == ""
    assert chat.wait(60)
    assert chat.messages.error_text == ""
    turn = chat.chat.turns[-1]
    assert chat.chat.system == "Be brief."
    assert turn.user == "Hello there" and turn.reply is not None and turn.reply.finish_reason in ("length", "eos")
    views = chat.view.children
    assert [v.role for v in views] == ["user", "assistant"]
    assert views[1].text == turn.reply.content
    # The same greedy reply as the library gives for these messages.
    expected = engine.generate(chat.chat.messages()[:-1], temperature=0, max_new_tokens=24).text
    assert turn.reply.content == expected
    # Regenerate replaces the reply and keeps the first version; Clear forgets the turns.
    chat.regenerate_button.click()
    assert chat.wait(60)
    assert len(chat.chat.turns) == 1 and len(chat.chat.turns[0].earlier) == 1
    assert chat.view.children[-1].note == "version 2 of 2"
    chat.clear_button.click()
    assert chat.view.children == () and len(chat.chat) == 0


def test_logprobs_set_in_the_settings_panel_show_the_token_view_in_the_chat(
        settings: SettingsPanel, chat: ChatPanel, engine: Any, tiny_model: Path) -> None:
    """The settings panel's logprobs field (beside its structured-output fields) makes the chat panel's
    replies carry their tokens, coloured by probability with the alternatives on hover."""
    assert {"logprobs", "schema", "choice"} <= set(settings.gen_fields)
    engine.load(tiny_model)
    settings.gen_fields["temperature"].value = 0.0
    settings.gen_fields["max_new_tokens"].value = 6
    settings.gen_fields["logprobs"].value = "3"
    assert engine.defaults.logprobs == 3
    chat.input.value = "Hello there"
    chat.send_button.click()
    assert chat.wait(60) and chat.messages.error_text == ""
    reply = chat.chat.turns[-1].reply
    assert reply is not None and reply.record is not None
    entries = reply.record.logprobs
    assert entries and all(len(e["top"]) == 3 for e in entries)
    shown = chat.view.children[-1].value
    assert shown.count("class='nbllm-token'") == len(entries) and "hover for the alternatives" in shown
    assert shown.count("title='") == len(entries) and "&#x27;" in shown  # each alternative list, escaped
    # without logprobs a reply has no token view
    settings.gen_fields["logprobs"].value = ""
    assert engine.defaults.logprobs is None
    chat.send("Again")
    assert chat.wait(60)
    assert "nbllm-token" not in chat.view.children[-1].value
    assert chat.view.children[1].value.count("class='nbllm-token'") == len(entries)  # the first reply keeps its view


def test_stop_during_a_long_reply_keeps_the_partial_reply(chat: ChatPanel, engine: Any, long_model: Path) -> None:
    engine.load(long_model)
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=4000)
    chat.input.value = "Write a long story."
    chat.send_button.click()
    assert chat.generating and not chat.stop_button.disabled and chat.send_button.disabled
    # The kernel's thread is free meanwhile: this test runs while the worker writes the reply.
    wait_for(lambda: len(chat.view.children[-1].text) > 20, what="streamed text in the panel")
    from nbllm.widgets.chat import CURSOR

    shown = chat.view.children[-1].text.removesuffix(CURSOR)
    chat.stop_button.click()
    assert chat.wait(30)
    reply = chat.chat.turns[-1].reply
    assert reply is not None and reply.partial and reply.finish_reason == "cancelled"
    assert reply.content.startswith(shown) and len(shown) > 20  # what had streamed in is kept
    assert reply.records[-1].generation_options["max_new_tokens"] == 4000  # recorded with the options it ran with
    assert chat.view.children[-1].text == reply.content
    assert "partial" in chat.view.children[-1].note
    assert "ended: cancelled" in chat.status.value
    assert chat.stop_button.disabled and not chat.continue_button.disabled
    # Continue goes on from the partial reply.
    before = reply.content
    chat.continue_button.click()
    wait_for(lambda: len(chat.view.children[-1].text) > len(before), what="continued text")
    chat.stop_button.click()
    assert chat.wait(30)
    assert chat.chat.turns[-1].reply.content.startswith(before)
    assert len(chat.chat.turns[-1].reply.content) > len(before)


def test_continue_past_the_context_is_one_message_that_says_what_to_do_and_clear_clears_the_numbers(
    chat: ChatPanel, engine: Any
) -> None:
    from nbllm.testing import tiny_transformers_model

    engine.load(tiny_transformers_model(max_position_embeddings=64))
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=200)
    chat.send("Hi")
    assert chat.wait(60)
    assert chat.chat.turns[-1].reply.finish_reason == "context"  # the reply ran to the end of the context
    assert "ended: context" in chat.status.value
    chat.continue_button.click()
    error = chat.messages.error_text
    assert error.startswith("the last reply and its message are ") and error.endswith(
        "tokens: the model's context (64 tokens) is full, so the reply cannot be continued. Lower max_new_tokens in "
        "the settings panel and click Regenerate, or click Clear to start over.")
    assert chat.messages.note_text == ""  # one message, not a second one that says something else
    assert not chat.generating and len(chat.chat) == 1
    chat.clear_button.click()
    assert chat.status.value == "" and chat.view.children == ()  # no numbers of a reply that is gone


def test_a_cell_waiting_for_the_chat_panels_reply_says_it_is_waiting(
    chat: ChatPanel, shell: Any, engine: Any, long_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import threading

    from nbllm.magics._common import WAITING as WAITING_FOR

    WAITING = WAITING_FOR.format(owner="the chat panel's reply")

    class Watched(io.StringIO):
        """stdout, telling when the cell has said it waits."""

        said = threading.Event()

        def write(self, text: str) -> int:
            n = super().write(text)
            if WAITING in self.getvalue():
                self.said.set()
            return n

    engine.load(long_model)
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=4000)
    chat.send("Write a long story.")
    wait_for(lambda: len(chat.view.children[-1].text) > 20, what="streamed text in the panel")
    out = Watched()
    monkeypatch.setattr(sys, "stdout", out)
    stopper = threading.Thread(target=lambda: out.said.wait(60) and chat.stop(), daemon=True)
    stopper.start()
    shell.run_cell("%%llm --temperature 0 --max-new-tokens 3\nHi").raise_error()  # waits for the panel's reply
    stopper.join(5)
    assert out.said.is_set() and out.getvalue().startswith(WAITING + "\n")
    assert chat.wait(30) and chat.chat.turns[-1].reply.finish_reason == "cancelled"  # stopped, not superseded
    assert engine.last_result.completion_tokens == 3  # then the cell's own prompt ran


def test_chat_panel_shares_the_conversation_with_the_magic(shell: Any, engine: Any, tiny_model: Path) -> None:
    from nbllm.widgets import _common

    forget("shared")
    panel = ChatPanel("shared")
    _common.track(panel)
    assert panel.chat is conversation("shared")
    engine.load(tiny_model)
    shell.run_cell("%%llm_chat shared --temperature 0 --max-new-tokens 8\nHi from a cell").raise_error()
    assert [v.role for v in panel.view.children] == ["user", "assistant"]
    assert panel.view.children[0].text == "Hi from a cell"
    assert panel.view.children[1].text == conversation("shared").turns[0].reply.content
    panel.close()
    forget("shared")


def test_chat_text_is_shown_as_written_in_markdown() -> None:
    from nbllm.widgets.chat import MessageView, chat_html

    assert chat_html("one\ntwo") == "<p>one<br />\ntwo</p>\n"  # a newline is a line break
    assert chat_html("a <b>tag</b> & `x<y` &amp; here") == (
        "<p>a &lt;b&gt;tag&lt;/b&gt; &amp; <code>x&lt;y</code> &amp;amp; here</p>\n")  # characters, not HTML
    dollars = "The apples cost $5 and the pears cost $10"
    assert chat_html(dollars) == f"<p>{dollars}</p>\n"  # no math: the HTML is shown as is, never typeset
    assert chat_html("Code:\n\n    a < b & c") == "<p>Code:</p>\n<pre><code>a &lt; b &amp; c\n</code></pre>\n"
    assert chat_html("```python\nif a<b:\n    pass\n```") == (
        '<pre><code class="language-python">if a&lt;b:\n    pass\n</code></pre>\n')  # escaped once
    assert 'target="_blank"' in chat_html("[docs](https://example.org)")
    assert "<img" not in chat_html("![x](https://example.org/x.png)") and "href" not in chat_html("[x](javascript:1)")
    view = MessageView("assistant", "    a < b & c")  # replies too
    assert "a &lt; b &amp; c" in view.value and "&amp;lt;" not in view.value


# ------------------------------------------------------------------------------------------ magics


def test_panel_magics_build_the_panels(shell: Any) -> None:
    settings = shell.run_line_magic("llm_settings", "")
    chat = shell.run_line_magic("llm_chat_panel", "magic-chat")
    assert isinstance(settings, SettingsPanel) and isinstance(chat, ChatPanel)
    assert chat.chat is conversation("magic-chat")
    settings.close()
    chat.close()
    forget("magic-chat")


def test_importing_the_panel_magics_imports_no_widgets_nor_torch() -> None:
    code = "import sys, nbllm.magics.panels; print(sorted({'ipywidgets', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- the panels as a browser user found them


@pytest.fixture
def in_folder(folder: Path) -> Iterator[Path]:
    """``folder`` as the models folder in effect (loading by name, saved settings)."""
    models.set_models_dir(folder)
    yield folder
    models.set_models_dir(None)


def test_saved_settings_apply_to_a_model_linked_into_the_models_folder(in_folder: Path, engine: Any) -> None:
    from nbllm import fit

    panel = SettingsPanel()
    try:
        select(panel, "org_tiny")  # a symlink in the folder, its files elsewhere
        panel.load_fields["dtype"].value = "float32"
        panel.save_button.click()
        assert panel.messages.error_text == ""
        assert "Settings of org_tiny saved in" in panel.messages.info_text
        saved = fit.saved_settings("org_tiny")
        assert saved is not None and saved.load == {"dtype": "float32"}
        panel.load_fields["dtype"].value = "auto"  # nothing typed: the saved settings apply
        panel.load_button.click()
        assert panel.wait(60) and panel.messages.error_text == ""
        assert engine.status().options == {"dtype": "float32"}
        assert "saved settings for org_tiny" in panel.messages.note_text  # and it says so
        engine.unload()
        assert nbllm_load("org_tiny").options == {"dtype": "float32"}  # by name, as %llm_load does
    finally:
        panel.close()


def nbllm_load(name: str) -> Any:
    import warnings

    import nbllm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nbllm.load(name)


def test_a_loader_saved_or_chosen_for_a_model_stays_with_that_model(in_folder: Path, engine: Any) -> None:
    pytest.importorskip("llama_cpp")
    import yaml

    panel = SettingsPanel()
    try:
        select(panel, "org_tiny")
        panel.save_button.click()  # loader auto: stored as auto (no loader key), restored as auto
        entry = yaml.safe_load((in_folder / "config-user.yaml").read_text())["org_tiny$"]
        assert "loader" not in entry
        # A file text-generation-webui wrote names the loader: it applies to that model only.
        (in_folder / "config-user.yaml").write_text("org_tiny$:\n  loader: Transformers\n")
        panel.load_button.click()
        assert panel.wait(60) and engine.status().options == {"loader": "transformers"}
        assert panel.load_fields["loader"].value == "transformers"
        select(panel, "tiny.gguf")
        assert panel.load_fields["loader"].value == "auto" and panel.loader == "llama.cpp"
        assert "(by the model's format)" in panel.effective_loader.value
        panel.load_button.click()
        assert panel.wait(60) and panel.messages.error_text == ""
        assert engine.status().loader == "llama.cpp"
        select(panel, "org_tiny")
        assert panel.load_fields["loader"].value == "transformers"
    finally:
        panel.close()


def test_lora_apply_refuses_a_scale_the_field_does_not_take(settings: SettingsPanel, engine: Any, folder: Path,
                                                            tiny_model: Path) -> None:
    pytest.importorskip("peft")
    from nbllm import testing

    loras = folder.parent / "loras"
    loras.mkdir()
    (loras / "tiny-lora").symlink_to(testing.tiny_peft_adapter(), target_is_directory=True)
    settings.refresh_button.click()
    assert settings.lora.choice.value.endswith("tiny-lora")
    engine.load(tiny_model)
    settings.lora.scale.input.value = "9"
    assert settings.lora.scale.messages.error_text.endswith("In use: 1.")
    settings.lora.add_button.click()
    assert settings.messages.error_text == (
        "the scale field holds a value the option does not take. Correct it as the message under the field says, "
        "then click Apply.")
    assert engine.adapters == ()  # not applied with the scale still in use
    settings.lora.scale.input.value = "0.7"
    settings.lora.add_button.click()
    assert settings.messages.error_text == ""
    assert [a.scale for a in engine.adapters] == [0.7]


def test_notes_on_options_show_under_their_own_fields_in_the_panels_words(settings: SettingsPanel) -> None:
    select(settings, "org_tiny")
    fields = settings.load_fields
    fields["quant_type"].value = "fp4"
    fields["double_quant"].value = True
    fields["compute_dtype"].value = "float16"  # changed last
    assert fields["quant_type"].messages.note_text == "quant_type only affects load_in_4bit; it is ignored here"
    assert fields["double_quant"].messages.note_text == "double_quant only affects load_in_4bit; it is ignored here"
    assert fields["compute_dtype"].messages.note_text == (
        "compute_dtype only affects load_in_4bit; it is ignored here")
    fields["load_in_4bit"].value = True  # now they all take effect: every note goes
    assert all(not f.messages.note_text for f in fields.values()), {n: f.messages.note_text for n, f in fields.items()}


def test_messages_do_not_outlive_what_they_were_about(settings: SettingsPanel, engine: Any, chat: ChatPanel,
                                                      shell: Any, long_model: Path) -> None:
    from nbllm.widgets import _common
    from nbllm.widgets.chat import BUSY

    other = SettingsPanel(models_dir=settings._models_dir)
    try:
        select(settings, "org_tiny")
        settings.load_button.click()
        assert settings.wait(60)
        other.messages.show_info("org_tiny: KV cache 2 MiB")  # what a load of the other panel said
        settings.unload_button.click()  # unloaded in one panel: the other one's note about it goes
        assert other.messages.note_text == "" and "No model loaded." in other.status.value
    finally:
        other.close()
    # A second Send while a reply is written says so, and the message goes when the reply ends.
    engine.load(long_model)
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=4000)
    chat.send("Write a long story.")
    chat.send("Again")
    assert chat.messages.error_text == BUSY
    chat.stop()
    assert chat.wait(30)
    assert chat.messages.error_text == ""
    assert "ended: cancelled" in chat.status.value
    # A turn of %%llm_chat shown in the panel: no numbers line of the panel's earlier reply under it.
    _common.track(chat)
    shell.run_cell(f"%%llm_chat {chat.chat.name} --temperature 0 --max-new-tokens 3\nHi from a cell").raise_error()
    assert chat.view.children[-2].text == "Hi from a cell"
    assert chat.status.value == ""


def test_a_load_during_a_chat_reply_says_it_waits_for_it_and_can_stop_it(
    settings: SettingsPanel, chat: ChatPanel, engine: Any, long_model: Path
) -> None:
    engine.load(long_model)
    engine.defaults = GenerationOptions(temperature=0, max_new_tokens=4000)
    chat.send("Write a long story.")
    wait_for(lambda: len(chat.view.children[-1].text) > 20, what="streamed text in the panel")
    select(settings, "org_tiny")
    assert settings.stop_reply_button.layout.display == "none"
    settings.load_button.click()
    said = html.escape("Loading org_tiny: waiting for the chat panel's reply to end")
    wait_for(lambda: said in settings.status.value, what="the load saying it waits")
    assert settings.stop_reply_button.layout.display is None and chat.generating
    settings.stop_reply_button.click()
    assert settings.wait(60) and chat.wait(30)
    assert chat.chat.turns[-1].reply.finish_reason == "cancelled"  # stopped, what it wrote kept
    assert engine.status().model == "org_tiny" and "Loaded org_tiny" in settings.status.value
    assert settings.stop_reply_button.layout.display == "none"


def test_the_openai_loader_takes_a_server_url_and_the_key_s_variable_name(settings: SettingsPanel,
                                                                        engine: Any, tiny_gguf: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    need("llama_cpp.server", "needs llama-cpp-python[server]")
    try:
        from servers import LlamaCppServer
    except ImportError:  # tests/ imported as a package
        from tests.servers import LlamaCppServer
    select(settings, "org_tiny")
    assert settings.server_row.layout.display == "none" and settings.model_row.layout.display is None
    settings.load_fields["loader"].value = "openai"
    assert settings.server_row.layout.display is None and settings.model_row.layout.display == "none"
    assert {"api_key_env", "remote_model", "timeout"} <= shown(settings) and "dtype" not in shown(settings)
    settings.load_button.click()
    assert settings.messages.error_text == (
        "no server URL is given. Type the server's URL in the Server URL field, e.g. http://127.0.0.1:8000/v1.")
    assert not engine.loaded
    # A real server that wants a key: the panel names the variable, the key stays in the environment.
    server = LlamaCppServer(tiny_gguf, api_key="panel-secret")
    try:
        monkeypatch.setenv("PANEL_TEST_KEY", "panel-secret")
        settings.load_fields["api_key_env"].input.value = "PANEL_TEST_KEY"
        settings.server_url.value = server.url
        settings.load_button.click()
        assert settings.wait(60) and settings.messages.error_text == "", settings.messages.error_text
        status = engine.status()
        assert status.loader == "openai" and status.path == server.url
        assert status.options == {"loader": "openai", "api_key_env": "PANEL_TEST_KEY"}
        assert "panel-secret" not in settings.status.value and "panel-secret" not in repr(status)
        assert engine.generate("Hi", temperature=0, max_new_tokens=3).completion_tokens > 0
    finally:
        engine.unload()
        server.stop()


def test_success_and_information_are_not_warning_orange() -> None:
    from nbllm.widgets._common import INFO_COLOR, WARN_COLOR, MessageLine

    line = MessageLine()
    line.show_info("Settings of x saved in y")
    assert INFO_COLOR in line.note.value and WARN_COLOR not in line.note.value
    line.show_note("quant_type only affects load_in_4bit", info="x is loaded")
    assert line.note_text == "quant_type only affects load_in_4bit; x is loaded"
    assert line.warning_text == "quant_type only affects load_in_4bit" and line.info_text == "x is loaded"
    assert line.note.value.index(WARN_COLOR) < line.note.value.index(INFO_COLOR)


def test_an_image_in_a_reply_is_its_alt_text_and_a_link_never_fetched() -> None:
    from nbllm.widgets.chat import chat_html

    out = chat_html("See ![a cat](https://example.org/cat.png) here")
    assert "<img" not in out and "!" not in out
    assert '[image: <a href="https://example.org/cat.png" target="_blank" rel="noopener noreferrer">a cat</a>]' in out
    assert "<img" not in chat_html("![x](javascript:alert(1))") and "href" not in chat_html("![x](javascript:1)")


def test_the_status_details_keep_their_lines(settings: SettingsPanel, engine: Any, tiny_model: Path) -> None:
    engine.load(tiny_model)
    settings.refresh()
    pre = settings.status.value.split("<pre", 1)[1].split(">", 1)[0]
    # one white-space rule in the details' style, the one that keeps %llm_status's lines
    assert pre.count("white-space") == 1 and "white-space: pre-wrap" in pre and "anywhere" not in pre


def test_panels_carry_the_heartbeat_the_page_watches_for_a_dead_kernel(settings: SettingsPanel,
                                                                      chat: ChatPanel) -> None:
    from nbllm.widgets import _common

    for panel in (settings, chat):
        assert "nbllm-panel" in panel._dom_classes
        (box,) = [c for c in panel.children if any("nbllm-heartbeat" in w._dom_classes for w in getattr(c, "children", ()))]
        beat, watcher = box.children
        (output,) = watcher.outputs
        assert "nbllm-dead" in output["data"]["application/javascript"]
    first = _common.heartbeat().children[0]
    value = first.value
    wait_for(lambda: first.value != value, timeout=120, what="a beat")


@pytest.mark.timeout(240)
def test_a_kernel_interrupt_stops_the_panels_reply_and_a_cell_waiting_for_it_ends_in_one_line(long_model: Path) -> None:
    try:
        from test_kernel import Kernel
    except ImportError:  # tests/ imported as a package
        from tests.test_kernel import Kernel
    from nbllm.magics._common import WAITING as WAITING_FOR

    WAITING = WAITING_FOR.format(owner="the chat panel's reply")
    kernel = Kernel()
    try:
        kernel.execute(
            "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n%load_ext nbllm\nimport nbllm\n"
            f"nbllm.load({str(long_model)!r})\n"
            "from nbllm.widgets import ChatPanel\npanel = ChatPanel('k')\n"
            "nbllm.get_engine().defaults = nbllm.GenerationOptions(temperature=0, max_new_tokens=4000)\n"
            "panel.send('Write a long story.')")
        assert kernel.last_status == "ok"
        shown: list[str] = []

        def on_message(msg: dict[str, Any]) -> None:
            if msg["msg_type"] in ("display_data", "update_display_data"):
                shown.append(msg["content"]["data"]["text/plain"])
                if msg["content"]["data"]["text/plain"] == WAITING:
                    kernel.km.interrupt_kernel()  # SIGINT, as the notebook's Interrupt button sends

        messages = kernel.execute("%%llm --max-new-tokens 3\nHi", on_message=on_message)
        stderr = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert stderr.startswith("UsageError: Interrupted: the chat panel's reply this cell waited for was stopped")
        assert stderr.count("\n") == 1 and "Traceback" not in stderr  # one line
        assert kernel.last_status == "error"
        assert WAITING in shown and shown[-1] == "[stopped the chat panel's reply (what it wrote is kept, marked partial)]"
        out = kernel.execute("print(panel.wait(60), panel.chat.turns[-1].reply.finish_reason)")
        printed = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        assert printed == "True cancelled\n"
        # With no cell running, the interrupt stops the panel's reply too (as Stop does).
        kernel.execute("panel.send('Write another long story.')")
        assert kernel.last_status == "ok"
        kernel.km.interrupt_kernel()
        out = kernel.execute("print(panel.wait(60), len(panel.chat), panel.chat.turns[-1].reply.finish_reason)")
        printed = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        assert printed == "True 2 cancelled\n"
    finally:
        kernel.close()
