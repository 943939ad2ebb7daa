"""Log-probabilities from the two local loaders: the logits of each generated token's position (for
``--logprobs``), and the model's log-probabilities of given tokens (scoring, perplexity, evaluation).

Kept apart from the loaders' modules: each loader calls one function here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tokens import Scores, entry, scores_from_logits
from .base import Request


class LogprobsRecorder:
    """Turns the logits of each step into :attr:`Request.logprobs` entries: :meth:`keep` is given the
    logits of the position a token is drawn at, :meth:`add` the token drawn from them."""

    def __init__(self, request: Request, piece: Any) -> None:
        options = request.options
        self.top = int(options.logprobs or 0)
        self.after = options if options.logprobs_after_samplers else None
        self.out = request.logprobs
        self.piece = piece
        self.pending: Any = None

    def keep(self, logits: Any) -> None:
        self.pending = logits

    def add(self, token: int) -> None:
        if self.pending is not None:
            self.out.append(entry(token, self.pending, self.top, self.piece, self.after))
            self.pending = None

    def processor(self) -> Any:
        """A transformers logits processor that keeps the model's logits of each step (it runs before
        the warpers transformers adds when sampling) and changes nothing."""
        from transformers import LogitsProcessor

        recorder = self

        class KeepLogits(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                recorder.keep(scores[0].detach().float().cpu().numpy().copy())
                return scores

        return KeepLogits()


def transformers_recorder(loader: Any, request: Request) -> LogprobsRecorder | None:
    if request.options.logprobs is None:
        return None
    return LogprobsRecorder(request, lambda token: loader.decode([token]))


def transformers_scores(model: Any, device: Any, rows: Sequence[Sequence[int]], starts: Sequence[int],
                        top: int = 0) -> list[Scores]:
    """One forward pass over the rows (left-padded, with an attention mask and positions counted from
    each row's own start), keeping only the logits of the positions that predict the scored tokens."""
    import torch

    width = max(len(r) for r in rows)
    keep = max(len(r) - s + 1 for r, s in zip(rows, starts, strict=True))  # logits of the last `keep` positions
    pad = 0
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask if len(rows) > 1 else None,
                    position_ids=positions, logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()
    results = []
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        n = len(row) - start  # scored tokens: row[start:], predicted by positions start-1 .. len-2
        last = logits.shape[1] - 1  # the last position of every row (left padding aligns the ends)
        picked = logits[i, last - n : last]
        if top:
            results.append(scores_from_logits(picked.cpu().numpy(), row[start:], top))
            continue
        # torch's logsumexp in float32, as the model's own loss computes it: a third of numpy's float64
        # log_softmax of every position's vocabulary (perplexity's windows spent 11 % of their time there)
        targets = torch.tensor(row[start:], device=picked.device)
        logprobs = picked.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(picked, dim=-1)
        greedy = picked.argmax(dim=-1) == targets
        results.append(Scores(logprobs.cpu().tolist(), greedy.cpu().tolist()))
    return results


def llamacpp_recorder(loader: Any, request: Request) -> LogprobsRecorder | None:
    if request.options.logprobs is None:
        return None
    return LogprobsRecorder(request, lambda token: loader.decode([token]))


def llamacpp_last_logits(llm: Any) -> Any:
    """The logits of the last position the context computed (the one a token was just sampled from): a
    copy, read without asking llama.cpp to keep the logits of every position (``logits_all``)."""
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def llamacpp_scores(llm: Any, rows: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0) -> list[Scores]:
    """The rows' shared prefix is computed once; then each row's rest, with llama.cpp asked for the
    logits of the positions that predict scored tokens only (the batch's per-token ``logits`` flags).
    The context is left empty (the next generation computes its prompt)."""
    import llama_cpp
    import numpy as np

    ctx, batch, n_batch, n_vocab = llm._ctx, llm._batch, llm.n_batch, llm.n_vocab()
    shared = _common_prefix(rows)
    prefix = max(0, min(shared, min(starts) - 1))  # no scored position inside the prefix

    def run(tokens: Sequence[int], past: int, wanted_from: int) -> list[Any]:
        """Decode ``tokens`` at positions ``past``...; the logits of positions >= ``wanted_from``."""
        got = []
        for begin in range(0, len(tokens), n_batch):
            chunk = tokens[begin : begin + n_batch]
            batch.set_batch(chunk, past + begin, False)
            flags = [past + begin + j >= wanted_from for j in range(len(chunk))]
            for j, flag in enumerate(flags):
                batch.batch.logits[j] = flag
            ctx.decode(batch)
            for j, flag in enumerate(flags):
                if flag:
                    pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, j)
                    got.append(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy())
        return got

    llm.reset()
    ctx.kv_cache_clear()
    try:
        if prefix:
            run(rows[0][:prefix], 0, prefix)  # nothing wanted: the last position is computed anyway
        results = []
        for row, start in zip(rows, starts, strict=True):
            ctx.kv_cache_seq_rm(0, prefix, -1)
            logits = run(row[prefix:], prefix, start - 1)
            n = len(row) - start
            results.append(scores_from_logits(np.stack(logits[:n]), row[start:], top))
        return results
    finally:
        ctx.kv_cache_clear()
        llm.reset()


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n
