"""LoRA adapters on real tiny models: greedy text equals PEFT's and llama-cpp-python's own, stacking equals
PEFT's weighted stacking, removal gives the base text back, every bad adapter is one line with the model
unchanged, records name the adapters, and %llm_lora, downloads and the settings panel go through the library."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

import nbllm
from nbllm import adapters, models, testing
from nbllm.errors import LoadError, ModelNotFoundError, NbllmError, NoModelLoadedError, OptionError
from nbllm.frontend import command
from nbllm.gguf_file import read_gguf_header

try:
    from hubserver import hub  # noqa: F401 - a fixture
except ImportError:  # tests/ imported as a package
    from tests.hubserver import hub  # noqa: F401

PROMPT = "Hello, world"
N = 20
BIG = dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
"""The conftest's ``tiny_model_64`` sizes (bitsandbytes 4-bit on CPU needs multiples of 64)."""


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh models folder (and so a fresh loras/ beside it)."""
    folder = tmp_path / "models"
    monkeypatch.setenv(models.ENV_VAR, str(folder))
    models.set_models_dir(None)
    yield folder


@pytest.fixture(scope="session")
def peft_a() -> Path:
    return testing.tiny_peft_adapter()


@pytest.fixture(scope="session")
def peft_b() -> Path:
    """Another adapter on other modules, attention and MLP."""
    return testing.tiny_peft_adapter(seed=2, targets=("k_proj", "o_proj", "up_proj"))


@pytest.fixture(scope="session")
def gguf_a() -> Path:
    return testing.tiny_gguf_adapter()


def greedy(engine: Any, n: int = N) -> str:
    return str(engine.generate(PROMPT, temperature=0, max_new_tokens=n).text)


def hf_greedy(model: Any, folder: Path, n: int = N) -> str:
    """Greedy text of a Transformers (or PEFT) model itself, decoded as the engine decodes."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def hf_model(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------- the tiny adapters


