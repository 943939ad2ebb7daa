"""A model's shape, read without its weights: from ``config.json``, the JSON headers of its safetensors
files, or a GGUF file's header.

The shape is what memory depends on: the parameters of each block (embeddings, each layer, the head),
split into the ``nn.Linear`` weights that bitsandbytes quantizes and everything it keeps as is
(embeddings, norms, biases and ``lm_head``), plus what the KV cache needs (layers, KV heads, head size).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..errors import LoadError, ModelNotFoundError
from ..frontend import command
from ..gguf_file import file_type_name, quantization_from_name, read_gguf_header
from ..loaders import (
    GGUF_FORMAT,
    TRANSFORMERS_FORMAT,
    file_format,
    folder_format,
    model_files,
    path_format,
    path_kinds,
)
from ..source import ModelSource

DTYPE_BYTES: dict[str, float] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8", 1), "F8_E5M2": ("float8", 1), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip

# Families whose MLP is two matrices (up, down) with LayerNorms, not Llama's gated three with RMSNorms.
_PLAIN_MLP = {"gpt2", "gpt_neox", "gptj", "falcon", "phi", "bloom", "opt", "gpt_bigcode", "starcoder2", "mpt",
              "gpt_neo", "codegen"}
_LEARNED_POSITIONS = {"gpt2", "gpt_bigcode", "opt", "gpt_neo"}
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(embed|wte|wpe|tok_embeddings|word_embeddings)", re.IGNORECASE)
_NORM = re.compile(r"(norm|\bln_|\.ln\d|layernorm)", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    """One placement unit of a model (embeddings, one layer, the head), as parameter counts.

    ``linear_params`` are the weights of ``nn.Linear`` modules that bitsandbytes quantizes;
    ``other_params`` everything it leaves in the model's dtype (embeddings, norms, biases, ``lm_head``).
    ``stored_bytes`` is set for blocks whose size does not depend on load options (a GGUF file's, or a
    checkpoint that is already quantized).
    """

    name: str
    linear_params: int = 0
    linear_rows: int = 0
    """Output rows of those Linear weights (8-bit keeps one float32 scale per row)."""
    linear_modules: int = 0
    """How many Linear modules (4-bit keeps a small lookup table per module)."""
    other_params: int = 0
    stored_bytes: int | None = None

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a model's files without loading its weights."""

    name: str
    format: str
    """``transformers`` (a folder with config.json) or ``gguf``."""
    source: str
    """Where the numbers come from: ``safetensors headers``, ``config.json`` or ``GGUF header``."""
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    blocks: tuple[Block, ...]
    model_type: str | None = None
    trained_context: int | None = None
    dtype: str | None = None
    """The checkpoint's dtype (``float16``, ``bfloat16``, ``float32``), or None if unknown."""
    needs_remote_code: bool = False
    prequantized: str | None = None
    """A checkpoint already quantized (``quantization_config.quant_method``: gptq, awq, bitsandbytes...)."""
    quantization: str | None = None
    """A GGUF file's quantization (``Q4_K_M``...)."""
    path: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """A GGUF file's header key-values (for the llama.cpp KV-cache and context rules)."""
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def layer_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.name.startswith("layer"))

    @property
    def stored_bytes(self) -> int | None:
        if any(b.stored_bytes is None for b in self.blocks):
            return None
        return sum(b.stored_bytes or 0 for b in self.blocks)

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """K and V of one token over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    def describe(self) -> str:
        """One line: family, parameters, layers, dtype or quantization, trained context, source."""
        kind = self.quantization or self.prequantized or self.dtype or "dtype unknown"
        ctx = f", trained context {self.trained_context}" if self.trained_context else ""
        family = f"{self.model_type}, " if self.model_type else ""
        gqa = f" ({self.kv_heads} KV heads)" if self.kv_heads != self.heads else ""
        return (f"{self.name}: {family}{_count(self.params)} parameters, {self.layers} layers, "
                f"{self.heads} heads{gqa}, {kind}{ctx} — read from {self.source}")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------- locating


def locate(model: str | Path | ModelSource) -> Path:
    """The files of ``model``: an existing path, a name in the models folder, or a hub id already
    downloaded there (nothing is downloaded: a shape is read from files on disk, and a folder holding
    only a config.json will do) — :func:`nbllm.resolve.locate`, as a load finds them."""
    from ..resolve import NotDownloaded
    from ..resolve import locate as find

    if isinstance(model, ModelSource):
        return model.files
    try:
        return find(model, download=False, whole=False)
    except NotDownloaded as exc:
        raise ModelNotFoundError(exc.cause, f"download it first: {command('download file', str(model).strip(), 'config.json')} "
                                 "(config.json is enough for an estimate)") from None


def model_shape(model: str | Path | ModelSource | ModelShape, *, file: str | None = None) -> ModelShape:
    """Read the shape of ``model``: a folder, a .gguf file, a models-folder name, or a hub id (its local
    copy if there is one, else its config.json and safetensors headers fetched from the Hub)."""
    if isinstance(model, ModelShape):
        return model
    try:
        path = locate(model)
    except ModelNotFoundError:
        hub = models.parse_hub_id(str(model).strip()) if isinstance(model, str) else None
        if hub is None:
            raise
        return hub_shape(*hub)
    if not path.is_dir() and file_format(path) is None and folder_format(path.parent, [path.name]) is not None:
        path = path.parent  # a folder's marker file (config.json) stands for its folder
    fmt = path_format(path)
    if path.is_dir():
        files = model_files(path)
        if file is not None:
            chosen = [p for p in files if p.name == file] or [p for p in files if re.fullmatch(
                re.escape(file).replace(r"\*", ".*"), p.name)]
            if chosen:
                return gguf_shape(chosen[0])
        if files:  # as models.source_from_path decides: a folder's model files win over its markers
            firsts = [p for p in files if (models.split_gguf_parts(p) or [p])[0] == p]
            return gguf_shape(firsts[0])
    if fmt == TRANSFORMERS_FORMAT and path.is_dir():
        return transformers_shape(path)
    if fmt == GGUF_FORMAT and path.is_file():
        return gguf_shape(path)
    raise ModelNotFoundError(f"{path} is not a model whose shape can be read", f"give {path_kinds()}")


# ------------------------------------------------------------------------------- Transformers models


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal models nest it under ``text_config``)."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and text.get("hidden_size"):
        return {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    return config


def _first(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def config_dtype(config: Mapping[str, Any]) -> str | None:
    value = _first(config, "dtype", "torch_dtype")
    value = str(value).removeprefix("torch.") if value is not None else None
    return value if value in DTYPE_BYTES else None


def trained_context_of(config: Mapping[str, Any]) -> int | None:
    n = _first(config, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
    return int(n) if isinstance(n, (int, float)) and n > 0 else None


def shape_from_config(config: Mapping[str, Any], name: str = "model", path: Path | None = None) -> ModelShape:
    """A shape from ``config.json`` alone: parameter counts computed from the architecture's sizes.

    Exact for Llama-style models (Llama, Mistral, Qwen, Gemma...); GPT-2/NeoX-style families are
    counted with their plain MLP and LayerNorms; mixture-of-experts counts every expert.
    """
    cfg = _text_config(config)
    model_type = cfg.get("model_type")
    h = int(_first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0))
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads", default=0))
    if not (h and layers and heads):
        raise LoadError(f"{name}'s config.json does not give the model's sizes (hidden size, layers, heads)",
                        "check that it is a language model's config.json")
    if cfg.get("multi_query"):
        kv = 1
    else:
        kv = int(_first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=h // heads))
    plain = model_type in _PLAIN_MLP
    inter = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * h)
    vocab = int(_first(cfg, "vocab_size", "padded_vocab_size", default=0))
    tied = bool(cfg.get("tie_word_embeddings", model_type in _PLAIN_MLP))
    q_out, kv_out = heads * head_dim, kv * head_dim

    attn = h * q_out + 2 * h * kv_out + q_out * h
    attn_rows = q_out + 2 * kv_out + h
    bias = 0
    if cfg.get("attention_bias") or plain:
        bias += q_out + 2 * kv_out + h
    elif model_type in ("qwen2", "qwen2_moe", "qwen2_vl"):
        bias += q_out + 2 * kv_out  # Qwen2: biases on q, k and v only
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    if experts:
        moe = int(_first(cfg, "moe_intermediate_size", default=inter))
        mlp = experts * 3 * h * moe + h * experts
        mlp_rows = experts * (2 * moe + h) + experts
        modules = 4 + 3 * experts + 1
        shared = int(_first(cfg, "shared_expert_intermediate_size", default=0) or 0)
        n_shared = int(_first(cfg, "n_shared_experts", default=0) or 0)
        if n_shared and not shared:
            shared = n_shared * moe
        if shared:
            mlp += 3 * h * shared
            mlp_rows += 2 * shared + h
            modules += 3
    elif plain:
        mlp, mlp_rows, modules = 2 * h * inter, inter + h, 4 + 2
        bias += inter + h
    else:
        mlp, mlp_rows, modules = 3 * h * inter, 2 * inter + h, 4 + 3
        if cfg.get("mlp_bias"):
            bias += 2 * inter + h
    norms = 4 * h if plain else 2 * h
    layer = Block("", attn + mlp, attn_rows + mlp_rows, modules, bias + norms)
    embed = vocab * h
    if model_type in _LEARNED_POSITIONS:
        embed += (trained_context_of(cfg) or 0) * h
    head_other = (2 * h if plain else h) + (0 if tied else vocab * h)
    blocks = (
        Block("embeddings", other_params=embed),
        *(Block(f"layer {i}", layer.linear_params, layer.linear_rows, layer.linear_modules, layer.other_params)
          for i in range(layers)),
        Block("head", other_params=head_other),
    )
    quant = config.get("quantization_config")
    prequantized = str(quant.get("quant_method", "quantized")) if isinstance(quant, Mapping) else None
    notes: tuple[str, ...] = ()
    if experts:
        notes = ("mixture of experts: every expert counted, as all of them sit in memory",)
    return ModelShape(
        name=name, format=TRANSFORMERS_FORMAT, source="config.json", layers=layers, hidden_size=h, heads=heads,
        kv_heads=kv, head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, blocks=blocks,
        model_type=model_type, trained_context=trained_context_of(cfg), dtype=config_dtype(cfg),
        needs_remote_code=_needs_remote_code(config), prequantized=prequantized, path=path, notes=notes,
    )


def _needs_remote_code(config: Mapping[str, Any]) -> bool:
    """As the Transformers loader decides it (its own function, when transformers is installed)."""
    if not config.get("auto_map"):
        return False
    try:
        from ..loaders.transformers import needs_remote_code

        return bool(needs_remote_code(dict(config)))
    except ImportError:
        return True


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes): the first 8 + n bytes only."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path.name} is truncated", "download the model again")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise LoadError(f"{path.name} has an impossible header", "download the model again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise LoadError(f"{path.name} has a damaged header", "download the model again") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path.name} has a damaged header", "download the model again")
    return header


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The checkpoint's safetensors files, or None when some listed shard is missing (or there are none)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        files = [folder / s for s in shards]
        return files if all(f.is_file() for f in files) else None
    files = sorted(folder.glob("*.safetensors"))
    return files or None


def transformers_shape(folder: Path) -> ModelShape:
    """The shape of a Transformers model folder: config.json, refined by the safetensors headers when the
    weights are there (exact tensor sizes), without reading any weight."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{folder / 'config.json'} cannot be read ({type(exc).__name__})",
                        "download the model again") from None
    base = shape_from_config(config, folder.name, folder)
    files = _safetensors_files(folder)
    if files is None:
        return base
    try:
        headers = [read_safetensors_header(f) for f in files]
    except (OSError, LoadError):
        return base
    return _refine_with_tensors(base, headers)


