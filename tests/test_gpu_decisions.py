"""The GPU paths' decisions, made on the CPU (issue 29): device maps built on an empty-weights model,
the attention choice, the dtype, memory margins, error frames cleared, what llama.cpp is told about flash
attention, the bitsandbytes library the machine probe expects. Where a decision asks the machine
(``cuda_devices``, free memory, whether flash-attn is installed) the query is faked, as in the loader's
unit tests; the real thing runs in tests/test_gpu.py on a GPU."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import threading
import weakref
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from nbllm.errors import LoadError, OptionError
from nbllm.loaders import _gpu
from nbllm.loaders.transformers import TransformersLoader, attention_for, pick_attention
from nbllm.options import LoadOptions

PROMPT = "The quick brown fox"
AMPERE = [("NVIDIA A100", (8, 0))]
GiB = 2**30


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """find_spec("flash_attn") answers as if the package were installed (everything else as it is)."""
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))


@pytest.fixture
def ampere_machine(monkeypatch, flash_attn_installed):
    """cuda_devices() and free_memory() answer as on a machine with one A100 (7 GiB free) and 50 GiB RAM."""
    import nbllm.loaders.transformers as module

    monkeypatch.setattr(module, "cuda_devices", lambda: AMPERE)
    monkeypatch.setattr(module, "free_memory", lambda gpus: {**{i: 7 * GiB for i in range(gpus)}, "cpu": 50 * GiB})


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


# -- 1. --compile with flash-attention 2 -------------------------------------------------------------
def test_compile_with_flash_attention_is_refused_and_auto_picks_sdpa_for_it(flash_attn_installed):
    assert pick_attention("auto", AMPERE, dtype="bfloat16")[0] == "flash_attention_2"
    attention, note = pick_attention("auto", AMPERE, dtype="bfloat16", compile=True)
    assert attention == "sdpa" and "--compile's decode step" in (note or "")
    with pytest.raises(OptionError, match="without an attention mask.*Drop --compile, or use --attn sdpa"):
        pick_attention("flash_attention_2", AMPERE, dtype="bfloat16", compile=True)


def test_the_compiled_decode_step_declines_a_model_loaded_with_flash_attention(engine, tiny_model):
    from nbllm.loaders._compiled import unsupported_reason

    engine.load(tiny_model)
    model = engine.loader.model
    assert unsupported_reason(model) is None
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert "passes no attention mask" in (unsupported_reason(model) or "")
    finally:
        model.config._attn_implementation = "sdpa"


# -- 2. auto picks flash-attention only where it runs -------------------------------------------------
def test_auto_attention_picks_flash_only_for_float16_or_bfloat16_models_of_classes_that_have_it(
        flash_attn_installed, tiny_model):
    attention, note = pick_attention("auto", AMPERE, dtype="float32")
    assert attention == "sdpa" and "float32" in (note or "")
    with pytest.raises(OptionError, match="runs only in float16 or bfloat16.*Add --dtype bfloat16"):
        pick_attention("flash_attention_2", AMPERE, dtype="float32")
    assert pick_attention("auto", AMPERE, dtype="float16", supported=False)[0] == "sdpa"
    with pytest.raises(OptionError, match="not implemented for this model's architecture"):
        pick_attention("flash_attention_2", AMPERE, dtype="float16", supported=False)
    assert pick_attention("auto", AMPERE, dtype="float16", supported=None)[0] == "sdpa"  # remote code: unknown
    # the tiny Llama is a float32 checkpoint of a class that implements flash-attention 2
    config = _config(tiny_model)
    assert _gpu.checkpoint_dtype(config) == "float32" and _gpu.attention_support(config) == (True, True)
    assert attention_for(LoadOptions(), config, AMPERE)[0] == "sdpa"
    assert attention_for(LoadOptions(dtype="bfloat16"), config, AMPERE)[0] == "flash_attention_2"
    assert attention_for(LoadOptions(dtype="bfloat16", compile=True), config, AMPERE)[0] == "sdpa"
    assert attention_for(LoadOptions(dtype="bfloat16", flash_attn=False), config, AMPERE)[0] == "sdpa"
    assert attention_for(LoadOptions(load_in_4bit=True), config, AMPERE)[0] == "flash_attention_2"  # float16 on a GPU
    assert _gpu.attention_support({**config, "model_type": "no_such_model"}) == (None, None)


def test_an_explicit_flash_attention_that_cannot_run_is_refused_before_the_model_is_released(
        engine, tiny_model, ampere_machine):
    engine.load(tiny_model, device="cpu")
    with pytest.raises(OptionError, match="runs only in float16 or bfloat16, and this model would run in float32"):
        engine.load(tiny_model, flash_attn=True)
    assert engine.status().model == tiny_model.name and engine.status().options == {"device": "cpu"}


# -- 3./4./5. offloading from a GPU: a dict map, a reserve, a note for an empty GPU --------------------
def _empty(folder: Path, dtype: str = "float32") -> Any:
    from transformers import AutoConfig

    return _gpu.empty_model(AutoConfig.from_pretrained(folder), dtype, remote=False)


def _on_gpu(device_map: dict[str, Any]) -> list[str]:
    return [name for name, device in device_map.items() if isinstance(device, int)]


def test_offloading_from_a_gpu_gives_from_pretrained_a_dict_map_with_quantized_sizes_on_the_gpu(tiny_model_64):
    """A dict map, as bitsandbytes needs to leave offloaded modules unquantized; the GPU's share counted
    at 4-bit size holds more layers than at float32, and what is left goes to the CPU at float32 size."""
    from accelerate.utils import compute_module_sizes

    model = _empty(tiny_model_64)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    sizes = compute_module_sizes(model, dtype=torch.float32)
    layer = sizes["model.layers.0"]
    budget = sizes["model.embed_tokens"] + 2 * layer  # room for the embeddings and ~one float32 layer (and a reserve)
    memory = {0: budget, "cpu": 50 * GiB}
    plain = _gpu.offload_map(model, memory, "float32", None)
    four_bit = _gpu.offload_map(model, memory, "float32", "4bit")
    assert isinstance(plain, dict) and isinstance(four_bit, dict)
    assert plain.get("model.embed_tokens") == 0 and set(plain.values()) == {0, "cpu"}
    assert sum(sizes[n] for n in _on_gpu(four_bit)) > sum(sizes[n] for n in _on_gpu(plain))
    # the CPU's budget is counted at the size the modules keep there (unquantized): beyond it, disk
    rest = [name for name, device in plain.items() if device == "cpu"]
    tight = {0: budget, "cpu": sizes[rest[0]] + 1}
    bounded = _gpu.offload_map(model, tight, "float32", None)
    assert "disk" in bounded.values()
    assert sum(sizes[n] for n, d in bounded.items() if d == "cpu") <= tight["cpu"]


def test_the_4bit_load_turns_on_fp32_cpu_offload_so_transformers_accepts_the_dict_map(tiny_model_64):
    """With the dict map, transformers' bitsandbytes quantizer refuses CPU modules unless
    llm_int8_enable_fp32_cpu_offload is on, and then leaves them unquantized (modules_to_not_convert)."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    config = TransformersLoader._quantization_config(LoadOptions(load_in_4bit=True, cpu_memory=4), on_gpu=True)
    assert config.llm_int8_enable_fp32_cpu_offload is True
    quantizer = Bnb4BitHfQuantizer(config)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = _empty(tiny_model_64)
    quantizer.preprocess_model(model, device_map=device_map, keep_in_fp32_modules=[])
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear  # offloaded: not quantized


