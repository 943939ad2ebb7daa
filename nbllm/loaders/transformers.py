"""The Transformers loader: Hugging Face models, with bitsandbytes, flash-attention, torch.compile,
offloading and RoPE scaling as text-generation-webui offers them.

torch, transformers, accelerate and bitsandbytes are imported inside the methods, never at import
time, so ``%load_ext nbllm`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..adapters import Adapter, check_peft_adapter, module_key, peft_targets
from ..errors import GenerationError, LoadError, NbllmError, NbllmWarning, OptionError, missing_dependency
from ..memory import model_memory
from ..options import GenerationOptions, LoadOptions
from ..safetensors_file import check_safetensors
from ..source import ModelSource
from ..streaming import threaded_tokens
from ._logprobs import transformers_recorder, transformers_scores
from ._quiet import quiet_library_noise
from ._samplers import TRANSFORMERS_SAMPLERS, transformers_processors
from .base import Placement, Request, TokenLoader
from .transformers_gguf import check_gguf, dequantized, gguf_arguments

_DTYPES = {"float16", "bfloat16", "float32"}


def cuda_devices() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of each visible CUDA GPU; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    ]


def free_memory(gpus: int) -> dict[int | str, int]:
    """Bytes free on each of the first ``gpus`` CUDA GPUs and in RAM ("cpu"): accelerate's own figures
    for a device it is given no limit for."""
    import psutil
    import torch

    free: dict[int | str, int] = {i: int(torch.cuda.mem_get_info(i)[0]) for i in range(gpus)}
    free["cpu"] = int(psutil.virtual_memory().available)
    return free


def pick_attention(
    requested: str,
    gpus: list[tuple[str, tuple[int, int]]],
    *,
    dtype: str = "float16",
    supported: bool | None = True,
    compile: bool = False,
) -> tuple[str, str | None]:
    """The attention implementation to use, and a note for the user when ``auto`` chose it.

    flash_attention_2 needs an NVIDIA GPU of the Ampere generation or newer (compute capability 8.0),
    the flash-attn package, a model class that implements it (``supported``; ``None``: unknown, as for
    remote code) and a float16 or bfloat16 model (``dtype``: flash-attn fails at the first generate
    otherwise, and transformers only warns); it cannot serve ``--compile``'s decode step, which runs over
    a static cache without an attention mask (transformers' flash path then attends to the cache's empty
    slots). Asked for explicitly, what is missing is an error naming it; ``auto`` then picks sdpa.
    """
    if requested not in ("auto", "flash_attention_2"):
        return requested, None
    if not gpus:
        why: tuple[str, str] = (
            "FlashAttention 2 needs an NVIDIA GPU and none is available (CUDA not found)",
            "use --attn sdpa (the default without a GPU), or run on a machine with an NVIDIA GPU",
        )
    elif min(cap for _, cap in gpus) < (8, 0):
        name, cap = min(gpus, key=lambda g: g[1])
        why = (
            f"FlashAttention 2 needs an Ampere or newer GPU (compute capability 8.0); {name} is {cap[0]}.{cap[1]}",
            "use --attn sdpa",
        )
    elif importlib.util.find_spec("flash_attn") is None:
        why = (
            "FlashAttention 2 needs the flash-attn package, which is not installed",
            "install it with: pip install flash-attn --no-build-isolation (or use --attn sdpa)",
        )
    elif supported is False:
        why = ("FlashAttention 2 is not implemented for this model's architecture in transformers", "use --attn sdpa")
    elif dtype not in ("float16", "bfloat16"):
        why = (f"FlashAttention 2 runs only in float16 or bfloat16, and this model would run in {dtype}",
               "add --dtype bfloat16 (or float16), or use --attn sdpa")
    elif compile:
        why = ("--compile's decode step runs over a static KV cache without an attention mask, and FlashAttention 2 "
               "needs one to leave the cache's empty slots out", "drop --compile, or use --attn sdpa with it")
    elif supported is None and requested == "auto":
        why = ("whether this model's code implements FlashAttention 2 is unknown", "ask for it with --attn flash_attention_2")
    else:
        return "flash_attention_2", ("attention: auto picked flash_attention_2" if requested == "auto" else None)
    if requested == "flash_attention_2":
        raise OptionError(*why)
    return "sdpa", f"attention: auto picked sdpa ({why[0]})"


def attention_for(options: LoadOptions, config: dict[str, Any], gpus: list[tuple[str, tuple[int, int]]]) -> tuple[str, str | None]:
    """:func:`pick_attention` for these options and this model (its dtype and class, read from config.json)."""
    from . import _gpu

    supported: bool | None = True
    if gpus and options.attn_requested in ("auto", "flash_attention_2"):  # imports the model's class: on a GPU only
        remote = options.trust_remote_code and bool(config.get("auto_map"))
        supported = None if remote else _gpu.attention_support(config)[0]
    return pick_attention(options.attn_requested, gpus, dtype=_gpu.run_dtype(options, config, bool(gpus)),
                          supported=supported, compile=options.compile)


def machine_notes(options: LoadOptions, gpus: list[tuple[str, tuple[int, int]]]) -> list[str]:
    """One line for each option that has no effect on this machine, or another effect than on a GPU."""
    notes: list[str] = []
    if gpus:
        return notes
    if options.gpu_split:
        notes.append("--gpu-split has no effect here: no CUDA GPU is available (the model runs on the CPU)")
    if options.cpu_memory_limit is not None:
        notes.append(f"without a GPU, --cpu-memory {options.cpu_memory:g} limits the RAM of the whole model: layers "
                     "beyond it go to disk with --disk-offload, or the load fails")
    elif options.disk_offload:
        notes.append("--disk-offload has no effect here without --cpu-memory: with no GPU, every layer fits in RAM "
                     "or the load fails")
    return notes


def _config_json(source: ModelSource) -> dict[str, Any]:
    """config.json as a dict ({} when it cannot be read: from_pretrained then says why)."""
    try:
        config = json.loads((source.files / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_vision_model(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json describes an image-text-to-text model (a vision tower beside its
    language model: LLaVA, Idefics3/SmolVLM, Gemma 3, Qwen2-VL...): loaded with ``AutoModelForImageTextToText``
    and its ``AutoProcessor``."""
    return isinstance(config.get("vision_config"), dict)


