"""The settings panel: text-generation-webui's model page as an ipywidgets panel.

Every load option comes from :meth:`LoadOptions.specs` (its widget, its help text, its group, the
loaders it applies to), every generation default from :meth:`GenerationOptions.specs`: nothing is
retyped here. Buttons call the library (:func:`nbllm.get_engine`, :class:`nbllm.models.ModelsFolder`,
:func:`nbllm.download.download`); the panel holds widgets and callbacks only.
"""

from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..adapters import LorasFolder
from ..download.options import DownloadOptions
from ..engine import Engine, Status, format_memory, get_engine
from ..errors import NbllmError, OptionError
from ..loaders import TRANSFORMERS, loader_class, loader_names
from ..loaders.openai import OpenAILoader
from ..lora import LoraOptions, lora_add, lora_remove
from ..models import ModelsFolder, format_size
from ..options import GenerationOptions, LoadOptions, OptionSpec, decode_escapes, encode_escapes, field_value
from ..result import Result
from ._common import (
    HELP_STYLE,
    WRAP,
    MessageLine,
    button,
    collected_notes,
    guarded,
    heartbeat,
    joined,
    named_options,
    panel_words,
    refresh_all,
    title,
    track,
    untrack,
)

log = logging.getLogger("nbllm.widgets")

GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed", "stop",
                     "logprobs", "schema", "choice", "prompt_lookup")
"""The generation options the panel shows first, open (logprobs too, though it is no panel option of
the schema: the chat panel shows the tokens it gives). Every other generation option with a panel
flag shows in the samplers' sections (:data:`SAMPLER_SECTIONS`). Presets are the library's
(:meth:`GenerationOptions.presets`)."""

SAMPLER_SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "curve-shape": ("Curve shape", ("dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent",
                                    "smoothing_factor", "smoothing_curve")),
    "curve-cutoff": ("Curve cutoff", ("top_n_sigma", "typical_p", "xtc_threshold", "xtc_probability",
                                      "epsilon_cutoff", "eta_cutoff", "top_a")),
    "repetition": ("Repetition suppression", ("dry_multiplier", "dry_allowed_length", "dry_base",
                                              "dry_sequence_breakers", "repetition_penalty_range", "presence_penalty",
                                              "frequency_penalty", "no_repeat_ngram_size")),
    "alternative": ("Alternative sampling methods", ("mirostat_mode", "mirostat_tau", "mirostat_eta",
                                                     "guidance_scale", "negative_prompt")),
    "other": ("Other options", ("temperature_last", "sampler_priority", "ban_eos_token", "custom_token_bans",
                                "logit_bias")),
}
"""The samplers' collapsible sections, as text-generation-webui's Parameters tab groups them (its
temperature, top_p, top_k, min_p and repetition_penalty are among :data:`GENERATION_FIELDS`, open
above). Only names: each field's widget, help and checks come from the schema. A panel generation option no
section names lands in "Other options", so none is ever left out."""

def generation_sections() -> dict[str, tuple[str, list[str]]]:
    """Each samplers' section's title and its fields: :data:`SAMPLER_SECTIONS`, and in "other" every
    panel generation option shown nowhere else."""
    sections = {key: (t, list(names)) for key, (t, names) in SAMPLER_SECTIONS.items()}
    placed = set(GENERATION_FIELDS).union(*(names for _t, names in sections.values()))
    sections["other"][1].extend(s.name for s in GenerationOptions.specs() if s.panel and s.name not in placed)
    return sections

_NO_MODEL = "(no model in the models folder)"

OPENAI = OpenAILoader.name
"""The loader of a model at a server: the panel takes its URL instead of a model of the folder."""

_CSS = """<style>
.nbllm-settings .nbllm-invalid input, .nbllm-settings input.nbllm-invalid, .nbllm-settings .nbllm-invalid textarea {
  border-color: var(--jp-error-color1, #c62828) !important; background: rgba(198, 40, 40, .06); }
.nbllm-settings .widget-inline-hbox, .nbllm-settings .widget-box { min-width: 0; }
</style>"""


def option_widget(spec: OptionSpec, value: Any = None) -> W.ValueWidget:
    """The input widget for one option, derived from its type and choices.

    Numbers are typed in text fields and read through the schema (:func:`field_value`): ipywidgets'
    number fields would clamp or round what was typed without a word (``2.5`` → ``25``)."""
    value = spec.default if value is None else value
    common: dict[str, Any] = {"description": spec.name, "style": {"description_width": "initial"}}
    choices = ("auto", *loader_names()) if spec == LoadOptions.spec("loader") else spec.choices
    if choices:
        widget: W.ValueWidget = W.Dropdown(options=list(choices), value=value, **common)
    elif three_state(spec):  # a three-state switch (--flash-attn): auto, on, off
        widget = W.Dropdown(options=[(name, name) for name in _THREE_STATES], value=_state(value), **common)
    elif spec.type is bool:
        widget = W.Checkbox(value=bool(value), indent=False, **common)
    elif spec.type is tuple:  # several texts: one per line, escapes as in a magic line (\\n: a newline)
        widget = W.Textarea(value=_lines(spec, value), placeholder="one per line", rows=2, continuous_update=False,
                            **common)
    else:  # numbers and texts: what was typed, read when the field is left or Enter is pressed
        placeholder = "unset" if spec.default is None else ""
        widget = W.Text(value=field_text(spec, value), placeholder=placeholder, continuous_update=False, **common)
    widget.add_class(f"nbllm-opt-{spec.name}")
    return widget