def test_tiny_adapters_are_deterministic_and_in_each_formats_layout(tmp_path):
    first = testing.tiny_peft_adapter(tmp_path / "a")
    second = testing.tiny_peft_adapter(tmp_path / "b")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    config = json.loads((first / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    g1, g2 = testing.tiny_gguf_adapter(tmp_path / "a.gguf"), testing.tiny_gguf_adapter(tmp_path / "b.gguf")
    assert g1.read_bytes() == g2.read_bytes()
    header = read_gguf_header(g1)
    assert header.is_adapter and header.metadata["adapter.type"] == "lora"
    assert header.metadata["adapter.lora.alpha"] == 8.0
    assert header.tensors["blk.0.attn_q.weight.lora_a"] == (64, 4)  # ggml order: inputs, rank
    assert header.tensors["blk.1.attn_v.weight.lora_b"] == (4, 64)  # rank, outputs


def test_the_gguf_form_on_llama_cpp_gives_the_peft_forms_text_on_transformers(engine, tiny_model, tiny_gguf, peft_a,
                                                                               gguf_a):
    engine.load(tiny_model)
    nbllm.lora_add(peft_a)
    with_peft = engine.generate(PROMPT, temperature=0, max_new_tokens=N).token_ids
    engine.load(tiny_gguf)
    nbllm.lora_add(gguf_a)
    assert engine.generate(PROMPT, temperature=0, max_new_tokens=N).token_ids == with_peft


# ------------------------------------------------------------------------------- Transformers (PEFT)


def test_greedy_text_with_an_adapter_equals_peftmodels_and_differs_from_the_base(engine, tiny_model, peft_a):
    from peft import PeftModel

    engine.load(tiny_model)
    base = greedy(engine)
    applied = nbllm.lora_add(peft_a)
    assert [a.name for a in applied] == [peft_a.name]
    text = greedy(engine)
    assert text == hf_greedy(PeftModel.from_pretrained(hf_model(tiny_model), peft_a), tiny_model)
    assert text != base


def test_after_remove_the_base_text_and_the_models_own_modules_come_back(engine, tiny_model, peft_a, peft_b):
    import torch

    engine.load(tiny_model)
    base = greedy(engine)
    nbllm.lora_add(peft_a)
    nbllm.lora_add(peft_b, 0.5)
    nbllm.lora_remove(peft_a.name)
    assert greedy(engine) not in (base, "")
    assert nbllm.lora_clear() == ()
    assert greedy(engine) == base
    model = engine.loader.model
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(model, "peft_config")


def test_two_stacked_adapters_equal_pefts_weighted_stacking(engine, tiny_model, peft_a, peft_b):
    from peft import PeftModel

    reference = PeftModel.from_pretrained(hf_model(tiny_model), peft_a, adapter_name="a")
    reference.load_adapter(peft_b, adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.7, 0.5], "ab", combination_type="cat")
    reference.set_adapter("ab")
    engine.load(tiny_model)
    nbllm.lora_add(peft_a, 0.7)
    nbllm.lora_add(peft_b, 0.5)
    assert greedy(engine, 30) == hf_greedy(reference, tiny_model, 30)


def test_adding_an_applied_adapter_again_changes_its_scale_in_place(engine, tiny_model, peft_a, peft_b):
    engine.load(tiny_model)
    base = greedy(engine)
    nbllm.lora_add(peft_a)
    nbllm.lora_add(peft_b)
    applied = nbllm.lora_add(peft_a, 0.0)
    assert [(a.name, a.scale) for a in applied] == [(peft_a.name, 0.0), (peft_b.name, 1.0)]
    nbllm.lora_remove(peft_b.name)
    assert greedy(engine) == base  # scale 0: no effect


@pytest.mark.parametrize("bits", [8, 4])
def test_adapters_on_4_and_8_bit_models_equal_peftmodel_on_the_same_quantized_base(engine, tiny_model_64, bits):
    import torch
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    adapter = testing.tiny_peft_adapter(**BIG)
    if bits == 8:
        options: dict[str, Any] = {"load_in_8bit": True}
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        options = {"load_in_4bit": True, "compute_dtype": "float32"}
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    engine.load(tiny_model_64, **options)
    base = greedy(engine)  # the model runs before the adapter comes (4-bit CPU weights are repacked then)
    nbllm.lora_add(adapter)
    text = greedy(engine)
    reference = PeftModel.from_pretrained(hf_model(tiny_model_64, quantization_config=quantization,
                                                   device_map={"": "cpu"}), adapter)
    assert text == hf_greedy(reference, tiny_model_64) and text != base
    nbllm.lora_clear()
    assert greedy(engine) == base


# -------------------------------------------------------------------------------------- llama.cpp (GGUF)


def test_greedy_text_with_a_gguf_adapter_equals_llama_cpp_pythons_own(engine, tiny_gguf, gguf_a):
    llama_cpp = pytest.importorskip("llama_cpp")
    engine.load(tiny_gguf)
    base = greedy(engine)
    nbllm.lora_add(gguf_a, 0.5)
    text = greedy(engine)
    reference = llama_cpp.Llama(str(tiny_gguf), lora_path=str(gguf_a), lora_scale=0.5, verbose=False, n_ctx=2048)
    try:
        completion = reference.create_completion(PROMPT, max_tokens=N, temperature=0)["choices"][0]["text"]
    finally:
        reference.close()
    # llama-cpp-python drops bytes that are not UTF-8 (errors="ignore"); nbllm shows them as U+FFFD
    assert text.replace("\ufffd", "") == completion and text != base
    nbllm.lora_remove(gguf_a.name)
    assert greedy(engine) == base


def test_gguf_adapters_stack_and_survive_unload(engine, tiny_gguf, gguf_a):
    other = testing.tiny_gguf_adapter(seed=2, targets=("k_proj", "o_proj", "up_proj"))
    engine.load(tiny_gguf)
    nbllm.lora_add(gguf_a)
    one = greedy(engine)
    nbllm.lora_add(other, 0.5)
    assert greedy(engine) != one
    nbllm.unload()  # adapters are freed before the model: no crash, nothing applied after
    engine.load(tiny_gguf)
    assert engine.adapters == ()


# ----------------------------------------------------------------------------- bad adapters: one line each


def _renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of a PEFT adapter whose module ``old`` is called ``new`` (config and weights)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text().replace(old, new))
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file({k.replace(old, new): v for k, v in load_file(str(src / "adapter_model.safetensors")).items()},
              str(dst / "adapter_model.safetensors"))
    return dst


