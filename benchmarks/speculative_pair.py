"""A draft/target pair for ``--draft-model`` benchmarks: the real model as the draft, and a target about
``factor`` times its size that computes the draft's function plus layers of its own.

No pair of real models with one tokenizer and a 10x size gap is on this machine (the only real model is
SmolLM2-135M-Instruct), and random built-in models never agree with each other. So the target is built from
the draft: its 30 layers, then as many more as make the target ``factor`` times the draft's parameters (342
for 10x). Each added layer is a copy of one of the draft's layers whose two output projections
(``o_proj``/``attn_output`` and ``down_proj``/``ffn_down``) are scaled by ``scale``: with ``scale`` 0 the added
layers add nothing to the residual stream, so the target's outputs are the draft's exactly and every drafted
token is accepted (the best case); a small ``scale`` moves the target's logits away from the draft's, and
fewer drafts are accepted — the benchmark reports the acceptance it got with the ratio. The target still
reads and multiplies every weight of every layer, so its decode costs what a model of its size costs (on a
CPU, mostly the memory traffic of its weights).

Both formats: a Transformers folder built from :func:`nbllm.testing.real_model_transformers` (float32), and
a GGUF file from :func:`nbllm.testing.real_model_gguf` (its Q4_1 tensors copied; the scaled projections
dequantized and stored as float16). Built once into ``$NBLLM_CACHE_DIR/tiny`` and reused.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import machine  # noqa: F401  (puts the repository on sys.path)

from nbllm.testing import _cache_root, real_model_gguf, real_model_transformers

_LAYER_PARAMS_HF = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
_SCALED_HF = ("self_attn.o_proj", "mlp.down_proj")
_SCALED_GGUF = ("attn_output", "ffn_down")


def added_layers(draft_params: int, layer_params: int, factor: float) -> int:
    """How many layers make the target ``factor`` times the draft's parameters."""
    return math.ceil((factor - 1) * draft_params / layer_params)


def _name(kind: str, factor: float, scale: float) -> Path:
    return _cache_root() / f"speculative-target-{kind}-x{factor:g}-s{scale:g}"


def transformers_target(factor: float = 10.0, scale: float = 0.0) -> tuple[Path, Path, dict[str, Any]]:
    """(draft folder, target folder, facts) for the Transformers loader."""
    import torch
    from safetensors.torch import load_file, save_file

    draft = real_model_transformers()
    target = _name("transformers", factor, scale)
    facts_file = target / "pair.json"
    if facts_file.is_file():
        return draft, target, json.loads(facts_file.read_text())
    config = json.loads((draft / "config.json").read_text())
    weights = load_file(str(draft / "model.safetensors"))
    layers = int(config["num_hidden_layers"])
    per_layer = sum(t.numel() for k, t in weights.items() if k.startswith("model.layers.0."))
    draft_params = sum(t.numel() for t in weights.values())
    extra = added_layers(draft_params, per_layer, factor)
    for j in range(extra):
        src = j % layers
        for part in _LAYER_PARAMS_HF:
            tensor = weights[f"model.layers.{src}.{part}.weight"]
            weights[f"model.layers.{layers + j}.{part}.weight"] = (tensor * scale if part in _SCALED_HF
                                                                  else tensor.clone())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in draft.iterdir():
        if item.is_file() and item.name not in ("model.safetensors", "config.json") and not item.name.startswith("."):
            shutil.copy2(item, tmp / item.name)
    config["num_hidden_layers"] = layers + extra
    if "layer_types" in config:
        config["layer_types"] = [config["layer_types"][0]] * (layers + extra)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    with torch.no_grad():
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    facts = {"draft_params": draft_params, "target_params": sum(t.numel() for t in weights.values()),
             "draft_layers": layers, "target_layers": layers + extra, "scale": scale}
    (tmp / "pair.json").write_text(json.dumps(facts))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return draft, target, facts


def gguf_target(factor: float = 10.0, scale: float = 0.0) -> tuple[Path, Path, dict[str, Any]]:
    """(draft file, target file, facts) for the llama.cpp loader."""
    import gguf
    import numpy as np

    draft = real_model_gguf()
    folder = _name("gguf", factor, scale)
    target = folder / "target.gguf"
    facts_file = folder / "pair.json"
    if facts_file.is_file() and target.is_file():
        return draft, target, json.loads(facts_file.read_text())
    reader = gguf.GGUFReader(draft)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    block_key = f"{arch}.block_count"
    layers = int(reader.fields[block_key].contents())
    tensors = {t.name: t for t in reader.tensors}
    per_layer = sum(int(t.n_elements) for n, t in tensors.items() if n.startswith("blk.0."))
    draft_params = sum(int(t.n_elements) for t in reader.tensors)
    extra = added_layers(draft_params, per_layer, factor)

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "target.gguf.partial"
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers + extra if field.name == block_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)

    def scaled(tensor: Any) -> Any:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32) * scale
        return values.astype(np.float16)

    added: list[tuple[str, Any, Any]] = []  # (name, source tensor, data to write or None for the source's bytes)
    for j in range(extra):
        src = j % layers
        for name, tensor in tensors.items():
            prefix = f"blk.{src}."
            if not name.startswith(prefix):
                continue
            part = name[len(prefix):]
            new = f"blk.{layers + j}.{part}"
            added.append((new, tensor, scaled(tensor) if part.split(".")[0] in _SCALED_GGUF else None))
    total_params = draft_params
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    for new, tensor, data in added:
        total_params += int(tensor.n_elements)
        if data is None:
            writer.add_tensor_info(new, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        else:
            writer.add_tensor_info(new, data.shape, data.dtype, data.nbytes, gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for _, tensor, data in added:
        writer.write_tensor_data(tensor.data if data is None else data, tensor_endianess=reader.endianess)
    writer.close()
    partial.rename(target)
    facts = {"draft_params": draft_params, "target_params": total_params, "draft_layers": layers,
             "target_layers": layers + extra, "scale": scale}
    facts_file.write_text(json.dumps(facts))
    return draft, target, facts
