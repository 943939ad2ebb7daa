"""Token log-probabilities: what ``--logprobs K`` keeps for each new token, how both local loaders compute
it from one row of logits, and how a result shows it (a table, a DataFrame, tokens coloured by probability).

Both loaders hand the same function, :func:`entry`, the logits the model gave for the position a token was
drawn at (the Transformers loader from a logits processor on ``generate``'s decode path, the llama.cpp
loader from the context's logits of the sampled position only, so plain decoding is not slowed); "after the
samplers" applies :func:`after_samplers` first, in transformers' order. numpy only: no torch needed here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .options import GenerationOptions


def logprobs_refusal(loader: Any) -> tuple[str, str]:
    """Why ``loader`` gives no logprobs, and what to do (one line, cause and fix)."""
    why = getattr(loader, "logprobs_why", None)
    if why:
        return why, "drop --logprobs, or load the model with the transformers or llama.cpp loader"
    return (f"the {loader.name} loader gives no token log-probabilities",
            "load the model with the transformers or llama.cpp loader, or drop --logprobs")


def log_softmax(logits: Any) -> Any:
    """``log_softmax`` of a 1-D (or 2-D, per row) float array, in float64 for a stable sum."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = x - top
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def after_samplers(logits: Any, options: GenerationOptions) -> Any:
    """The logits as the samplers leave them (temperature, top-k, top-p, min-p, typical-p, in
    transformers' order; removed tokens at ``-inf``): the distribution a token is drawn from. Greedy
    decoding leaves only the most likely token."""
    import numpy as np

    x = np.array(logits, dtype=np.float64)
    if options.greedy:
        out = np.full_like(x, -np.inf)
        out[int(np.argmax(x))] = 0.0
        return out
    x = x / options.temperature
    if options.top_k and options.top_k < x.size:
        kth = np.partition(x, -options.top_k)[-options.top_k]
        x[x < kth] = -np.inf
    if options.top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p
        order = np.argsort(x, kind="stable")
        probs = np.exp(log_softmax(x[order]))
        drop = np.cumsum(probs) <= 1 - options.top_p
        drop[-1] = False
        x[order[drop]] = -np.inf
    if options.min_p:
        probs = np.exp(log_softmax(x))
        x[probs < options.min_p * probs.max()] = -np.inf
    if options.typical_p < 1.0:  # transformers' TypicalLogitsWarper
        logp = log_softmax(x)
        p = np.exp(logp)
        entropy = -np.nansum(p * np.where(np.isfinite(logp), logp, 0.0))
        shifted = np.abs(-logp - entropy)
        order = np.argsort(shifted, kind="stable")
        cumulative = np.cumsum(p[order])
        last = min(int(np.sum(cumulative < options.typical_p)), x.size - 1)
        keep = order[: last + 1]
        mask = np.ones(x.size, dtype=bool)
        mask[keep] = False
        x[mask] = -np.inf
    return x


def entry(token: int, logits: Any, top: int, piece: Callable[[int], str],
          options: GenerationOptions | None = None) -> dict[str, Any]:
    """One new token's record: its ``id``, text (``token``), ``logprob`` and the ``top`` most likely
    tokens at that position as ``[token, id, logprob]``. ``options`` (after the samplers) applies
    :func:`after_samplers` first. Runs once per token: one max, one exp and one partial sort over the
    vocabulary, in float32 (the sum in float64), never a whole log-softmax array."""
    import numpy as np

    x = after_samplers(logits, options) if options is not None else np.asarray(logits, dtype=np.float32)
    peak = float(x.max())
    lse = peak + math.log(float(np.exp(x - peak).sum(dtype=np.float64)))
    out: dict[str, Any] = {"id": int(token), "token": piece(int(token)), "logprob": _finite(float(x[int(token)]) - lse)}
    alternatives = []
    if top:
        n = x.size
        best = np.argpartition(x, n - top)[n - top :] if top < n else np.arange(n)
        for i in best[np.argsort(-x[best], kind="stable")]:
            value = float(x[i]) - lse
            if math.isfinite(value):
                alternatives.append([piece(int(i)), int(i), value])
    out["top"] = alternatives
    return out


def _finite(value: Any) -> float:
    """A logprob for JSON: ``-inf`` (a token the samplers removed; never a drawn one) as -1e30, so records
    stay strict JSON."""
    v = float(value)
    return v if math.isfinite(v) else -1e30


