"""The Transformers loader with every load option, on real tiny models (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import nbllm
from nbllm.errors import LoadError, OptionError
from nbllm.loaders.transformers import TransformersLoader, pick_attention, rope_parameters
from nbllm.models import source_from_path
from nbllm.options import LoadOptions

PROMPT = "The quick brown fox"


def direct_greedy(engine, prompt: str, n: int) -> list[int]:
    """What transformers itself generates greedily with the loaded model (the reference)."""
    model, tok = engine.loader.model, engine.loader.tokenizer
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=n)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def bitsandbytes_reference(path, config, n: int) -> tuple[list[int], torch.Tensor]:
    """What transformers + bitsandbytes give when called directly with ``config`` (the reference for
    nbllm's --load-in-8bit/--load-in-4bit): greedy tokens, and the logits of the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": "cpu"})
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    tokens = model.generate(**ids, do_sample=False, max_new_tokens=n)[0, ids["input_ids"].shape[1] :].tolist()
    return tokens, logits


def prompt_logits(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.loader.model(**engine.loader.tokenizer(PROMPT, return_tensors="pt")).logits


def test_greedy_output_equals_model_generate_token_for_token(engine, tiny_model):
    engine.load(tiny_model)
    result = engine.generate(PROMPT, temperature=0, max_new_tokens=24)
    assert result.token_ids == direct_greedy(engine, PROMPT, 24)
    assert result.text == engine.loader.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.finish_reason == "length" and result.completion_tokens == 24


def test_streamed_text_equals_the_finished_text(engine, tiny_model):
    engine.load(tiny_model)
    streamed = list(engine.stream(PROMPT, temperature=0, max_new_tokens=30))
    assert "".join(streamed) == engine.generate(PROMPT, temperature=0, max_new_tokens=30).text
    assert len(streamed) > 5  # it really streamed, piece by piece


def test_same_seed_same_sampled_text_other_seed_other_text(engine, tiny_model):
    engine.load(tiny_model)
    a = engine.generate(PROMPT, temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=20)
    b = engine.generate(PROMPT, temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=20)
    c = engine.generate(PROMPT, temperature=1.0, top_p=0.95, seed=4321, max_new_tokens=20)
    assert a.token_ids == b.token_ids != c.token_ids
    assert a.seed == 1234 and a.record.seed == 1234


def test_a_seed_is_drawn_and_recorded_and_reproduces_the_output(engine, tiny_model):
    engine.load(tiny_model)
    first = engine.generate(PROMPT, temperature=1.0, max_new_tokens=16)
    assert first.record.generation_options["seed"] == first.seed
    again = engine.generate(PROMPT, **{**first.record.generation_options, "stop": ()})
    assert again.token_ids == first.token_ids


def test_sampling_options_reach_generate(engine, tiny_model):
    engine.load(tiny_model)
    loader = engine.loader
    kw = loader.generation_kwargs(nbllm.GenerationOptions(temperature=0.5, top_p=0.8, top_k=7, min_p=0.05,
                                                          typical_p=0.9, repetition_penalty=1.2, max_new_tokens=9))
    assert {k: kw[k] for k in ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p",
                               "repetition_penalty", "max_new_tokens")} == {
        "do_sample": True, "temperature": 0.5, "top_p": 0.8, "top_k": 7, "min_p": 0.05, "typical_p": 0.9,
        "repetition_penalty": 1.2, "max_new_tokens": 9}
    greedy = loader.generation_kwargs(nbllm.GenerationOptions(temperature=0))
    assert greedy["do_sample"] is False


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0, "repetition_penalty": 1.3},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.02, "typical_p": 0.95, "repetition_penalty": 1.1},
        {"temperature": 1.5, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
    ],
    ids=["greedy", "every-sampler", "wide"],
)
def test_output_equals_model_generate_with_the_same_kwargs_and_seed(engine, tiny_model, options):
    """nbllm's tokens are what transformers' own ``model.generate`` gives with the kwargs nbllm maps the
    options to, sampled ones under the same seed (``transformers.set_seed``): the mapping and the seed
    mean in nbllm what they mean in transformers."""
    from transformers import set_seed

    engine.load(tiny_model)
    loader = engine.loader
    opts = nbllm.GenerationOptions(max_new_tokens=24, seed=2024, **options)
    ours = engine.generate(PROMPT, opts)
    ids = loader.tokenizer(PROMPT, return_tensors="pt")
    set_seed(2024)
    direct = loader.model.generate(**ids, **loader.generation_kwargs(opts))[0, ids["input_ids"].shape[1] :].tolist()
    assert ours.token_ids == direct
    if opts.greedy:
        assert direct != direct_greedy(engine, PROMPT, 24)  # the penalty really reached generate
    else:
        set_seed(2025)
        other = loader.model.generate(**ids, **loader.generation_kwargs(opts))[0, ids["input_ids"].shape[1] :]
        assert other.tolist() != direct  # it is sampled: another seed, other tokens


