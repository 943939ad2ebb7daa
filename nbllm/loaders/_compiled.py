"""``--compile`` for the Transformers loader: a decode step compiled once, over a static KV cache.

``torch.compile(model.forward)`` under ``model.generate`` pays little on a CPU (1.03x measured): the
matrix-vector products stay the library's, and generate's per-step work stays Python. Here instead:

- the KV cache is a :class:`transformers.StaticCache` sized to the request, rounded up to a power of
  two (:func:`cache_bucket`), so one compiled graph serves every request of that size class and no
  length recompiles: a few graphs for the whole context, each compiled once and kept;
- the prompt is computed by the eager model into that cache; each new token then goes through one
  compiled call that runs the model on one token *and* picks the next token (repetition penalty,
  greedy argmax, or temperature / top-k / top-p / min-p / typical sampling), so nothing but one
  token id leaves the graph;
- on a CPU, inductor freezes the weights and packs them for its own matrix-vector kernels
  (``max_autotune``, ``freezing``): that, not the Python overhead, is where the time goes (about 2x
  decode on the ~64M-parameter built-in model, see benchmarks/). The packed copy costs a second
  copy of the linear layers' weights in memory;
- on CUDA, CUDA graphs (inductor's ``reduce-overhead``) replay the whole step with one launch;
- inductor's caches live under nbllm's cache folder (``TORCHINDUCTOR_CACHE_DIR``, unless set), so a
  later load of the same model and options compiles from the cache in seconds.

Greedy text equals the eager loader's (tested on the built-in tiny model).
"""

from __future__ import annotations

import os
import threading
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..options import GenerationOptions
from ..store import cache_dir

MIN_BUCKET = 128
"""The smallest static cache, in tokens. Attention reads the whole cache (masked) at every step, so a
cache much longer than the request costs time; a power of two bounds that waste at 2x."""


def cache_bucket(needed: int, context: int | None) -> int:
    """Cache size for a request of ``needed`` tokens (prompt + new tokens): the next power of two, at
    least :data:`MIN_BUCKET`, at most the model's context."""
    size = MIN_BUCKET
    while size < needed:
        size *= 2
    return min(size, context) if context else size


def inductor_cache() -> str:
    """Where inductor keeps compiled graphs and autotuning results: ``TORCHINDUCTOR_CACHE_DIR`` when set,
    else ``<nbllm cache>/inductor`` (set for this process, so compiled graphs outlive it)."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def unsupported_reason(model: Any) -> str | None:
    """Why the compiled decode step cannot run this model, or ``None`` when it can."""
    if getattr(model, "hf_quantizer", None) is not None:
        return "it does not run bitsandbytes-quantized weights"
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1 or "disk" in devices:
        return "it does not run a model split across devices or offloaded"
    attention = str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")
    if "flash" in attention:  # flash paths take no mask: attention would cover the static cache's empty slots
        return f"passes no attention mask over its static KV cache, which {attention} needs"
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare support for torch.compile with a static cache"
    return None


# -- picking the next token (in the compiled graph, and eagerly after the prompt) ------------------


def _penalize(logits: Any, seen: Any, penalty: Any) -> Any:
    import torch

    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def pick_greedy(logits: Any, seen: Any, knobs: Any) -> Any:
    """The most likely token after the repetition penalty (``knobs[5]``), as transformers' greedy search."""
    return _penalize(logits.float(), seen, knobs[5]).argmax(-1, keepdim=True)