@dataclass
class Scores:
    """The log-probabilities a loader gives for given tokens (:meth:`TokenLoader.token_scores`)."""

    logprobs: list[float]
    """Each token's log-probability given the tokens before it."""
    greedy: list[bool]
    """Whether each token is the model's most likely one at its position."""
    top: list[list[tuple[int, float]]] | None = None
    """The ``top`` most likely (id, logprob) at each position, when asked for."""


def scores_from_logits(logits: Any, targets: Sequence[int], top: int = 0) -> Scores:
    """:class:`Scores` of ``targets`` from the logits at the positions that predict them (one row each)."""
    import numpy as np

    logp = log_softmax(logits)
    idx = np.asarray(targets, dtype=np.int64)
    picked = logp[np.arange(len(idx)), idx]
    greedy = np.argmax(logp, axis=-1) == idx
    best = None
    if top:
        best = []
        for row in logp:
            ids = np.argsort(-row, kind="stable")[:top]
            best.append([(int(i), float(row[i])) for i in ids])
    return Scores([float(v) for v in picked], [bool(g) for g in greedy], best)


class TokenLogprobs(Sequence[dict[str, Any]]):
    """The new tokens of a result with their log-probabilities (``result.tokens``): a sequence of
    entries (``id``, ``token``, ``logprob``, ``top``); ``frame()`` gives a DataFrame, one row per token;
    shown in a notebook as the tokens coloured by probability, the alternatives on hover."""

    def __init__(self, entries: Sequence[dict[str, Any]]) -> None:
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: Any) -> Any:
        return self.entries[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries)

    def frame(self) -> Any:
        """A pandas DataFrame: one row per token (position, token, id, logprob, prob, rank-1 alternative,
        the alternatives as a list)."""
        from .errors import pandas_module

        pd = pandas_module()
        rows = []
        for i, e in enumerate(self.entries):
            top = e.get("top") or []
            rows.append({
                "position": i, "token": e["token"], "id": e["id"], "logprob": e["logprob"],
                "prob": math.exp(e["logprob"]), "rank": _rank(e),
                "top": [(t, lp) for t, _id, lp in top],
            })
        return pd.DataFrame(rows, columns=["position", "token", "id", "logprob", "prob", "rank", "top"])

    def text(self) -> str:
        """Plain text, one token a line: its probability and the alternatives (front ends without HTML)."""
        lines = []
        for e in self.entries:
            alts = ", ".join(f"{t!r} {math.exp(lp):.3f}" for t, _i, lp in (e.get("top") or []))
            lines.append(f"{e['token']!r:>16} {math.exp(e['logprob']):6.3f}" + (f"   [{alts}]" if alts else ""))
        return "\n".join(lines)

    def html(self) -> str:
        """The tokens in a row, each coloured by its probability (red unlikely → green likely), its
        probability and the alternatives in the hover title."""
        spans = []
        for e in self.entries:
            p = math.exp(e["logprob"])
            alts = "\n".join(f"{t!r}: {math.exp(lp):.3f}" for t, _i, lp in (e.get("top") or []))
            title = f"{e['token']!r}: {p:.3f} (logprob {e['logprob']:.3f})" + (f"\n{alts}" if alts else "")
            spans.append(f"<span class='nbllm-token' style='background-color:{color(p)}' "
                         f"title='{html.escape(title, quote=True)}'>{html.escape(e['token'])}</span>")
        return "<div style='white-space:pre-wrap;font-family:monospace;line-height:1.6'>" + "".join(spans) + "</div>"

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        return self.text()


def _rank(e: dict[str, Any]) -> int | None:
    """The token's rank among the alternatives kept (1: the most likely), ``None`` when not among them."""
    for n, (t, i, _lp) in enumerate(e.get("top") or [], start=1):
        if (i == e["id"]) if e["id"] is not None else (t == e["token"]):  # a server's entries: texts, no ids
            return n
    return None


def color(p: float) -> str:
    """A background colour for probability ``p``: red (0) through yellow to green (1), light enough to read."""
    p = min(max(p, 0.0), 1.0)
    red, green = (255, int(200 * p * 2)) if p < 0.5 else (int(255 * (1 - p) * 2), 200)
    return f"rgba({red},{green},80,0.35)"

