"""text-generation-webui's samplers (issue 25) in the two local loaders, in its order (``sampler_priority``).

- llama.cpp: llama.cpp's own sampler chain (``llama_sampler_init_*`` through llama-cpp-python's
  ``LlamaSampler``): logit bias, penalties, DRY, top-n-sigma, temperature or dynamic temperature
  (``temp_ext``), top-k, top-p, typical-p, min-p, XTC, then mirostat or the draw. It is built only when
  one of these samplers is set; a plain request keeps llama-cpp-python's own chain.
- Transformers: transformers' processors where it has one (top-k/p, typical, min-p, temperature,
  epsilon, eta, no-repeat-ngram, sequence bias, suppress tokens; CFG through ``guidance_scale``), and
  the processors below for the rest, written from text-generation-webui's definitions
  (``modules/sampler_hijack.py``): penalties over a range, DRY, top-n-sigma, dynamic temperature,
  quadratic smoothing, top-a, mirostat, XTC.

Each loader declares the sampler options it applies (:attr:`Loader.sampler_options`); a request that
sets another is refused in one line (:func:`refuse_samplers`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import OptionError
from ..options import SAMPLER_SWITCHES, GenerationOptions

LLAMACPP_SAMPLERS = frozenset({
    "frequency_penalty", "presence_penalty", "repetition_penalty_range", "dry_multiplier", "xtc_probability",
    "mirostat_mode", "top_n_sigma", "dynamic_temperature", "custom_token_bans", "logit_bias", "ban_eos_token",
    "sampler_priority", "temperature_last",
})
"""What llama.cpp's sampler chain has: no quadratic smoothing, epsilon/eta cutoff, top-a, no-repeat-ngram or CFG."""

TRANSFORMERS_SAMPLERS = frozenset(SAMPLER_SWITCHES)
"""Every one of them (transformers' processors and this module's)."""


def refuse_samplers(loader: Any, options: GenerationOptions) -> None:
    """Refuse, in one line, a request that sets a text-generation-webui sampler the loader cannot apply
    (its output would silently ignore it)."""
    active = options.active_samplers()
    if not active:
        return
    allowed: frozenset[str] = getattr(loader, "sampler_options", frozenset())
    missing = [n for n in active if n not in allowed]
    if missing:
        flags = ", ".join(options.spec(n).flag for n in missing)
        where = getattr(loader, "sampler_refusal", None) or "load the model with the transformers loader"
        raise OptionError(f"the {loader.name} loader cannot apply {flags}", f"{where}, or leave {flags} out")


# -- llama.cpp ---------------------------------------------------------------------------------------