def test_a_gpu_split_smaller_than_the_largest_layer_places_nothing_there_and_a_note_says_so(tiny_model_64):
    model = _empty(tiny_model_64)
    memory = {0: int(0.0005 * GiB), "cpu": 50 * GiB}
    device_map = _gpu.offload_map(model, memory, "float32", None)
    assert not _on_gpu(device_map)
    (note,) = _gpu.empty_gpus(device_map, memory)
    assert note.startswith("cuda:0 was given 0.0005 GiB but no layer fits in it") and "--gpu-split" in note
    roomy = {0: 10 * GiB, "cpu": 50 * GiB}
    assert _gpu.empty_gpus(_gpu.offload_map(model, roomy, "float32", None), roomy) == []


def test_offloading_keeps_a_reserve_on_each_gpu_given_no_split(ampere_machine):
    """max_memory turns transformers' own 10% reserve off, so nbllm keeps one where it passes what is free."""
    args = TransformersLoader._device_arguments
    assert args(LoadOptions(cpu_memory=8))["max_memory"] == {0: int(7 * GiB * 0.9), "cpu": 8 * GiB}
    assert args(LoadOptions(disk_offload=True))["max_memory"] == {0: int(7 * GiB * 0.9), "cpu": 50 * GiB}
    assert args(LoadOptions(gpu_split="5"))["max_memory"] == {0: 5 * GiB, "cpu": 50 * GiB}  # the user's share as given


