"""The llama.cpp loader: GGUF models through llama-cpp-python, with text-generation-webui's load options.

``llama_cpp`` is imported inside the methods, never at import time, so ``%load_ext nbllm`` stays fast.

What each load option becomes (see :func:`llama_kwargs`, a pure function so the mapping is testable
without loading anything):

==================  ==========================================================================
``--n-gpu-layers``  ``n_gpu_layers`` (0: CPU only, -1: all layers)
``--n-ctx``         ``n_ctx``; 0: the model's trained context (``<arch>.context_length``, times
                    ``--compress-pos-emb``), capped at :data:`N_CTX_CAP` — not llama-cpp-python's 512
``--n-batch``       ``n_batch``
``--threads``       ``n_threads`` (0: llama-cpp-python's default, half the logical CPUs)
``--threads-batch`` ``n_threads_batch`` (0: llama-cpp-python's default, all logical CPUs)
``--gpu-split``     ``tensor_split`` (proportions per GPU)
``--flash-attn``    ``flash_attn``
``--cache-type``    ``type_k``/``type_v`` (GGML type ids); the V cache is quantized only with
                    ``--flash-attn`` (llama.cpp refuses a quantized V cache without it)
``--no-mmap``       ``use_mmap=False``
``--mlock``         ``use_mlock=True``
``--alpha-value``   ``rope_freq_base`` = (the model's base) · alpha^(64/63); for the usual base 10000
                    this is text-generation-webui's 10000 · alpha^(64/63)
``--rope-freq-base``  ``rope_freq_base`` (0: the model's own)
``--compress-pos-emb``  ``rope_freq_scale`` = 1/N (1: the model's own)
``--verbose``       ``verbose``; otherwise llama.cpp's C log is kept out of the notebook
==================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..adapters import Adapter, check_gguf_adapter
from ..errors import (
    GenerationError,
    LoadError,
    ModelNotFoundError,
    NbllmWarning,
    OptionError,
    missing_dependency,
)
from ..frontend import command
from ..gguf_file import (
    GGUFHeader,
    adapter_not_model,
    quantization_from_name,
    read_gguf_header,
    split_gguf_parts,
)
from ..options import GenerationOptions, LoadOptions
from ..source import ModelSource
from ._logprobs import llamacpp_last_logits, llamacpp_recorder, llamacpp_scores
from ._samplers import LLAMACPP_SAMPLERS, llamacpp_chain
from .base import Placement, Request, TokenLoader

N_CTX_CAP = 8192
"""``--n-ctx 0`` takes the model's trained context but never more than this many tokens: a model
trained on 128k tokens would otherwise reserve a KV cache of many GiB (text-generation-webui caps it
the same way)."""

N_CTX_FALLBACK = 4096
"""``--n-ctx 0`` for a GGUF whose header does not say its trained context length."""

ALPHA_EXPONENT = 64 / 63
"""NTK-aware scaling multiplies the RoPE base by alpha^(d/(d-2)); text-generation-webui fixes d = 128
(the head size of Llama-style models), hence 64/63."""

CACHE_TYPES: dict[str, int] = {"fp16": 1, "q8_0": 8, "q4_0": 2, "fp32": 0}
"""``--cache-type`` → GGML type id (``GGML_TYPE_F16``, ``GGML_TYPE_Q8_0``, ``GGML_TYPE_Q4_0``)."""

_CACHE_BLOCK = {"fp16": 1, "q8_0": 32, "q4_0": 32, "fp32": 1}
_CACHE_BYTES = {"fp16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "fp32": 4.0}

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
"""llama.cpp's "draw a random seed" value: never passed, or sampling would not be reproducible."""


# ---------------------------------------------------------------------------------- option mapping


def _meta_float(metadata: Mapping[str, Any], key: str) -> float | None:
    value = metadata.get(key)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _arch(metadata: Mapping[str, Any]) -> str:
    return str(metadata.get("general.architecture", "llama"))


def trained_context(metadata: Mapping[str, Any]) -> int | None:
    """The context length the model was trained with (``<arch>.context_length``), if the header says."""
    value = _meta_float(metadata, f"{_arch(metadata)}.context_length")
    return int(value) if value else None


def default_n_ctx(metadata: Mapping[str, Any], options: LoadOptions) -> int:
    """``--n-ctx 0``: the trained context (times ``--compress-pos-emb``, which stretches it), capped at
    :data:`N_CTX_CAP`."""
    trained = trained_context(metadata) or N_CTX_FALLBACK
    return min(int(trained * options.compress_pos_emb), N_CTX_CAP)


def rope_freq_base(metadata: Mapping[str, Any], options: LoadOptions) -> float:
    """The RoPE base to ask llama.cpp for; 0 leaves the model's own.

    ``--alpha-value`` scales the model's own base by alpha^(64/63). For a model whose base is 10000
    (Llama 1/2, Mistral) that is exactly text-generation-webui's 10000 · alpha^(64/63); for a model
    trained with another base (Llama 3: 500000) scaling its own base is what NTK-aware scaling means,
    while 10000 · alpha^(64/63) would *shrink* its base and break it.
    """
    if options.alpha_value != 1.0:
        if options.rope_freq_base:
            raise OptionError(
                "--alpha-value and --rope-freq-base both set the RoPE frequency base",
                "give only one of them",
            )
        base = _meta_float(metadata, f"{_arch(metadata)}.rope.freq_base") or 10000.0
        return base * options.alpha_value**ALPHA_EXPONENT
    return float(options.rope_freq_base)