def llamacpp_chain(llm: Any, opts: GenerationOptions, prompt_ids: Sequence[int], eos: Sequence[int],
                   logits_processor: Any = None) -> Any:
    """A llama.cpp sampler chain (``llama_cpp._internals.LlamaSampler``) for ``opts`` in
    text-generation-webui's order, with the prompt's tokens accepted (the penalties and DRY see the
    whole text, as the Transformers loader's do). ``logits_processor``: a structured-output mask, first."""
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import _internals

    chain = _internals.LlamaSampler()
    if logits_processor:  # as llama-cpp-python's own chain applies it
        def apply(token_data_array: Any) -> None:
            size = token_data_array.contents.size
            data = token_data_array.contents.data
            rec = np.recarray(shape=(size,), dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                           align=True),
                              buf=(llama_cpp.llama_token_data * size).from_address(ctypes.addressof(data.contents)))
            for processor in logits_processor:
                rec.logit[:] = processor(llm._input_ids, rec.logit)

        chain.add_custom(apply)
    bias = {**opts.logit_biases, **{t: -math.inf for t in opts.token_bans}}
    if opts.ban_eos_token:
        bias.update({t: -math.inf for t in eos})
    if bias:
        chain.add_logit_bias(llm._n_vocab, bias)
    window = opts.repetition_penalty_range or llm.n_ctx()
    seed = llm._seed
    penalties = opts.repetition_penalty != 1.0 or opts.presence_penalty or opts.frequency_penalty
    sampled = not opts.greedy
    mirostat = sampled and opts.mirostat_mode != 0
    for name in opts.sampler_order:
        if name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            if penalties:  # llama.cpp's one penalties sampler does the three, at the first of their places
                chain.add_penalties(llm._n_vocab, window, opts.repetition_penalty, opts.frequency_penalty,
                                    opts.presence_penalty)
                penalties = False
        elif name == "dry" and opts.dry_multiplier > 0:
            chain.add_dry(llm._model, opts.dry_multiplier, opts.dry_base, opts.dry_allowed_length, window,
                          opts.sequence_breakers)
        elif not sampled:
            continue
        elif name == "temperature" and not opts.dynamic_temperature:
            chain.add_temp(opts.temperature)
        elif name == "dynamic_temperature" and opts.dynamic_temperature:
            low, high = opts.dynatemp_low, opts.dynatemp_high
            chain.add_temp_ext((low + high) / 2, (high - low) / 2, opts.dynatemp_exponent)
        elif mirostat:  # mirostat replaces the truncation samplers (llama.cpp's common sampler does the same)
            continue
        elif name == "top_n_sigma" and opts.top_n_sigma > 0:
            chain.add_top_n_sigma(opts.top_n_sigma)
        elif name == "top_k" and opts.top_k > 0:
            chain.add_top_k(opts.top_k)
        elif name == "top_p" and opts.top_p < 1.0:
            chain.add_top_p(opts.top_p, 1)
        elif name == "typical_p" and opts.typical_p < 1.0:
            chain.add_typical(opts.typical_p, 1)
        elif name == "min_p" and opts.min_p > 0:
            chain.add_min_p(opts.min_p, 1)
        elif name == "xtc" and opts.xtc_probability > 0:
            chain.add_xtc(opts.xtc_probability, opts.xtc_threshold, 1, seed)
    if not sampled:
        chain.add_greedy()
    elif opts.mirostat_mode == 1:
        chain.add_mirostat(llm._n_vocab, seed, opts.mirostat_tau, opts.mirostat_eta, 100)
    elif opts.mirostat_mode == 2:
        chain.add_mirostat_v2(seed, opts.mirostat_tau, opts.mirostat_eta)
    else:
        chain.add_dist(seed)
    for token in list(prompt_ids)[-window:]:
        chain.accept(token)
    return chain


# -- Transformers ------------------------------------------------------------------------------------