def test_the_fit_estimate_keeps_the_same_reserve_and_says_so(tiny_model_64):
    from nbllm.fit import GPU, Machine, estimate

    machine = Machine(gpus=(GPU("NVIDIA A100", 8 * GiB, (8, 0), free_bytes=4 * GiB),), ram_bytes=64 * GiB)
    offloaded = estimate(tiny_model_64, {"cpu_memory": 8}, machine)
    assert any("up to 90% of its free memory" in n for n in offloaded.notes)
    assert not any("90%" in n for n in estimate(tiny_model_64, {}, machine).notes)
    tiny_share = estimate(tiny_model_64, {"gpu_split": "0.0005"}, machine)
    assert "cuda:0" not in tiny_share.devices or not tiny_share.devices["cuda:0"].blocks
    assert any(n.startswith("cuda:0 gets no layer") for n in tiny_share.notes)
    assert not any("gets no layer" in n for n in estimate(tiny_model_64, {"gpu_split": "1"}, machine).notes)


# -- 6. a failed load's frames are cleared before the previous model comes back ----------------------
class _Held:
    """Stands for what a failing load had built (a partly loaded model)."""


def test_a_failed_load_drops_what_it_built_before_the_previous_model_comes_back(engine, tiny_model, monkeypatch):
    import nbllm.loaders
    from nbllm.loaders import TokenLoader
    from nbllm.source import ModelSource

    built: list[weakref.ref[_Held]] = []

    class HoldsThenOutOfMemory(TokenLoader):
        name: ClassVar[str] = "holds-then-oom"
        formats: ClassVar[frozenset[str]] = frozenset({"holds-then-oom"})

        @classmethod
        def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
            return ModelSource(format="holds-then-oom", name="big", path=Path(spec)) if spec.endswith("-big") else None

        def load(self, source: ModelSource, options: LoadOptions) -> None:
            partial = _Held()  # alive in this frame, as from_pretrained's model is in its own
            built.append(weakref.ref(partial))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def unload(self) -> None: ...
        def tokenize(self, text: str, *, add_special: bool) -> list[int]: return []
        def decode(self, ids: Any) -> str: return ""
        @property
        def eos_token_ids(self) -> frozenset[int]: return frozenset()
        def generate_tokens(self, request: Any) -> Any: return iter(())

    alive_at_restore: list[bool] = []
    restore = type(engine)._restore

    def spying_restore(self: Any, *args: Any) -> bool:
        alive_at_restore.append(built[-1]() is not None)
        return restore(self, *args)

    monkeypatch.setattr(type(engine), "_restore", spying_restore)
    engine.load(tiny_model)
    nbllm.loaders.register(HoldsThenOutOfMemory)
    try:
        with pytest.raises(LoadError) as info:
            engine.load("/models/model-big")
        assert alive_at_restore == [False]  # gone before the previous model was loaded again
        assert "loaded again" in info.value.message and engine.status().model == tiny_model.name
        gc.collect()
        assert built[-1]() is None  # and the error, still held here (as IPython's sys.last_value), keeps nothing
    finally:
        nbllm.loaders.unregister("holds-then-oom")