def cache_types(options: LoadOptions) -> tuple[int, int]:
    """(type_k, type_v) for ``--cache-type``: the V cache is quantized only with ``--flash-attn`` (fp32 needs
    no quantization: both caches get it)."""
    k = CACHE_TYPES[options.cache_type]
    return k, (k if options.flash_attn or options.cache_type == "fp32" else CACHE_TYPES["fp16"])


def llama_kwargs(source: ModelSource, options: LoadOptions, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``llama_cpp.Llama(...)`` that give ``options`` text-generation-webui's
    meanings. ``metadata`` is the GGUF's key-values (numbers or strings, as ``Llama.metadata`` has them)."""
    type_k, type_v = cache_types(options)
    return {
        "model_path": str(source.files),
        "n_gpu_layers": options.n_gpu_layers,
        "n_ctx": options.n_ctx or default_n_ctx(metadata, options),
        "n_batch": options.n_batch,
        "n_threads": options.threads or None,
        "n_threads_batch": options.threads_batch or None,
        "tensor_split": list(options.gpu_split_values) or None,
        "flash_attn": bool(options.flash_attn),  # unset (auto): see flash_attention_type
        "type_k": type_k,
        "type_v": type_v,
        "use_mmap": not options.no_mmap,
        "use_mlock": options.mlock,
        "rope_freq_base": rope_freq_base(metadata, options),
        "rope_freq_scale": 1.0 / options.compress_pos_emb if options.compress_pos_emb != 1.0 else 0.0,
        "verbose": options.verbose,
    }


def flash_attention_type(options: LoadOptions, gpu: bool) -> int:
    """llama.cpp's flash attention setting (``LLAMA_FLASH_ATTN_TYPE_*``: -1 auto, 0 off, 1 on).

    --flash-attn is on, --no-flash-attn off. Unset, llama.cpp's own ``auto`` decides where layers run on
    a GPU (it turns flash attention on where the backend has it); llama-cpp-python's ``Llama`` takes
    only a bool, and its ``False`` would override that ``auto`` with off. On a CPU-only run unset stays
    off, llama-cpp-python's default (every CPU figure and the greedy-equality tests use it)."""
    if options.flash_attn is not None:
        return int(options.flash_attn)
    return -1 if gpu and options.n_gpu_layers != 0 else 0


@contextlib.contextmanager
def _flash_attention(llama_cpp: Any, setting: int) -> Iterator[None]:
    """While loading, create the llama.cpp context with ``setting`` (see :func:`flash_attention_type`):
    ``Llama`` turns its ``flash_attn`` bool into on or off and has no way to pass auto."""
    internals = llama_cpp.llama.internals
    original = internals.LlamaContext
    if setting != llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO:
        yield
        return

    class AutoFlashAttention(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, params: Any, **kwargs: Any) -> None:
            params.flash_attn_type = setting
            super().__init__(*args, params=params, **kwargs)

    internals.LlamaContext = AutoFlashAttention
    try:
        yield
    finally:
        internals.LlamaContext = original


def kv_cache_bytes(metadata: Mapping[str, Any], n_ctx: int, options: LoadOptions) -> int | None:
    """About how many bytes the KV cache of ``n_ctx`` tokens takes, from the header (None if unknown)."""
    arch = _arch(metadata)
    layers = _meta_float(metadata, f"{arch}.block_count")
    heads = _meta_float(metadata, f"{arch}.attention.head_count")
    embd = _meta_float(metadata, f"{arch}.embedding_length")
    if not (layers and heads and embd):
        return None
    kv_heads = _meta_float(metadata, f"{arch}.attention.head_count_kv") or heads
    k_len = _meta_float(metadata, f"{arch}.attention.key_length") or embd / heads
    v_len = _meta_float(metadata, f"{arch}.attention.value_length") or embd / heads
    type_k, type_v = cache_types(options)
    names = {v: k for k, v in CACHE_TYPES.items()}
    per_token = kv_heads * (k_len * _CACHE_BYTES[names[type_k]] + v_len * _CACHE_BYTES[names[type_v]])
    return int(n_ctx * layers * per_token)


def head_sizes(metadata: Mapping[str, Any]) -> tuple[int, int] | None:
    """(K head size, V head size) from the header, if it says."""
    arch = _arch(metadata)
    heads = _meta_float(metadata, f"{arch}.attention.head_count")
    embd = _meta_float(metadata, f"{arch}.embedding_length")
    k_len = _meta_float(metadata, f"{arch}.attention.key_length") or (embd / heads if embd and heads else None)
    v_len = _meta_float(metadata, f"{arch}.attention.value_length") or (embd / heads if embd and heads else None)
    if not (k_len and v_len):
        return None
    return int(k_len), int(v_len)


# ------------------------------------------------------------------------------------ llama.cpp's log


class LlamaLog:
    """Where llama.cpp's C log goes: the notebook's stderr with ``--verbose``, otherwise nowhere.

    llama-cpp-python's own callback maps llama.cpp's log levels wrongly (it shows warnings as errors
    even with ``verbose=False``), so nbllm installs its own while one of its models is loaded or
    loading. Quiet lines are kept (the last ones) so a failed load can say what llama.cpp said.
    Outside nbllm's loads, lines go to llama-cpp-python's callback, as if nbllm were not there.
    """

    def __init__(self) -> None:
        self.mode = "forward"
        """``forward`` (to llama-cpp-python's callback), ``quiet`` or ``verbose``."""
        self.lines: deque[tuple[int, str]] = deque(maxlen=200)
        self._callback: Any = None
        self._partial = ""
        self._mtmd_routed = False

    def install(self, llama_cpp: Any) -> None:
        """Route llama.cpp's log through this object (once per process)."""
        if self._callback is not None:
            return
        from llama_cpp import _logger

        original = _logger.llama_log_callback

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if self.mode == "forward":
                original(level, text, user_data)
                return
            message = text.decode("utf-8", errors="replace") if text else ""
            if self.mode == "verbose":
                print(message, end="", file=sys.stderr, flush=True)
                return
            self._partial += message
            if self._partial.endswith("\n"):
                self.lines.append((level, self._partial.rstrip("\n")))
                self._partial = ""

        self._callback = callback  # keep a reference: C holds only the pointer
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def install_mtmd(self, mtmd: Any) -> None:
        """Route libmtmd's log (the projector's loading and each image's encoding) through this object too."""
        if self._callback is not None and not self._mtmd_routed:
            mtmd.mtmd_log_set(self._callback, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))
            self._mtmd_routed = True

    def errors(self) -> list[str]:
        """The error lines llama.cpp logged since :meth:`clear` (level ERROR = 4 in ggml.h)."""
        return [text.strip() for level, text in self.lines if level == 4 and text.strip()]

    def clear(self) -> None:
        self.lines.clear()
        self._partial = ""