def transformers_processors(opts: GenerationOptions, *, eos: Sequence[int], newline: Sequence[int],
                            breakers: Sequence[int], device: Any) -> list[Any]:
    """The logits processors for ``opts`` in text-generation-webui's order (bias and bans first), to run
    with ``do_sample`` and transformers' own warpers off (``generation_kwargs`` sets them neutral).
    ``breakers``: the token ids of DRY's sequence breakers; ``newline``: tokens XTC never removes."""
    from transformers.generation.logits_process import (
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        MinPLogitsWarper,
        NoRepeatNGramLogitsProcessor,
        SequenceBiasLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    out: list[Any] = []
    if opts.logit_biases:
        out.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in opts.logit_biases.items()]))
    banned = list(opts.token_bans) + (list(eos) if opts.ban_eos_token else [])
    if banned:
        out.append(SuppressTokensLogitsProcessor(banned, device=device))
    sampled = not opts.greedy
    window = opts.repetition_penalty_range
    for name in opts.sampler_order:
        p: Any = None
        if name == "repetition_penalty" and opts.repetition_penalty != 1.0:
            p = RepetitionPenalty(opts.repetition_penalty, window)
        elif name == "presence_penalty" and opts.presence_penalty:
            p = PresencePenalty(opts.presence_penalty, window)
        elif name == "frequency_penalty" and opts.frequency_penalty:
            p = FrequencyPenalty(opts.frequency_penalty, window)
        elif name == "dry" and opts.dry_multiplier > 0:
            p = Dry(opts.dry_multiplier, opts.dry_base, opts.dry_allowed_length, breakers, window)
        elif name == "no_repeat_ngram" and opts.no_repeat_ngram_size > 0:
            p = NoRepeatNGramLogitsProcessor(opts.no_repeat_ngram_size)
        elif not sampled:
            continue
        elif name == "top_n_sigma" and opts.top_n_sigma > 0:
            p = TopNSigma(opts.top_n_sigma)
        elif name == "temperature" and not opts.dynamic_temperature and opts.temperature != 1.0:
            p = TemperatureLogitsWarper(opts.temperature)
        elif name == "dynamic_temperature" and opts.dynamic_temperature:
            p = DynamicTemperature(opts.dynatemp_low, opts.dynatemp_high, opts.dynatemp_exponent)
        elif name == "quadratic_sampling" and opts.smoothing_factor > 0:
            p = QuadraticSampling(opts.smoothing_factor, opts.smoothing_curve)
        elif opts.mirostat_mode and name not in ("mirostat", "xtc"):
            continue  # mirostat replaces the truncation samplers, as in llama.cpp
        elif name == "top_k" and opts.top_k > 0:
            p = TopKLogitsWarper(top_k=opts.top_k, min_tokens_to_keep=1)
        elif name == "top_p" and opts.top_p < 1.0:
            p = TopPLogitsWarper(top_p=opts.top_p, min_tokens_to_keep=1)
        elif name == "typical_p" and opts.typical_p < 1.0:
            p = TypicalLogitsWarper(mass=opts.typical_p, min_tokens_to_keep=1)
        elif name == "epsilon_cutoff" and opts.epsilon_cutoff > 0:
            p = EpsilonLogitsWarper(epsilon=opts.epsilon_cutoff * 1e-4, min_tokens_to_keep=1)
        elif name == "eta_cutoff" and opts.eta_cutoff > 0:
            p = EtaLogitsWarper(epsilon=opts.eta_cutoff * 1e-4, min_tokens_to_keep=1, device=device)
        elif name == "top_a" and opts.top_a > 0:
            p = TopA(opts.top_a)
        elif name == "min_p" and opts.min_p > 0:
            p = MinPLogitsWarper(min_p=opts.min_p, min_tokens_to_keep=1)
        elif name == "mirostat" and opts.mirostat_mode:
            p = Mirostat(opts.mirostat_mode, opts.mirostat_tau, opts.mirostat_eta)
        elif name == "xtc" and opts.xtc_probability > 0:
            p = Xtc(opts.xtc_threshold, opts.xtc_probability, [*eos, *newline])
        if p is not None:
            out.append(p)
    return out


def _seen(input_ids: Any, window: int) -> Any:
    return input_ids[:, -window:] if window > 0 else input_ids


class RepetitionPenalty:
    """Divide a positive logit (multiply a negative one) of every token in the last ``window`` tokens
    (0: all) by ``penalty``: transformers' repetition penalty over a range (text-generation-webui's)."""

    def __init__(self, penalty: float, window: int = 0) -> None:
        self.penalty, self.window = penalty, window

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        seen = _seen(input_ids, self.window)
        score = torch.gather(scores, 1, seen)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, seen, score)


class _Counted:
    def __init__(self, penalty: float, window: int = 0) -> None:
        self.penalty, self.window = penalty, window

    def counts(self, input_ids: Any, scores: Any) -> Any:
        import torch

        seen = _seen(input_ids, self.window)
        counts = torch.zeros_like(scores)
        return counts.scatter_add(1, seen, torch.ones_like(seen, dtype=scores.dtype))


class PresencePenalty(_Counted):
    """Subtract ``penalty`` from the logit of each token present in the window (OpenAI's definition)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return scores - self.penalty * (self.counts(input_ids, scores) > 0).to(scores.dtype)


class FrequencyPenalty(_Counted):
    """Subtract ``penalty`` times its count in the window from each token's logit (OpenAI's definition)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return scores - self.penalty * self.counts(input_ids, scores)