def test_an_out_of_memory_generation_drops_its_frames_and_the_model_stays(engine):
    import nbllm.loaders
    from nbllm.errors import GenerationError
    from nbllm.loaders import TokenLoader
    from nbllm.source import ModelSource

    refs: list[weakref.ref[_Held]] = []

    class OutOfMemoryMidGeneration(TokenLoader):
        name: ClassVar[str] = "oom-mid-generation"
        formats: ClassVar[frozenset[str]] = frozenset({"oom-mid-generation"})

        @classmethod
        def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
            return ModelSource(format="oom-mid-generation", name="gen", path=Path(spec)) if spec.endswith("-gen") else None

        def load(self, source: ModelSource, options: LoadOptions) -> None:
            self.source, self.options = source, options

        def unload(self) -> None: ...
        def tokenize(self, text: str, *, add_special: bool) -> list[int]: return [1, 2, 3]
        def decode(self, ids: Any) -> str: return "x" * len(ids)
        @property
        def eos_token_ids(self) -> frozenset[int]: return frozenset()

        def generate_tokens(self, request: Any) -> Any:
            kv_cache = _Held()  # what a forward pass holds when CUDA runs out of memory
            refs.append(weakref.ref(kv_cache))
            yield 5
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    nbllm.loaders.register(OutOfMemoryMidGeneration)
    try:
        engine.load("/models/a-gen")
        with pytest.raises(GenerationError) as info:
            engine.generate("hi", max_new_tokens=4)
        assert "out of memory" in info.value.message and engine.loaded
        assert refs[-1]() is None  # the error (alive here, as in sys.last_value) holds no frame's locals
    finally:
        engine.unload()
        nbllm.loaders.unregister("oom-mid-generation")


def test_drop_frames_clears_the_whole_chain_but_not_the_running_frame():
    from nbllm.memory import drop_frames

    def inner() -> None:
        held = _Held()
        refs.append(weakref.ref(held))
        raise RuntimeError("inner")

    def outer() -> None:
        try:
            inner()
        except RuntimeError:
            raise ValueError("outer") from None  # from None still keeps __context__, and its frames

    refs: list[weakref.ref[_Held]] = []
    mine = _Held()
    try:
        outer()
    except ValueError as exc:
        assert refs[0]() is not None
        drop_frames(exc)
        assert refs[0]() is None and mine is not None


# -- 7. --device cpu --flash-attn on a GPU machine ----------------------------------------------------
def test_device_cpu_with_flash_attention_on_a_gpu_machine_is_refused_before_the_model_is_released(
        engine, tiny_model, ampere_machine):
    engine.load(tiny_model, device="cpu")
    with pytest.raises(OptionError, match="FlashAttention 2 needs an NVIDIA GPU and none is available"):
        engine.load(tiny_model, device="cpu", flash_attn=True, dtype="bfloat16")
    assert engine.status().model == tiny_model.name and engine.status().options == {"device": "cpu"}


# -- 8. the 4-bit compute dtype --------------------------------------------------------------------
def test_4bit_on_a_gpu_loads_the_rest_of_the_model_in_the_compute_dtype():
    float32 = {"dtype": "float32"}
    assert _gpu.load_dtype(LoadOptions(load_in_4bit=True), float32, on_gpu=True) == "float16"
    assert _gpu.load_dtype(LoadOptions(load_in_4bit=True, compute_dtype="bfloat16"), float32, on_gpu=True) == "bfloat16"
    assert _gpu.load_dtype(LoadOptions(load_in_4bit=True), float32, on_gpu=False) is None  # the checkpoint's
    assert _gpu.load_dtype(LoadOptions(load_in_4bit=True, dtype="float32"), float32, on_gpu=True) == "float32"
    assert _gpu.load_dtype(LoadOptions(), float32, on_gpu=True) is None


def test_4bit_layers_keep_the_compute_dtype_after_a_generate(engine, tiny_model_64):
    """transformers builds each Linear4bit with --compute-dtype, and bitsandbytes 0.50 keeps it (it would
    adopt the input's dtype at the first forward only for a layer built without one): checked after a
    generate, where that would happen, with a float32 model and bfloat16 compute."""
    import bitsandbytes as bnb

    engine.load(tiny_model_64, load_in_4bit=True, compute_dtype="bfloat16")
    layer = engine.loader.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and engine.loader.model.dtype == torch.float32
    engine.generate(PROMPT, temperature=0, max_new_tokens=2)
    assert layer.compute_type_is_set and layer.compute_dtype == torch.bfloat16


