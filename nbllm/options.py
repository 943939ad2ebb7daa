"""The two option schemas: how a model is loaded, and how text is generated.

Each field of :class:`LoadOptions` and :class:`GenerationOptions` carries its help text, its choices or
bounds and the panel group it belongs in (each loader declares which load options it understands: see
:mod:`nbllm.loaders`). The magics' flags, ``%llm_load?``,
validation, the settings panel and the run record are all derived from these two classes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import NbllmWarning, OptionError


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    group: str = "advanced",
    minimum: float | None = None,
    maximum: float | None = None,
    minimum_exclusive: bool = False,
    flag: str | None = None,
    metavar: str | None = None,
    panel: bool = True,
    example: str | None = None,
    escapes: bool = False,
) -> Any:
    """A schema field: its default plus everything needed to derive flags, help, panel and checks.

    ``minimum_exclusive``: the value must be above ``minimum``, not equal to it. ``example``: a valid
    value that error messages suggest (default: the default). ``escapes``: text typed in a magic line
    or a panel field goes through :func:`decode_escapes` (``\\n`` is a newline).
    """
    meta = {
        "help": help,
        "choices": choices,
        "group": group,
        "minimum": minimum,
        "maximum": maximum,
        "minimum_exclusive": minimum_exclusive,
        "flag": flag,
        "metavar": metavar,
        "panel": panel,
        "example": example,
        "escapes": escapes,
    }
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the magics, panels and docs see it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    group: str
    minimum: float | None
    maximum: float | None
    minimum_exclusive: bool
    flag: str
    metavar: str | None
    panel: bool
    example: str | None
    escapes: bool


S = TypeVar("S", bound="_Schema")

_TYPES: dict[str, type] = {
    "bool": bool, "bool | None": bool, "int": int, "float": float, "str": str,
    "str | None": str, "float | None": float, "int | None": int,
    "tuple[str, ...]": tuple, "tuple[float, ...]": tuple,
}


class _Schema:
    """What both option classes share: introspection, coercion, validation and argparse flags."""

    GROUPS: ClassVar[dict[str, str]] = {}

    @classmethod
    def specs(cls) -> list[OptionSpec]:
        """Every option, in declaration order."""
        return list(cls._spec_table().values())

    @classmethod
    def _spec_table(cls) -> dict[str, OptionSpec]:
        # Built once per class: every request asks for specs (validation, the samplers set), and building them
        # from the dataclass fields each time cost ~25 ms per request once the schema had 60 generation options.
        table: dict[str, OptionSpec] | None = cls.__dict__.get("_specs_built")
        if table is None:
            table = {s.name: s for s in cls._build_specs()}
            cls._specs_built = table  # type: ignore[attr-defined]
        return table

    @classmethod
    def _build_specs(cls) -> list[OptionSpec]:
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            out.append(
                OptionSpec(
                    name=f.name,
                    type=_TYPES[str(f.type)],
                    default=default,
                    help=m["help"],
                    choices=m["choices"],
                    group=m["group"],
                    minimum=m["minimum"],
                    maximum=m["maximum"],
                    minimum_exclusive=m["minimum_exclusive"],
                    flag=m["flag"] or "--" + f.name.replace("_", "-"),
                    metavar=m["metavar"],
                    panel=m["panel"],
                    example=m["example"],
                    escapes=m["escapes"],
                )
            )
        return out

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        found = cls._spec_table().get(name)
        if found is not None:
            return found
        raise OptionError(f"unknown option {name!r}", f"valid options: {', '.join(cls.names())}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any] | None = None, **more: Any) -> S:
        """Build from user values (strings from a panel or JSON are coerced), then validate."""
        merged = {**(values or {}), **more}
        unknown = sorted(set(merged) - set(cls.names()))
        if unknown:
            raise OptionError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                f"valid options: {', '.join(cls.names())}",
            )
        return cls(**merged)

    def __post_init__(self) -> None:
        """Coerce every value to its option's type (strings from a panel, ints for floats), then validate."""
        for s in self.specs():
            object.__setattr__(self, s.name, _coerce(s, getattr(self, s.name)))
        self.validate()

    def replace(self: S, **changes: Any) -> S:
        """A copy with some options changed (validated)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_valid(self: S, **values: Any) -> S:
        """A copy with some options set to values already validated (a drawn seed, a length capped to
        the context): no second validation, no second round of warnings."""
        changed = copy.copy(self)
        for name, value in values.items():
            object.__setattr__(changed, name, value)
        return changed

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def changed(self) -> dict[str, Any]:
        """Only the options that differ from their defaults."""
        return {s.name: getattr(self, s.name) for s in self.specs() if getattr(self, s.name) != s.default}

    def validate(self) -> None:
        """Check every field's choices and bounds; subclasses add combinations."""
        for s in self.specs():
            value = getattr(self, s.name)
            if value is None:
                continue
            if s.choices is not None and value not in s.choices:
                raise OptionError(
                    f"{s.flag} {value!r} is not valid", f"use one of: {', '.join(map(str, s.choices))}"
                )
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise OptionError(f"{s.flag} must be a finite number, not {value}", "give a number")
                problem = _out_of_bounds(s, value)
                if problem:
                    raise OptionError(f"{s.flag} {value} {problem}", _bounds_fix(s))

    @classmethod
    def argparse_arguments(cls, *, defaults_none: bool = True) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """(flags, kwargs) pairs for ``argparse.add_argument``, one per option.

        With ``defaults_none`` every default is ``None`` (or absent for switches) so that a parser
        tells what the user typed apart from what the schema defaults to.
        """
        args: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        for s in cls.specs():
            help_text = f"{s.help} (default: {_show(s.default)})"
            kwargs: dict[str, Any] = {"dest": s.name, "help": help_text.replace("%", "%%")}
            if s.type is bool:  # a switch; with no default (auto) it has an off form too: --no-flash-attn
                kwargs["action"] = "store_true" if s.default is not None else argparse.BooleanOptionalAction
                kwargs["default"] = None if defaults_none else s.default
            elif s.type is tuple:
                kwargs["action"] = "append"
                kwargs["default"] = None
                kwargs["metavar"] = s.metavar or "TEXT"
                if s.escapes:
                    kwargs["type"] = decode_escapes
            else:
                kwargs["type"] = _parser_type(s)
                kwargs["default"] = None if defaults_none else s.default
                if s.choices:
                    kwargs["choices"] = s.choices
                kwargs["metavar"] = s.metavar or (None if s.choices else s.name.upper())
            args.append(((s.flag,), kwargs))
        return args

    @classmethod
    def typed(cls, ns: argparse.Namespace) -> dict[str, Any]:
        """The options the user typed as flags (parsed with ``argparse_arguments()``)."""
        return {n: getattr(ns, n) for n in cls.names() if getattr(ns, n, None) is not None}

    @classmethod
    def from_namespace(cls: type[S], ns: argparse.Namespace, base: S | None = None) -> S:
        """Options from parsed flags: what the user typed, over ``base`` (or the defaults)."""
        start = base.to_dict() if base is not None else {}
        return cls.from_dict({**start, **cls.typed(ns)})