class Dry:
    """DRY ("don't repeat yourself", p-e-w's, text-generation-webui's definition): for each earlier place
    where the last token appeared, the token that followed it there would extend a repeat whose length is
    how far the match reaches back (up to 50, stopping at a sequence breaker); a repeat of at least
    ``allowed`` tokens costs ``multiplier * base ** (length - allowed)`` off that token's logit."""

    def __init__(self, multiplier: float, base: float, allowed: int, breakers: Sequence[int], window: int = 0) -> None:
        self.multiplier, self.base, self.allowed, self.window = multiplier, base, allowed, window
        self.breakers = frozenset(breakers)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores = scores.clone()
        for row, ids in enumerate(_seen(input_ids, self.window).tolist()):
            for token, length in self.match_lengths(ids).items():
                if length >= self.allowed:
                    scores[row, token] -= self.multiplier * self.base ** (length - self.allowed)
        return scores

    def match_lengths(self, ids: Sequence[int]) -> dict[int, int]:
        """Next token → the longest repeat it would extend."""
        if not ids or ids[-1] in self.breakers:
            return {}
        last, out = ids[-1], dict[int, int]()
        for i in range(len(ids) - 1):
            if ids[i] != last or ids[i + 1] in self.breakers:
                continue
            length = 1
            while length < 50:
                j = i - length
                if j < 0 or ids[j] != ids[-(length + 1)] or ids[j] in self.breakers:
                    break
                length += 1
            out[ids[i + 1]] = max(length, out.get(ids[i + 1], 0))
        return out


class TopNSigma:
    """Keep the tokens whose logit is within ``n`` standard deviations (over the finite logits) of the top."""

    def __init__(self, n: float) -> None:
        self.n = n

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        finite = torch.isfinite(scores)
        count = finite.sum(-1, keepdim=True).clamp(min=1)
        values = torch.where(finite, scores, torch.zeros_like(scores))
        mean = values.sum(-1, keepdim=True) / count
        var = (torch.where(finite, scores - mean, torch.zeros_like(scores)) ** 2).sum(-1, keepdim=True) / count
        top = scores.max(-1, keepdim=True).values
        return scores.masked_fill(scores < top - self.n * var.sqrt(), -math.inf)


class DynamicTemperature:
    """Temperature between ``low`` and ``high`` by the normalized entropy of the distribution
    (``low + (high - low) * (H / log N) ** exponent``, N the tokens still possible)."""

    def __init__(self, low: float, high: float, exponent: float) -> None:
        self.low, self.high, self.exponent = low, high, exponent

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
        entropy = -(probs * logs).sum(-1, keepdim=True)
        n = torch.isfinite(scores).sum(-1, keepdim=True).float()
        normalized = torch.where(n > 1, entropy / n.clamp(min=2).log(), torch.zeros_like(entropy))
        temperature = self.low + (self.high - self.low) * normalized.clamp(min=0) ** self.exponent
        return scores / temperature.clamp(min=1e-6).to(scores.dtype)


class QuadraticSampling:
    """Quadratic ("smoothing") sampling: each logit becomes ``max - k*f*d**2 + s*f*d**3`` with ``d`` its
    distance below the top, ``k = (3 - curve) / 2`` and ``s = (curve - 1) / 2``."""

    def __init__(self, factor: float, curve: float) -> None:
        self.factor, self.curve = factor, curve

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        top = scores.max(-1, keepdim=True).values
        d = scores - top
        k, s = (3 - self.curve) / 2, (self.curve - 1) / 2
        changed = -(k * self.factor * d**2) + (s * self.factor * d**3) + top
        return torch.where(torch.isfinite(scores), changed, scores)


class TopA:
    """Drop tokens with probability below ``a`` times the square of the top probability."""

    def __init__(self, a: float) -> None:
        self.a = a

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        top = probs.max(-1, keepdim=True).values
        return scores.masked_fill(probs < self.a * top * top, -math.inf)