# -- 9. llama.cpp's flash attention: auto, on, off ----------------------------------------------------
def test_flash_attn_is_three_state_in_one_schema_field():
    parser = argparse.ArgumentParser()
    for flags, kwargs in LoadOptions.argparse_arguments():
        parser.add_argument(*flags, **kwargs)
    typed = {line: LoadOptions.typed(parser.parse_args(line.split())).get("flash_attn", "unset")
             for line in ("", "--flash-attn", "--no-flash-attn")}
    assert typed == {"": "unset", "--flash-attn": True, "--no-flash-attn": False}
    assert LoadOptions().flash_attn is None
    assert LoadOptions.from_dict({"flash_attn": "auto"}).flash_attn is None
    assert LoadOptions.from_dict({"flash_attn": "off"}).flash_attn is False
    assert LoadOptions(flash_attn=False).attn_requested == "sdpa"  # off: auto does not pick it
    with pytest.raises(OptionError, match="--no-flash-attn contradicts --attn flash_attention_2"):
        LoadOptions(flash_attn=False, attn="flash_attention_2")
    from nbllm.options import markdown_table

    assert "| `--flash-attn` | auto |" in markdown_table(LoadOptions)
    from nbllm.widgets.settings import option_widget

    widget = option_widget(LoadOptions.spec("flash_attn"))
    assert [label for label, _ in widget.options] == ["auto", "on", "off"] and widget.value is None


def test_llama_cpp_flash_attention_unset_is_llama_cpps_own_auto_where_layers_go_on_a_gpu():
    from nbllm.loaders.llamacpp import flash_attention_type

    assert flash_attention_type(LoadOptions(), gpu=True) == -1  # LLAMA_FLASH_ATTN_TYPE_AUTO
    assert flash_attention_type(LoadOptions(n_gpu_layers=0), gpu=True) == 0
    assert flash_attention_type(LoadOptions(), gpu=False) == 0  # llama-cpp-python's own default on a CPU
    assert flash_attention_type(LoadOptions(flash_attn=True), gpu=False) == 1
    assert flash_attention_type(LoadOptions(flash_attn=False), gpu=True) == 0