def test_repetition_penalty_is_applied(engine, tiny_model):
    engine.load(tiny_model)
    plain = engine.generate(PROMPT, temperature=0, max_new_tokens=40)
    penalized = engine.generate(PROMPT, temperature=0, max_new_tokens=40, repetition_penalty=5.0)
    model, tok = engine.loader.model, engine.loader.tokenizer
    ids = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, do_sample=False, max_new_tokens=40, repetition_penalty=5.0)
    assert penalized.token_ids == ref[0, ids["input_ids"].shape[1]:].tolist()
    assert penalized.token_ids != plain.token_ids


def test_stop_strings_end_generation_and_are_never_shown(engine, tiny_model):
    engine.load(tiny_model)
    full = engine.generate(PROMPT, temperature=0, max_new_tokens=40).text
    stop = full[10:13]
    cut = engine.generate(PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in "".join(cut.chunks)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementations_load_and_agree(engine, tiny_model, attn):
    engine.load(tiny_model, attn=attn)
    assert engine.loader.model.config._attn_implementation == attn
    assert engine.status().details["attn_implementation"] == attn
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=12).token_ids == direct_greedy(engine, PROMPT, 12)


def test_auto_attention_says_what_it_picked(engine, tiny_model):
    status = engine.load(tiny_model)
    assert status.details["attn_implementation"] == "sdpa"
    assert any("auto picked sdpa" in n and "no" in n.lower() for n in status.placement.notes)


@pytest.mark.parametrize("flags", [{"attn": "flash_attention_2"}, {"flash_attn": True}])
def test_flash_attention_without_a_gpu_is_one_line_naming_the_cause(engine, tiny_model, flags):
    engine.load(tiny_model)
    with pytest.raises(OptionError) as info:
        engine.load(tiny_model, **flags)
    assert "FlashAttention 2 needs an NVIDIA GPU" in info.value.message
    assert "--attn sdpa" in info.value.message
    assert engine.loaded and engine.status().options == {}  # the model it had is kept


def test_flash_attention_reasons_in_order(monkeypatch):
    """Each missing piece is named: no GPU, an old GPU, the package (checked where CUDA is absent)."""
    with pytest.raises(OptionError, match="needs an NVIDIA GPU"):
        pick_attention("flash_attention_2", [])
    with pytest.raises(OptionError, match=r"Ampere or newer GPU .* Tesla T4 is 7\.5"):
        pick_attention("flash_attention_2", [("Tesla T4", (7, 5))])
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(OptionError, match="needs the flash-attn package.*pip install flash-attn"):
        pick_attention("flash_attention_2", [("NVIDIA A100", (8, 0))])
    assert pick_attention("auto", [("NVIDIA A100", (8, 0))])[0] == "sdpa"