class Mirostat:
    """Mirostat (1: the paper's first version with m = 100, as llama.cpp; 2: the second): keep the
    tokens whose surprise is within the running bound ``mu`` (first 2*tau), draw one, leave only it
    possible, and move ``mu`` by ``eta`` times the error against ``tau``. Draws from torch's generator,
    so a seeded generation repeats."""

    def __init__(self, mode: int, tau: float, eta: float) -> None:
        self.mode, self.tau, self.eta = mode, tau, eta
        self.mu = 2 * tau

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        out = torch.full_like(scores, -math.inf)
        for row in range(scores.shape[0]):
            logits, order = torch.sort(scores[row].float(), descending=True)
            probs = torch.softmax(logits, dim=-1)
            if self.mode == 2:
                keep = int((-torch.log2(probs.clamp(min=1e-45)) <= self.mu).sum().clamp(min=1))
            else:
                keep = self._k(probs)
            kept = torch.softmax(logits[:keep], dim=-1)
            pick = int(torch.multinomial(kept, 1))
            self.mu -= self.eta * (-math.log2(float(kept[pick])) - self.tau)
            out[row, order[pick]] = 0.0
        return out

    def _k(self, probs: Any) -> int:
        """Mirostat 1's top-k from the estimated Zipf exponent (llama.cpp's ``llama_sampler_mirostat``)."""
        m, n = min(100, probs.numel()), probs.numel()
        p = probs[:m].double().tolist()
        num = den = 0.0
        for i in range(m - 1):
            if p[i + 1] <= 0:
                break
            t = math.log((i + 2) / (i + 1))
            num += t * math.log(p[i] / p[i + 1])
            den += t * t
        s_hat = num / den if den else 1.0
        eps = s_hat - 1
        try:
            k = ((eps * 2**self.mu) / (1 - n ** (-eps))) ** (1 / s_hat)
        except (OverflowError, ZeroDivisionError):
            k = float(n)
        return max(1, min(n, int(k) if math.isfinite(k) else n))


class Xtc:
    """XTC ("exclude top choices"): with chance ``probability`` at each step, remove every token at least
    ``threshold`` likely except the least likely of them, unless that would remove a newline or the end
    of text. The chance is drawn from torch's generator (a seeded generation repeats)."""

    def __init__(self, threshold: float, probability: float, special: Sequence[int]) -> None:
        self.threshold, self.probability, self.special = threshold, probability, list(special)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if float(torch.rand(())) >= self.probability:
            return scores
        return self.remove(scores)

    def remove(self, scores: Any) -> Any:
        import torch

        logits, order = torch.sort(scores, descending=True)
        probs = torch.softmax(logits.float(), dim=-1)
        remove = torch.zeros_like(probs, dtype=torch.bool)
        remove[..., :-1] = probs[..., 1:] >= self.threshold
        remove = remove.scatter(1, order, remove)
        if self.special and remove[:, self.special].any():
            return scores
        return scores.masked_fill(remove, -math.inf)


# -- servers (the openai loader) ---------------------------------------------------------------------

_PENALTIES = frozenset({"frequency_penalty", "presence_penalty"})
_LLAMA_SERVER = frozenset({
    "frequency_penalty", "presence_penalty", "repetition_penalty_range", "dry_multiplier", "xtc_probability",
    "mirostat_mode", "top_n_sigma", "dynamic_temperature", "custom_token_bans", "logit_bias", "ban_eos_token",
})
SERVER_SAMPLERS: dict[str, frozenset[str]] = {
    # tools/server/server-task.cpp params_from_json_cmpl
    "llama.cpp": _LLAMA_SERVER,
    # nbllm.serve_requests: llama.cpp's server's fields (the loaded model's loader refuses what it cannot do)
    "nbllm": _LLAMA_SERVER,
    # modules/api/typing.py GenerationOptions: every one under its own name
    "text-generation-webui": frozenset(SAMPLER_SWITCHES),
    # vllm/entrypoints/openai/protocol.py: the OpenAI penalties, logit_bias, ignore_eos
    "vllm": _PENALTIES | {"logit_bias", "ban_eos_token"},
    "sglang": _PENALTIES | {"ban_eos_token"},
    "openai": _PENALTIES | {"logit_bias"},
    "tgi": frozenset({"frequency_penalty"}),
    # llama_cpp/server/types.py
    "llama-cpp-python": _PENALTIES | {"mirostat_mode", "logit_bias"},
    # api/types.go Options
    "ollama": _PENALTIES | {"repetition_penalty_range", "mirostat_mode"},
    "unknown": _PENALTIES | {"logit_bias"},
}
"""Server kind → the text-generation-webui sampler switches it reads (others are refused before sending)."""