LOG = LlamaLog()


def machine_notes(options: LoadOptions, *, gpu: bool, cores: int) -> list[str]:
    """One line for each option set by the user that has no effect on this machine (or hurts)."""
    notes = []
    if not gpu:
        why = "this llama-cpp-python was built without GPU support, so every layer runs on the CPU"
        if options.gpu_split:
            notes.append(f"--gpu-split has no effect here: {why}")
        if options.n_gpu_layers > 0:
            notes.append(f"--n-gpu-layers {options.n_gpu_layers} has no effect here: {why}")
    for flag, n in (("--threads", options.threads), ("--threads-batch", options.threads_batch)):
        if n > cores:
            notes.append(f"{flag} {n} is more than the {cores} CPU cores here: llama.cpp slows down with more "
                         "threads than cores (0 picks a good number)")
    return notes


# ------------------------------------------------------------------------------------------ the loader


class LlamaCppLoader(TokenLoader):
    """Loads one GGUF file with ``llama_cpp.Llama`` and generates from it."""

    structured_output: ClassVar[bool] = True

    name: ClassVar[str] = "llama.cpp"
    formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    format_words: ClassVar[str] = "a GGUF file"
    model_files: ClassVar[tuple[str, ...]] = (".gguf",)
    load_options: ClassVar[frozenset[str]] = frozenset({
        "revision", "file", "flash_attn", "gpu_split", "alpha_value", "compress_pos_emb", "rope_freq_base",
        "n_gpu_layers", "n_ctx", "n_batch", "threads", "threads_batch", "cache_type", "no_mmap", "mlock", "verbose",
        "draft_model", "draft_max",
    })
    libraries: ClassVar[tuple[str, ...]] = ("llama_cpp_python", "huggingface_hub")
    adapters: ClassVar[frozenset[str]] = frozenset({"gguf"})
    gives_logprobs: bool = True
    scores_tokens: bool = True
    speculation: ClassVar[bool] = True
    sampler_options = LLAMACPP_SAMPLERS

    def __init__(self) -> None:
        super().__init__()
        self.llm: Any = None
        self.draft: Any = None
        """The ``--draft-model`` (a :class:`~nbllm.loaders._speculative.GGUFDraftModel`), if one is loaded."""
        self._drafts: Any = None
        """The ``Llama``'s ``draft_model`` (a counting wrapper) when it was built with one."""
        self.header: GGUFHeader | None = None
        self.kwargs: dict[str, Any] = {}
        """What ``Llama(...)`` was called with."""
        self._eos: frozenset[int] = frozenset()
        self._pieces: dict[int, bytes] = {}
        """Token id → its bytes, filled as tokens are decoded (llama.cpp's vocabulary never changes)."""
        self._vocab: Any = None
        self._n_vocab = 0
        self._notes: list[str] = []
        self._gpu_offload = False
        """Whether this llama-cpp-python was built with GPU support."""
        self.template_error: str | None = None
        """Why the GGUF's chat template does not compile, if it does not."""
        self._lora: dict[str, tuple[Any, Adapter]] = {}
        """Applied adapter's name → (llama.cpp's handle, the adapter)."""
        self._mtmd: Any = None
        """libmtmd's context for the model's projector (``source.projector``): the model takes images."""

    # -- before anything is released ------------------------------------------------------------
    @classmethod
    def check(cls, source: ModelSource, options: LoadOptions) -> None:
        llama_cpp = _import_llama_cpp()
        path = source.files
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}", f"check the path, or run {command('models')} to list models")
        header = read_gguf_header(path)
        if header.is_adapter:
            raise adapter_not_model(path)
        parts = split_gguf_parts(path)
        for part in (parts or [])[1:]:
            if not part.is_file():
                raise ModelNotFoundError(f"{part.name}, a part of {path.name}, is missing", "download the missing parts")
            read_gguf_header(part)
        kwargs = llama_kwargs(source, options, header.metadata)  # raises on contradictory RoPE options
        if options.draft_model:
            from ._speculative import check_gguf_draft

            LOG.install(llama_cpp)
            mode, LOG.mode = LOG.mode, "quiet"
            try:
                check_gguf_draft(source, options)
            finally:
                LOG.mode = mode
        elif options.draft_max != LoadOptions.spec("draft_max").default:
            warnings.warn("--draft-max has no effect without --draft-model", NbllmWarning, stacklevel=2)
        split = options.gpu_split_values
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        for note in machine_notes(options, gpu=gpu, cores=os.cpu_count() or 1):
            warnings.warn(note, NbllmWarning, stacklevel=2)
        if gpu and len(split) > int(llama_cpp.llama_max_devices()):
            raise OptionError(
                f"--gpu-split names {len(split)} GPUs; llama.cpp supports at most {llama_cpp.llama_max_devices()}",
                "give one proportion per GPU",
            )
        if options.cache_type != "fp16":
            block = _CACHE_BLOCK[options.cache_type]
            sizes = head_sizes(header.metadata)
            if sizes is not None:
                quantized = [sizes[0]] + ([sizes[1]] if options.flash_attn else [])
                if any(s % block for s in quantized):
                    raise OptionError(
                        f"--cache-type {options.cache_type} needs attention heads whose size is a multiple of "
                        f"{block}; this model's are {sizes[0]}",
                        "use --cache-type fp16",
                    )
        on_cpu = not gpu or options.n_gpu_layers == 0
        kv = kv_cache_bytes(header.metadata, kwargs["n_ctx"], options)
        if on_cpu and kv is not None:
            import psutil

            total = psutil.virtual_memory().total
            if kv > total:
                sizes = head_sizes(header.metadata)
                smaller = options.cache_type == "fp16" and sizes is not None and not (sizes[0] % 32 or sizes[1] % 32)
                raise LoadError(
                    f"not enough memory for --n-ctx {kwargs['n_ctx']}: its KV cache needs about "
                    f"{kv / 2**30:.1f} GiB and this machine has {total / 2**30:.1f} GiB",
                    "lower --n-ctx" + (" (or use --cache-type q8_0 with --flash-attn)" if smaller else ""),
                )

    # -- loading ---------------------------------------------------------------------------------
    def load(self, source: ModelSource, options: LoadOptions) -> None:
        llama_cpp = _import_llama_cpp()
        self.source, self.options = source, options
        self.header = read_gguf_header(source.files)
        self.kwargs = llama_kwargs(source, options, self.header.metadata)
        LOG.install(llama_cpp)
        LOG.mode = "verbose" if options.verbose else "quiet"
        LOG.clear()
        try:
            flash = flash_attention_type(options, bool(llama_cpp.llama_supports_gpu_offload()))
            drafting: dict[str, Any] = {}
            if options.draft_model:  # checked by check(); the same Llama keyword for both models
                from ._speculative import draft_classes, draft_source

                counting, drafter = draft_classes()
                draft = draft_source(options.draft_model, "gguf", self.name)
                self._drafts = counting()
                # logits_all: llama-cpp-python sizes its logits array by it, not by draft_model
                drafting = {"draft_model": self._drafts, "logits_all": True}
            with _tolerant_chat_templates(llama_cpp) as broken, _flash_attention(llama_cpp, flash):
                self.llm = llama_cpp.Llama(**self.kwargs, **drafting)
                if drafting:
                    small = {**llama_kwargs(draft, options, read_gguf_header(draft.files).metadata), "n_ctx": self.kwargs["n_ctx"]}
                    self.draft = drafter(llama_cpp.Llama(**small), options.draft_max)
        except MemoryError:
            self.unload()
            raise self._memory_error() from None
        except Exception as exc:  # llama-cpp-python raises ValueError; anything else is reported alike
            said = LOG.errors()
            self.unload()
            if any(_is_memory_message(line) for line in said):
                raise self._memory_error() from exc
            reason = _llama_reason(said)
            detail = f": llama.cpp says {reason!r}" if reason else f" ({type(exc).__name__}: {_first_line(exc)})"
            raise LoadError(
                f"llama.cpp could not load {source.name}{detail}",
                _load_fix(said),
            ) from exc
        self.template_error = broken[0] if broken else None
        if self.template_error:
            warnings.warn(
                f"the chat template in {source.name} does not compile ({self.template_error}): raw prompts work; "
                "chats use nbllm's generic template instead of the model's own",
                NbllmWarning, stacklevel=2,
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._n_vocab = int(self.llm.n_vocab())
        eos = {int(self.llm.token_eos())}
        eos.update(i for i in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        self._eos = frozenset(e for e in eos if e >= 0)
        self._gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if source.projector is not None:
            self._load_projector(source.projector)
        self._notes = self._load_notes()
        self.placement = self._placement(llama_cpp)

    def _load_projector(self, projector: Path) -> None:
        """Open the multimodal projector with libmtmd (as llama-cpp-python's ``MTMDChatHandler`` does),
        so the model takes images; a projector that does not load is a one-line :class:`LoadError`."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        params = mtmd.mtmd_context_params_default()
        params.use_gpu = self._gpu_offload and self.kwargs.get("n_gpu_layers", 0) != 0
        params.print_timings = False
        params.n_threads = self.llm.n_threads
        enabled = self.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as the model's
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if enabled else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        LOG.install_mtmd(mtmd)
        LOG.clear()
        context = mtmd.mtmd_init_from_file(str(projector).encode(), self.llm.model, params)
        if not context or not mtmd.mtmd_support_vision(context):
            said = _llama_reason(LOG.errors())
            if context:
                mtmd.mtmd_free(context)
            name = self.source.name if self.source else "the model"
            self.unload()
            raise LoadError(
                f"llama.cpp could not load the projector {projector.name} beside {name}"
                + (f": it says {said!r}" if said else " (not a vision projector for this model?)"),
                f"move {projector.name} out of the model's folder to load the model without images, or get the "
                "projector made for this model",
            )
        self._mtmd = context

    def _memory_error(self) -> LoadError:
        n_ctx = self.kwargs.get("n_ctx")
        return LoadError(
            f"not enough memory to load {self.source.name if self.source else 'the model'} with --n-ctx {n_ctx}",
            "lower --n-ctx or --n-gpu-layers (or use a smaller quantization)",
        )

    def _load_notes(self) -> list[str]:
        """Choices made for the user, shown by %llm_load and %llm_status."""
        opts, notes = self.options, []
        assert opts is not None
        if opts.cache_type not in ("fp16", "fp32") and not opts.flash_attn:
            notes.append(f"--cache-type {opts.cache_type} quantizes the K cache only; the V cache stays fp16 "
                         "(llama.cpp quantizes it only with --flash-attn)")
        trained = trained_context(self.header.metadata) if self.header else None
        scaled = opts.alpha_value != 1.0 or opts.compress_pos_emb != 1.0 or opts.rope_freq_base
        if opts.n_ctx and trained and opts.n_ctx > trained and not scaled:
            times = f"{opts.n_ctx / trained:.3g}"
            notes.append(f"n_ctx {opts.n_ctx} is {times}x the {trained} tokens the model was trained on: past "
                         f"{trained} tokens it needs RoPE scaling, --compress-pos-emb {times} (linear, for a model "
                         "fine-tuned with it) or --alpha-value (NTK: 1.75 for 1.5x, 2.5 for 2x)")
        if opts.n_ctx == 0:
            if trained and self.context_length and trained > self.context_length:
                notes.append(f"n_ctx: {self.context_length} (the model was trained on {trained}; "
                             f"--n-ctx 0 caps it at {N_CTX_CAP}, give --n-ctx to use more)")
        return notes

    def _placement(self, llama_cpp: Any) -> Placement:
        """Layers per device and the memory they use (weights + KV cache), from llama.cpp's numbers."""
        llm, opts = self.llm, self.options
        assert opts is not None
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        weights = int(llama_cpp.llama_model_size(llm.model))
        gpu_layers = 0
        if self._gpu_offload:
            gpu_layers = n_layer if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, n_layer)
        kv = kv_cache_bytes(self.header.metadata if self.header else {}, self.context_length or 0, opts) or 0
        devices: dict[str, int] = {}
        memory: dict[str, int] = {}
        if n_layer - gpu_layers:
            devices["cpu"] = n_layer - gpu_layers
            memory["cpu"] = int((weights + kv) * (n_layer - gpu_layers) / n_layer)
        if gpu_layers:
            devices["gpu"] = gpu_layers
            memory["gpu"] = int((weights + kv) * gpu_layers / n_layer)
        mapped = "memory-mapped from the file (pages are read as needed)" if not opts.no_mmap else "read into memory"
        notes = [*self._notes, f"weights: {weights / 2**20:.1f} MiB, {mapped}; KV cache: {kv / 2**20:.1f} MiB"]
        return Placement(devices, memory, notes)

    def unload(self) -> None:
        self._free_adapters()
        if self._mtmd is not None:
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        draft, self.draft, self._drafts = self.draft, None, None
        if draft is not None:
            draft.llm.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            close = getattr(llm, "close", None)
            if close is not None:
                close()
        self._pieces = {}
        self._vocab = None
        LOG.mode = "forward"

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def _piece(self, token: int) -> bytes:
        """The bytes of one token, special (control) tokens empty; cached."""
        import llama_cpp

        if not 0 <= token < self._n_vocab:
            return b""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                piece = buf.raw[:n]
                break
            size = -n
        self._pieces[token] = piece
        return piece

    def decode(self, ids: Sequence[int]) -> str:
        pieces = self._pieces
        data = b"".join([pieces[i] if i in pieces else self._piece(i) for i in ids])
        return data.decode("utf-8", errors="replace")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def takes_images(self) -> bool:
        return self._mtmd is not None

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each message with images as text holding libmtmd's media marker where each image stands (any
        GGUF chat template renders text; libmtmd finds the markers when it tokenizes)."""
        if self._mtmd is None:
            return messages
        import llama_cpp.mtmd_cpp as mtmd

        marker = mtmd.mtmd_default_marker().decode("utf-8")
        return [m if isinstance(m["content"], str) else {**m, "content": "".join(
            p["text"] if p["type"] == "text" else marker for p in m["content"])} for m in messages]

    def _image_chunks(self, text: str, images: Sequence[Any], *, add_special: bool) -> Any:
        """libmtmd's chunks (text tokens and image embeddings to come) for ``text`` and ``images``."""
        import ctypes

        import llama_cpp.mtmd_cpp as mtmd

        bitmaps = []
        for image in images:
            data = (ctypes.c_uint8 * len(image.png)).from_buffer(bytearray(image.png))
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._mtmd, data, len(image.png), False)
            if not bitmap:
                raise GenerationError(f"llama.cpp could not read the image {image.sha256[:12]}", "send it as a PNG")
            bitmaps.append(bitmap)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            given = mtmd.mtmd_input_text()
            encoded = text.encode("utf-8")
            given.text, given.text_len, given.add_special, given.parse_special = encoded, len(encoded), add_special, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            said = mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(given), array, len(bitmaps))
            if said != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise GenerationError(f"llama.cpp could not place the images in the prompt (mtmd_tokenize said {said})",
                                      "give as many images as the message has image places")
            return chunks
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _chunk_ids(self, chunks: Any) -> Iterator[tuple[Any, list[int] | None, int]]:
        """Each chunk, its text tokens (``None`` for an image) and how many positions it takes."""
        import ctypes

        import llama_cpp.mtmd_cpp as mtmd

        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens = [int(pointer[j]) for j in range(n.value)]
                yield chunk, tokens, len(tokens)
            else:
                yield chunk, None, int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))

    def tokenize_with_images(self, text: str, images: Sequence[Any], *, add_special: bool) -> list[int]:
        import llama_cpp.mtmd_cpp as mtmd

        chunks = self._image_chunks(text, images, add_special=add_special)
        try:  # an image's positions hold no token: -1 stands there (never a vocabulary id)
            return [t for _, tokens, n in self._chunk_ids(chunks) for t in (tokens if tokens is not None else [-1] * n)]
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _evaluate_images(self, request: Request) -> list[int]:
        """Compute the prompt with its images into the context (as ``MTMDChatHandler`` does), from empty;
        returns the ids ``Llama.generate`` then continues from (all of the prompt but its last token is kept)."""
        import ctypes

        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        from ..chat_template import starts_with_bos

        llm = self.llm
        add_special = not starts_with_bos(request.prompt, self.special_tokens)
        chunks = self._image_chunks(request.prompt, request.images, add_special=add_special)
        try:
            llm.reset()
            llm._ctx.kv_cache_clear()
            for chunk, tokens, _n in self._chunk_ids(chunks):
                if tokens is not None:
                    llm.eval(tokens)
                    continue
                n_past = llama_cpp.llama_pos(0)
                said = mtmd.mtmd_helper_eval_chunk_single(self._mtmd, llm._ctx.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens),
                                                          llama_cpp.llama_seq_id(0), llm.n_batch, False,
                                                          ctypes.byref(n_past))
                if said != 0:
                    raise GenerationError(f"llama.cpp could not compute an image (mtmd said {said})",
                                          "check the projector matches the model")
                llm.n_tokens = n_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return [int(t) for t in llm.input_ids[: llm.n_tokens]]

    @property
    def chat_template(self) -> str | None:
        if self.template_error:
            return None
        return self.llm.metadata.get("tokenizer.chat_template") or None

    @property
    def special_tokens(self) -> dict[str, str]:
        import llama_cpp

        def text(token: int) -> str:
            if token < 0:
                return ""
            return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

        return {"bos_token": text(int(self.llm.token_bos())), "eos_token": text(int(self.llm.token_eos()))}

    @property
    def context_length(self) -> int | None:
        if self.llm is None:
            return None
        # llama.cpp may round the context up (to 256); llama-cpp-python's buffers hold what was asked.
        return int(min(self.llm.n_ctx(), self.llm.context_params.n_ctx))

    def describe(self) -> dict[str, Any]:
        opts, header, kw = self.options, self.header, self.kwargs
        assert opts is not None and header is not None and self.source is not None
        quant = header.file_type
        trained = trained_context(header.metadata)
        base = kw["rope_freq_base"] or _meta_float(header.metadata, f"{header.architecture}.rope.freq_base")
        return {
            "file": self.source.files.name,
            "quantization": quant or quantization_from_name(self.source.files.name),
            "architecture": header.architecture,
            "n_ctx": self.context_length,
            "n_ctx_trained": trained,
            "n_gpu_layers": opts.n_gpu_layers,
            "n_batch": self.llm.n_batch if self.llm is not None else kw["n_batch"],
            "threads": f"{self.llm.n_threads}/{self.llm.n_threads_batch}" if self.llm is not None else None,
            "rope": f"freq_base {base:g}" + (f", freq_scale {kw['rope_freq_scale']:g}" if kw["rope_freq_scale"] else "")
            if base else None,
            "flash_attn": {-1: "auto (llama.cpp decides)", 0: False, 1: True}.get(
                int(self.llm.context_params.flash_attn_type), opts.flash_attn) if self.llm is not None else opts.flash_attn,
            "cache_type": opts.cache_type if opts.cache_type == "fp16" or opts.flash_attn
            else f"K {opts.cache_type}, V fp16",
            "gpu_offload": self._gpu_offload,
        }

    # -- generation ------------------------------------------------------------------------------
    @staticmethod
    def sampling_kwargs(options: GenerationOptions) -> dict[str, Any]:
        """``Llama.generate`` sampling arguments with the Transformers loader's meanings: temperature 0
        is greedy; top_k 0, top_p 1, min_p 0, typical_p 1 and repetition_penalty 1 each disable their
        step. llama-cpp-python's own defaults (top_k 40, top_p 0.95, min_p 0.05) are never used."""
        return {
            "temp": options.temperature,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "min_p": options.min_p,
            "typical_p": options.typical_p,
            "repeat_penalty": options.repetition_penalty,
        }

    def generate_tokens(self, request: Request) -> Iterator[int]:
        llm, prompt_ids, cancel = self.llm, request.prompt_ids, request.cancel
        assert prompt_ids is not None
        limit = min(request.options.max_new_tokens, (self.context_length or 0) - len(prompt_ids))
        self.reused_tokens = 0
        self.draft_counts = None
        if limit <= 0:
            return
        if request.images:  # computed here, images and all; generate() goes on from it
            prompt_ids = self._evaluate_images(request)
        elif request.reuse_prefix:  # generate(reset=True) keeps the longest prefix the context shares with the prompt
            kept = list(llm._input_ids[: llm.n_tokens])
            self.reused_tokens = next(
                (i for i, (a, b) in enumerate(zip(kept, prompt_ids[:-1], strict=False)) if a != b),
                min(len(kept), len(prompt_ids) - 1),
            )
        else:
            llm.reset()
        seed = request.seed
        llm.set_seed(seed if seed != LLAMA_DEFAULT_SEED else LLAMA_DEFAULT_SEED - 1)
        eos = self._eos
        produced = 0
        logprobs = llamacpp_recorder(self, request)
        constraint = self._constraint_processor(request)
        if request.options.active_samplers():  # text-generation-webui's samplers: llama.cpp's chain, in its order
            chain = llamacpp_chain(llm, request.options, prompt_ids, sorted(eos), constraint.get("logits_processor"))
            llm._init_sampler = lambda **_: chain  # what generate() builds its sampler with, for this call
        with self._speculating(request, bool(constraint) or logprobs is not None) as counts:
            tokens = llm.generate(prompt_ids, reset=True, **self.sampling_kwargs(request.options), **constraint)
            try:
                for token in tokens:
                    if cancel.is_set():
                        return
                    if logprobs is not None:  # the logits the token was just sampled from
                        logprobs.keep(llamacpp_last_logits(llm))
                        logprobs.add(int(token))
                    if counts is not None:
                        counts.produced(int(token))
                    yield int(token)
                    produced += 1
                    if token in eos or produced >= limit or cancel.is_set():
                        return
            finally:
                tokens.close()
                llm.__dict__.pop("_init_sampler", None)

    @contextlib.contextmanager
    def _speculating(self, request: Request, exact_steps: bool) -> Iterator[Any]:
        """The drafter of this generation set on the ``Llama`` (``--prompt-lookup``: llama-cpp-python's
        ``LlamaPromptLookupDecoding``; else the ``--draft-model``), yielding its counts; ``None`` and no
        drafting when neither is asked for, or when the request needs one token a step (a constraint or
        --logprobs with a draft model: a note says it runs without drafting)."""
        from ..speculative import DraftCounts

        n = request.options.prompt_lookup
        self.draft_counts = None
        if not n and (self.draft is None or exact_steps):
            if self.draft is not None:
                warnings.warn("--draft-model sits out this request: a constraint or --logprobs needs one token a step",
                              NbllmWarning, stacklevel=4)
            yield None
            return
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        from ._speculative import draft_classes, llama_logits_all

        if n and self.draft is not None:
            warnings.warn("--prompt-lookup drafts this request; the --draft-model sits it out", NbllmWarning, stacklevel=4)
        drafter = LlamaPromptLookupDecoding(num_pred_tokens=n) if n else self.draft
        counts = DraftCounts("prompt lookup" if n else "draft model")
        wrapper = self._drafts if self._drafts is not None else draft_classes()[0]()
        wrapper.drafter, wrapper.counts = drafter, counts
        llm, kept = self.llm, self.llm.draft_model
        llm.draft_model = wrapper
        try:
            with llama_logits_all(llm):
                yield counts
        finally:
            wrapper.drafter, wrapper.counts = None, None
            llm.draft_model = kept
            self.draft_counts = counts

    def _constraint_processor(self, request: Request) -> dict[str, Any]:
        """``logits_processor`` for a request with a constraint (structured output): the same llguidance
        matcher as the Transformers loader, over the GGUF's vocabulary, masking the logits before
        llama.cpp's samplers; no keyword without one."""
        from ..constraints import Constraint, llamacpp_compiler, numpy_processor

        constraint = Constraint.from_options(request.options)
        self.grammar_seconds = None
        if constraint is None:
            return {}
        if self.constraints is None:
            self.constraints = llamacpp_compiler(self.llm, None)
        compiled = self.constraints.compile(constraint)
        self.grammar_seconds = compiled.seconds
        return {"logits_processor": [numpy_processor(compiled, len(request.prompt_ids or ()))]}

    def token_scores(self, rows: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0) -> list[Any]:
        return llamacpp_scores(self.llm, rows, starts, top)

    # -- LoRA adapters (GGUF) -----------------------------------------------------------------------
    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """GGUF LoRA adapters set on the loaded context with their scales (llama.cpp's
        ``llama_adapter_lora_init`` / ``llama_set_adapters_lora``): the model is not reloaded. Each new
        adapter is checked against the model's header first; adapters no longer wanted are freed."""
        import llama_cpp

        assert self.header is not None and self.source is not None
        before = dict(self._lora)
        handles = {a.name: before[a.name][0] for a in adapters if a.name in before and before[a.name][1].same_weights(a)}
        new = [a for a in adapters if a.name not in handles]
        for adapter in new:
            check_gguf_adapter(adapter, self.header, self.source.name)
        made: list[Any] = []
        try:
            for adapter in new:
                LOG.clear()
                handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(adapter.path).encode("utf-8"))
                if not handle:
                    reason = _llama_reason(LOG.errors())
                    raise LoadError(f"llama.cpp could not load the adapter {adapter.name}"
                                    + (f": llama.cpp says {reason!r}" if reason else ""),
                                    "check that it was made for this model; download it again if it is damaged")
                made.append(handle)
                handles[adapter.name] = handle
            self._set_context_adapters([(handles[a.name], a.scale) for a in adapters])
        except BaseException:
            for handle in made:
                llama_cpp.llama_adapter_lora_free(handle)
            raise
        for name, (handle, _) in before.items():
            if handles.get(name) is not handle:
                llama_cpp.llama_adapter_lora_free(handle)
        self._lora = {a.name: (handles[a.name], a) for a in adapters}
        self.llm.reset()  # the kept KV cache was computed with other weights

    def _set_context_adapters(self, pairs: list[tuple[Any, float]]) -> None:
        import llama_cpp

        n = len(pairs)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[h for h, _ in pairs]) if n else None
        scales = (ctypes.c_float * n)(*[s for _, s in pairs]) if n else None
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, handles, n, scales):
            raise LoadError("llama.cpp refused to set the adapters on the model", "remove the last adapter and try again")

    def _free_adapters(self) -> None:
        """Take the adapters off the context and free them (before the model is freed)."""
        if not self._lora:
            return
        import llama_cpp

        if self.llm is not None:
            self._set_context_adapters([])
        for handle, _ in self._lora.values():
            llama_cpp.llama_adapter_lora_free(handle)
        self._lora = {}