def _out_of_bounds(s: OptionSpec, value: float) -> str | None:
    """How ``value`` breaks the bounds of ``s`` (``is below 0``), or None when it is within them."""
    if s.minimum is not None and value < s.minimum:
        return f"is below {s.minimum}"
    if s.minimum_exclusive and value == s.minimum:
        return f"is not above {s.minimum}"
    if s.maximum is not None and value > s.maximum:
        return f"is above {s.maximum}"
    return None


def field_value(s: OptionSpec, text: str) -> Any:
    """What the text typed in a panel field means for option ``s``: its value, checked alone as the
    schema checks it (type, bounds), or an :class:`OptionError` in panel words: it names the field, not
    the flag, and shows the text as typed (``cpu_memory -3 is below 0``, not ``-3.0``). An empty
    optional field is ``None``. Combinations are checked where the whole set is built."""
    text = text.strip()
    if not text:
        if s.default is None:
            return None
        raise OptionError(f"the {s.name} field is empty", f"type {_type_words(s)}, for example {_show(s.default)}")
    try:
        value = _coerce(s, text)
    except OptionError:
        raise OptionError(f"the {s.name} field expects {_type_words(s)}, not {text!r}", _field_fix(s)) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"the {s.name} field expects a finite number, not {text!r}", _field_fix(s))
    problem = _out_of_bounds(s, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if problem:
        raise OptionError(f"{s.name} {text} {problem}", _bounds_fix(s))
    if s.choices is not None and value not in s.choices:
        raise OptionError(f"{s.name} {text!r} is not valid", f"use one of: {', '.join(map(str, s.choices))}")
    return value


def _field_fix(s: OptionSpec) -> str:
    """:func:`_value_fix` for a panel field: an example to type, or leaving the field empty."""
    example = s.example if s.example is not None else None if s.default is None else _show(s.default)
    if example is None:
        return f"type {_type_words(s)}, or leave the field empty"
    return f"for example: {example}" + (", or leave the field empty" if s.default is None else "")


def _bounds_fix(s: OptionSpec) -> str:
    low = f"above {s.minimum}" if s.minimum_exclusive else f"at least {s.minimum}"
    if s.minimum is not None and s.maximum is not None:
        if s.minimum_exclusive:
            return f"use a value {low} and at most {s.maximum}"
        return f"use a value from {s.minimum} to {s.maximum}"
    if s.minimum is not None:
        return f"use a value {low}"
    return f"use a value of at most {s.maximum}"


def _value_fix(s: OptionSpec) -> str:
    """What to type instead of a value of the wrong type: a valid example (or leaving the flag out)."""
    example = s.example if s.example is not None else None if s.default is None else _show(s.default)
    if example is None:
        return f"give {_type_words(s)}, or leave {s.flag} out"
    return f"for example: {s.flag} {example}" + (f", or leave {s.flag} out" if s.default is None else "")


_ESCAPE = re.compile(r"""\\(u[0-9a-fA-F]{4}|[ntr\\"'])""")
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_SHOWN = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def decode_escapes(text: str) -> str:
    r"""Text typed in a magic line or a panel field, with its escapes decoded: ``\n`` (newline), ``\t``
    (tab), ``\r``, ``\\`` (one backslash), ``\"``, ``\'`` and ``\uXXXX`` (the character with that hex
    code). Any other backslash stays as written. Python callers pass real strings instead."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if code[0] == "u" else _ESCAPED[code]

    return _ESCAPE.sub(one, text)


def encode_escapes(text: str) -> str:
    r"""The inverse of :func:`decode_escapes` (``decode_escapes(encode_escapes(s)) == s``), for showing
    a stop string in a panel field: backslashes, newlines, tabs and other control characters as escapes."""
    return "".join(
        _SHOWN.get(ch) or (f"\\u{ord(ch):04x}" if unicodedata.category(ch) == "Cc" else ch) for ch in text
    )


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _parser_type(s: OptionSpec) -> Any:
    def convert(text: str) -> Any:
        try:
            return _coerce(s, text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = s.type.__name__
    return convert


def _coerce(s: OptionSpec, value: Any) -> Any:
    """Turn a user value (maybe a string) into the option's type."""
    if value is None:
        return None
    try:
        if s.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if s.default is None and low in ("auto", "none", ""):  # a three-state switch: unset is auto
                    return None
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if s.type is tuple:
            if isinstance(value, str):
                return (value,)
            return tuple(value)
        if s.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if s.type is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise OptionError(f"{s.flag} expects {_type_words(s)}, not {value!r}", _value_fix(s)) from None


def _type_words(s: OptionSpec) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(s.type, "text")


def parse_gpu_split(text: str | None) -> tuple[float, ...]:
    """``"20,7"`` → ``(20.0, 7.0)``: GiB per GPU (Transformers) or proportions (llama.cpp)."""
    if not text:
        return ()
    try:
        parts = tuple(float(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise OptionError(
            f"--gpu-split {text!r} is not a list of numbers", 'write one number per GPU: --gpu-split "20,7"'
        ) from None
    if any(p <= 0 or not math.isfinite(p) for p in parts):
        raise OptionError(f"--gpu-split {text!r} has a value that is not positive", "give every GPU a positive amount")
    return parts


@dataclass(frozen=True)
class LoadOptions(_Schema):
    """How a model is loaded: text-generation-webui's load options, with the same meanings."""

    GROUPS: ClassVar[dict[str, str]] = {
        "model": "Model and loader",
        "quantization": "Quantization",
        "memory": "Memory and offloading",
        "rope": "RoPE (longer context)",
        "advanced": "Advanced",
        "remote": "Model at a server",
        "speculative": "Speculative decoding",
    }

    loader: str = option(
        "auto", "Which loader loads the model. auto: by the model's format (.gguf files go to llama.cpp, "
        "model folders to Transformers, a model at a server to the loader that claims its URL).", group="model",
    )
    revision: str | None = option(
        None, "Hub revision (branch, tag or commit) to download and load; a local folder ignores it.", group="model", metavar="REV", panel=False,
    )
    file: str | None = option(
        None, "Which .gguf file to load when the model folder holds several.", group="model",
        metavar="NAME", panel=False,
    )
    device: str = option(
        "auto", "Where the model runs. auto: the GPU when CUDA is available, else the CPU.",
        choices=("auto", "cpu", "cuda"), group="model",
    )
    dtype: str = option(
        "auto", "Data type of the weights. auto keeps the checkpoint's. float16/bfloat16 halve memory "
        "on a GPU; float32 is the safe choice on a CPU.",
        choices=("auto", "float16", "bfloat16", "float32"), group="model",
    )
    load_in_8bit: bool = option(
        False, "Quantize the weights to 8 bits with bitsandbytes on load: about half the memory of "
        "float16. Useful on small GPUs.", group="quantization",
    )
    load_in_4bit: bool = option(
        False, "Quantize the weights to 4 bits with bitsandbytes on load: about a quarter of the memory "
        "of float16. Turn it on for models that do not fit otherwise.", group="quantization",
    )
    quant_type: str = option(
        "nf4", "4-bit quantization type. nf4 (NormalFloat4) is the best balance of size and quality; "
        "change it only if the model's page asks.", choices=("nf4", "fp4"), group="quantization",
    )
    compute_dtype: str = option(
        "auto", "Data type of the computations of 4-bit layers. float16 is fast on most GPUs, bfloat16 "
        "on Ampere and newer; auto: float16 on a GPU, float32 on a CPU.",
        choices=("auto", "float16", "bfloat16", "float32"), group="quantization",
    )
    double_quant: bool = option(
        False, "Also quantize the 4-bit quantization constants (saves about 0.4 bit per weight).", group="quantization",
    )
    attn: str = option(
        "auto", "Attention implementation. flash_attention_2 is fastest on NVIDIA Ampere or newer GPUs "
        "with flash-attn installed; sdpa is PyTorch's fused attention; eager is the reference. auto "
        "picks flash_attention_2 where it can run and sdpa elsewhere.",
        choices=("auto", "sdpa", "eager", "flash_attention_2"), group="advanced",
    )
    flash_attn: bool | None = option(
        None, "Use FlashAttention: --flash-attn on, --no-flash-attn off, unset: auto (Transformers: on is "
        "--attn flash_attention_2, off keeps --attn auto from picking it; llama.cpp: its flash attention "
        "kernels, which llama.cpp itself turns on where they run). If it errors, turn it off.", group="advanced",
    )
    compile: bool = option(
        False, "Compile one decode step with torch.compile over a static KV cache (CPU: frozen, packed "
        "weights; CUDA: CUDA graphs): each cache size's first generation compiles, later ones decode "
        "faster; greedy text equals eager.", group="advanced",
    )
    trust_remote_code: bool = option(
        False, "Run the Python code that ships with the model (needed by models with custom "
        "architectures). Only for repositories you trust.", group="advanced",
    )
    cpu_memory: float | None = option(
        None, "Most CPU RAM in GiB for layers offloaded from the GPU; layers that do not fit go to disk "
        "if --disk-offload. Unset or 0: no limit (as in text-generation-webui).", group="memory", minimum=0, metavar="GIB",
    )
    gpu_split: str | None = option(
        None, "Memory per GPU, comma separated (Transformers: GiB per GPU, e.g. \"20,7\"; llama.cpp: "
        "proportions, e.g. \"60,40\"). Leave empty if unsure.", group="memory", metavar="LIST",
    )
    disk_offload: bool = option(
        False, "Put the layers that fit neither in the GPUs nor in --cpu-memory on disk (slow, but "
        "loads models larger than memory).", group="memory",
    )
    alpha_value: float = option(
        1.0, "NTK RoPE scaling factor for a longer context than the model was trained on: 1.75 for 1.5x "
        "context, 2.5 for 2x. Keep 1 unless the model asks.", group="rope", minimum=1.0,
    )
    compress_pos_emb: float = option(
        1.0, "Linear RoPE scaling (positional embeddings compression factor): set it to (context you "
        "want) / (model's original context), for models fine-tuned with it.", group="rope", minimum=1.0,
    )
    rope_freq_base: float = option(
        0.0, "RoPE frequency base; 0 takes it from the model (or from --alpha-value).",
        group="rope", minimum=0.0,
    )
    n_gpu_layers: int = option(
        -1, "How many layers to put on the GPU: 0 keeps everything on the CPU, -1 puts all of them. "
        "Lower it when the GPU runs out of memory.", group="memory", minimum=-1,
    )
    n_ctx: int = option(
        0, "Context length in tokens. 0: the model's trained context, capped at 8192 to bound memory. "
        "Lower it if loading runs out of memory.", group="model", minimum=0,
    )
    n_batch: int = option(
        512, "Prompt tokens processed per batch. Larger is faster for long prompts and uses more memory.", group="advanced", minimum=1,
    )
    threads: int = option(
        0, "CPU threads for generation; 0: llama.cpp's default (the physical cores).",
        group="advanced", minimum=0,
    )
    threads_batch: int = option(
        0, "CPU threads for prompt processing; 0: same as llama.cpp's default.",
        group="advanced", minimum=0,
    )
    cache_type: str = option(
        "fp16", "Data type of the KV cache. q8_0 halves its memory, q4_0 quarters it (needs "
        "--flash-attn for the V cache); fp32 doubles it and keeps log-probabilities within 1e-4 of a float32 "
        "Transformers model (fp16 moves them by up to ~0.05).", choices=("fp16", "q8_0", "q4_0", "fp32"), group="memory",
    )
    no_mmap: bool = option(
        False, "Read the whole file into memory instead of mapping it (slower to load).",
        group="memory",
    )
    mlock: bool = option(
        False, "Lock the model in RAM so the system never swaps it out.", group="memory",
    )
    verbose: bool = option(
        False, "Show the loader library's own log (llama.cpp prints a lot).", group="advanced",
    )
    remote_model: str | None = option(
        None, "Which model of the server to use (its id, as the server lists it); unset: the first one "
        "it lists.", group="remote", metavar="ID",
    )
    api_key_env: str = option(
        "OPENAI_API_KEY", "The environment variable that holds the server's API key (the key is never typed "
        "into a cell, shown or recorded); when it is not set, no key is sent.", group="remote", metavar="NAME",
    )
    max_concurrency: int = option(
        8, "Most requests sent to the server at once by nbllm.generate_many and sweeps (a server batches them).",
        group="remote", minimum=1, maximum=1024, metavar="N",
    )
    timeout: float = option(
        60.0, "Seconds to wait for the server to accept a connection or to send the next data of a reply "
        "(keep-alive comments are no answer); raise it for prompts the server takes longer to read.",
        group="remote", minimum=0.1, metavar="SECONDS",
    )
    # Speculative decoding with a draft model (docs/speculative.md): its own block, apart from the others.
    draft_model: str | None = option(
        None, "A small model with the same tokenizer that drafts tokens for the loaded one to check in one step "
        "(speculative decoding: same text, faster decoding when the draft guesses well). A path or a models-folder "
        "name, of the loaded model's format (a GGUF file for llama.cpp, a model folder for Transformers).",
        group="speculative", metavar="PATH",
    )
    draft_max: int = option(
        4, "With --draft-model: most tokens the draft model proposes per step (text-generation-webui's draft_max).",
        group="speculative", minimum=1, maximum=64, metavar="N",
    )

    def validate(self) -> None:
        """Field checks, then impossible combinations (raise) and ineffective ones (warn)."""
        super().validate()
        if self.load_in_8bit and self.load_in_4bit:
            raise OptionError(
                "--load-in-8bit and --load-in-4bit cannot be used together", "choose one of them"
            )
        if self.alpha_value != 1.0 and self.compress_pos_emb != 1.0:
            raise OptionError(
                "--alpha-value and --compress-pos-emb cannot be used together",
                "use --alpha-value for NTK scaling or --compress-pos-emb for linear scaling, not both",
            )
        if self.flash_attn and self.attn not in ("auto", "flash_attention_2"):
            raise OptionError(
                f"--flash-attn contradicts --attn {self.attn}", "drop one of them"
            )
        if self.flash_attn is False and self.attn == "flash_attention_2":
            raise OptionError("--no-flash-attn contradicts --attn flash_attention_2", "drop one of them")
        if self.device == "cpu" and self.gpu_split:
            raise OptionError("--gpu-split needs --device cuda or auto, not cpu", "drop --gpu-split")
        parse_gpu_split(self.gpu_split)
        if self.disk_offload and self.device == "cpu" and not self.cpu_memory:
            raise OptionError(
                "--disk-offload on the CPU needs a limit: set --cpu-memory GIB",
                "add --cpu-memory with the RAM the model may use, e.g. --cpu-memory 8",
            )
        quantized = self.load_in_4bit or self.load_in_8bit
        if not self.load_in_4bit:
            for name in ("quant_type", "double_quant", "compute_dtype"):
                if getattr(self, name) != self.spec(name).default:
                    warnings.warn(
                        f"{self.spec(name).flag} only affects --load-in-4bit; it is ignored here",
                        NbllmWarning,
                        stacklevel=3,
                    )
        if quantized and self.dtype not in ("auto",) and self.load_in_4bit:
            warnings.warn(
                "with --load-in-4bit, --dtype sets only the layers left unquantized (embeddings, norms, the "
                "output layer); --compute-dtype sets the type the 4-bit layers compute in",
                NbllmWarning,
                stacklevel=3,
            )

    @property
    def cpu_memory_limit(self) -> float | None:
        """The CPU RAM limit in GiB, or None for no limit (0 means no limit, as in text-generation-webui)."""
        return self.cpu_memory or None

    @property
    def gpu_split_values(self) -> tuple[float, ...]:
        return parse_gpu_split(self.gpu_split)

    @property
    def attn_requested(self) -> str:
        """The attention implementation asked for, with --flash-attn folded in (--no-flash-attn: auto is sdpa)."""
        if self.flash_attn:
            return "flash_attention_2"
        return "sdpa" if self.flash_attn is False and self.attn == "auto" else self.attn


SAMPLER_ORDER: tuple[str, ...] = (
    "repetition_penalty", "presence_penalty", "frequency_penalty", "dry", "top_n_sigma", "temperature",
    "dynamic_temperature", "quadratic_sampling", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "top_a", "min_p", "mirostat", "xtc", "no_repeat_ngram",
)
"""text-generation-webui's default sampler order (its ``sampler_priority``, less tfs and the encoder
repetition penalty, which nbllm does not have): what ``--sampler-priority`` names and reorders."""


@dataclass(frozen=True)
class GenerationOptions(_Schema):
    """How text is sampled. The defaults are nbllm's, documented in the README."""

    GROUPS: ClassVar[dict[str, str]] = {"sampling": "Sampling", "length": "Length and stopping",
                                        "samplers": "Samplers (text-generation-webui's)",
                                        "structured": "Structured output", "speculative": "Speculative decoding"}

    max_new_tokens: int = option(
        512, "Most tokens to generate.", group="length", minimum=1, flag="--max-new-tokens", metavar="N"
    )
    temperature: float = option(
        0.7, "Randomness. 0 is greedy (always the most likely token, fully deterministic); higher is more "
        "varied.", group="sampling", minimum=0.0, maximum=5.0,
    )
    top_p: float = option(
        0.9, "Nucleus sampling: keep the smallest set of tokens whose probabilities add up to top_p "
        "(1 disables).", group="sampling", minimum=0.0, maximum=1.0,
    )
    top_k: int = option(
        0, "Keep only the k most likely tokens (0 disables).", group="sampling", minimum=0
    )
    min_p: float = option(
        0.0, "Drop tokens less likely than min_p times the most likely one (0 disables).",
        group="sampling", minimum=0.0, maximum=1.0,
    )
    typical_p: float = option(
        1.0, "Locally typical sampling: keep the most typical tokens up to this probability mass (above 0; "
        "1 disables).", group="sampling", minimum=0.0, minimum_exclusive=True, maximum=1.0,
    )
    repetition_penalty: float = option(
        1.0, "Penalty for tokens already present (1 disables; 1.1–1.2 curbs loops).", group="sampling",
        minimum=0.05, maximum=10.0,
    )
    stop: tuple[str, ...] = option(
        (), "Stop when this text appears (it is not shown). Repeat the flag for several. Typed text decodes "
        "escapes: \\n is a newline, \\t a tab (quote them in a magic line: --stop '\\n').", group="length",
        metavar="TEXT", escapes=True,
    )
    logprobs: int | None = option(
        None, "Keep each new token's log-probability and its K most likely alternatives (0: the token's own only; "
        "at most 20): in the result (.tokens), the record and the run log; the cell shows the tokens coloured by "
        "probability.", group="sampling", minimum=0, maximum=20, metavar="K", panel=False, example="5",
    )
    logprobs_after_samplers: bool = option(
        False, "With --logprobs: the probabilities after the samplers (temperature, top-k, top-p, min-p, typical-p), "
        "as the token was drawn, instead of the model's own (text-generation-webui's Logits tab offers both).",
        group="sampling", panel=False,
    )

    # ---- samplers from text-generation-webui (issue 25; nbllm/loaders/_samplers.py; docs/samplers.md) ----
    # Each default is text-generation-webui's neutral ("off") value, so a request that sets none of them is
    # the request it was before they existed (identities and records carry only changed values).
    frequency_penalty: float = option(
        0.0, "Penalty that grows with how many times a token already appeared: subtracted from its logit once per "
        "occurrence (0 disables).", group="samplers", minimum=-2.0, maximum=2.0,
    )
    presence_penalty: float = option(
        0.0, "Flat penalty subtracted from the logit of every token that already appeared (0 disables).",
        group="samplers", minimum=-2.0, maximum=2.0,
    )
    repetition_penalty_range: int = option(
        0, "How many of the last tokens the repetition, presence and frequency penalties look at (0: all of them).",
        group="samplers", minimum=0, metavar="N",
    )
    no_repeat_ngram_size: int = option(
        0, "Never repeat a sequence of this many tokens (0 disables; small values such as 2 cripple the text).",
        group="samplers", minimum=0, metavar="N",
    )
    dry_multiplier: float = option(
        0.0, "DRY: penalize a token that would extend a sequence already in the text; strength (0 disables, 0.8 "
        "is typical).", group="samplers", minimum=0.0,
    )
    dry_base: float = option(
        1.75, "DRY: how fast the penalty grows with the length of the repeated sequence.", group="samplers",
        minimum=1.0, maximum=10.0,
    )
    dry_allowed_length: int = option(
        2, "DRY: the longest sequence repeated without penalty.", group="samplers", minimum=1, metavar="N",
    )
    dry_sequence_breakers: str = option(
        '"\\n", ":", "\\"", "*"', "DRY: strings that end a repeated sequence, as quoted strings separated by commas "
        "(text-generation-webui's format).", group="samplers", metavar="TEXT",
    )
    xtc_threshold: float = option(
        0.1, "XTC: tokens at least this likely count as top choices; all but the least likely of them are removed.",
        group="samplers", minimum=0.0, maximum=0.5,
    )
    xtc_probability: float = option(
        0.0, "XTC: the chance that the top choices are removed at a step (0 disables).", group="samplers",
        minimum=0.0, maximum=1.0,
    )
    mirostat_mode: int = option(
        0, "Mirostat: 1 or 2 replaces the other truncation samplers and keeps the text's surprise near "
        "mirostat_tau (0 disables; llama.cpp's two versions).", group="samplers", choices=(0, 1, 2),
    )
    mirostat_tau: float = option(5.0, "Mirostat: the target surprise (entropy); lower is more focused.",
                                 group="samplers", minimum=0.0)
    mirostat_eta: float = option(0.1, "Mirostat: the learning rate.", group="samplers", minimum=0.0, maximum=1.0)
    top_n_sigma: float = option(
        0.0, "Keep only tokens whose logit is within n standard deviations of the top one (0 disables).",
        group="samplers", minimum=0.0,
    )
    dynamic_temperature: bool = option(
        False, "Dynamic temperature: the temperature of each step is between dynatemp_low and dynatemp_high, "
        "higher when the model is unsure (replaces --temperature).", group="samplers",
    )
    dynatemp_low: float = option(1.0, "Dynamic temperature: the lowest temperature.", group="samplers",
                                 minimum=0.0, maximum=5.0)
    dynatemp_high: float = option(1.0, "Dynamic temperature: the highest temperature.", group="samplers",
                                  minimum=0.0, maximum=5.0)
    dynatemp_exponent: float = option(1.0, "Dynamic temperature: the exponent of the curve between low and high.",
                                      group="samplers", minimum=0.0)
    smoothing_factor: float = option(
        0.0, "Quadratic sampling: makes the distribution smoother around the top tokens (0 disables).",
        group="samplers", minimum=0.0,
    )
    smoothing_curve: float = option(
        1.0, "Quadratic sampling: the curve (1 is plain quadratic, higher curbs the unlikely tokens more).",
        group="samplers", minimum=1.0,
    )
    epsilon_cutoff: float = option(
        0.0, "Drop tokens less likely than this, in units of 1e-4 (0 disables; 3 is typical).", group="samplers",
        minimum=0.0, maximum=9.0,
    )
    eta_cutoff: float = option(
        0.0, "Eta sampling: an entropy-dependent epsilon, in units of 1e-4 (0 disables; 3 is typical).",
        group="samplers", minimum=0.0, maximum=20.0,
    )
    top_a: float = option(
        0.0, "Drop tokens less likely than top_a times the square of the top probability (0 disables).",
        group="samplers", minimum=0.0, maximum=1.0,
    )
    custom_token_bans: str = option(
        "", "Token ids that are never generated, separated by commas (text-generation-webui's format).",
        group="samplers", metavar="IDS",
    )
    logit_bias: tuple[str, ...] = option(
        (), "Add a bias to one token's logit: TOKEN_ID:BIAS (repeat the flag for several; -100 bans it).",
        group="samplers", metavar="ID:BIAS",
    )
    ban_eos_token: bool = option(
        False, "Never end the text with the end-of-sequence token (it goes on to --max-new-tokens).",
        group="samplers",
    )
    guidance_scale: float = option(
        1.0, "CFG (classifier-free guidance): how strongly the text is pushed away from --negative-prompt "
        "(1 disables; 1.5 is typical).", group="samplers", minimum=0.0,
    )
    negative_prompt: str = option(
        "", "CFG: the prompt the text is pushed away from (empty: none, which guides against no context).",
        group="samplers", metavar="TEXT", escapes=True,
    )
    sampler_priority: tuple[str, ...] = option(
        (), "The order the samplers run in, by name (repeat the flag; empty: text-generation-webui's order). "
        "Names: " + ", ".join(SAMPLER_ORDER) + ".", group="samplers", metavar="NAME",
    )
    temperature_last: bool = option(
        False, "Apply temperature (and dynamic temperature) after the other samplers instead of in its place in "
        "the order.", group="samplers",
    )
    # ---- end of text-generation-webui's samplers ----
    # Speculative decoding (docs/speculative.md): its own block, apart from the samplers.
    prompt_lookup: int = option(
        0, "Prompt lookup decoding: draft up to N tokens per step by finding the last words again in the prompt and "
        "the reply, and check them in one step (same text; faster when the reply repeats its input: rewrites, "
        "edits of code, extraction). 0 disables; 10 suits most rewrites.", group="speculative", minimum=0,
        maximum=64, metavar="N", example="10",
    )

    seed: int | None = option(
        None, "Random seed. Unset: one is drawn and recorded with the output, so it can be reproduced.",
        group="sampling", minimum=0, maximum=2**32 - 1, example="1234",
    )
    # Structured output (nbllm/constraints.py; docs/structured.md): at most one of these per request.
    json_schema: str | None = option(
        None, "The output is JSON that follows this JSON Schema: JSON text or a .json file (Python: also a dict "
        "or a pydantic model class); r.parsed reads it.", group="structured", metavar="SCHEMA", panel=False,
    )
    schema: str | None = option(
        None, "simonw/llm's short schema syntax for a JSON object: 'name, age int, bio: one sentence' (types: "
        "str, int, float, bool; every field required).", group="structured", metavar="FIELDS",
    )
    schema_multi: bool = option(
        False, "With --schema or --json-schema: many items per answer, as {\"items\": [...]}.", group="structured",
        panel=False,
    )
    json: bool = option(False, "The output is a JSON object (any keys).", group="structured", panel=False)
    regex: str | None = option(
        None, "The whole output matches this regular expression.", group="structured", metavar="REGEX", panel=False,
    )
    choice: tuple[str, ...] = option(
        (), "The output is exactly one of these strings; repeat the flag for each.", group="structured",
        metavar="TEXT",
    )
    grammar: str | None = option(
        None, "The output follows this GBNF grammar (llama.cpp's format: root ::= ...), as text or a .gbnf file.",
        group="structured", metavar="GBNF", panel=False,
    )

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """Every preset by name: the option values its file sets (text-generation-webui's YAML format:
        nbllm's own, then the user's from ``presets/`` beside the models folder; :mod:`nbllm.presets`).
        deterministic is greedy decoding; balanced is nbllm's default; creative samples more widely and
        curbs repetition."""
        return all_presets()

    @classmethod
    def preset(cls, name: str, base: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """``base`` (or the defaults) with preset ``name`` applied, then ``overrides`` on top (validated).

        ``%%llm --preset creative --temperature 0.8`` is ``preset("creative", engine.defaults,
        temperature=0.8)``: what the user typed wins over the preset, the preset over the defaults. As in
        text-generation-webui, the samplers the preset's file does not name go to their neutral values
        (temperature 1, top_p 1, the others off); max_new_tokens, stop, the seed and constraints stay.
        """
        return apply_preset(name, base, **overrides)

    def __post_init__(self) -> None:
        if self.json_schema is not None or self.grammar is not None:  # a dict, a model class, a file → text
            from .constraints import grammar_text, schema_text

            if self.json_schema is not None:
                object.__setattr__(self, "json_schema", schema_text(self.json_schema))
            if self.grammar is not None:
                object.__setattr__(self, "grammar", grammar_text(self.grammar))
        super().__post_init__()

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with some options changed (validated). A constraint among the changes replaces the
        one these options had (a cell's --json over a panel's default schema), rather than joining it."""
        from .constraints import without_other_constraints

        return type(self).from_dict(without_other_constraints(self.to_dict(), changes))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, base: GenerationOptions | None = None) -> GenerationOptions:
        """Options from parsed flags over ``base``; a constraint flag replaces ``base``'s constraint."""
        from .constraints import without_other_constraints

        start = base.to_dict() if base is not None else {}
        return cls.from_dict(without_other_constraints(start, cls.typed(ns)))

    def validate(self) -> None:
        super().validate()
        if self.json_schema or self.schema or self.schema_multi or self.json or self.regex or self.choice or self.grammar:
            from .constraints import check_options

            check_options(self)
        if self.prompt_lookup:
            from .speculative import check_options as check_speculation

            check_speculation(self)
        if any(s == "" for s in self.stop):
            raise OptionError("--stop '' is empty", "give the text to stop at")
        if self.greedy:
            ignored = [n for n in ("top_p", "top_k", "min_p", "typical_p") if getattr(self, n) != self.spec(n).default]
            if ignored:
                warnings.warn(
                    f"temperature 0 is greedy decoding; {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} "
                    "no effect",
                    NbllmWarning,
                    stacklevel=3,
                )

        check_samplers(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    # -- text-generation-webui's samplers, read (validated by check_samplers) --
    @property
    def sequence_breakers(self) -> list[str]:
        """``dry_sequence_breakers`` as a list of strings."""
        return parse_sequence_breakers(self.dry_sequence_breakers)

    @property
    def token_bans(self) -> list[int]:
        """``custom_token_bans`` as token ids."""
        return parse_token_bans(self.custom_token_bans)

    @property
    def logit_biases(self) -> dict[int, float]:
        """``logit_bias`` as token id → bias."""
        return parse_logit_bias(self.logit_bias)

    @property
    def sampler_order(self) -> list[str]:
        """The samplers' order: ``sampler_priority`` (its missing names after it, in the default order),
        with temperature and dynamic temperature moved to the end under ``temperature_last``."""
        given = list(self.sampler_priority)
        order = given + [n for n in SAMPLER_ORDER if n not in given]
        if self.temperature_last:
            order = [n for n in order if n not in ("temperature", "dynamic_temperature")]
            order += ["temperature", "dynamic_temperature"]
        return order

    def active_samplers(self) -> list[str]:
        """The text-generation-webui sampler options that change this request (the switch of each sampler:
        ``dry_multiplier``, not ``dry_base``, which does nothing while DRY is off)."""
        return [n for n in SAMPLER_SWITCHES if getattr(self, n) != self.spec(n).default]

    def samplers_set(self) -> list[str]:
        """The text-generation-webui sampler options set away from their off values (their names)."""
        return [n for n in SAMPLER_OPTIONS if getattr(self, n) != self.spec(n).default]


SAMPLER_OPTIONS: tuple[str, ...] = (
    "frequency_penalty", "presence_penalty", "repetition_penalty_range", "no_repeat_ngram_size", "dry_multiplier",
    "dry_base", "dry_allowed_length", "dry_sequence_breakers", "xtc_threshold", "xtc_probability", "mirostat_mode",
    "mirostat_tau", "mirostat_eta", "top_n_sigma", "dynamic_temperature", "dynatemp_low", "dynatemp_high",
    "dynatemp_exponent", "smoothing_factor", "smoothing_curve", "epsilon_cutoff", "eta_cutoff", "top_a",
    "custom_token_bans", "logit_bias", "ban_eos_token", "guidance_scale", "negative_prompt", "sampler_priority",
    "temperature_last",
)
"""The options text-generation-webui's samplers added (issue 25), in schema order."""


SAMPLER_SWITCHES: tuple[str, ...] = (
    "frequency_penalty", "presence_penalty", "repetition_penalty_range", "no_repeat_ngram_size", "dry_multiplier",
    "xtc_probability", "mirostat_mode", "top_n_sigma", "dynamic_temperature", "smoothing_factor", "epsilon_cutoff",
    "eta_cutoff", "top_a", "custom_token_bans", "logit_bias", "ban_eos_token", "guidance_scale", "sampler_priority",
    "temperature_last",
)
"""The option that turns each of those samplers on (the others only tune one that is on)."""


def parse_sequence_breakers(text: str) -> list[str]:
    """text-generation-webui's ``dry_sequence_breakers``: quoted strings separated by commas
    (``"\\n", ":"``), read as the items of a JSON list; an empty text is no breakers."""
    import json

    if not text.strip():
        return []
    try:
        items = json.loads(f"[{text}]")
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise OptionError(f"--dry-sequence-breakers {text!r} is not a list of quoted strings",
                          'write them as text-generation-webui does: --dry-sequence-breakers \'"\\n", ":", "*"\'')
    return items


def parse_token_bans(text: str) -> list[int]:
    """``custom_token_bans``: token ids separated by commas."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise OptionError(f"--custom-token-bans {text!r} is not a list of token ids",
                          "give token ids separated by commas: --custom-token-bans 13,198")
    return [int(p) for p in parts]


def parse_logit_bias(entries: Iterable[str]) -> dict[int, float]:
    """``logit_bias`` entries ``TOKEN_ID:BIAS`` → ``{id: bias}`` (a later entry for a token wins)."""
    out: dict[int, float] = {}
    for entry in entries:
        token, sep, bias = str(entry).partition(":")
        try:
            if not sep or not token.strip().isdigit():
                raise ValueError(entry)
            value = float(bias)
            if not math.isfinite(value):
                raise ValueError(entry)
        except ValueError:
            raise OptionError(f"--logit-bias {entry!r} is not TOKEN_ID:BIAS",
                              "give a token id and a number: --logit-bias 13:-5") from None
        out[int(token)] = value
    return out


def check_samplers(opts: GenerationOptions) -> None:
    """The text-generation-webui sampler options checked together (each alone is checked by its field)."""
    opts.sequence_breakers, opts.token_bans, opts.logit_biases  # noqa: B018 - parsing is the check
    unknown = [n for n in opts.sampler_priority if n not in SAMPLER_ORDER]
    if unknown:
        raise OptionError(f"--sampler-priority {unknown[0]!r} is not a sampler nbllm knows",
                          f"use names from: {', '.join(SAMPLER_ORDER)}")
    if opts.dynatemp_low > opts.dynatemp_high:
        raise OptionError(f"--dynatemp-low {opts.dynatemp_low:g} is above --dynatemp-high {opts.dynatemp_high:g}",
                          "give a low temperature at most the high one")
    if opts.negative_prompt and opts.guidance_scale == 1.0:
        warnings.warn("--negative-prompt has no effect with --guidance-scale 1; set a guidance scale such as 1.5",
                      NbllmWarning, stacklevel=4)
    if opts.greedy:
        ignored = [n for n in ("xtc_probability", "mirostat_mode", "top_n_sigma", "dynamic_temperature",
                               "smoothing_factor", "epsilon_cutoff", "eta_cutoff", "top_a")
                   if getattr(opts, n) != opts.spec(n).default]
        if ignored:
            warnings.warn(f"temperature 0 is greedy decoding; {', '.join(ignored)} "
                          f"{'has' if len(ignored) == 1 else 'have'} no effect", NbllmWarning, stacklevel=4)


def markdown_table(schema: type[_Schema], loaders: Callable[[str], Iterable[str]] | None = None) -> str:
    """The options of ``schema`` as a markdown table (the README's tables are generated by this);
    ``loaders(name)`` fills a column with the loaders that understand each option."""
    head = "| flag | default | loaders | what it does and when to use it |" if loaders else \
        "| flag | default | what it does and when to use it |"
    rows = [head, "|---|---|---|---|" if loaders else "|---|---|---|"]
    for s in schema.specs():
        default = _show(s.default) if s.type is not bool else "off" if s.default is not None else "auto"
        choices = f" One of: {', '.join(map(str, s.choices))}." if s.choices else ""
        column = f" {', '.join(loaders(s.name)) or 'all'} |" if loaders else ""
        rows.append(f"| `{s.flag}` | {default} |{column} {s.help}{choices} |")
    return "\n".join(rows)


# ---- presets in text-generation-webui's format (nbllm.presets re-exports these; docs/samplers.md) ----
# nbllm's own (deterministic, balanced, creative) ship as YAML files (nbllm/data/presets); a user's are read
# from presets/ beside the models folder, as text-generation-webui keeps user_data/presets beside
# user_data/models. As in text-generation-webui, a preset sets every sampler: those its file names, the
# others neutral (temperature 1, top_p 1, every other sampler off); never max_new_tokens, stop, the seed,
# logprobs or a constraint.

BUILTIN_PRESETS = ("deterministic", "balanced", "creative")
"""nbllm's own presets, in the order they are shown."""

PRESETS_BUILTIN_DIR = Path(__file__).parent / "data" / "presets"
"""Where nbllm's own preset files are."""

NOT_PRESET = frozenset({"seed", "logprobs", "logprobs_after_samplers"})
"""Options of the sampling groups that a preset never sets."""

TGW_ONLY = frozenset({
    "tfs", "encoder_repetition_penalty", "penalty_alpha", "grammar_string", "auto_max_new_tokens", "max_tokens_second",
    "add_bos_token", "skip_special_tokens", "truncation_length", "static_cache", "num_beams", "length_penalty",
    "early_stopping", "min_length", "prompt_lookup_num_tokens", "show_after", "max_updates_second",
})
"""text-generation-webui preset keys nbllm has no option for: left out with a warning (when not neutral)."""

TGW_NEUTRAL: dict[str, Any] = {"tfs": 1, "encoder_repetition_penalty": 1, "penalty_alpha": 0, "grammar_string": "",
                               "num_beams": 1, "length_penalty": 1, "early_stopping": False, "min_length": 0}


def presets_dir(models: str | Path | None = None) -> Path:
    """The user's presets folder: ``presets`` beside the models folder ``models`` (default: the one in effect)."""
    from .models import models_dir

    return (Path(models).expanduser() if models is not None else models_dir()).parent / "presets"


def neutral() -> dict[str, Any]:
    """What a preset starts from: every sampling option off (text-generation-webui's neutral values)."""
    out = {s.name: s.default for s in GenerationOptions.specs()
           if s.group in ("sampling", "samplers") and s.name not in NOT_PRESET}
    out.update(temperature=1.0, top_p=1.0)
    return out


def _with_neutral(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the neutral ones; greedy (temperature 0) leaves the samplers it ignores at nbllm's
    defaults, where they do not warn."""
    start = neutral()
    if values.get("temperature") == 0.0:
        start.update({n: GenerationOptions.spec(n).default for n in ("top_p", "top_k", "min_p", "typical_p")})
    return {**start, **values}


def read_preset(path: str | Path) -> dict[str, Any]:
    """The option values of one preset file (text-generation-webui's YAML). Keys text-generation-webui has
    and nbllm lacks are left out with one warning; any other key, or a value the schema refuses, is an
    :class:`OptionError` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise OptionError(f"preset {path.name} cannot be read ({str(exc).splitlines()[0]})",
                          "fix the file: one 'option: value' per line") from None
    if not isinstance(data, dict):
        raise OptionError(f"preset {path.name} is not a list of 'option: value' lines", "fix the file")
    known = set(GenerationOptions.names()) - NOT_PRESET
    values: dict[str, Any] = {}
    lacking = []
    for key, value in data.items():
        key = str(key)
        if key in TGW_ONLY:
            if TGW_NEUTRAL.get(key, object()) != value:
                lacking.append(key)
        elif key == "do_sample":  # text-generation-webui's greedy switch
            if value is False:
                values["temperature"] = 0.0
        elif key == "sampler_priority":
            names = value.split() if isinstance(value, str) else [str(v) for v in value or ()]
            values[key] = tuple(n for n in names if n in SAMPLER_ORDER)  # tfs, encoder_repetition_penalty: absent
        elif key in known:
            values[key] = value
        else:
            raise OptionError(f"preset {path.name} has an unknown option {key!r}",
                              f"remove it, or use an option of --preset files: {', '.join(sorted(known))}")
    if lacking:
        warnings.warn(f"preset {path.stem}: nbllm has no {', '.join(lacking)}; left out", NbllmWarning, stacklevel=3)
    try:
        GenerationOptions.from_dict(_with_neutral(values))
    except OptionError as exc:
        raise OptionError(f"preset {path.name}: {exc.cause}", exc.fix) from None
    return values


def preset_files(models: str | Path | None = None) -> dict[str, Path]:
    """Every preset's file by name: nbllm's, then the user's (which replace nbllm's of the same name)."""
    files = {name: PRESETS_BUILTIN_DIR / f"{name}.yaml" for name in BUILTIN_PRESETS}
    folder = presets_dir(models)
    if folder.is_dir():
        for path in sorted(folder.glob("*.yaml")):
            files[path.stem] = path
    return files


def all_presets(models: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every preset by name: the option values its file sets. A user's file that cannot be used is left
    out with a warning saying why (``--preset`` with its name says it again, as an error)."""
    out = {}
    for name, path in preset_files(models).items():
        try:
            out[name] = read_preset(path)
        except OptionError as exc:
            warnings.warn(f"{exc.message} (left out of the presets)", NbllmWarning, stacklevel=2)
    return out


def apply_preset(name: str, base: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
    """``base`` (or the defaults) with preset ``name`` applied (every sampler: its file's values, the
    others neutral), then ``overrides`` on top (validated)."""
    files = preset_files()
    if name not in files:
        raise OptionError(f"unknown preset {name!r}", f"use one of: {', '.join(files)}")
    start = base.to_dict() if base is not None else {}
    return GenerationOptions.from_dict({**start, **_with_neutral(read_preset(files[name])), **overrides})


def save_preset(name: str, options: GenerationOptions, models: str | Path | None = None) -> Path:
    """Write ``options``' samplers as preset ``name`` in the user's presets folder, in text-generation-webui's
    format (the values away from neutral, as its "Save preset" writes them); returns the file."""
    import yaml

    start = neutral()
    values: dict[str, Any] = {}
    for key, off in start.items():
        value = getattr(options, key)
        if value != off:
            values[key] = list(value) if isinstance(value, tuple) else value
    folder = presets_dir(models)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