def pick_sampled(logits: Any, seen: Any, knobs: Any, noise: Any) -> Any:
    """A token drawn as transformers' sampling draws it: repetition penalty, temperature, top-k, top-p,
    min-p, typical-p (in that order, each keeping at least one token), then a draw with ``noise``
    (exponential variates: ``argmax(p / E)`` is a draw from ``p``, with no synchronizing multinomial).

    ``knobs`` = [temperature, top_k, top_p, min_p, typical_p, repetition_penalty] as one tensor, so
    one graph serves all values."""
    import torch

    temperature, top_k, top_p, min_p, typical_p, penalty = knobs.unbind()
    neg_inf = torch.finfo(torch.float32).min
    scores = _penalize(logits.float(), seen, penalty) / temperature
    vocab = scores.shape[-1]
    # top-k: keep what scores at least the k-th best (0 disables)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
    ordered = scores.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).view(1, 1))
    scores = scores.masked_fill(scores < kth, neg_inf)
    # top-p: drop the least likely tokens whose probabilities add up to at most 1 - top_p
    ascending, order = scores.sort(dim=-1)
    drop = ascending.softmax(-1).cumsum(-1) <= (1 - top_p)
    drop[..., -1:] = False
    drop = drop & (top_p < 1)
    scores = scores.masked_fill(drop.scatter(-1, order, drop), neg_inf)
    # min-p: drop tokens less likely than min_p times the most likely one
    probs = scores.softmax(-1)
    scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), neg_inf)
    # typical-p: keep the tokens closest to the expected information content, up to typical_p of the mass
    normalized = scores.log_softmax(-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted, order = (-normalized - entropy).abs().sort(dim=-1)
    mass = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (mass < typical_p).sum(-1, keepdim=True).clamp(max=vocab - 1)
    drop = shifted > shifted.gather(-1, last)
    drop[..., :1] = False
    drop = drop & (typical_p < 1)
    scores = scores.masked_fill(drop.scatter(-1, order, drop), neg_inf)
    return (scores.softmax(-1) / noise).argmax(-1, keepdim=True)


_PACKING = threading.Event()
"""Set while a CPU decode step compiles: autotuning then takes inductor's own packed GEMM kernel
wherever one is offered (see :func:`_prefer_packed_gemm`)."""
_FILTER_ADDED = False


def _prefer_packed_gemm(choices: list[Any]) -> list[Any]:
    """Inductor's autotuning choice, made for it while nbllm compiles a decode step on a CPU: its C++
    GEMM template on packed weights (``cpp_*``) over the library's matrix-vector product wherever both
    are offered. For one token at a time the packed kernel was 2-2.5x faster on every shape timed here;
    left to timing, a busy machine made autotuning pick the slower one for some layers, and decoding
    gained 1.2x instead of 1.7x. One choice also skips the timing, so compiling is faster."""
    if not _PACKING.is_set():
        return choices
    packed = [c for c in choices if str(getattr(c, "name", "")).startswith("cpp_")]
    return packed or choices


def _add_gemm_filter() -> None:
    global _FILTER_ADDED
    if not _FILTER_ADDED:
        from torch._inductor.select_algorithm import add_preprocessing_fn

        add_preprocessing_fn(_prefer_packed_gemm)
        _FILTER_ADDED = True


def _greedy_step(model: Any, cache: Any, token: Any, position: Any, seen: Any, knobs: Any) -> Any:
    logits = model(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits[:, -1, :]
    return pick_greedy(logits, seen, knobs)


def _sampled_step(model: Any, cache: Any, token: Any, position: Any, seen: Any, knobs: Any, noise: Any) -> Any:
    logits = model(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits[:, -1, :]
    return pick_sampled(logits, seen, knobs, noise)


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object and globals of its own. torch.compile keeps compiled graphs on the code
    object and puts the compiled functions into the function's globals; with frozen weights a graph
    holds the model's (packed) weights. So each loaded model gets its own: its graphs never serve
    another model, and they are freed with it."""
    code = fn.__code__.replace()
    return types.FunctionType(code, dict(fn.__globals__), fn.__name__, fn.__defaults__, fn.__closure__)


class CompileFailed(Exception):
    """torch.compile could not compile the decode step for this model (raised before any token)."""


class CompiledDecoder:
    """The compiled decode steps of one loaded model, and the static caches they run on (one per size
    class, kept across generations)."""

    def __init__(self, model: Any, context: int | None) -> None:
        import torch

        self.model = model
        self.context = context
        self.device = model.device
        self.on_cuda = self.device.type == "cuda"
        inductor_cache()
        if self.on_cuda:
            mode: str | None = "reduce-overhead"
            self._patch: dict[str, Any] = {}
            self.how = "CUDA graphs (reduce-overhead)"
        else:
            # set around the compiling call: as torch.compile(options=...) freezing is silently not applied
            # (the backends, in an order of nbllm's own, also keep these graphs apart in inductor's cache from
            # ones compiled without the choice made in _prefer_packed_gemm)
            mode, self._patch = None, {"max_autotune": True, "freezing": True, "max_autotune_gemm_backends": "CPP,ATEN"}
            self.how = "inductor max-autotune with frozen, packed weights"
        # autotuning reports every choice it timed on stderr, into the cell: keep that quiet
        self._patch.update(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)

        def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(_own_copy(fn), fullgraph=True, dynamic=False, mode=mode)

        self._steps = {"greedy": compiled(_greedy_step), "sampled": compiled(_sampled_step)}
        self._caches: dict[int, Any] = {}
        self._ready: set[tuple[str, int]] = set()
        self.compile_seconds: dict[tuple[str, int], float] = {}
        self._modules: list[Any] = []
        """The Python modules inductor loaded for these graphs: they hold the packed weights."""

    def release(self) -> None:
        """Free the compiled graphs and their packed weights. Inductor keeps every module it loaded in a
        class-wide list (and in sys.modules), weights attached, for the life of the process: unloading
        a compiled model would otherwise keep a copy of its weights."""
        import sys

        from torch._inductor.codecache import PyCodeCache

        mine = {id(m) for m in self._modules}
        PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in mine]
        for module in self._modules:
            name = str(module.__name__)
            if sys.modules.get(name) is module:
                del sys.modules[name]
            for key, value in list(vars(module).items()):
                if type(value).__name__ in ("Tensor", "Parameter"):
                    setattr(module, key, None)
        self._modules.clear()
        import torch._dynamo

        for step in self._steps.values():  # the compiled graphs and the compiled functions in the globals
            original = getattr(step, "_torchdynamo_orig_callable", None)
            if original is not None:
                torch._dynamo.reset_code(original.__code__)
                original.__globals__.clear()
        self._steps.clear()
        self._caches.clear()
        self._ready.clear()
        if self.on_cuda:
            release_cuda_graphs()

    def _cache(self, size: int) -> Any:
        from transformers import StaticCache

        cache = self._caches.get(size)
        if cache is None:
            cache = self._caches[size] = StaticCache(config=self.model.config, max_cache_len=size)
        return cache

    def _initialize(self, cache: Any) -> None:
        """Allocate the cache's tensors (the eager model does it on its first write). On a CPU the
        tensors must not be 'static addresses': freezing would take them for constants, like weights."""
        import torch

        if not all(getattr(layer, "is_initialized", True) for layer in cache.layers):
            token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self.model(input_ids=token, position_ids=token, cache=cache, use_cache=True)
        if not self.on_cuda:
            for layer in cache.layers:
                for name in ("keys", "values", "cumulative_length"):
                    tensor = getattr(layer, name, None)
                    if tensor is not None and hasattr(tensor, "_dynamo_static_input_type"):
                        del tensor._dynamo_static_input_type

    def generate(
        self,
        prompt_ids: Sequence[int],
        options: GenerationOptions,
        seed: int,
        cancel: threading.Event,
        eos: frozenset[int],
        emit: Callable[[int], None],
    ) -> float | None:
        """Generate into ``emit`` until EOS (emitted last), ``max_new_tokens`` or ``cancel``. Returns the
        seconds spent compiling for this request (``None`` when nothing was compiled)."""
        import torch

        model, device = self.model, self.device
        size = cache_bucket(len(prompt_ids) + options.max_new_tokens, self.context)
        kind = "greedy" if options.greedy else "sampled"
        step = self._steps[kind]
        cache = self._cache(size)
        vocab = model.config.get_text_config().vocab_size
        seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
        knobs = torch.tensor(
            [options.temperature or 1.0, options.top_k, options.top_p, options.min_p, options.typical_p,
             options.repetition_penalty], dtype=torch.float32, device=device,
        )
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.ones((1, vocab), dtype=torch.float32, device=device)

        def args(token: Any, position: int, draw: bool = True) -> tuple[Any, ...]:
            pos = torch.tensor([[position]], device=device)
            if kind == "greedy":
                return model, cache, token, pos, seen, knobs
            if draw:
                noise.exponential_(generator=generator)
            return model, cache, token, pos, seen, knobs, noise

        compile_seconds = None
        with torch.inference_mode():
            if (kind, size) not in self._ready:
                import torch._inductor.config

                start = time.perf_counter()
                self._initialize(cache)
                cache.reset()
                token = torch.zeros((1, 1), dtype=torch.long, device=device)
                from torch._inductor.codecache import PyCodeCache

                known = {id(m) for m in PyCodeCache.modules}
                if not self.on_cuda:
                    _add_gemm_filter()
                    _PACKING.set()
                try:
                    with torch._inductor.config.patch(self._patch), warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # inductor's own use of TypedStorage
                        step(*args(token, 0, draw=False))  # the seed's draws are the generation's alone
                except Exception as exc:
                    raise CompileFailed(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
                finally:
                    _PACKING.clear()
                self._modules += [m for m in PyCodeCache.modules if id(m) not in known]
                if self.on_cuda:  # CUDA graphs record on the second and later calls
                    step(*args(token, 1, draw=False))
                    torch.cuda.synchronize()
                compile_seconds = self.compile_seconds[kind, size] = time.perf_counter() - start
                self._ready.add((kind, size))
            cache.reset()
            ids = torch.tensor([list(prompt_ids)], device=device)
            seen[0, ids[0]] = True
            n = ids.shape[1]
            logits = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1, :]
            if kind == "greedy":
                token = pick_greedy(logits, seen, knobs)
            else:
                noise.exponential_(generator=generator)
                token = pick_sampled(logits, seen, knobs, noise)
            for i in range(options.max_new_tokens):
                value = int(token.item())
                emit(value)
                if value in eos or cancel.is_set() or i + 1 == options.max_new_tokens:
                    break
                seen[0, value] = True
                token = step(*args(token.clone(), n + i))
        return compile_seconds

    def describe(self) -> str:
        sizes = sorted({size for _, size in self._ready})
        return self.how + (f"; compiled for caches of {', '.join(map(str, sizes))} tokens" if sizes else "")


def release_cuda_graphs() -> None:
    """Free the CUDA graphs ``--compile`` recorded, and their memory pool. Inductor keeps them in
    thread-local storage (``torch._inductor.cudagraph_trees``) of the thread that ran the compiled step:
    nbllm's generation thread, not the one unloading, so they are reset there."""
    from ..streaming import run_on_generation_thread

    def reset() -> None:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()

    run_on_generation_thread(reset)