def _refine_with_tensors(base: ModelShape, headers: list[dict[str, Any]]) -> ModelShape:
    """Blocks from the tensors themselves: names say where they belong, shapes how big they are."""
    layers: dict[int, dict[str, int]] = {}
    first = {"linear": 0, "rows": 0, "modules": 0, "other": 0, "bytes": 0}
    last = dict(first)
    dtypes: Counter[str] = Counter()
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, Mapping):
                continue
            shape = [int(d) for d in info.get("shape", [])]
            count = 1
            for d in shape:
                count *= d
            kind, size = _SAFETENSORS_DTYPES.get(str(info.get("dtype")), ("unknown", 2))
            offsets = info.get("data_offsets") or [0, count * size]
            nbytes = int(offsets[1]) - int(offsets[0])
            if kind in DTYPE_BYTES:
                dtypes[kind] += count
            match = _LAYER.search("." + name)
            if match:
                slot = layers.setdefault(int(match.group(1)), {"linear": 0, "rows": 0, "modules": 0, "other": 0, "bytes": 0})
            elif _EMBEDDINGS.search(name):
                slot = first
            else:
                slot = last
            slot["bytes"] += nbytes
            if match and len(shape) == 2 and name.endswith(".weight") and not _NORM.search(name):
                slot["linear"] += count
                slot["rows"] += shape[0]
                slot["modules"] += 1
            else:
                slot["other"] += count
    if not layers:
        return base
    stored = base.prequantized is not None

    def block(name: str, s: Mapping[str, int]) -> Block:
        return Block(name, s["linear"], s["rows"], s["modules"], s["other"], s["bytes"] if stored else None)

    blocks = (block("embeddings", first), *(block(f"layer {i}", layers[i]) for i in sorted(layers)),
              block("head", last))
    dtype: str | None = base.dtype or (dtypes.most_common(1)[0][0] if dtypes else None)
    return dataclasses.replace(base, blocks=blocks, source="safetensors headers", dtype=dtype,
                               layers=max(len(layers), base.layers))