_THREE_STATES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""A yes/no option that may be unset, as its list shows it. (Not ``None`` as a list value: ipywidgets
reads the value ``None`` as no choice at all and empties the list.)"""


def three_state(spec: OptionSpec) -> bool:
    """Whether the option is a yes/no that may also be unset (``--flash-attn``/``--no-flash-attn``/auto)."""
    return spec.type is bool and spec.default is None


def _state(value: bool | None) -> str:
    return next(name for name, v in _THREE_STATES.items() if v is value)


def default_input(spec: OptionSpec) -> Any:
    """What an option's widget holds for its default (a text field's text, a list's or box's value)."""
    if three_state(spec):
        return _state(None)
    if spec.choices or spec.type is bool:
        return bool(spec.default) if spec.type is bool else spec.default
    return field_text(spec, spec.default)


def field_text(spec: OptionSpec, value: Any) -> str:
    """How a text field shows an option's value (``''`` for unset; floats without a trailing ``.0`` noise)."""
    if value is None:
        return ""
    if spec.type is tuple:
        return _lines(spec, value)
    if isinstance(value, float):
        return format(value, ".15g")
    return str(value)


def read_widget(spec: OptionSpec, widget: W.ValueWidget) -> Any:
    """What the widget holds, as an option value, checked alone against the schema (raises
    :class:`OptionError` in panel words for what the schema refuses)."""
    value = widget.value
    if three_state(spec):
        return _THREE_STATES[value]
    if spec.type is tuple:
        decode = decode_escapes if spec.escapes else str
        return tuple(decode(line) for line in value.split("\n") if line)
    if isinstance(widget, W.Text):
        return field_value(spec, value)
    return value


def _lines(spec: OptionSpec, values: Any) -> str:
    """Several texts as a text area shows them: one per line, with escapes where the option takes them."""
    encode = encode_escapes if spec.escapes else str
    return "\n".join(encode(v) for v in values or ())


def _help(text: str) -> W.HTML:
    h = W.HTML(f"<div style='{HELP_STYLE}; {WRAP}'>{html.escape(text)}</div>", layout=W.Layout(width="auto"))
    h.add_class("nbllm-help")
    return h


class OptionField(W.VBox):
    """One option: its input, its own message line (what is wrong with what was typed, notes about it)
    and its help text.

    :attr:`value` is the last valid value: what was typed when the schema accepts it. Text the schema
    refuses stays in the field, marked invalid, with the schema's one-line error under it and the
    value still in use; nothing else changes. A number with bounds on both sides (temperature) also
    gets a slider, which writes into the text field.
    """

    def __init__(self, spec: OptionSpec, value: Any = None) -> None:
        self.spec = spec
        self._value = spec.default if value is None else value
        self._listeners: list[Callable[[OptionField], None]] = []
        self._moving = False
        self._valid = True
        self.input = option_widget(spec, self._value)
        self.input.layout.width = "auto"  # the column's width less the widget's margins: no sideways scrolling
        self.messages = MessageLine()
        self.messages.add_class("nbllm-field-messages")
        self.slider: W.FloatSlider | None = None
        top: W.Widget = self.input
        if spec.type is float and spec.minimum is not None and spec.maximum is not None and spec.default is not None:
            self.slider = W.FloatSlider(value=self._value, min=spec.minimum, max=spec.maximum, step=0.01,
                                        readout=False, continuous_update=False,
                                        layout=W.Layout(width="auto", flex="2 1 0", min_width="0"))
            self.slider.add_class(f"nbllm-slider-{spec.name}")
            self.input.layout.flex, self.input.layout.min_width = "3 1 0", "0"
            top = W.HBox([self.input, self.slider], layout=W.Layout(width="100%"))
            self.slider.observe(self._slid, names="value")
        self.input.observe(self._typed, names="value")
        self.help = _help(spec.help)
        super().__init__([top, self.messages, self.help], layout=W.Layout(width="100%", min_width="0"))
        self.add_class("nbllm-option")

    @property
    def value(self) -> Any:
        """The value in use: the last one the schema accepted."""
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        """Show ``value`` in the field, as if typed (listeners hear it)."""
        if three_state(self.spec):
            self.input.value = _state(value)
        elif isinstance(self.input, (W.Dropdown, W.Checkbox)):
            self.input.value = value
        else:
            self.input.value = field_text(self.spec, value)
        if not self.valid or self._value != value:  # same text, but the value had not been read from it
            self._read()

    @property
    def valid(self) -> bool:
        """Whether the field holds what the schema accepts."""
        return self._valid

    def on_change(self, callback: Callable[[OptionField], None]) -> None:
        """Call ``callback(field)`` when the user sets a new valid value."""
        self._listeners.append(callback)

    @property
    def shown(self) -> bool:
        return self.layout.display != "none"

    def show(self, visible: bool) -> None:
        self.layout.display = None if visible else "none"

    def _typed(self, _change: dict[str, Any]) -> None:
        self._read()

    def _read(self) -> None:
        try:
            value = read_widget(self.spec, self.input)
        except OptionError as exc:
            self._valid = False
            self.input.add_class("nbllm-invalid")
            in_use = "unset" if self._value is None else field_text(self.spec, self._value)
            self.messages.show_error(f"{exc.message} In use: {in_use}.")
            return
        self._valid = True
        self.input.remove_class("nbllm-invalid")
        self.messages.clear()
        self._value = value
        if self.slider is not None and value is not None and self.slider.value != value:
            self._moving = True
            try:
                self.slider.value = value
            finally:
                self._moving = False
        for callback in self._listeners:
            callback(self)

    def refuse(self, message: str, in_use: Any) -> None:
        """The whole set refused what the field holds (a format the field alone cannot check, such as
        DRY's sequence breakers, or an impossible combination): mark it invalid with ``message`` under
        it, as a value the field refused, and keep ``in_use``, so the other fields keep working."""
        self._valid = False
        self._value = in_use
        self.input.add_class("nbllm-invalid")
        shown = "unset" if in_use is None else field_text(self.spec, in_use)
        self.messages.show_error(f"{message} In use: {shown}.")

    def _slid(self, change: dict[str, Any]) -> None:
        if not self._moving:
            self.input.value = field_text(self.spec, round(change["new"], 6))


