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
    assert "--quant-type only affects --load-in-4bit" in settings.messages.note_text


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
    settings.load_fields["attn"].value = "eager"
    settings.load_fields["alpha_value"].input.value = "2"  # an option both loaders take
    assert settings.option_groups["quantization"].layout.display is None
    select(settings, "tiny.gguf")
    assert settings.option_groups["quantization"].layout.display == "none"  # llama.cpp has no such option
    assert all(g.layout.display is None for k, g in settings.option_groups.items() if k not in ("quantization", "remote"))
    assert settings.load_fields["alpha_value"].value == 2.0  # first shown: what was set carries over
    settings.load_fields["alpha_value"].input.value = "1.5"  # now llama.cpp's own choice
    settings.load_button.click()  # loading the GGUF shows its options; the Transformers ones stay
    assert settings.wait(60) and settings.messages.error_text == ""
    assert engine.status().options == {"alpha_value": 1.5}
    select(settings, "org_tiny")
    assert settings.load_fields["dtype"].value == "float32" and settings.load_fields["attn"].value == "eager"
    assert settings.load_fields["alpha_value"].value == 2.0
    select(settings, "tiny.gguf")
    assert settings.load_fields["alpha_value"].value == 1.5


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