def test_load_in_8bit(engine, tiny_model_64):
    status = engine.load(tiny_model_64, load_in_8bit=True)
    import bitsandbytes as bnb

    layer = engine.loader.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert status.details["quantization"] == "8-bit (bitsandbytes LLM.int8)"  # the flags' words, not a dict
    assert "bnb_4bit" not in str(status)
    ours = engine.generate(PROMPT, temperature=0, max_new_tokens=24).token_ids
    from transformers import BitsAndBytesConfig

    tokens, logits = bitsandbytes_reference(tiny_model_64, BitsAndBytesConfig(load_in_8bit=True), 24)
    assert ours == tokens and torch.equal(prompt_logits(engine), logits)  # token for token, bit for bit


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "compute_dtype", "expected_compute"),
    [("nf4", False, "auto", torch.float32), ("fp4", True, "bfloat16", torch.bfloat16)],
)
def test_load_in_4bit_with_quant_type_double_quant_and_compute_dtype(
    engine, tiny_model_64, quant_type, double_quant, compute_dtype, expected_compute
):
    engine.load(tiny_model_64, load_in_4bit=True, quant_type=quant_type, double_quant=double_quant,
                compute_dtype=compute_dtype)
    import bitsandbytes as bnb

    layer = engine.loader.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == quant_type
    assert layer.compute_dtype == expected_compute
    assert (layer.weight.quant_state.nested) is double_quant
    result = engine.generate(PROMPT, temperature=0, max_new_tokens=24)
    assert result.record.load_options["load_in_4bit"] is True
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=expected_compute)
    tokens, logits = bitsandbytes_reference(tiny_model_64, config, 24)
    assert result.token_ids == tokens and torch.equal(prompt_logits(engine), logits)


def test_dtype_with_4bit_sets_the_layers_left_unquantized_and_says_so(engine, tiny_model_64):
    import bitsandbytes as bnb

    with pytest.warns(nbllm.errors.NbllmWarning, match="--dtype sets only the layers left unquantized"):
        engine.load(tiny_model_64, load_in_4bit=True, dtype="bfloat16")
    model = engine.loader.model
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == torch.float32  # --compute-dtype auto


def test_dtype(engine, tiny_model):
    engine.load(tiny_model, dtype="bfloat16")
    assert engine.loader.model.dtype == torch.bfloat16
    engine.load(tiny_model, dtype="auto")
    assert engine.loader.model.dtype == torch.float32  # the checkpoint's


def test_alpha_value_is_dynamic_ntk_scaling_keeping_rope_theta(engine, tiny_model):
    theta = json.loads((tiny_model / "config.json").read_text())["rope_parameters"]["rope_theta"]
    engine.load(tiny_model, alpha_value=2.5)
    rope = engine.loader.model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("dynamic", 2.5, theta)
    assert engine.loader.model.model.rotary_emb.rope_type == "dynamic"
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_compress_pos_emb_is_linear_scaling_and_changes_the_output(engine, tiny_model):
    engine.load(tiny_model)
    plain = engine.generate(PROMPT, temperature=0, max_new_tokens=16).token_ids
    engine.load(tiny_model, compress_pos_emb=4)
    rope = engine.loader.model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == ("linear", 4.0) and "rope_theta" in rope
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=16).token_ids != plain


def test_dynamic_scaling_changes_outputs_only_past_the_trained_context(engine, tmp_path):
    from nbllm.testing import tiny_transformers_model

    short = tiny_transformers_model(tmp_path / "short", max_position_embeddings=32)
    engine.load(short)
    plain = engine.generate("a b c", temperature=0, max_new_tokens=40).token_ids
    engine.load(short, alpha_value=4.0)
    scaled = engine.generate("a b c", temperature=0, max_new_tokens=40).token_ids
    n_prompt = len(engine.loader.tokenize("a b c", add_special=True))
    inside = 32 - n_prompt
    assert scaled[:inside] == plain[:inside]
    assert scaled != plain


def test_rope_parameters_helper_refuses_models_without_rope():
    with pytest.raises(OptionError, match="needs a model with rotary position embeddings"):
        rope_parameters(None, LoadOptions(alpha_value=2.0))
    assert rope_parameters({"rope_theta": 5.0, "rope_type": "default"}, LoadOptions()) == {
        "rope_theta": 5.0, "rope_type": "default"}