def needs_remote_code(config: dict[str, Any]) -> bool:
    """Whether the model's architecture exists only in code shipped with it (config.json auto_map)."""
    if not config.get("auto_map"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config.get("model_type") not in CONFIG_MAPPING_NAMES


def rope_parameters(current: dict[str, Any] | None, options: LoadOptions) -> dict[str, Any] | None:
    """The model's RoPE parameters with --alpha-value (dynamic NTK) or --compress-pos-emb (linear) applied.

    rope_theta and every other key are kept: replacing the dict (transformers' rope_scaling) loses them.
    """
    if options.alpha_value == 1.0 and options.compress_pos_emb == 1.0:
        return current
    if not current:
        flag = "--alpha-value" if options.alpha_value != 1.0 else "--compress-pos-emb"
        raise OptionError(f"{flag} needs a model with rotary position embeddings (RoPE); this one has none", f"drop {flag}")
    if options.alpha_value != 1.0:
        return {**current, "rope_type": "dynamic", "factor": options.alpha_value}
    return {**current, "rope_type": "linear", "factor": options.compress_pos_emb}


class TransformersLoader(TokenLoader):
    """Loads a Hugging Face model folder with ``AutoModelForCausalLM``."""

    name: ClassVar[str] = "transformers"
    formats: ClassVar[frozenset[str]] = frozenset({"transformers"})
    format_words: ClassVar[str] = "a Transformers model folder (the one holding config.json)"
    model_markers: ClassVar[tuple[str, ...]] = ("config.json",)
    formats_when_asked: ClassVar[frozenset[str]] = frozenset({"gguf"})  # dequantized: see transformers_gguf
    load_options: ClassVar[frozenset[str]] = frozenset({
        "revision", "device", "dtype", "load_in_8bit", "load_in_4bit", "quant_type", "compute_dtype", "double_quant",
        "attn", "flash_attn", "compile", "trust_remote_code", "cpu_memory", "gpu_split", "disk_offload",
        "alpha_value", "compress_pos_emb", "draft_model", "draft_max",
    })
    libraries: ClassVar[tuple[str, ...]] = (
        "transformers", "torch", "accelerate", "bitsandbytes", "huggingface_hub", "tokenizers", "peft",
    )
    adapters: ClassVar[frozenset[str]] = frozenset({"peft"})
    structured_output: ClassVar[bool] = True
    gives_logprobs: bool = True
    scores_tokens: bool = True
    speculation: ClassVar[bool] = True
    sampler_options = TRANSFORMERS_SAMPLERS

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None
        self.draft: Any = None
        """The ``--draft-model`` (transformers' ``assistant_model``), if one is loaded."""
        self.tokenizer: Any = None
        self._attention: str | None = None
        self._device_kwargs: dict[str, Any] = {}
        self._cache: Any = None
        """The KV cache of the last generation, and the token ids it holds (see ``reuse_prefix``)."""
        self._cache_ids: list[int] = []
        self._lora: dict[str, tuple[str, Adapter]] = {}
        """Applied adapter's name → (the key PEFT knows it by, the adapter)."""
        self._compiled: Any = None
        """The compiled decode step (``--compile``), a :class:`~nbllm.loaders._compiled.CompiledDecoder`."""
        self._rust_decode: Any = None
        """The tokenizers library's own decode, where ``tokenizer.decode`` adds nothing to it."""
        self._dequantized: str | None = None
        """A GGUF file's load, in words (see :mod:`nbllm.loaders.transformers_gguf`)."""
        self.processor: Any = None
        """A vision model's processor (``AutoProcessor``: its image processor and tokenizer), else ``None``."""

    # -- before anything is released ------------------------------------------------------------
    @classmethod
    def check(cls, source: ModelSource, options: LoadOptions) -> None:
        for module, extra in (("torch", "transformers"), ("transformers", "transformers"), ("accelerate", "transformers")):
            if importlib.util.find_spec(module) is None:
                raise missing_dependency(module, extra)
        if (options.load_in_4bit or options.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
            raise missing_dependency("bitsandbytes (needed by --load-in-4bit/--load-in-8bit)", "gpu")
        _quiet_library_noise()
        cls._device_arguments(options)
        if options.draft_model:
            from ._speculative import check_transformers_draft

            check_transformers_draft(source, options)
        elif options.draft_max != LoadOptions.spec("draft_max").default:
            warnings.warn("--draft-max has no effect without --draft-model", NbllmWarning, stacklevel=2)
        gpus = cuda_devices() if options.device != "cpu" else []  # what load() will use, not every GPU there is
        if source.format == "gguf":
            attention_for(options, {}, gpus)
            for note in machine_notes(options, gpus):
                warnings.warn(note, NbllmWarning, stacklevel=2)
            check_gguf(source.files)
            return
        config_path = source.files / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise LoadError(f"{config_path} cannot be read ({type(exc).__name__})", "download the model again") from None
        if not isinstance(config, dict):
            raise LoadError(f"{config_path} holds no settings object", "download the model again")
        attention_for(options, config, gpus)
        for note in machine_notes(options, gpus):
            warnings.warn(note, NbllmWarning, stacklevel=2)
        if needs_remote_code(config) and not options.trust_remote_code:
            raise LoadError(
                f"{source.name} ships its own model code (model_type {config.get('model_type')!r}) and needs "
                "--trust-remote-code",
                "add --trust-remote-code if you trust the repository it comes from",
            )
        weights = sorted(source.files.glob("*.safetensors")) or sorted(source.files.glob("*.bin"))
        if not weights:
            raise LoadError(
                f"{source.name} has no weights (no .safetensors or .bin file)", "download the model again"
            )
        for w in weights:
            if w.suffix == ".safetensors":
                check_safetensors(w)

    @staticmethod
    def _device_arguments(options: LoadOptions) -> dict[str, Any]:
        """device_map / max_memory / offload arguments for from_pretrained (validated against this machine)."""
        gpus = cuda_devices() if options.device != "cpu" else []
        if options.device == "cuda" and not gpus:
            raise OptionError(
                "--device cuda was asked for but no CUDA GPU is available", "use --device cpu (or auto)"
            )
        split = options.gpu_split_values if gpus else ()  # without a GPU it has no effect (a note says so)
        if len(split) > len(gpus):
            raise OptionError(
                f"--gpu-split names {len(split)} GPUs but {len(gpus)} {'is' if len(gpus) == 1 else 'are'} available",
                f"give at most {len(gpus)} values",
            )
        device = "cuda" if gpus else "cpu"
        if not (split or options.cpu_memory_limit is not None or options.disk_offload):
            return {"device_map": {"": device}}
        # accelerate uses only the devices max_memory names, so with a GPU every device is named (see
        # _gpu.max_memory: a reserve is kept on each GPU given no --gpu-split); load() then turns "auto"
        # into a dict map, which bitsandbytes needs to leave offloaded layers unquantized.
        from . import _gpu

        max_memory: dict[int | str, str | int] = {}
        limit = options.cpu_memory_limit
        if gpus:
            max_memory.update(_gpu.max_memory(options, split, free_memory(len(gpus))))
        elif limit is not None:
            max_memory["cpu"] = f"{limit}GiB"
        kwargs: dict[str, Any] = {"device_map": "auto", "max_memory": max_memory or None}
        if options.disk_offload:
            cache = Path(os.environ.get("NBLLM_CACHE_DIR", Path.home() / ".cache" / "nbllm"))
            kwargs["offload_folder"] = str(cache / "offload")
        return kwargs

    # -- loading ---------------------------------------------------------------------------------
    def load(self, source: ModelSource, options: LoadOptions) -> None:
        quiet_library_noise()  # bitsandbytes' import (--load-in-4bit) says nothing a user can act on
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        from . import _gpu

        self.source, self.options = source, options
        gpus = cuda_devices() if options.device != "cpu" else []
        config_json = _config_json(source)
        attention, note = attention_for(options, config_json, gpus)
        notes = [note] if note else []
        self._device_kwargs = self._device_arguments(options)
        kwargs: dict[str, Any] = dict(self._device_kwargs)
        path, remote = str(source.files), options.trust_remote_code
        gguf: dict[str, Any] = {}  # a GGUF file: its folder, and gguf_file= for the config, model and tokenizer
        if source.format == "gguf":
            path, gguf = gguf_arguments(source.files)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=remote, revision=options.revision, **gguf)
            rope = rope_parameters(getattr(config, "rope_parameters", None), options)
            if rope is not None:
                config.rope_parameters = rope
            kwargs["config"] = config
            dtype = _gpu.load_dtype(options, config_json, bool(gpus))
            kwargs["dtype"] = getattr(torch, dtype) if dtype else "auto"
            quantization = self._quantization_config(options, bool(gpus))
            if quantization is not None:
                kwargs["quantization_config"] = quantization
            if gpus and kwargs["device_map"] == "auto":  # offloading from a GPU: a dict map (see _gpu)
                memory = kwargs["max_memory"]
                quantized = "4bit" if options.load_in_4bit else "8bit" if options.load_in_8bit else None
                empty = _gpu.empty_model(config, _gpu.run_dtype(options, config_json, True), remote)
                kwargs["device_map"] = _gpu.offload_map(empty, memory, _gpu.run_dtype(options, config_json, True),
                                                        quantized)
                del empty
                notes += _gpu.empty_gpus(kwargs["device_map"], memory)
            vision = not gguf and is_vision_model(config_json)
            model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
            with no_progress_bars():  # transformers' "Loading weights" bar: nbllm's own line says it loaded
                self.model = model_class.from_pretrained(
                    path, attn_implementation=attention, trust_remote_code=remote, revision=options.revision,
                    **gguf, **kwargs
                )
            self.model.eval()
            if vision:
                self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote, revision=options.revision)
                self.tokenizer = self.processor.tokenizer
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote,
                                                               revision=options.revision, **gguf)
            self._rust_decode = _plain_rust_decode(self.tokenizer)
            if options.draft_model:
                from ._speculative import draft_source, load_transformers_draft

                with no_progress_bars():
                    self.draft = load_transformers_draft(draft_source(options.draft_model, "transformers", self.name),
                                                         self.model, options)
        except (OptionError, LoadError):
            self.unload()
            raise
        except (torch.OutOfMemoryError, MemoryError):
            self.unload()
            raise LoadError(
                f"not enough memory to load {source.name}",
                "use --load-in-4bit or --load-in-8bit, offload with --cpu-memory/--disk-offload, or a smaller model",
            ) from None
        except ImportError as exc:
            self.unload()
            raise LoadError(f"loading {source.name} needs a library that is missing: {_first_line(exc)}",
                            "install it with pip and load again") from exc
        except Exception as exc:
            self.unload()
            raise LoadError(
                f"could not load {source.name}: {type(exc).__name__}: {_first_line(exc)}",
                "check that the folder holds a complete model (config.json, weights, tokenizer); "
                "download it again if files are damaged",
            ) from exc
        device_map = getattr(self.model, "hf_device_map", None) or {}
        if "disk" in device_map.values() and not options.disk_offload:
            self.unload()
            raise LoadError(
                f"{source.name} does not fit in the memory allowed (--cpu-memory {options.cpu_memory})",
                "raise --cpu-memory, or add --disk-offload to put the rest on disk",
            )
        self._attention = attention
        self.placement = self._placement(None)
        self.placement.notes[:0] = notes
        if gguf:
            self._dequantized, gguf_note = dequantized(source.files, self.model, sum(self.placement.memory_bytes.values()))
            self.placement.notes.append(gguf_note)
            self.source = dataclasses.replace(source, dequantized=self._dequantized)
        if options.compile:
            self.placement.notes.append(self._prepare_compile())

    @staticmethod
    def _quantization_config(options: LoadOptions, on_gpu: bool) -> Any:
        if not (options.load_in_4bit or options.load_in_8bit):
            return None
        import torch
        from transformers import BitsAndBytesConfig

        offloading = options.cpu_memory_limit is not None or bool(options.gpu_split) or options.disk_offload
        if options.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offloading)
        compute = options.compute_dtype if options.compute_dtype != "auto" else ("float16" if on_gpu else "float32")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, compute),
            bnb_4bit_use_double_quant=options.double_quant,
            llm_int8_enable_fp32_cpu_offload=offloading,
        )

    def _placement(self, note: str | None) -> Placement:
        """Modules and bytes per device, from the tensors themselves (meta: offloaded, to the CPU or disk as
        the device map says)."""
        device_map = getattr(self.model, "hf_device_map", None)
        memory = model_memory(self.model, device_map)  # bitsandbytes' scales and code tables too; offloaded: cpu or disk
        if device_map:
            devices = Counter(_device_name(d) for d in device_map.values())
        else:
            devices = Counter({dev: self.model.config.get_text_config().num_hidden_layers for dev in memory})
        return Placement(dict(devices), dict(memory), [note] if note else [])

    def _prepare_compile(self) -> str:
        """Set up ``--compile`` (nothing is compiled before the first generation); the note says what it
        does and what it costs."""
        from ._compiled import CompiledDecoder, inductor_cache, unsupported_reason

        reason = unsupported_reason(self.model)
        if reason is not None:
            return f"--compile has no effect: nbllm's compiled decode step {reason}; generating without compilation"
        self._compiled = CompiledDecoder(self.model, self.context_length)
        cost = ("expect a minute or more on a CPU (autotuning, C++ compilation)" if not self._compiled.on_cuda
                else "expect tens of seconds") + f", much less once inductor's cache ({inductor_cache()}) holds it from an earlier load"
        extra = "" if self._compiled.on_cuda else "; the packed weights take a second copy of the linear layers' memory"
        return (f"--compile: each new token runs one compiled step ({self._compiled.how}) over a static KV cache "
                "sized to the request; the first generation of each cache size (128, 256, ... tokens), greedy or "
                f"sampled, compiles it ({cost}; its timings show it){extra}")

    def unload(self) -> None:
        self.model = None
        self.draft = None
        self.tokenizer = None
        self.processor = None
        self._cache, self._cache_ids = None, []
        if self._compiled is not None:
            self._compiled.release()
        self._compiled = None

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def tokenize_with_images(self, text: str, images: Sequence[Any], *, add_special: bool) -> list[int]:
        return list(self._image_inputs(text, images, add_special=add_special)["input_ids"][0].tolist())

    def _image_inputs(self, text: str, images: Sequence[Any], *, add_special: bool) -> Any:
        """The processor's inputs for ``text`` (its image placeholders expanded) and ``images`` (pixels)."""
        return self.processor(text=text, images=[image.pil() for image in images], return_tensors="pt",
                              add_special_tokens=add_special)

    def decode(self, ids: Sequence[int]) -> str:
        if self._rust_decode is not None:  # called twice per new token: the wrapper's own work shows
            return str(self._rust_decode(ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template or None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": self.tokenizer.bos_token or "", "eos_token": self.tokenizer.eos_token or ""}

    @property
    def context_length(self) -> int | None:
        config = self.model.config.get_text_config()  # a vision model's language model holds it
        n = getattr(config, "max_position_embeddings", None)
        if n is None:
            return None
        factor = (getattr(config, "rope_parameters", None) or {}).get("factor") or 1.0
        return int(n * factor)

    def describe(self) -> dict[str, Any]:
        quant = getattr(self.model.config, "quantization_config", None)
        return {
            "attn_implementation": self._attention,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "quantization": quantization_words(self.options, quant) if not self._dequantized else None,
            "compiled": self._compiled.describe() if self._compiled is not None else False,
            "dequantized": self._dequantized,
            "device_map": dict(getattr(self.model, "hf_device_map", None) or {}),
        }

    # -- generation ------------------------------------------------------------------------------
    def generation_kwargs(self, options: GenerationOptions) -> dict[str, Any]:
        """``model.generate`` keyword arguments for these options (the model's generation_config fills the rest)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens,
            "repetition_penalty": options.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else next(iter(sorted(self.eos_token_ids)), None),
        }
        if options.active_samplers():  # text-generation-webui's samplers: every processor from sampler_processors
            kwargs.update(do_sample=not options.greedy, repetition_penalty=1.0)
            if options.greedy:
                kwargs.update(temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)
            else:
                kwargs.update(temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0)
            if options.guidance_scale != 1.0:  # transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor
                import torch

                kwargs["guidance_scale"] = options.guidance_scale
                if options.negative_prompt:
                    negative = self.tokenize(options.negative_prompt, add_special=True)
                    kwargs["negative_prompt_ids"] = torch.tensor([negative], device=self._input_device())
                    kwargs["negative_prompt_attention_mask"] = torch.ones_like(kwargs["negative_prompt_ids"])
        elif options.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                min_p=options.min_p or None,
                typical_p=options.typical_p,
            )
        return kwargs

    def sampler_processors(self, options: GenerationOptions) -> list[Any]:
        """text-generation-webui's samplers as logits processors, in its order (none unless one is set)."""
        if not options.active_samplers():
            return []

        def last_id(text: str) -> list[int]:  # the token a text ends in after other text (TGW's "a" + text)
            ids = self.tokenizer.encode("a" + text, add_special_tokens=False)
            return ids[-1:]

        breakers = [t for b in options.sequence_breakers for t in last_id(b)]
        return transformers_processors(options, eos=sorted(self.eos_token_ids), newline=last_id("\n"),
                                       breakers=breakers, device=self._input_device())

    def _input_device(self) -> Any:
        """Where the prompt goes: the model's device, or the CPU when offloading left it on meta."""
        device = self.model.device
        return "cpu" if device.type == "meta" else device

    def _reusable_cache(self, prompt_ids: list[int], reuse: bool) -> Any:
        """The last generation's KV cache cut to the prefix it shares with ``prompt_ids`` (at least
        one prompt token is always left to compute), or a fresh cache."""
        from transformers import DynamicCache

        self.reused_tokens = 0
        if reuse and self._cache is not None:
            shared = min(_common_prefix(self._cache_ids, prompt_ids), len(prompt_ids) - 1)
            if shared > 0:
                self._cache.crop(shared - self._cache.get_seq_length())  # transformers 5: minus tokens to drop
                self.reused_tokens = shared
                return self._cache
        return DynamicCache(config=self.model.config)

    def generate_tokens(self, request: Request) -> Iterator[int]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from ._seeding import set_seed  # not transformers': its import takes seconds (see _seeding)

        model = self.model
        kwargs = self.generation_kwargs(request.options)
        prompt_ids, seed, cancel, reuse_prefix = request.prompt_ids, request.seed, request.cancel, request.reuse_prefix
        assert prompt_ids is not None
        self.compile_seconds = None
        self.draft_counts = None
        pixels: dict[str, Any] = {}  # a vision model's image inputs (pixel values...), beside the ids
        if request.images:
            from ..chat_template import starts_with_bos

            add_special = not starts_with_bos(request.prompt, self.special_tokens)
            inputs = self._image_inputs(request.prompt, request.images, add_special=add_special)
            prompt_ids = inputs["input_ids"][0].tolist()
            pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            reuse_prefix = False  # the kept state is of other pixels, perhaps: compute it all
        constrained = self._constraint_processors(request, rows=1, width=len(prompt_ids))
        samplers = self.sampler_processors(request.options)
        speculative = self._speculation(request, exact_steps=bool(constrained) or request.options.logprobs is not None)
        if (self._compiled is not None and not constrained and not samplers and request.options.logprobs is None
                and not speculative and not pixels):  # else generate's path
            return self._compiled_tokens(request)
        logprobs = transformers_recorder(self, request)
        processors: list[Any] = [*constrained, *samplers]
        if logprobs is not None:  # the model's own probabilities: before the constraint's mask, unless after samplers
            after = request.options.logprobs_after_samplers
            processors = [*processors, logprobs.processor()] if after else [logprobs.processor(), *processors]

        device = self._input_device()
        answers = {flag: torch.full((1,), flag, dtype=torch.bool, device=device) for flag in (False, True)}

        class Cancelled(StoppingCriteria):
            """Checked at every step: a prebuilt answer, no tensor made per token (generate ORs it in)."""

            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return answers[cancel.is_set()]

        def run(emit: Any) -> None:
            produced: list[int] = []

            class Emit(BaseStreamer):
                prompt_seen = False

                def put(self, value: Any) -> None:
                    if not self.prompt_seen:  # generate() first puts the prompt itself
                        self.prompt_seen = True
                        return
                    if value.numel() == 1:  # one new token per step: the common case, kept short
                        token = int(value)
                        produced.append(token)
                        if logprobs is not None:
                            logprobs.add(token)
                        emit(token)
                        return
                    for token in value.reshape(-1).tolist():
                        produced.append(token)
                        if logprobs is not None:
                            logprobs.add(token)
                        emit(token)

                def end(self) -> None:
                    pass

            cache = self._reusable_cache(prompt_ids, reuse_prefix)
            self._cache, self._cache_ids = None, []
            set_seed(seed)
            input_ids = torch.tensor([prompt_ids], device=device)
            counted: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if speculative:
                from ..speculative import DraftCounts
                from ._speculative import counted_candidates

                self.draft_counts = DraftCounts("prompt lookup" if "prompt_lookup_num_tokens" in speculative else "draft model")
                counted = counted_candidates(model, self.draft_counts)
            with torch.inference_mode(), counted:
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    **{k: v.to(device) for k, v in pixels.items()},
                    streamer=Emit(),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    cache=cache,
                    **({"logits_processor": LogitsProcessorList(processors)} if processors else {}),
                    **kwargs,
                    **speculative,
                )
            if reuse_prefix and not speculative:  # (a drafted generation's cache was cut back step by step: not kept)
                self._cache, self._cache_ids = cache, (prompt_ids + produced)[: cache.get_seq_length()]

        return threaded_tokens(run, cancel)

    def _speculation(self, request: Request, *, exact_steps: bool) -> dict[str, Any]:
        """``generate`` keywords for speculative decoding: ``prompt_lookup_num_tokens`` (``--prompt-lookup``,
        which wins over a loaded draft model) or ``assistant_model`` (``--draft-model``); none without them,
        nor for a request that needs one token a step (a constraint, --logprobs: the draft model sits out,
        a note says so). ``--compile``'s decode step checks no drafts: such a request runs eagerly."""
        n = request.options.prompt_lookup
        if not n and (self.draft is None or exact_steps):
            if self.draft is not None:
                warnings.warn("--draft-model sits out this request: a constraint or --logprobs needs one token a step",
                              NbllmWarning, stacklevel=4)
            return {}
        if self._compiled is not None:
            warnings.warn("--compile: a request with speculative decoding runs without the compiled step",
                          NbllmWarning, stacklevel=4)
        if n:
            if self.draft is not None:
                warnings.warn("--prompt-lookup drafts this request; the --draft-model sits it out", NbllmWarning,
                              stacklevel=4)
            return {"prompt_lookup_num_tokens": n}
        return {"assistant_model": self.draft}

    def _constraint_processors(self, request: Request, *, rows: int, width: int) -> list[Any]:
        """The logits processor that holds the output to the request's constraint (structured output:
        one llguidance matcher per row), or none. ``--compile``'s decode step picks tokens inside its
        graph, where no processor can go: a constrained request runs eagerly (a note says so)."""
        from ..constraints import Constraint, hf_compiler, torch_processor

        constraint = Constraint.from_options(request.options)
        self.grammar_seconds = None
        if constraint is None:
            return []
        if self._compiled is not None and rows == 1:  # (padded batches never use the compiled step)
            warnings.warn("--compile: a constrained request (structured output) runs without the compiled step",
                          NbllmWarning, stacklevel=4)
        if self.constraints is None:
            self.constraints = hf_compiler(self.tokenizer, self.model.config, self.eos_token_ids)
        compiled = self.constraints.compile(constraint)
        self.grammar_seconds = compiled.seconds
        return [torch_processor(compiled, rows, width)]

    def token_scores(self, rows: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0) -> list[Any]:
        return transformers_scores(self.model, self._input_device(), rows, starts, top)

    def _compiled_tokens(self, request: Request) -> Iterator[int]:
        """``--compile``: the compiled decode step generates (it keeps no prefix: the whole prompt is
        computed, ``reused_tokens`` is 0)."""
        compiled, prompt_ids = self._compiled, request.prompt_ids
        assert prompt_ids is not None
        self.reused_tokens = 0
        self._cache, self._cache_ids = None, []
        eos = self.eos_token_ids

        def run(emit: Any) -> None:
            from ._compiled import CompileFailed

            try:
                self.compile_seconds = compiled.generate(prompt_ids, request.options, request.seed, request.cancel, eos, emit)
            except CompileFailed as exc:  # before any token: from now on this model generates without compiling
                compiled.release()
                self._compiled = None
                self.placement.notes[:] = [n for n in self.placement.notes if not n.startswith("--compile: ")]
                self.placement.notes.append(f"--compile has no effect: compiling failed ({exc}); generating without it")
                raise GenerationError(
                    f"--compile could not compile this model's decode step ({exc})",
                    "run the prompt again: the model is still loaded and now generates without compiling "
                    "(or load it without --compile)",
                ) from exc

        return threaded_tokens(run, request.cancel)

    # -- LoRA adapters (PEFT) -----------------------------------------------------------------------
    def adaptable_modules(self) -> dict[str, tuple[int, int]]:
        """The modules a LoRA can adapt: path → (in features, out features); embeddings: (tokens, width).
        Modules PEFT added (an applied adapter's own layers) are left out."""
        out: dict[str, tuple[int, int]] = {}
        for name, module in self.model.named_modules():
            if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
                continue
            if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
                out[name] = (int(module.num_embeddings), int(module.embedding_dim))
            elif hasattr(module, "in_features") and hasattr(module, "out_features"):
                out[name] = (int(module.in_features), int(module.out_features))
        return out

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """PEFT LoRA adapters injected into the loaded model (4/8-bit ones too), active together with their
        scales; adapters no longer wanted are deleted, and with none left the model's own modules are put
        back. Every new adapter is checked (and its weights read) before the model is touched."""
        if importlib.util.find_spec("peft") is None:
            raise missing_dependency("peft (needed to apply LoRA adapters)", "transformers")
        quiet_library_noise()  # peft imports bitsandbytes
        from peft import LoraConfig
        from peft.functional import cast_adapter_dtype, inject_adapter_in_model

        assert self.source is not None
        before = dict(self._lora)
        keys = {a.name: before[a.name][0] for a in adapters if a.name in before and before[a.name][1].same_weights(a)}
        new = []
        for adapter in (a for a in adapters if a.name not in keys):
            state = _read_adapter_weights(adapter)
            check_peft_adapter(adapter, {k: tuple(v.shape) for k, v in state.items()}, self.adaptable_modules(),
                               self.source.name)
            new.append((adapter, state))
        added: list[str] = []
        try:
            for adapter, state in new:
                key = module_key(adapter.name, next(_ADAPTER_SERIAL))
                config = LoraConfig.from_pretrained(str(adapter.path))
                config.inference_mode = True
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PEFT's notes about the config's task type and such
                    inject_adapter_in_model(config, self.model, key)
                added.append(key)
                cast_adapter_dtype(self.model, key)  # fp16/bf16 LoRA weights computed in fp32, as PeftModel does
                self._fill_adapter(key, adapter, state)
                keys[adapter.name] = key
            self._activate_adapters([(keys[a.name], a.scale) for a in adapters])
        except Exception as exc:
            self._activate_adapters([(key, a.scale) for key, a in before.values()])
            for key in added:
                self._delete_adapter(key)
            if not before:
                self._unwrap_adapters()
            if isinstance(exc, NbllmError):
                raise
            name = new[len(added) - 1][0].name if added else "the adapters"
            raise LoadError(f"could not apply {name}: {type(exc).__name__}: {_first_line(exc)}",
                            "the model is unchanged; check that the adapter was made for this model") from exc
        for name, (key, _) in before.items():
            if keys.get(name) != key:
                self._delete_adapter(key)
        self._lora = {a.name: (keys[a.name], a) for a in adapters}
        if not self._lora:
            self._unwrap_adapters()
        self._cache, self._cache_ids = None, []  # computed with other weights

    def _fill_adapter(self, key: str, adapter: Adapter, state: dict[str, Any]) -> None:
        """Copy the adapter's tensors into the LoRA layers PEFT injected under ``key``. (Not PEFT's
        ``set_peft_model_state_dict``: it calls ``model.state_dict()``, which on a bitsandbytes 4-bit model
        that already ran on the CPU unpacks its weights and changes its outputs, bitsandbytes 0.50.)"""
        import torch

        filled = set()
        with torch.no_grad():
            for name, (module, part, rest) in peft_targets(state).items():
                target = getattr(self.model.get_submodule(module), part)[key]
                for attr in filter(None, rest.split(".")):
                    target = getattr(target, attr)
                target.copy_(state[name])
                filled.add(id(target))
        unfilled = [n for n, p in self.model.named_parameters() if f".{key}" in n and id(p) not in filled]
        if unfilled:
            raise LoadError(f"{adapter.name}'s adapter_config.json targets {unfilled[0].split('.lora_')[0]}, for which "
                            "its weights hold nothing: the two files do not belong together", "download the adapter again")

    def _activate_adapters(self, keys_and_scales: list[tuple[str, float]]) -> None:
        from peft.functional import set_adapter
        from peft.tuners.tuners_utils import BaseTunerLayer

        set_adapter(self.model, [k for k, _ in keys_and_scales], inference_mode=True)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "set_scale"):
                for key, scale in keys_and_scales:
                    module.set_scale(key, scale)  # scale × lora_alpha / r

    def _delete_adapter(self, key: str) -> None:
        from peft.functional import delete_adapter
        from peft.tuners.tuners_utils import BaseTunerLayer

        delete_adapter(self.model, adapter_name=key, prefix="lora_", layer_cls=BaseTunerLayer)
        configs = getattr(self.model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(key, None)

    def _unwrap_adapters(self) -> None:
        """Put the model's own modules back in place of PEFT's (empty) LoRA layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config


    # -- batches (sweeps) --------------------------------------------------------------------------
    batch_size: ClassVar[int] = 16

    def generate_batch(self, requests: Sequence[Request]) -> Iterator[list[int]]:
        """The rows left-padded, with an attention mask, in one ``model.generate``.

        Each row gives its one-by-one text: greedy rows take the same argmax; a sampled row draws from
        its own generator seeded with its seed, as a row alone draws from the global one after
        ``set_seed(seed)`` (same warpers in transformers' order, same softmax and multinomial on the
        row), and the repetition penalty counts no padding. What can still differ is the last bits
        of the padded batch's arithmetic, which can move a near tie.
        """
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )
        from transformers.generation.streamers import BaseStreamer

        model, options, cancel = self.model, requests[0].options, requests[0].cancel
        kwargs = self.generation_kwargs(options)
        pad = kwargs["pad_token_id"]
        device = self._input_device()
        rows = [list(r.prompt_ids or ()) for r in requests]
        width = max(len(ids) for ids in rows)
        padding = [width - len(ids) for ids in rows]
        input_ids = torch.tensor([[pad] * n + ids for n, ids in zip(padding, rows)], device=device)
        attention_mask = torch.tensor([[0] * n + [1] * len(ids) for n, ids in zip(padding, rows)], device=device)

        class PenaltyOnRows(LogitsProcessor):
            """transformers' repetition penalty, row by row, over each row's own tokens (not its padding)."""

            def __call__(self, ids: Any, scores: Any) -> Any:
                for i, n in enumerate(padding):
                    seen = ids[i : i + 1, n:]
                    score = torch.gather(scores[i : i + 1], 1, seen)
                    score = torch.where(score < 0, score * options.repetition_penalty, score / options.repetition_penalty)
                    scores[i : i + 1] = scores[i : i + 1].scatter(1, seen, score)
                return scores

        class SampleEachRow(LogitsProcessor):
            """Draw each row's token from its own generator; leave only that token possible."""

            def __init__(self) -> None:
                self.generators = [torch.Generator(device=input_ids.device).manual_seed(r.seed) for r in requests]

            def __call__(self, ids: Any, scores: Any) -> Any:
                chosen = torch.full_like(scores, float("-inf"))
                for i, generator in enumerate(self.generators):
                    probs = torch.nn.functional.softmax(scores[i : i + 1], dim=-1)
                    token = torch.multinomial(probs, num_samples=1, generator=generator)
                    chosen[i, token[0, 0]] = 0.0
                return chosen

        processors = LogitsProcessorList(self._constraint_processors(requests[0], rows=len(rows), width=width))
        if options.repetition_penalty != 1.0:
            processors.append(PenaltyOnRows())
            kwargs["repetition_penalty"] = 1.0
        if not options.greedy:  # the warpers transformers adds when sampling, in its order
            if options.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                processors.append(TopKLogitsWarper(top_k=options.top_k, min_tokens_to_keep=1))
            if options.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=options.top_p, min_tokens_to_keep=1))
            if options.min_p:
                processors.append(MinPLogitsWarper(min_p=options.min_p, min_tokens_to_keep=1))
            if options.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(mass=options.typical_p, min_tokens_to_keep=1))
            processors.append(SampleEachRow())
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None)

        class Cancelled(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=ids.device)

        def run(emit: Any) -> None:
            class Steps(BaseStreamer):
                prompt_seen = False

                def put(self, value: Any) -> None:
                    if not self.prompt_seen:  # generate() first puts the prompts themselves
                        self.prompt_seen = True
                        return
                    emit(value.reshape(-1).tolist())

                def end(self) -> None:
                    pass

            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    streamer=Steps(),
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    **kwargs,
                )

        return threaded_tokens(run, cancel)  # one list of ids per step


