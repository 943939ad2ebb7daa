"""The nbllm model class of lm-evaluation-harness (imported only by :func:`nbllm.evaluate.evaluate`: it
imports lm_eval). Registered with lm-eval as ``nbllm``; it runs on the engine's loaded model.

Texts are tokenized as lm-eval's own ``hf`` model tokenizes them (the tokenizer's own special tokens; a
context's trailing spaces moved to the continuation; an empty context replaced by the BOS token, else EOS),
so both give the same log-likelihoods on the same weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .engine import Engine, get_engine
from .errors import GenerationError
from .loaders import TokenLoader


@register_model("nbllm")
class NbllmLM(LM):
    """lm-eval's model interface over nbllm's engine: ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until``."""

    def __init__(self, engine: Engine | None = None, **_: Any) -> None:
        super().__init__()
        self.engine = engine or get_engine()

    # -- tokens, as lm-eval's hf model makes them ------------------------------------------------------
    def _loader(self) -> Any:
        loader = self.engine.loader
        if not loader.scores_tokens:  # a local loader, or the remote loader at a server it scores on
            raise GenerationError(f"the {loader.name} loader does not give the log-probabilities lm-eval needs",
                                  "load the model with the transformers or llama.cpp loader to evaluate it")
        return loader

    def _prefix_token(self, loader: TokenLoader) -> int:
        ids = loader.tokenize("", add_special=True)
        return ids[0] if ids else min(getattr(loader, "eos_token_ids", None) or [0])

    def _encode_pair(self, loader: TokenLoader, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        if not context:
            return [self._prefix_token(loader)], self._encode(loader, continuation)
        whole = self._encode(loader, context + continuation)
        context_ids = self._encode(loader, context)
        return context_ids, whole[len(context_ids):]

    def _encode(self, loader: TokenLoader, text: str) -> list[int]:
        """As lm-eval's hf model encodes: the tokenizer's own special tokens (its BOS), unless the text
        already starts with the BOS text."""
        bos = loader.special_tokens.get("bos_token") or ""
        return loader.tokenize(text, add_special=not (bos and text.startswith(bos)))

    def _score(self, loader: TokenLoader, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        limit = loader.context_length or 2048
        rows, starts = [], []
        for context, continuation in pairs:
            row = (context + continuation)[-(limit):]
            rows.append(row)
            starts.append(max(1, len(row) - len(continuation)))
        got = loader.token_scores(rows, starts)
        return [(float(sum(s.logprobs)), bool(all(s.greedy))) for s in got]

    # -- lm-eval's three requests --------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each (context, continuation): the continuation's log-likelihood and whether it is greedy; the
        continuations of one context run as one batch."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with self.engine.model_held():
            loader = self._loader()
            groups: dict[str, list[int]] = defaultdict(list)
            for i, request in enumerate(requests):
                groups[request.args[0]].append(i)
            bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
            for context, members in groups.items():
                pairs = [self._encode_pair(loader, context, requests[i].args[1]) for i in members]
                for i, value in zip(members, self._score(loader, pairs), strict=True):
                    out[i] = value
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, value)
                bar.update(len(members))
            bar.close()
        return [v for v in out if v is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in lm-eval's rolling windows of the model's context."""
        out = []
        with self.engine.model_held():
            loader = self._loader()
            limit = loader.context_length or 2048
            for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
                windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self._encode(loader, request.args[0]),
                    prefix_token=self._prefix_token(loader), max_seq_len=limit, context_len=1)))
                total = sum(ll for ll, _ in self._score(loader, windows))
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each (context, options): greedy (or sampled, as the task asks) text up to the task's ``until``
        strings and ``max_gen_toks``, through the engine (so each is a generation in the run log)."""
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            options: dict[str, Any] = {"max_new_tokens": int(kwargs.get("max_gen_toks", 256)),
                                       "stop": tuple(u for u in until if u), "seed": 1234}
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                options.update(temperature=float(kwargs.get("temperature", 1.0)), top_p=float(kwargs.get("top_p", 1.0)))
            else:
                options.update(temperature=0.0, top_p=0.9)
            text = self.engine.generate(context, **options).text
            for stop in until:  # as lm-eval's own models cut their answers
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out