def test_cpu_memory_offloads_layers_to_disk_and_output_matches(engine, tiny_model_64):
    engine.load(tiny_model_64)
    reference = engine.generate(PROMPT, temperature=0, max_new_tokens=12).token_ids
    status = engine.load(tiny_model_64, cpu_memory=0.001, disk_offload=True)
    assert "disk" in status.placement.devices and "cpu" in status.placement.devices
    assert status.placement.memory_bytes.get("disk", 0) > 0
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=12).token_ids == reference


def test_everything_offloaded_to_disk_still_generates(engine, tiny_model_64):
    status = engine.load(tiny_model_64, cpu_memory=0.0001, disk_offload=True)
    assert set(status.placement.devices) == {"disk"}
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_cpu_memory_too_small_without_disk_offload_says_how_to_fix(engine, tiny_model_64):
    with pytest.raises(LoadError, match=r"does not fit in the memory allowed .*--disk-offload"):
        engine.load(tiny_model_64, cpu_memory=0.0001)


def test_device_map_arguments_for_every_memory_option():
    args = TransformersLoader._device_arguments
    assert args(LoadOptions()) == {"device_map": {"": "cpu"}}
    assert args(LoadOptions(cpu_memory=0)) == {"device_map": {"": "cpu"}}  # 0: no limit, as in the guide
    assert args(LoadOptions(cpu_memory=8)) == {"device_map": "auto", "max_memory": {"cpu": "8.0GiB"}}
    with_disk = args(LoadOptions(cpu_memory=8, disk_offload=True))
    assert with_disk["offload_folder"].endswith("offload")
    assert args(LoadOptions(gpu_split="20,7")) == {"device_map": {"": "cpu"}}  # no GPU: no effect (a note says so)
    with pytest.raises(OptionError, match="--device cuda was asked for but no CUDA GPU"):
        args(LoadOptions(device="cuda"))


def test_device_map_arguments_on_a_gpu_machine(monkeypatch):
    """With a GPU every device is named to accelerate (it uses no other): the GPU with --gpu-split's share
    or else what it has free, the CPU with --cpu-memory or else the RAM available (no limit)."""
    import nbllm.loaders.transformers as module

    monkeypatch.setattr(module, "cuda_devices", lambda: [("NVIDIA GeForce RTX 4060", (8, 9))])
    monkeypatch.setattr(module, "free_memory", lambda gpus: {**{i: (7 - i) * 2**30 for i in range(gpus)},
                                                              "cpu": 50 * 2**30})
    args = TransformersLoader._device_arguments
    assert args(LoadOptions()) == {"device_map": {"": "cuda"}}
    reserved = int(7 * 2**30 * 0.9)  # what is free less a 10% reserve (issue 29: max_memory turns transformers' off)
    assert args(LoadOptions(cpu_memory=8)) == {"device_map": "auto", "max_memory": {0: reserved, "cpu": 8 * 2**30}}
    assert args(LoadOptions(disk_offload=True))["max_memory"] == {0: reserved, "cpu": 50 * 2**30}
    assert args(LoadOptions(gpu_split="5", cpu_memory=8))["max_memory"] == {0: 5 * 2**30, "cpu": 8 * 2**30}
    assert args(LoadOptions(gpu_split="5"))["max_memory"] == {0: 5 * 2**30, "cpu": 50 * 2**30}
    assert args(LoadOptions(device="cpu", cpu_memory=8))["max_memory"] == {"cpu": "8.0GiB"}


def test_quantized_offload_turns_on_fp32_cpu_offload():
    cfg = TransformersLoader._quantization_config(LoadOptions(load_in_8bit=True, cpu_memory=4), on_gpu=False)
    assert cfg.llm_int8_enable_fp32_cpu_offload is True
    cfg = TransformersLoader._quantization_config(LoadOptions(load_in_4bit=True), on_gpu=True)
    assert cfg.llm_int8_enable_fp32_cpu_offload is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16  # auto on a GPU