def _gguf_adapter(path: Path, arch: str = "llama", kind: str = "lora") -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, kind)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


def _truncated(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
        weights = dst / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        return dst
    dst.write_bytes(src.read_bytes()[:-100])
    return dst


PEFT_CASES = {
    "another size": (lambda t: testing.tiny_peft_adapter(**BIG), "made for a model of another size"),
    "a deeper model": (lambda t: testing.tiny_peft_adapter(num_layers=4), "made for a larger model"),
    "another architecture": (lambda t: _renamed(testing.tiny_peft_adapter(), t / "gpt2", "q_proj", "c_attn"),
                             "targets modules"),
    "a rank its config does not say": (
        lambda t: _with_config(testing.tiny_peft_adapter(), t / "r8", r=8), "says rank 8 but its weights have rank 4"),
    "a config its weights do not match": (  # found only once PEFT injected its layers: they are taken out again
        lambda t: _with_config(testing.tiny_peft_adapter(), t / "qkv", target_modules=["k_proj", "q_proj", "v_proj"]),
        "for which its weights hold nothing"),
    "a gguf adapter": (lambda t: testing.tiny_gguf_adapter(), "which the transformers loader does not apply"),
    "a missing path": (lambda t: t / "nowhere", "no adapter"),
    "no weights": (lambda t: _without_weights(testing.tiny_peft_adapter(), t / "empty"), "has no adapter weights"),
    "damaged weights": (lambda t: _truncated(testing.tiny_peft_adapter(), t / "cut"), "truncated or damaged"),
    "a model": (lambda t: testing.tiny_gguf_model(), "is a model, not a LoRA adapter"),
    "not an adapter": (lambda t: t, "is not a LoRA adapter folder"),
}


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def _without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").unlink()
    return dst


GGUF_CASES = {
    "another size": (lambda t: testing.tiny_gguf_adapter(**BIG), "made for a model of another size"),
    "a deeper model": (lambda t: testing.tiny_gguf_adapter(num_layers=4), "which tiny-llama"),
    "another architecture": (lambda t: _gguf_adapter(t / "gpt2.gguf", arch="gpt2"), "made for a gpt2 model"),
    "another kind of adapter": (lambda t: _gguf_adapter(t / "cvec.gguf", kind="control_vector"), "control_vector"),
    "a peft adapter": (lambda t: testing.tiny_peft_adapter(), "which the llama.cpp loader does not apply"),
    "a damaged file": (lambda t: _truncated(testing.tiny_gguf_adapter(), t / "cut.gguf"), "truncated or damaged"),
    "a model": (lambda t: testing.tiny_gguf_model(), "is a model, not a LoRA adapter"),
}


FORMS = {"transformers": ("tiny_model", "peft_a", PEFT_CASES), "gguf": ("tiny_gguf", "gguf_a", GGUF_CASES)}


@pytest.mark.parametrize("form, case", [(form, case) for form, (_, _, cases) in FORMS.items() for case in cases])
def test_each_bad_adapter_is_one_line_and_the_model_and_its_adapters_stay(request, engine, tmp_path, form, case):
    model, good, cases = FORMS[form]
    make, words = cases[case]
    bad = make(tmp_path)
    engine.load(request.getfixturevalue(model))
    nbllm.lora_add(request.getfixturevalue(good), 0.5)
    before, applied = greedy(engine), engine.adapters
    with pytest.raises(NbllmError) as err:
        nbllm.lora_add(bad)
    assert words in one_line(err.value)
    assert engine.adapters == applied and greedy(engine) == before


def test_a_failure_after_peft_injected_its_layers_leaves_the_models_own_modules(engine, tiny_model, tmp_path):
    import torch

    bad = _with_config(testing.tiny_peft_adapter(), tmp_path / "qkv", target_modules=["k_proj", "q_proj", "v_proj"])
    engine.load(tiny_model)
    before = greedy(engine)
    with pytest.raises(LoadError, match="the two files do not belong together"):
        nbllm.lora_add(bad)
    assert type(engine.loader.model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert not hasattr(engine.loader.model, "peft_config") and greedy(engine) == before


def test_a_gguf_adapter_is_not_loaded_as_a_model_and_the_listing_says_why(engine, tiny_gguf, gguf_a, isolated):
    engine.load(tiny_gguf)
    with pytest.raises(LoadError, match="a LoRA adapter, not a model") as err:
        engine.load(gguf_a)
    assert command("lora add", gguf_a.name) in one_line(err.value)
    assert engine.status().model == tiny_gguf.name
    isolated.mkdir()
    shutil.copy(gguf_a, isolated / gguf_a.name)
    (entry,) = models.ModelsFolder().list()
    assert entry.status == "not loadable: a LoRA adapter, not a model"


def test_no_model_loaded_and_unknown_names_are_one_line(engine, peft_a):
    with pytest.raises(NoModelLoadedError):
        nbllm.lora_add(peft_a)
    engine.load(testing.tiny_transformers_model())
    with pytest.raises(ModelNotFoundError, match="no adapter 'nope'"):
        nbllm.lora_add("nope")
    with pytest.raises(OptionError, match="no adapter 'nope' is applied"):
        nbllm.lora_remove("nope")
    with pytest.raises(OptionError, match="--scale 9.0 is above 4.0"):
        nbllm.lora_add(peft_a, 9)


def test_check_functions_name_the_cause_without_a_model(peft_a):
    """The PEFT checks are pure: the adapter's tensor shapes against a module table."""
    adapter = adapters.adapter_from_path(peft_a)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    shapes = {f"{q}.lora_A.weight": (4, 64), f"{q}.lora_B.weight": (64, 4)}
    modules = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 64)}
    adapters.check_peft_adapter(adapter, shapes, modules, "m")
    with pytest.raises(LoadError, match="its model.layers.0.self_attn.q_proj takes 64 features, m's 128"):
        adapters.check_peft_adapter(adapter, shapes, {**modules, "model.layers.0.self_attn.q_proj": (128, 64)}, "m")
    with pytest.raises(LoadError, match="replaces whole modules"):
        adapters.peft_targets(["base_model.model.lm_head.weight"])


