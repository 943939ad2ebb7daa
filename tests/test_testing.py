"""Tests for nbllm.testing: the built-in tiny models (Transformers and GGUF forms)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need

from nbllm import testing
from nbllm.errors import OptionError

ROUND_TRIP = 'Olá, mundo! 🤖 {"a": [1, 2]}'
TEXTS = [
    ROUND_TRIP,
    "Hello world",
    "The quick brown fox's tail, isn't it?\n\n  Indented  code:\tx = [1, 2, 3]\n",
    "Ação e coração — crème brûlée, 3.14159 ≠ 42 ✨🇧🇷",
]
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.tiny_transformers_model(tmp_path_factory.mktemp("hf") / "model", **SMALL)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.tiny_gguf_model(tmp_path_factory.mktemp("gguf") / "model.gguf", **SMALL)


@pytest.fixture(scope="module")
def hf(hf_path: Path):
    need("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(hf_path), AutoTokenizer.from_pretrained(hf_path)


@pytest.fixture(scope="module")
def llm(gguf_path: Path):
    llama_cpp = need("llama_cpp")
    return llama_cpp.Llama(model_path=str(gguf_path), verbose=False, n_ctx=256, seed=0)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) >= n:
            break
    return out


# ----------------------------------------------------------------------------------- Transformers form


def test_transformers_form_files(hf_path: Path) -> None:
    names = _files(hf_path)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert name in names
    assert not any(n.startswith(".tmp") for n in _files(hf_path.parent))


def test_transformers_form_loads_and_generates(hf) -> None:
    import torch

    model, tok = hf
    assert model.config.bos_token_id == tok.bos_token_id == 1
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.config.pad_token_id == tok.pad_token_id == 3
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == testing.count_params(**SMALL)
    enc = tok("Hello world", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert len(new) == 12  # special tokens (EOS) are never greedy picks
    assert len(set(new)) > 3  # varied, not one repeated token
    ids = enc["input_ids"]
    for token in new:  # each one is the most likely next token of the loaded weights
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        assert int(logits.argmax()) == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert tok.decode(new).strip()  # text, not only special tokens


def test_transformers_form_loads_every_saved_weight(hf, hf_path: Path) -> None:
    """from_pretrained took each tensor from the file: none was left out or freshly initialized."""
    import torch
    from safetensors.torch import load_file

    model, _ = hf
    saved = load_file(hf_path / "model.safetensors")
    state = model.state_dict()
    assert set(saved) <= set(state) and len(saved) > 0
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_tokenizer_round_trips_utf8(hf) -> None:
    _, tok = hf
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    raw = testing.build_tokenizer()
    enc = raw.encode(ROUND_TRIP)
    assert enc.ids == tok(ROUND_TRIP)["input_ids"]
    assert raw.decode(enc.ids) == ROUND_TRIP


def test_build_tokenizer_vocab() -> None:
    tok = testing.build_tokenizer(512)
    assert tok.get_vocab_size() == 512
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    big = testing.build_tokenizer(4096)  # more than the corpus gives: padded with reserved tokens
    assert big.get_vocab_size() == 4096
    assert big.id_to_token(4095).startswith("<|reserved_")
    assert big.encode(ROUND_TRIP).ids[:5] == tok.encode(ROUND_TRIP).ids[:5]
    with pytest.raises(ValueError, match="vocab_size"):
        testing.build_tokenizer(100)


def test_chat_template(hf) -> None:
    _, tok = hf
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Olá!"},
        {"role": "assistant", "content": "Oi."},
        {"role": "user", "content": "Tudo bem?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>") and text.count("<s>") == 1
    assert text.endswith("<|assistant|>\n")
    assert "<|system|>\nYou are terse.</s>\n" in text
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert (Path(tok.name_or_path) / "chat_template.jinja").read_text() == testing.TINY_CHAT_TEMPLATE


def test_no_chat_template(tmp_path: Path) -> None:
    path = testing.tiny_transformers_model(tmp_path / "m", chat_template=False)
    assert not (path / "chat_template.jinja").exists()


def test_dtype(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    path = testing.tiny_transformers_model(tmp_path / "m", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ determinism and caching


def test_deterministic_files(tmp_path: Path, hf_path: Path, gguf_path: Path) -> None:
    again = testing.tiny_transformers_model(tmp_path / "again", **SMALL)
    names = _files(hf_path)
    assert _files(again) == names
    match, mismatch, errors = filecmp.cmpfiles(hf_path, again, names, shallow=False)
    assert mismatch == [] and errors == []
    gguf_again = testing.tiny_gguf_model(tmp_path / "again.gguf", **SMALL)
    assert filecmp.cmp(gguf_path, gguf_again, shallow=False)
    other = testing.tiny_transformers_model(tmp_path / "seed1", **SMALL, seed=1)
    assert not filecmp.cmp(hf_path / "model.safetensors", other / "model.safetensors", shallow=False)


def test_cache_dir_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = testing.tiny_transformers_model(**SMALL)
    assert path.parent == tmp_path / "cache" / "tiny"
    assert "h64" in path.name and "l2" in path.name and "kv2" in path.name
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert testing.tiny_transformers_model(**SMALL) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert testing.tiny_transformers_model(**SMALL, seed=3) != path
    gguf = testing.tiny_gguf_model(**SMALL)
    assert gguf.parent == path.parent and gguf.suffix == ".gguf"
    stamp = gguf.stat().st_mtime_ns
    assert testing.tiny_gguf_model(**SMALL) == gguf and gguf.stat().st_mtime_ns == stamp
    assert testing.tiny_gguf_model(**SMALL, file_type="f16") != gguf
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_explicit_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert testing.tiny_transformers_model(empty) == empty
    assert (empty / "model.safetensors").exists()
    # the same folder with other parameters: the old tiny model is replaced
    testing.tiny_transformers_model(empty, num_layers=1)
    from safetensors import safe_open

    with safe_open(empty / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("model.layers.1.")]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no nbllm tiny model"):
        testing.tiny_transformers_model(foreign)
    # GGUF: a folder receives <name>.gguf; a foreign file is never overwritten
    in_folder = testing.tiny_gguf_model(tmp_path / "ggufs")
    assert in_folder.parent == tmp_path / "ggufs" and in_folder.suffix == ".gguf"
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not an nbllm tiny model"):
        testing.tiny_gguf_model(bogus)
    assert bogus.read_bytes() == b"not a gguf"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 100}, "multiple of 64"),
        ({"hidden_size": 32}, "at least 64"),
        ({"intermediate_size": 100}, "intermediate_size must be a multiple of 64"),
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"num_heads": 4, "num_kv_heads": 3}, "divisible by num_kv_heads"),
        ({"hidden_size": 64, "num_heads": 64}, "even"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": 200}, "vocab_size"),
        ({"hidden_size": 64.0}, "integer"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sizes(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        testing.tiny_transformers_model(tmp_path / "m", **kwargs)
    with pytest.raises(OptionError, match=message):
        testing.tiny_gguf_model(tmp_path / "m.gguf", **kwargs)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


def test_bad_dtype_and_file_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        testing.tiny_transformers_model(tmp_path / "m", dtype="int8")
    with pytest.raises(ValueError, match="file_type"):
        testing.tiny_gguf_model(tmp_path / "m.gguf", file_type="q4_0")  # type: ignore[arg-type]


def test_model_for_params() -> None:
    kw = testing.model_for_params(100_000_000)
    assert kw["hidden_size"] % 64 == 0 and kw["intermediate_size"] % 64 == 0
    assert abs(testing.count_params(**kw) - 100_000_000) < 5_000_000
    assert kw["hidden_size"] // kw["num_heads"] == 64
    small = testing.model_for_params(1_000_000)
    assert abs(testing.count_params(**small) - 1_000_000) < 200_000
    with pytest.raises(ValueError, match="too small"):
        testing.model_for_params(1000)


def test_import_is_light() -> None:
    code = "import sys, nbllm.testing; print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'gguf') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- GGUF form


def test_gguf_loads_and_has_chat_template(llm) -> None:
    assert llm.metadata["tokenizer.chat_template"] == testing.TINY_CHAT_TEMPLATE
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2"
    assert llm.n_vocab() == 512 and llm.token_bos() == 1 and llm.token_eos() == 2
    out = llm("Hello world", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] == 8


def test_gguf_tokenizes_like_transformers(llm, hf) -> None:
    _, tok = hf
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"]
        assert llm.detokenize(tok(text)["input_ids"][1:]).decode() == text


def test_gguf_greedy_matches_transformers(llm, hf) -> None:
    model, tok = hf
    enc = tok("Olá, mundo!", return_tensors="pt")
    expected = model.generate(**enc, max_new_tokens=10, do_sample=False)[
        0, enc["input_ids"].shape[1] :
    ].tolist()
    assert _llama_greedy(llm, enc["input_ids"][0].tolist(), 10) == expected


def test_gguf_without_chat_template(tmp_path: Path) -> None:
    llama_cpp = need("llama_cpp")
    path = testing.tiny_gguf_model(tmp_path / "m.gguf", chat_template=False, file_type="f16")
    llm = llama_cpp.Llama(model_path=str(path), verbose=False, n_ctx=64)
    assert "tokenizer.chat_template" not in llm.metadata