@pytest.fixture
def remote_code_model(tiny_model, tmp_path) -> Path:
    """The tiny model dressed as a custom architecture whose code ships with it (auto_map)."""
    folder = tmp_path / "custom_model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="nbllm_custom", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'nbllm_custom'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


def test_trust_remote_code_is_off_by_default_and_named_in_the_error(engine, tiny_model, remote_code_model):
    engine.load(tiny_model)
    with pytest.raises(LoadError) as info:
        engine.load(remote_code_model)
    assert "needs --trust-remote-code" in info.value.message
    assert engine.status().model == tiny_model.name  # nothing was released


def test_trust_remote_code_runs_the_models_code(engine, remote_code_model):
    engine.load(remote_code_model, trust_remote_code=True)
    assert type(engine.loader.model).__name__ == "CustomForCausalLM"
    assert len(engine.generate(PROMPT, temperature=0, max_new_tokens=4).token_ids) == 4


def test_truncated_safetensors_is_caught_before_the_current_model_is_released(engine, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    engine.load(tiny_model)
    with pytest.raises(LoadError, match="model.safetensors is truncated or damaged. Download the model again"):
        engine.load(broken)
    assert engine.status().model == tiny_model.name
    assert len(engine.generate(PROMPT, max_new_tokens=3).token_ids) == 3


def test_missing_weights_and_unreadable_config(engine, tiny_model, tmp_path):
    empty = tmp_path / "noweights"
    shutil.copytree(tiny_model, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="has no weights"):
        engine.load(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="config.json cannot be read"):
        TransformersLoader.check(source_from_path(empty), LoadOptions())


def test_load_failure_after_release_loads_the_previous_model_again(engine, tiny_model, tmp_path):
    """A failure that no check can foresee (here: a tokenizer file that cannot be parsed)."""
    bad = tmp_path / "badtok"
    shutil.copytree(tiny_model, bad)
    (bad / "tokenizer.json").write_text("{broken")
    engine.load(tiny_model)
    with pytest.raises(LoadError) as info:
        engine.load(bad)
    assert f"could not load {bad.name}" in info.value.message
    assert f"({tiny_model.name} is loaded again)" in info.value.message
    assert engine.status().model == tiny_model.name
    assert len(engine.generate(PROMPT, max_new_tokens=3).token_ids) == 3


def test_options_with_no_effect_without_a_gpu_are_accepted_with_one_note_each(shell, engine, tiny_model, capsys):
    shell.run_line_magic("llm_load", f"{tiny_model} --gpu-split 20,7")
    out = capsys.readouterr().out
    assert "note: --gpu-split has no effect here: no CUDA GPU is available" in out and engine.loaded
    shell.run_line_magic("llm_load", f"{tiny_model} --cpu-memory 4")
    assert "note: without a GPU, --cpu-memory 4 limits the RAM of the whole model" in capsys.readouterr().out
    shell.run_line_magic("llm_load", f"{tiny_model} --disk-offload")
    assert "note: --disk-offload has no effect here without --cpu-memory" in capsys.readouterr().out


def test_loads_and_8bit_generation_keep_library_noise_out_of_the_cell(shell, engine, tiny_model_64, capfd):
    """transformers' "Loading weights" bar and bitsandbytes' kernel and cast warnings never reach the cell."""
    shell.run_line_magic("llm_load", f"{tiny_model_64} --load-in-8bit")
    shell.run_cell_magic("llm", "--temperature 0 --max-new-tokens 4", "Hello")
    shell.run_line_magic("llm_load", f"{tiny_model_64} --load-in-4bit")
    captured = capfd.readouterr()
    noise = captured.out + captured.err
    for line in ("Loading weights", "gemm_4bit_forward", "MatMul8bitLt", "inputs will be cast"):
        assert line not in noise, line
    assert "Loaded " in captured.out