# ------------------------------------------------------------------------------------ records, engine


def test_records_name_each_adapter_and_treat_them_as_the_models_identity(engine, tiny_model, peft_a, peft_b):
    engine.load(tiny_model)
    plain = engine.generate(PROMPT, temperature=0, max_new_tokens=2).record.to_dict()["model"]
    assert "adapters" not in plain
    nbllm.lora_add(peft_a)
    nbllm.lora_add(peft_b, 0.5)
    model = engine.generate(PROMPT, temperature=0, max_new_tokens=2).record.to_dict()["model"]
    assert model["adapters"] == engine.model_identity()["adapters"]
    assert [(a["name"], a["scale"], a["format"]) for a in model["adapters"]] == [
        (peft_a.name, 1.0, "peft"), (peft_b.name, 0.5, "peft")]
    import hashlib

    digest = hashlib.sha256((peft_a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert model["adapters"][0]["sha256"] == {"adapter_model.safetensors": digest}
    assert {k: v for k, v in model.items() if k != "adapters"} == plain
    assert f"adapters:  {peft_a.name} ×1, {peft_b.name} ×0.5" in str(engine.status())


def test_a_records_adapters_are_restored_for_a_replay_and_changed_weights_are_refused(engine, tiny_model, peft_a,
                                                                                       tmp_path):
    mine = shutil.copytree(peft_a, tmp_path / "mine")
    engine.load(tiny_model)
    nbllm.lora_add(mine, 0.5)
    first = engine.generate(PROMPT, temperature=0.9, max_new_tokens=N)
    engine.unload()
    engine.load(tiny_model)
    recorded = first.record.to_dict()["model"]["adapters"]
    assert [a.label for a in nbllm.lora_restore(recorded)] == ["mine ×0.5"]
    again = engine.generate(PROMPT, temperature=0.9, max_new_tokens=N, seed=first.seed)
    assert again.text == first.text and again.record.to_dict()["model"]["adapters"] == recorded
    shutil.copy(testing.tiny_peft_adapter(seed=3) / "adapter_model.safetensors", mine)  # other weights, same name
    with pytest.raises(LoadError, match="not the recorded ones"):
        nbllm.lora_restore(recorded)
    assert [a.label for a in engine.adapters] == ["mine ×0.5"]


def test_loading_a_model_drops_its_adapters(engine, tiny_model, tiny_gguf, peft_a):
    engine.load(tiny_model)
    nbllm.lora_add(peft_a)
    engine.load(tiny_model)  # the same model with the same options: nothing happens
    assert engine.adapters != ()
    engine.load(tiny_gguf)
    assert engine.adapters == ()


def test_changing_adapters_settles_an_unfinished_result_first(engine, tiny_model, peft_a):
    engine.load(tiny_model)
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=200)
    chunks = iter(result)
    first = next(chunks)  # half read, left in a variable
    nbllm.lora_add(peft_a)
    assert result.finish_reason == "superseded" and "".join(chunks) == "" and result.text == first
    assert engine.adapters[0].name == peft_a.name


def test_a_generation_being_read_on_another_thread_is_waited_for(engine, tiny_model, peft_a):
    engine.load(tiny_model)
    result = engine.stream(PROMPT, temperature=0, max_new_tokens=40)
    started, text = threading.Event(), []

    def read() -> None:
        for piece in result:
            started.set()
            text.append(piece)

    reader = threading.Thread(target=read)
    result.read_by(reader)
    reader.start()
    started.wait(10)
    nbllm.lora_add(peft_a)
    reader.join(10)
    assert result.finish_reason == "length" and result.completion_tokens == 40


# ------------------------------------------------------------------------------ the adapters folder, magic


def test_names_in_the_adapters_folder_and_the_listing(engine, tiny_model, peft_a, gguf_a, isolated):
    loras = adapters.loras_dir()
    assert loras == isolated.parent / "loras"
    loras.mkdir()
    shutil.copytree(peft_a, loras / "my_lora")
    shutil.copy(gguf_a, loras / "style.gguf")
    _truncated(peft_a, loras / "broken")
    engine.load(tiny_model)
    nbllm.lora_add("my_lora", 0.5)
    listing = nbllm.lora_list()
    rows = {r[0]: r for r in listing.rows()}
    assert rows["my_lora"][1:2] == ("PEFT",) and rows["my_lora"][4] == "applied ×0.5"
    assert rows["style.gguf"][4] == "ready"
    assert rows["broken"][4].startswith("not usable: adapter_model.safetensors is truncated")
    assert listing.applied_line() == f"Applied to {tiny_model.name}: my_lora ×0.5 (PEFT)"
    assert "<table" in listing._repr_html_()
    with pytest.raises(LoadError, match="broken cannot be applied"):
        nbllm.lora_add("broken")


def test_the_magic_adds_lists_removes_and_clears(shell, engine, tiny_model, peft_a, peft_b, capsys):
    shell.run_line_magic("llm_load", str(tiny_model))
    base = greedy(engine)
    capsys.readouterr()
    shell.run_line_magic("llm_lora", f"add {peft_a} --scale 0.5")
    assert capsys.readouterr().out.strip() == f"Applied to {tiny_model.name}: {peft_a.name} ×0.5 (PEFT)"
    shell.run_line_magic("llm_lora", f"add {peft_b}")
    listing = shell.run_line_magic("llm_lora", "")
    assert [a.name for a in listing.applied] == [peft_a.name, peft_b.name]
    shell.run_line_magic("llm_lora", f"remove {peft_a.name}")
    assert capsys.readouterr().out.strip().endswith(f"{peft_b.name} ×1 (PEFT)")
    shell.run_line_magic("llm_lora", "clear")
    assert capsys.readouterr().out.strip() == f"No adapter applied to {tiny_model.name}."
    assert greedy(engine) == base


@pytest.mark.parametrize("line, words", [
    ("add", "needs an adapter"),
    ("remove nope", "no adapter 'nope' is applied"),
    ("remove x --scale 2", "takes no scale"),
    ("add x --scale 5", "is above 4.0"),
    ("frobnicate", "invalid choice"),
])
def test_the_magics_mistakes_are_one_line(shell, engine, tiny_model, line, words):
    shell.run_line_magic("llm_load", str(tiny_model))
    with pytest.raises(UsageError, match=words) as err:
        shell.run_line_magic("llm_lora", line)
    one_line(err.value)


def test_the_settings_panel_applies_scales_and_removes(engine, tiny_model, peft_a, isolated):
    pytest.importorskip("ipywidgets")
    from nbllm.widgets import SettingsPanel

    loras = adapters.loras_dir()
    loras.mkdir(parents=True)
    shutil.copytree(peft_a, loras / "my_lora")
    engine.load(tiny_model)
    panel = SettingsPanel(engine=engine)
    section = panel.lora
    assert section.choice.value == str(loras / "my_lora")
    section.scale.value = 0.25
    section.add_button.click()
    assert panel.messages.error_text == ""
    assert [(a.name, a.scale) for a in engine.adapters] == [("my_lora", 0.25)]
    (row,) = section.applied.children
    assert "my_lora ×0.25" in row.children[0].value
    nbllm.lora_add(peft_a)  # from a cell: the panel shows it after the cell
    panel.refresh()
    assert len(section.applied.children) == 2
    row.children[1].click()  # Remove my_lora
    assert [a.name for a in engine.adapters] == [peft_a.name]
    engine.unload()
    section.add_button.click()
    assert "no model is loaded" in panel.messages.error_text
    panel.close()


# ------------------------------------------------------------------------------------------- downloads


def test_an_adapter_repository_downloads_into_loras_checked_and_applies(engine, tiny_model, peft_a, hub, isolated):
    from nbllm.download import download

    hub.add_folder("org/tiny-lora", peft_a)
    result = download("org/tiny-lora", echo=None)
    assert result.path == adapters.loras_dir() / "org_tiny-lora" and result.adapter
    assert result.summary.endswith(f"Apply it with {command('lora add', 'org_tiny-lora')}.")
    assert not (isolated / "org_tiny-lora").exists()
    assert download("org/tiny-lora", echo=None).downloaded == ()  # complete: nothing fetched again
    assert download("org/tiny-lora", check=True, echo=None).checked
    engine.load(tiny_model)
    (applied,) = nbllm.lora_add("org/tiny-lora")  # a hub id: the local copy
    assert applied.repo_id == "org/tiny-lora" and applied.revision == result.revision
    record = engine.generate(PROMPT, temperature=0, max_new_tokens=2).record.to_dict()
    assert record["model"]["adapters"][0]["revision"] == result.revision


def test_a_gguf_adapter_download_goes_to_loras_and_a_hub_id_downloads_before_applying(engine, tiny_gguf, gguf_a, hub,
                                                                                        isolated):
    hub.add_repo("org/style-GGUF", {"style-LoRA-F32.gguf": gguf_a, "README.md": "a LoRA"})
    engine.load(tiny_gguf)
    (applied,) = nbllm.lora_add("org/style-GGUF")  # not here yet: downloaded first
    assert applied.path == adapters.loras_dir() / "style-LoRA-F32.gguf" and applied.repo_id == "org/style-GGUF"
    assert not (isolated / "style-LoRA-F32.gguf").exists() and not list((isolated / ".nbllm").glob("style*"))
    from nbllm.download import download

    again = download("org/style-GGUF", echo=None)
    assert again.downloaded == () and again.adapter and again.path == applied.path
    assert download("org/style-GGUF", check=True, echo=None).checked


def test_a_dropped_adapter_download_resumes_with_a_range_request_then_moves_to_loras(hub, isolated, monkeypatch):
    from huggingface_hub import constants

    from nbllm.download import download

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # (tiny files: resumes happen at whole chunks)
    adapter = testing.tiny_gguf_adapter(rank=16)
    assert adapter.stat().st_size > 8 * 1024
    hub.add_repo("org/big-lora-GGUF", {"big-lora.gguf": adapter})
    hub.drop_once["big-lora.gguf"] = 4 * 1024 + 100
    result = download("org/big-lora-GGUF", echo=None)
    assert [r.range for r in hub.gets("big-lora.gguf")] == [None, "bytes=4096-"]
    assert result.path == adapters.loras_dir() / "big-lora.gguf" and result.adapter
    assert result.path.read_bytes() == adapter.read_bytes()


def test_a_model_given_as_an_adapter_hub_id_says_so(engine, tiny_model, hub):
    hub.add_folder("org/tiny", tiny_model)
    engine.load(tiny_model)
    with pytest.raises(LoadError, match="org/tiny is a model, not a LoRA adapter") as err:
        nbllm.lora_add("org/tiny")
    assert command("load", "org_tiny") in one_line(err.value)