@contextlib.contextmanager
def _tolerant_chat_templates(llama_cpp: Any) -> Iterator[list[str]]:
    """While loading, record a chat template that does not compile instead of failing the load.

    llama-cpp-python compiles every chat template of the GGUF when it loads the model, so one syntax
    error makes the whole load fail — although nbllm renders chats itself and raw prompts need no
    template. The yielded list receives ``line N: message`` for each template that does not compile."""
    import jinja2

    module = llama_cpp.llama_chat_format
    original = module.Jinja2ChatFormatter
    broken: list[str] = []

    class Tolerant(original):  # type: ignore[misc, valid-type]
        def __init__(self, template: str, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(template, *args, **kwargs)
            except jinja2.TemplateSyntaxError as exc:
                broken.append(f"line {exc.lineno}: {exc.message}")
                self.template = template

        def to_chat_handler(self) -> Any:
            return super().to_chat_handler() if hasattr(self, "_environment") else None

    module.Jinja2ChatFormatter = Tolerant
    try:
        yield broken
    finally:
        module.Jinja2ChatFormatter = original


def _import_llama_cpp() -> Any:
    """``llama_cpp``, or an error that says how to install it (or why the installed one is broken)."""
    try:
        import llama_cpp
    except ImportError:
        raise missing_dependency("llama-cpp-python", "llamacpp") from None
    except (OSError, RuntimeError) as exc:
        raise LoadError(
            f"llama-cpp-python is installed but its C library cannot be loaded ({_first_line(exc)})",
            "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python",
        ) from None
    return llama_cpp


def _is_memory_message(line: str) -> bool:
    low = line.lower()
    return "alloc" in low or "out of memory" in low or "memory" in low and "not enough" in low


def _llama_reason(said: list[str]) -> str | None:
    """The most telling of llama.cpp's error lines, without function-name prefixes: the first one
    that says more than "failed to load model"."""
    reasons = []
    for line in said:
        text = line
        while True:
            head, sep, rest = text.partition(": ")
            if sep and (head.replace("_", "").isalnum() and " " not in head or head == "error loading model"):
                text = rest
            else:
                break
        if text and text.lower() not in ("failed to load model", "error loading model"):
            reasons.append(text)
    return reasons[0] if reasons else (said[-1] if said else None)


def _load_fix(said: list[str]) -> str:
    text = " ".join(said).lower()
    if "unknown model architecture" in text:
        return "this llama-cpp-python does not know the model's architecture; upgrade llama-cpp-python"
    if "cache" in text or "flash" in text:
        return "try again without --cache-type or --flash-attn"
    return "download the file again; if it keeps failing, load with --verbose to see llama.cpp's log"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = [
    "CACHE_TYPES",
    "GGUFHeader",
    "LlamaCppLoader",
    "N_CTX_CAP",
    "default_n_ctx",
    "llama_kwargs",
    "read_gguf_header",
    "rope_freq_base",
]