def server_sampler_fields(kind: str, opts: GenerationOptions) -> dict[str, Any]:
    """The request fields that carry ``opts``' active samplers in server ``kind``'s dialect (the kind's
    :data:`SERVER_SAMPLERS`; :func:`refuse_samplers` has refused the others)."""
    active = set(opts.active_samplers())
    if not active:
        return {}
    out: dict[str, Any] = {}
    if "frequency_penalty" in active:
        out["frequency_penalty"] = opts.frequency_penalty
    if "presence_penalty" in active:
        out["presence_penalty"] = opts.presence_penalty
    if kind == "text-generation-webui":  # its own names and formats
        for name in active:
            value = getattr(opts, name)
            out[name] = dict(opts.logit_biases) if name == "logit_bias" else \
                "\n".join(value) if name == "sampler_priority" else value
        for tuned, switch in (("dry_base", "dry_multiplier"), ("dry_allowed_length", "dry_multiplier"),
                              ("dry_sequence_breakers", "dry_multiplier"), ("xtc_threshold", "xtc_probability"),
                              ("mirostat_tau", "mirostat_mode"), ("mirostat_eta", "mirostat_mode"),
                              ("dynatemp_low", "dynamic_temperature"), ("dynatemp_high", "dynamic_temperature"),
                              ("dynatemp_exponent", "dynamic_temperature"), ("smoothing_curve", "smoothing_factor"),
                              ("negative_prompt", "guidance_scale")):
            if switch in active:
                out[tuned] = getattr(opts, tuned)
        return out
    bias = dict(opts.logit_biases)
    bans = list(opts.token_bans)
    if kind in ("llama.cpp", "nbllm"):
        if "repetition_penalty_range" in active:
            out["repeat_last_n"] = opts.repetition_penalty_range
        if "dry_multiplier" in active:
            out.update(dry_multiplier=opts.dry_multiplier, dry_base=opts.dry_base,
                       dry_allowed_length=opts.dry_allowed_length, dry_sequence_breakers=opts.sequence_breakers,
                       dry_penalty_last_n=opts.repetition_penalty_range or -1)
        if "xtc_probability" in active:
            out.update(xtc_probability=opts.xtc_probability, xtc_threshold=opts.xtc_threshold)
        if "mirostat_mode" in active:
            out.update(mirostat=opts.mirostat_mode, mirostat_tau=opts.mirostat_tau, mirostat_eta=opts.mirostat_eta)
        if "top_n_sigma" in active:
            out["top_n_sigma"] = opts.top_n_sigma
        if "dynamic_temperature" in active:  # llama.cpp's: a range around temperature
            low, high = opts.dynatemp_low, opts.dynatemp_high
            out.update(temperature=(low + high) / 2, dynatemp_range=(high - low) / 2,
                       dynatemp_exponent=opts.dynatemp_exponent)
        if bans:  # llama.cpp's server: false bans a token
            out["logit_bias"] = [[t, b] for t, b in bias.items()] + [[t, False] for t in bans]
        elif bias:
            out["logit_bias"] = [[t, b] for t, b in bias.items()]
        if "ban_eos_token" in active:
            out["ignore_eos"] = True
        return out
    if "logit_bias" in active:
        out["logit_bias"] = {str(t): b for t, b in bias.items()}
    if "ban_eos_token" in active:
        out["ignore_eos"] = True
    if kind == "llama-cpp-python" and "mirostat_mode" in active:
        out.update(mirostat_mode=opts.mirostat_mode, mirostat_tau=opts.mirostat_tau, mirostat_eta=opts.mirostat_eta)
    if kind == "ollama":
        if "repetition_penalty_range" in active:
            out["repeat_last_n"] = opts.repetition_penalty_range
        if "mirostat_mode" in active:
            out.update(mirostat=opts.mirostat_mode, mirostat_tau=opts.mirostat_tau, mirostat_eta=opts.mirostat_eta)
    return out