def _grid(children: list[W.Widget]) -> W.GridBox:
    return W.GridBox(children, layout=W.Layout(grid_template_columns="repeat(2, minmax(0, 1fr))",
                                               grid_gap="2px 16px", width="100%"))


def _short(path: Path) -> str:
    """``path`` with the home folder written ``~``."""
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def status_line(status: Status) -> str:
    """One line: the loaded model, its loader, where its layers are and the memory it uses."""
    if not status.loaded:
        return "No model loaded."
    layers = ", ".join(f"{n} on {dev}" for dev, n in status.placement.devices.items()) or "n/a"
    memory = ", ".join(f"{dev} {format_memory(b)}" for dev, b in status.placement.memory_bytes.items()) or "n/a"
    return (f"Loaded {status.model} with {status.loader} · layers: {layers} · memory: {memory} · "
            f"process {format_memory(status.process_rss_bytes)}")


class SettingsPanel(W.VBox):
    """Choose, download and load a model; set its load options and the default generation options.

    Shares the kernel's one :class:`~nbllm.engine.Engine` with the magics: a model loaded with
    ``%llm_load`` shows in the status line (refreshed when the panel is displayed, after each cell and
    after the panel's own actions), and the generation defaults set here are those of ``%%llm`` and
    ``%%llm_chat``. ``models_dir`` overrides the models folder for this panel only.

    Load runs on a worker thread, so the page and the kernel stay live while a model loads; Load,
    Unload and the model choice are disabled until it ends (:meth:`wait` blocks until then). Errors
    show where they belong: a field's under that field, a load's at the top.
    """

    def __init__(self, models_dir: str | Path | None = None, engine: Engine | None = None) -> None:
        self.engine = engine or get_engine()
        self._models_dir = models_dir
        self._loaders: dict[str, str] = {}
        self._seen: tuple[Any, ...] | None = None
        self._syncing = False
        self._lock = threading.RLock()
        self._loading: str | None = None
        self._worker: threading.Thread | None = None
        self._shown_loader: str | None = None
        self._model_loaders: dict[str, str] = {}
        """The loader chosen for each model (in the list) while this panel lives: auto unless set."""
        self._choices: dict[str, dict[str, Any]] = {}
        """What was set for each loader while this panel lives: switching the model to a GGUF and back
        brings back the Transformers choices (options both loaders share included)."""
        self.messages = MessageLine()
        self.messages.add_class("nbllm-panel-messages")

        # -- model, loader, download ---------------------------------------------------------------
        self.model = W.Dropdown(description="Model", options=[], style={"description_width": "initial"},
                                layout=W.Layout(width="60%"))
        self.model.add_class("nbllm-model")
        self.refresh_button = button("", "refresh", icon="refresh", tooltip="List the models folder again")
        self.folder_label = W.HTML(layout=W.Layout(min_width="0"))
        self.model_row = W.HBox([self.model, self.refresh_button, self.folder_label], layout=W.Layout(width="100%"))
        # A model at a server (the openai loader): its URL, typed; the key stays in the environment
        # variable the api_key_env field names (never typed here, shown or recorded).
        self.server_url = W.Text(description="Server URL", placeholder="http://127.0.0.1:8000/v1",
                                 style={"description_width": "initial"}, layout=W.Layout(width="60%"))
        self.server_url.add_class("nbllm-server-url")
        self.server_row = W.VBox([self.server_url, _help(
            "The base URL of an OpenAI-compatible server (vLLM, llama.cpp's server, %llm_serve, ...). Its API "
            "key, if it needs one, is read from the environment variable named in api_key_env below.")],
            layout=W.Layout(width="100%", display="none"))
        self.download_id = W.Text(description="Download model", placeholder=DownloadOptions.spec("model").metavar,
                                  tooltip=f"A hub id, and %llm_download's flags if needed: "
                                  f"{DownloadOptions.usage()}",
                                  style={"description_width": "initial"}, layout=W.Layout(width="60%"))
        self.download_id.add_class("nbllm-download-id")
        self.download_button = button("Download", "download", icon="download",
                                      tooltip="Download from the Hugging Face Hub into the models folder")
        self.download_output = W.Output(layout=W.Layout(width="auto"))
        self.download_output.add_class("nbllm-download-progress")

        load_specs = [s for s in LoadOptions.specs() if s.panel]
        self.load_fields: dict[str, OptionField] = {s.name: OptionField(s) for s in load_specs}
        self.effective_loader = W.HTML()
        self.effective_loader.add_class("nbllm-effective-loader")

        self.load_button = button("Load", "load", style="primary", icon="play")
        self.load_as = W.Text(description="as", placeholder="(the unnamed model)", layout=W.Layout(width="16em"),
                              tooltip="Load beside the models loaded, under this name (%llm_load MODEL --as NAME); "
                                      "empty: replace the unnamed model",
                              style={"description_width": "initial"})
        self.load_as.add_class("nbllm-load-as")
        self.unload_button = button("Unload", "unload", icon="eject")
        self.save_button = button("Save settings", "save-settings", icon="save",
                                  tooltip="Save these load options and generation defaults for the selected model "
                                          "(config-user.yaml in the models folder; loading it by name applies them)")
        self.stop_reply_button = button("Stop the reply", "stop-reply", style="warning", icon="stop",
                                        tooltip="Stop the chat panel's reply that this load waits for")
        self.stop_reply_button.layout.display = "none"  # shown while a load waits for a reply
        self._waited_on: Result | None = None
        self.status = W.HTML()
        self.status.add_class("nbllm-status")

        self.option_groups: dict[str, W.VBox] = {}
        for key, group_title in LoadOptions.GROUPS.items():
            fields: list[W.Widget] = [f for f in self.load_fields.values() if f.spec.group == key]
            if key == "model":
                fields.insert(1, self.effective_loader)  # next to "loader"
            box = W.VBox([W.HTML(f"<b>{html.escape(group_title)}</b>"), _grid(fields)],
                         layout=W.Layout(width="100%"))
            box.add_class(f"nbllm-group-{key}")
            self.option_groups[key] = box

        # -- generation defaults -------------------------------------------------------------------
        defaults = self.engine.defaults
        sections = generation_sections()
        names = [*GENERATION_FIELDS, *(n for _t, section in sections.values() for n in section)]
        self.gen_fields: dict[str, OptionField] = {
            n: OptionField(GenerationOptions.spec(n), getattr(defaults, n)) for n in names
        }
        # The samplers: one collapsible section per text-generation-webui group, closed until opened
        # (each opens on its own: several can be open at once).
        self.sampler_sections: dict[str, W.Accordion] = {}
        for key, (section_title, section) in sections.items():
            box = W.Accordion(children=[_grid([self.gen_fields[n] for n in section])], titles=(section_title,),
                              selected_index=None, layout=W.Layout(width="auto"))  # (100% and its margins: sideways)
            box.add_class(f"nbllm-samplers-{key}")
            self.sampler_sections[key] = box
        self.preset_buttons = {name: button(name, f"preset-{name}") for name in GenerationOptions.presets()}
        self.preset_label = W.HTML()
        self.preset_label.add_class("nbllm-preset")
        self.lora = LoraSection(self.engine, self.messages, models_dir)
        self.preset_messages = MessageLine()

        super().__init__([
            W.HTML(_CSS, layout=W.Layout(display="none")),
            heartbeat(),
            title("nbllm · model settings"),
            self.model_row,
            self.server_row,
            W.HBox([self.download_id, self.download_button], layout=W.Layout(width="100%")),
            self.download_output,
            W.HBox([self.load_button, self.load_as, self.unload_button, self.save_button, self.stop_reply_button],
                   layout=W.Layout(flex_flow="row wrap")),
            self.status,
            self.messages,
            W.HTML("<hr style='margin: 4px 0'>"),
            *self.option_groups.values(),
            W.HTML("<hr style='margin: 4px 0'>"),
            self.lora,
            W.HTML("<hr style='margin: 4px 0'>"),
            W.HTML(f"<div style='{WRAP}'><b>Generation defaults</b> "
                   f"<span style='{HELP_STYLE}'>(used by %%llm, %%llm_chat and the chat panel when no "
                   "option is given)</span></div>"),
            W.HBox([W.HTML("Preset:"), *self.preset_buttons.values(), self.preset_label],
                   layout=W.Layout(flex_flow="row wrap")),
            self.preset_messages,
            _grid([self.gen_fields[n] for n in GENERATION_FIELDS]),
            W.HTML(f"<div style='{WRAP}; margin-top: 6px'><b>{html.escape(GenerationOptions.GROUPS['samplers'])}</b> "
                   f"<span style='{HELP_STYLE}'>(grouped as in its Parameters tab; click a section to open it)"
                   "</span></div>"),
            *self.sampler_sections.values(),
        ], layout=W.Layout(width="100%", max_width="980px", border="1px solid var(--jp-border-color2, #ccc)",
                           padding="8px"))
        self.add_class("nbllm-settings")
        self.add_class("nbllm-panel")

        self.refresh_button.on_click(lambda _b: self.refresh_models())
        self.download_button.on_click(lambda _b: self.download())
        self.load_button.on_click(lambda _b: self.load())
        self.unload_button.on_click(lambda _b: self.unload())
        self.save_button.on_click(lambda _b: self.save_settings())
        self.stop_reply_button.on_click(lambda _b: self.stop_reply())
        self.model.observe(lambda _c: self._model_selected(), names="value")
        for f in self.load_fields.values():
            f.on_change(self._load_field_changed)
        for name, b in self.preset_buttons.items():
            b.on_click(lambda _b, name=name: self.apply_preset(name))
        for f in self.gen_fields.values():
            f.on_change(self._generation_changed)

        self.refresh_models()
        self.refresh()
        track(self)

    # -- reading the panel ---------------------------------------------------------------------------
    @property
    def folder(self) -> ModelsFolder:
        """The models folder listed: ``models_dir``, else the one in effect now (it can change with
        ``%config ModelMagics.models_dir``)."""
        return ModelsFolder(self._models_dir)

    @property
    def loader(self) -> str:
        """The loader that will load the selected model: the chosen one, or (auto) by its format."""
        chosen = self.load_fields["loader"].value
        if chosen != "auto":
            return str(chosen)
        return self._loaders.get(self.model.value or "", TRANSFORMERS)

    @property
    def remote(self) -> bool:
        """Whether the loader chosen is the one of a model at a server: Load takes the Server URL field."""
        return self.load_fields["loader"].value == OPENAI

    def load_options(self) -> LoadOptions:
        """The load options the panel shows for the chosen loader (hidden ones keep their defaults;
        a field holding text the schema refuses gives its last valid value)."""
        values = {name: f.value for name, f in self.load_fields.items() if f.shown}
        return LoadOptions.from_dict({k: v for k, v in values.items() if v is not None})

    def generation_options(self) -> GenerationOptions:
        """The engine's defaults with the panel's generation fields on top."""
        values = {name: f.value for name, f in self.gen_fields.items()}
        return self.engine.defaults.replace(**values)

    @property
    def loading(self) -> bool:
        """Whether a load started by this panel is running."""
        return self._loading is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the load started by this panel has ended; returns False on timeout."""
        return joined(self._worker, timeout)

    # -- actions -------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """List the models folder again (the refresh button)."""
        def run() -> None:
            folder = self.folder
            entries = folder.list()
            options: list[tuple[str, str]] = []
            self._loaders = {}
            for e in entries.loadable:
                options.append((f"{e.name}  ({e.format_label}, {format_size(e.size)})", str(e.path)))
                self._loaders[str(e.path)] = e.loader
            incomplete = len(entries) - len(entries.loadable)
            loaded = self.engine.status()
            loaded_value = self._listed(loaded.path)
            if loaded.loaded and loaded.path and loaded_value is None:
                options.append((f"{loaded.model}  (loaded, outside the models folder)", loaded.path))
                self._loaders[loaded.path] = loaded.loader or TRANSFORMERS
                loaded_value = loaded.path
            current = self.model.value
            self._syncing = True
            try:
                self.model.options = options or [(_NO_MODEL, "")]
                values = [v for _label, v in options]
                if current in values:
                    self.model.value = current
                elif loaded_value in values:
                    self.model.value = loaded_value
                else:
                    self.model.index = 0
            finally:
                self._syncing = False
            where = html.escape(_short(folder.path))
            extra = f" · {incomplete} incomplete download(s) not listed" if incomplete else ""
            self.folder_label.value = f"<span style='{HELP_STYLE}; {WRAP}'>from {where}{extra}</span>"
            self._update_visibility()
            self.lora.refresh_choices()

        guarded(self.messages, run)

    def load(self) -> None:
        """Load the selected model with the panel's options (the Load button).

        The options are checked here (an error shows at once, the loaded model stays); the load itself
        runs on a worker thread. While it runs, Load says "Loading…" and, with Unload and the model
        choice, is disabled; another Load is refused with a note, never dropped without a word."""
        if self._loading is not None:
            self.messages.show_info(f"{self._loading} is still loading: Load is back when it has loaded.")
            return

        def prepare() -> tuple[str, LoadOptions]:
            if self.remote:
                if not self.server_url.value.strip():
                    raise OptionError("no server URL is given", "type the server's URL in the Server URL field, "
                                      "e.g. http://127.0.0.1:8000/v1")
            elif not self.model.value:
                raise OptionError("no model is selected", "download one, or choose one in the Model list")
            invalid = [name for name, f in self.load_fields.items() if f.shown and not f.valid]
            if invalid:
                raise OptionError(
                    f"{', '.join(invalid)} {'holds' if len(invalid) == 1 else 'hold'} a value the option does not take",
                    "correct it as the message under the field says, then click Load",
                )
            model = self.server_url.value.strip() if self.remote else str(self.model.value)
            if self.load_as.value.strip():
                from ..registry import check_name

                check_name(self.load_as.value.strip())
            return model, self.load_options()

        prepared = guarded(self.messages, prepare)
        if prepared is None:
            return
        model, options = prepared
        checked = panel_words(self.messages.warning_text)  # notes on the options (ineffective combinations)
        self.messages.show_note(checked)
        self._set_loading(model if self.remote else Path(model).name)
        self._worker = threading.Thread(target=self._load_in_worker, args=(model, options, checked),
                                        name="nbllm-load", daemon=True)
        self._worker.start()

    def _load_in_worker(self, model: str, options: LoadOptions, checked: str) -> None:
        status: Status | None = None
        error = ""
        try:
            with collected_notes() as notes, self.engine.on_wait(self._waiting_for_reply):
                try:
                    name = self.load_as.value.strip()
                    if name:  # beside the others, under that name (this panel's status stays the unnamed model's)
                        from ..registry import models

                        status = models().load(model, options, name=name)
                    else:
                        status = self.engine.load(model, options)
                except NbllmError as exc:
                    error = exc.message
                except Exception as exc:  # a bug: one line in the panel, the traceback in the log
                    log.exception("loading from the settings panel failed")
                    error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            with self._lock:
                self._loading = None
                self._set_loading(None)
            self.refresh()
            if error:
                self.messages.show_error(error)
            warned, said = [checked, *notes], []
            if status is not None and status.already_loaded:
                said.append(f"{status.model} is already loaded with these options; nothing was done")
            elif status is not None and self.load_as.value.strip():
                said.append(f"{status.model} is loaded as {self.load_as.value.strip()}")
                said.extend(status.placement.notes)
            elif status is not None:
                said.extend(status.placement.notes)
            self.messages.show_note("; ".join(panel_words(n) for n in dict.fromkeys(warned) if n),
                                    info="; ".join(n for n in dict.fromkeys(said) if n))
            refresh_all(except_=self)

    def _waiting_for_reply(self, reply: Result) -> None:
        """The load waits for a reply another thread writes (the chat panel's): say so, and offer to
        stop that reply (called once, on the load's worker, holding the engine's lock: so not this
        panel's, which a refresh holds while it asks the engine)."""
        loading = self._loading
        if loading is None:
            return
        self._waited_on = reply
        self.stop_reply_button.layout.display = None
        self.status.value = self._status_html(
            f"Loading {loading}: waiting for the chat panel's reply to end (the model writes one reply at a time). "
            "Click Stop the reply to stop it now (what it wrote is kept).")

    def stop_reply(self) -> None:
        """Stop the reply the load waits for (the Stop the reply button); what it wrote is kept."""
        reply = self._waited_on
        if reply is not None:
            reply.cancel()

    def unload(self) -> None:
        """Unload the model (the Unload button)."""
        if self._loading is not None:
            self.messages.show_info(f"{self._loading} is still loading: Unload is back when it has loaded.")
            return
        guarded(self.messages, self.engine.unload)
        self.refresh()
        refresh_all(except_=self)

    def save_settings(self) -> Path | None:
        """Save the panel's load options and the generation defaults for the selected model (the Save
        settings button): the model's entry in the models folder's ``config-user.yaml``."""
        def run() -> Path:
            from ..fit import save_settings, settings_name

            if not self.model.value:
                raise OptionError("no model is selected", "choose one in the Model list, then click Save settings")
            name = settings_name(Path(self.model.value))
            path = save_settings(name, self.load_options(), self.generation_options(), models_dir=self.folder.path)
            self.messages.show_info(f"Settings of {name} saved in {path}: loading it by name applies them.")
            return path

        return guarded(self.messages, run)

    def download(self) -> None:
        """Download what the download field names into the models folder, then select it.

        The field takes what ``%llm_download`` takes: a hub id, and its flags if needed
        (``org/model-GGUF --file '*Q8_0*'``). The library's progress bars (tqdm) show in the panel.
        """
        line = self.download_id.value.strip()

        def run() -> None:
            if not line:
                raise OptionError("no hub id given", "type organization/model in the download field")
            options = DownloadOptions.parse(line)
            self.download_output.clear_output()
            self.download_button.disabled = True
            failure: BaseException | None = None
            try:
                with self.download_output:  # (an Output widget swallows exceptions: keep ours)
                    try:
                        result = options.run(models_dir=self.folder.path, echo=None)
                    except BaseException as exc:
                        failure = exc
            finally:
                self.download_button.disabled = False
            if failure is not None:
                raise failure
            self.refresh_models()
            if str(result.path) in self._loaders and not self.loading:
                self.model.value = str(result.path)
            self.messages.show_info(result.summary)

        guarded(self.messages, run)

    def apply_preset(self, name: str) -> None:
        """Set the generation fields (and so the engine's defaults) to a preset of the library."""
        preset = GenerationOptions.preset(name, self.engine.defaults).to_dict()  # every sampler, as in TGW
        self._syncing = True
        try:
            for key, field in self.gen_fields.items():
                if field.value != preset[key]:
                    field.value = preset[key]
        finally:
            self._syncing = False

        def run() -> None:
            self.engine.defaults = self.generation_options()

        guarded(self.preset_messages, run)
        self._show_preset(self.engine.defaults)

    def refresh(self) -> None:
        """Show the engine's state now: status line, and the loaded model's choices when they changed.
        While this panel loads a model, its "Loading…" line stays."""
        with self._lock:
            if self._loading is not None:
                return
            status = self.engine.status()
            self.status.value = self._status_html(status_line(status), details=str(status) if status.loaded else None)
            seen = (status.path, tuple(sorted(status.options.items()))) if status.loaded else None
            if seen != self._seen:
                if self._seen is not None:  # another model, or none: notes about the last one are stale
                    self.messages.clear()
                self._seen = seen
                if status.loaded:
                    self._show_loaded(status)
            self._show_defaults(self.engine.defaults)
            self.lora.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.refresh()  # shown again (e.g. re-run cell): show the engine's state now
        return super()._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        untrack(self)
        super().close()

    # -- internals -----------------------------------------------------------------------------------
    def _set_loading(self, name: str | None) -> None:
        """Show that ``name`` is loading (Load busy; Load, Unload and the model choice disabled), or
        that nothing is (``None``)."""
        self._loading = name
        busy = name is not None
        self.load_button.description = "Loading…" if busy else "Load"
        self.load_button.icon = "hourglass-half" if busy else "play"
        for widget in (self.load_button, self.unload_button, self.model, self.refresh_button):
            widget.disabled = busy
        if not busy:
            self._waited_on = None
            self.stop_reply_button.layout.display = "none"
        if busy:
            self.status.value = self._status_html(
                f"Loading {name}… Load, Unload and the model choice are back when it has loaded.")

    def _show_loaded(self, status: Status) -> None:
        """Select the loaded model and show the options it was loaded with (it may come from
        %llm_load): those its loader understands; the other loaders' choices stay as they were. A
        loader the model was loaded with by name (``--loader``, or its saved settings) is that
        model's choice only: another model selected afterwards has its own (auto unless set)."""
        if self._listed(status.path) is None:
            self.refresh_models()
        listed = self._listed(status.path)
        if listed is not None:
            self._model_loaders[listed] = str(status.options.get("loader", "auto"))
        if status.loader == OPENAI and status.path:
            self.server_url.value = status.path
        self._syncing = True
        try:
            if listed is not None:
                self.model.value = listed  # (its loader choice, and that loader's fields, come with it)
            self.load_fields["loader"].value = status.options.get("loader", "auto")
            self._update_visibility()
            understood = loader_class(status.loader).load_options if status.loader else frozenset()
            for name, f in self.load_fields.items():
                if name != "loader" and name in understood:
                    f.value = status.options.get(name, f.spec.default)
        finally:
            self._syncing = False
        self._update_visibility()

    def _model_selected(self) -> None:
        """Another model selected: its own loader choice (auto unless one was chosen for it)."""
        choice = self._model_loaders.get(self.model.value or "", "auto")
        if self.load_fields["loader"].value != choice:
            syncing, self._syncing = self._syncing, True
            try:
                self.load_fields["loader"].value = choice
            finally:
                self._syncing = syncing
        self._update_visibility()

    def _listed(self, path: str | None) -> str | None:
        """The dropdown value for a model path (the engine resolves links; the folder lists them)."""
        if not path:
            return None
        if path in self._loaders:
            return path
        target = Path(path).resolve()
        return next((value for value in self._loaders if value and Path(value).resolve() == target), None)

    def _show_defaults(self, defaults: GenerationOptions) -> None:
        self._syncing = True
        try:
            for name, f in self.gen_fields.items():
                if f.value != getattr(defaults, name):
                    f.value = getattr(defaults, name)
        finally:
            self._syncing = False
        self._show_preset(defaults)

    def _show_preset(self, defaults: GenerationOptions) -> None:
        # A preset matches when applying it changes nothing: its file's values, and the samplers it
        # leaves neutral (a DRY set on top of balanced is custom, not balanced).
        presets = GenerationOptions.presets()
        matching = [n for n, p in presets.items() if all(getattr(defaults, k) == v for k, v in p.items())
                    and GenerationOptions.preset(n, defaults) == defaults]
        self.preset_label.value = f"<i>{matching[0] if matching else 'custom'}</i>"
        for name, b in self.preset_buttons.items():
            b.button_style = "info" if name in matching[:1] else ""

    def _generation_changed(self, field: OptionField) -> None:
        """A generation field got a valid value: it becomes a default at once; what the whole set
        says about it (an error, a note) shows under that field."""
        if self._syncing:
            return
        def run() -> None:
            self.engine.defaults = self.generation_options()

        _check_set(self.gen_fields, field, run)
        in_use = getattr(self.engine.defaults, field.spec.name)
        if field.value != in_use:  # the set refused it: the field says so and the value in use stays
            field.refuse(field.messages.error_text, in_use)
        self._show_preset(self.engine.defaults)

    def _load_field_changed(self, field: OptionField) -> None:
        """A load option got a valid value: check the set it makes (an error or a note shows under
        that field; Load checks again)."""
        if field.spec.name == "loader":
            if not self._syncing and self.model.value:
                self._model_loaders[str(self.model.value)] = str(field.value)
            self._update_visibility()
        if self._syncing:
            return
        if field.shown:
            _check_set(self.load_fields, field, self.load_options)

    def _update_visibility(self) -> None:
        loader = self.loader
        if loader != self._shown_loader:
            self._switch_choices(loader)
        understood = loader_class(loader).load_options
        for name, f in self.load_fields.items():
            f.show(name == "loader" or name in understood)
        remote = self.remote  # a URL instead of the models folder's list
        self.model_row.layout.display = "none" if remote else None
        self.server_row.layout.display = None if remote else "none"
        for key, box in self.option_groups.items():  # no heading over an empty group
            box.layout.display = None if key == "model" or any(
                f.shown for f in self.load_fields.values() if f.spec.group == key) else "none"
        chosen = self.load_fields["loader"].value
        how = "by the model's format" if chosen == "auto" else "chosen"
        self.effective_loader.value = (
            f"<div style='{HELP_STYLE}; {WRAP}; margin-top: 6px'>Loader used: <b>{html.escape(loader)}</b> ({how}); "
            "only its options are shown.</div>"
        )

    def _switch_choices(self, loader: str) -> None:
        """Keep what was set for the loader shown until now, and bring back what was set for ``loader``;
        a loader shown for the first time starts from its own defaults (options both loaders take,
        such as gpu_split, do not mean the same in both)."""
        previous, self._shown_loader = self._shown_loader, loader
        if previous is not None:
            kept = loader_class(previous).load_options
            self._choices[previous] = {n: f.input.value for n, f in self.load_fields.items() if n in kept}
        understood = loader_class(loader).load_options
        typed = self._choices.get(loader) or {
            n: default_input(f.spec) for n, f in self.load_fields.items() if n in understood
        }
        syncing, self._syncing = self._syncing, True
        try:
            for name, text in typed.items():
                self.load_fields[name].input.value = text
        finally:
            self._syncing = syncing

    def _status_html(self, line: str, details: str | None = None) -> str:
        body = f"<b style='{WRAP}'>{html.escape(line)}</b>"
        if details:
            body += (f"<details><summary style='{HELP_STYLE}; cursor: pointer'>details</summary>"
                     f"<pre class='nbllm-status-details' style='{HELP_STYLE}; white-space: pre-wrap; "
                     f"overflow-wrap: break-word'>{html.escape(details)}</pre></details>")  # its lines kept
        return f"<div style='margin: 4px 0; {WRAP}'>{body}</div>"


def _check_set(fields: dict[str, OptionField], edited: OptionField, check: Callable[[], Any]) -> None:
    """Check the whole set after ``edited`` changed, in the panel's words: an error (an impossible
    combination) shows under the edited field; each note under the field it is about (the first option
    it names), not all under the field changed last. What the last check said elsewhere is cleared
    (a field's own error about what was typed in it stays)."""
    for f in fields.values():
        if f.valid:
            f.messages.clear()
    with collected_notes() as notes:
        try:
            check()
        except NbllmError as exc:
            edited.messages.show_error(panel_words(exc.message))
        except Exception as exc:  # a bug: one line in the panel, the traceback in the log
            log.exception("checking the settings panel's options failed")
            edited.messages.show_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
    for note in dict.fromkeys(notes):
        owner = next((fields[n] for n in named_options(note) if n in fields and fields[n].shown), edited)
        said = owner.messages.warning_text
        owner.messages.show_note("; ".join(t for t in (said, panel_words(note)) if t))



class LoraSection(W.VBox):
    """The settings panel's LoRA adapters: one from the adapters folder (``loras/`` beside the models
    folder) with a scale, Apply (again: change its scale); each applied adapter with its Remove button.
    The buttons call :mod:`nbllm.lora`, the same calls as ``%llm_lora``."""

    def __init__(self, engine: Engine, messages: MessageLine, models_dir: str | Path | None = None) -> None:
        self.engine, self.messages, self._models_dir = engine, messages, models_dir
        # One row that wraps: the adapter list takes the room its names need, the scale the rest, and
        # Apply keeps its whole label (it never shrinks; at a narrow width it goes to the next line).
        self.choice = W.Dropdown(description="Adapter", options=[], style={"description_width": "initial"},
                                 layout=W.Layout(width="auto", flex="2 1 22em", min_width="0"))
        self.choice.add_class("nbllm-lora-choice")
        self.scale = OptionField(LoraOptions.spec("scale"))
        self.scale.layout.width, self.scale.layout.flex = "auto", "1 1 14em"
        self.add_button = button("Apply", "lora-add", icon="plus",
                                 tooltip="Apply the adapter to the loaded model with this scale, without reloading it")
        self.add_button.layout.flex, self.add_button.layout.min_width = "0 0 auto", "max-content"
        self.applied = W.VBox()
        self.applied.add_class("nbllm-lora-applied")
        self._shown: tuple[Any, ...] | None = None
        super().__init__([
            W.HTML(f"<b>LoRA adapters</b> <span style='{HELP_STYLE}'>(applied to the loaded model; several stack, "
                   "each with its scale)</span>"),
            W.HBox([self.choice, self.scale, self.add_button],
                   layout=W.Layout(width="100%", flex_flow="row wrap", align_items="flex-start")),
            self.applied,
        ])
        self.add_class("nbllm-group-lora")
        self.add_button.on_click(lambda _b: self.add())
        self.refresh_choices()
        self.refresh()

    def refresh_choices(self) -> None:
        """List the adapters folder again (the panel's refresh button does)."""
        entries = [e for e in LorasFolder(self._models_dir).list() if e.problem is None]
        current = self.choice.value
        self.choice.options = [(f"{e.name}  ({e.format.upper()}, {format_size(e.size)})", str(e.path)) for e in entries] \
            or [("(no adapter in loras/)", "")]
        values = [value for _label, value in self.choice.options]
        self.choice.value = current if current in values else values[0]

    def add(self) -> None:
        """Apply the chosen adapter with the chosen scale (the Apply button)."""
        def run() -> None:
            if not self.choice.value:
                raise OptionError("no adapter is selected", "download one with %llm_download into loras/, then refresh")
            if not self.scale.valid:  # never apply another scale than the one typed
                raise OptionError("the scale field holds a value the option does not take",
                                  "correct it as the message under the field says, then click Apply")
            lora_add(self.choice.value, self.scale.value, engine=self.engine)

        guarded(self.messages, run)
        self.refresh()

    def remove(self, name: str) -> None:
        """Remove an applied adapter (its Remove button)."""
        guarded(self.messages, lambda: lora_remove(name, engine=self.engine))
        self.refresh()

    def refresh(self) -> None:
        """Show the adapters applied now (they may come from %llm_lora)."""
        applied = self.engine.adapters
        if applied == self._shown:
            return
        self._shown = applied
        rows: list[W.Widget] = []
        for adapter in applied:
            remove = button("Remove", "lora-remove", icon="times", tooltip=f"Remove {adapter.name}")
            remove.on_click(lambda _b, name=adapter.name: self.remove(name))
            rows.append(W.HBox([W.HTML(f"{html.escape(adapter.label)} <span style='{HELP_STYLE}'>"
                                       f"({adapter.format.upper()})</span>"), remove]))
        self.applied.children = rows or [W.HTML(f"<span style='{HELP_STYLE}'>No adapter applied.</span>")]