_ADAPTER_SERIAL = itertools.count()
"""Numbers the keys adapters get in PEFT, so an adapter replaced under its name never meets its old key."""


def _read_adapter_weights(adapter: Adapter) -> dict[str, Any]:
    """A PEFT adapter's tensors, on the CPU (a damaged file is one line)."""
    import torch

    weights = adapter.weights
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(weights), device="cpu"))
        return dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # safetensors and torch raise several kinds for a damaged file
        raise LoadError(f"{weights.name} of {adapter.name} cannot be read ({type(exc).__name__})",
                        "download the adapter again") from None


class _DropLibraryNoise(logging.Filter):
    """bitsandbytes logs two harmless lines into the cell: "Failed to load CPU gemm_4bit_forward from
    kernels-community" (an optional kernel package is absent; it falls back) on import, and "MatMul8bitLt:
    inputs will be cast ... to float16" on every 8-bit matmul. Neither asks anything of the user. Nor does
    transformers' own draft model call (``--draft-model``), which logs "Passing `generation_config` together with
    generation-related arguments ... is deprecated" about its own call."""

    NOISE = ("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast",
             "Passing `generation_config` together with generation-related")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions", "transformers.generation.utils")


def _quiet_library_noise() -> None:
    """Install the filter on the loggers that say it, before the libraries are imported."""
    for name in _NOISY_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryNoise) for f in log.filters):
            log.addFilter(_DropLibraryNoise())


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off in the block (and back on after, if they were on)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def quantization_words(options: LoadOptions | None, config_quantization: Any) -> str | None:
    """The quantization in the flags' words: what the user chose, or the checkpoint's own."""
    if options is not None and options.load_in_4bit:
        compute = options.compute_dtype
        if compute == "auto" and config_quantization is not None:
            compute = str(getattr(config_quantization, "bnb_4bit_compute_dtype", "auto")).removeprefix("torch.")
        return (f"4-bit {options.quant_type} (bitsandbytes), compute {compute}"
                + (", double quant" if options.double_quant else ""))
    if options is not None and options.load_in_8bit:
        return "8-bit (bitsandbytes LLM.int8)"
    if config_quantization is None:
        return None
    data = config_quantization.to_dict() if hasattr(config_quantization, "to_dict") else dict(config_quantization)
    method = data.get("quant_method")
    bits = data.get("bits")
    return f"{getattr(method, 'value', method)}" + (f" {bits}-bit" if bits else "") + " (from the checkpoint)"


def _plain_rust_decode(tokenizer: Any) -> Any:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` as the Rust tokenizer's own decode, when the
    Python side adds nothing to it (a fast tokenizer that neither overrides decoding nor cleans up
    spaces); ``None`` otherwise."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    kind = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend) or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    if kind._decode is not TokenizersBackend._decode or kind.decode is not PreTrainedTokenizerBase.decode:
        return None
    return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _device_name(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