# ------------------------------------------------------------------------------------------ GGUF files


def gguf_shape(path: Path) -> ModelShape:
    """The shape of a GGUF model from its header: sizes from the metadata, bytes from the file (every part
    of a split model), split between embeddings, layers and output in proportion to their parameters."""
    parts = models.split_gguf_parts(path) or [path]
    headers = [read_gguf_header(p) for p in parts if p.is_file()]
    meta = headers[0].metadata
    arch = str(meta.get("general.architecture", "llama"))

    def num(key: str, default: float = 0) -> int:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else int(default)

    layers, h = num("block_count"), num("embedding_length")
    heads = num("attention.head_count", 1) or 1
    kv = num("attention.head_count_kv", heads) or heads
    head_dim = num("attention.key_length", h // heads if heads else 0)
    inter = num("feed_forward_length", 4 * h)
    vocab = num("vocab_size")
    experts = num("expert_count")
    config = {
        "model_type": arch, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": inter, "vocab_size": vocab,
        "max_position_embeddings": num("context_length") or None, "num_local_experts": experts or None,
        "moe_intermediate_size": num("expert_feed_forward_length") or None,
    }
    if not (layers and h):
        raise LoadError(f"{path.name}'s header does not give the model's sizes", "download it again")
    base = shape_from_config(config, path.name, path)
    total = sum(hdr.data_end for hdr in headers)
    params = base.params or 1
    blocks = tuple(Block(b.name, b.linear_params, b.linear_rows, b.linear_modules, b.other_params,
                         round(total * b.params / params)) for b in base.blocks)
    code = meta.get("general.file_type")
    quant = file_type_name(code)
    return dataclasses.replace(
        base, format=GGUF_FORMAT, source="GGUF header", blocks=blocks, dtype=None, metadata=dict(meta),
        quantization=quant or quantization_from_name(path.name), needs_remote_code=False, prequantized=None,
    )


# ------------------------------------------------------------------------------------------- the Hub


def hub_shape(repo_id: str, revision: str | None = None) -> ModelShape:
    """The shape of a hub repository from its config.json and its safetensors headers (huggingface_hub
    reads the headers with HTTP range requests: no weight is downloaded). config.json lands in the
    Hugging Face cache, not in the models folder."""
    try:
        from huggingface_hub import HfApi, hf_hub_download

        config_file = hf_hub_download(repo_id, "config.json", revision=revision)
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except Exception as exc:  # offline, not found, gated, no config.json (a GGUF repository)...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(
            f"{repo_id}'s config.json could not be fetched from the Hub ({type(exc).__name__}: {first[:160]})",
            f"check the name and the network, or download the model first: {command('download', repo_id)}",
        ) from None
    base = dataclasses.replace(shape_from_config(config, repo_id), source="config.json from the Hub")
    try:
        meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)  # today's endpoint, not import time's
    except Exception:  # not a safetensors repository: the config's sizes are the shape
        return base
    headers = [
        {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
         for name, t in file.tensors.items()}
        for file in meta.files_metadata.values()
    ]
    return dataclasses.replace(_refine_with_tensors(base, headers), source="safetensors headers from the Hub")