def test_llama_cpp_is_given_auto_through_its_context_and_generates(tiny_gguf):
    """llama-cpp-python's Llama takes flash_attn as a bool; auto reaches llama.cpp through the context
    parameters it is created with (a real Llama, on the CPU, where llama.cpp's auto also runs)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from nbllm.loaders.llamacpp import _flash_attention

    with _flash_attention(llama_cpp, llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO):
        llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=64, verbose=False)
    assert llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert len(llm.tokenize(b"Hello")) > 0 and llm("Hello", max_tokens=4, temperature=0)["choices"]
    plain = llama_cpp.Llama(str(tiny_gguf), n_ctx=64, verbose=False)  # the patch is gone after the load
    assert plain.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


def test_llama_cpp_loads_with_the_three_settings(shell, engine, tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    expected = {"": -1 if on_gpu else 0, " --flash-attn": 1, " --no-flash-attn": 0}
    for flags, value in expected.items():
        shell.run_line_magic("llm_load", f"{tiny_gguf}{flags}")
        assert engine.loader.llm.context_params.flash_attn_type == value
        assert engine.generate(PROMPT, temperature=0, max_new_tokens=2).completion_tokens == 2
    assert "options:   --no-flash-attn" in str(engine.status())


# -- 10. offloaded memory is told apart; the bitsandbytes library the probe expects -------------------
def test_model_memory_counts_cpu_offloaded_weights_as_cpu_and_the_rest_of_meta_as_disk(engine, tiny_model):
    from nbllm.memory import model_memory

    engine.load(tiny_model)
    model = engine.loader.model
    layer1 = sum(p.numel() * p.element_size() for p in model.model.layers[1].parameters())
    total = sum(model_memory(model).values())
    model.model.layers[0].to("meta")  # as accelerate leaves a module it offloads (its weights kept elsewhere)
    model.model.layers[1].to("meta")
    device_map = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": 0,
                  "model.rotary_emb": 0, "lm_head": 0}
    memory = model_memory(model, device_map)
    assert memory == {"cpu": total - layer1, "disk": layer1}  # layer 0 is in RAM, only layer 1 on disk
    assert model_memory(model)["cpu"] < total - layer1  # without the map, all of meta counts as disk


@pytest.mark.parametrize(("torch_cuda", "expected"), [
    ("12.8", "libbitsandbytes_cuda128.so"), ("12.9", "libbitsandbytes_cuda128.so"),
    ("12.0", "libbitsandbytes_cuda121.so"), ("11.7", "libbitsandbytes_cuda118.so"),
    ("13.1", "libbitsandbytes_cuda130.so"), ("14.0", None),
])
def test_the_probe_expects_the_bitsandbytes_library_bitsandbytes_itself_falls_back_to(monkeypatch, torch_cuda, expected):
    from nbllm.fit.machine import bitsandbytes_library

    monkeypatch.delenv("BNB_CUDA_VERSION", raising=False)
    shipped = [f"libbitsandbytes_cuda{v}.so" for v in ("118", "121", "124", "126", "128", "130", "132")]
    assert bitsandbytes_library(torch_cuda, ["libbitsandbytes_cpu.so", *shipped]) == expected
    monkeypatch.setenv("BNB_CUDA_VERSION", "126")
    assert bitsandbytes_library(torch_cuda, shipped) == "libbitsandbytes_cuda126.so"


def test_the_installed_bitsandbytes_has_a_library_for_a_cuda_it_does_not_name_exactly():
    pytest.importorskip("bitsandbytes")
    from nbllm.fit.machine import bitsandbytes_cuda_support

    assert bitsandbytes_cuda_support("12.9") is True  # 0.50 ships 12.8 and falls back to it


# -- 11. --compile's CUDA graphs are freed on the thread that holds them -------------------------------
def test_releasing_cuda_graphs_resets_them_on_the_generation_thread(monkeypatch):
    import torch._inductor.cudagraph_trees as trees

    from nbllm.loaders._compiled import release_cuda_graphs
    from nbllm.streaming import run_on_generation_thread

    threads: list[str] = []
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: threads.append(threading.current_thread().name))
    release_cuda_graphs()
    run_on_generation_thread(release_cuda_graphs)  # from the generation thread itself: no deadlock
    assert len(threads) == 2 and all(name.startswith("nbllm-generate") for name in threads)
    assert threading.current_thread().name not in threads


def test_a_cuda_compiled_decoder_releases_its_graphs_on_unload(engine, tiny_model, monkeypatch):
    import torch._inductor.cudagraph_trees as trees

    from nbllm.loaders._compiled import CompiledDecoder

    engine.load(tiny_model)
    calls: list[str] = []
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: calls.append(threading.current_thread().name))
    decoder = CompiledDecoder(engine.loader.model, 128)
    decoder.release()
    assert calls == []  # a CPU decoder records no CUDA graphs
    decoder = CompiledDecoder(engine.loader.model, 128)
    decoder.on_cuda = True  # as on a GPU (compiling is not needed to test the release)
    decoder.release()
    assert len(calls) == 1 and calls[0].startswith("nbllm-generate")


def test_flash_attentions_dtype_failure_is_a_known_one_with_its_fix():
    """flash-attn's own check (csrc: "FlashAttention only support fp16 and bf16 data type"), raised at the
    first generate of a float32 model; the text cannot be raised for real without flash-attn and a GPU."""
    from nbllm.errors import GenerationError
    from nbllm.fit.failures import failure_error, failure_kind

    error = RuntimeError("FlashAttention only support fp16 and bf16 data type")
    assert failure_kind(error) == "flash_dtype"
    explained = failure_error(error, during="generation")
    assert isinstance(explained, GenerationError) and "--dtype bfloat16" in explained.message


def test_a_saved_unticked_flash_attn_box_leaves_the_choice_to_auto(tmp_path):
    from nbllm.fit.settings import saved_settings

    (tmp_path / "config-user.yaml").write_text("tiny.gguf:\n  loader: llama.cpp\n  flash_attn: false\n  ctx_size: 512\n"
                                               "big.gguf:\n  loader: llama.cpp\n  flash_attn: true\n")
    small = saved_settings("tiny.gguf", models_dir=tmp_path)
    assert small is not None and "flash_attn" not in small.load and small.load.get("n_ctx") == 512
    big = saved_settings("big.gguf", models_dir=tmp_path)
    assert big is not None and big.load.get("flash_attn") is True
