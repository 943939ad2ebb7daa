"""Token log-probabilities from a model at a server (the remote loader, :mod:`nbllm.loaders.openai`).

- ``--logprobs K``: the entries of a streamed reply's ``logprobs``, in OpenAI's legacy completions form
  (``tokens``, ``token_logprobs``, ``top_logprobs`` as ``{text: logprob}``) and in the chat form (``content``:
  ``token``, ``logprob``, ``top_logprobs``), made into :func:`nbllm.tokens.entry`'s shape. A server gives
  token texts, not ids: ``id`` is ``None``.
- Scoring, perplexity, evaluation: the log-probabilities of given tokens, from a completion that echoes
  its prompt with ``logprobs`` (``echo: true``, one new token, discarded), with the server's own tokenizer
  endpoints. Done for llama-cpp-python's server, the one tested here: it takes prompts as text only (its
  ``prompt`` is a string), so each row of ids is sent as its text and refused in one line when that text
  does not tokenize back to the same ids; its echo gives ``null`` for a prompt's first token, so that one
  token cannot be scored (:attr:`ServerScorer.first_scored`); and it puts the model's BOS before every
  prompt, so a row that does not start a text (a perplexity window inside it) is scored after a BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import GenerationError
from ..tokens import Scores

SCORING_SERVERS = frozenset({"llama-cpp-python"})
"""Server kinds whose prompt log-probabilities (echo) and tokenizer nbllm uses to score given tokens."""

NO_STREAMED_LOGPROBS = {
    "nbllm": "nbllm's own server gives logprobs only in replies that are not streamed",
    "ollama": "Ollama's own API, which nbllm speaks to it, gives no token log-probabilities",
    "tgi": "TGI's OpenAI layer gives no token log-probabilities in streamed completions",
}
"""Server kinds that give no log-probabilities in a streamed reply, and why (one line each)."""


def logprobs_fields(top: int, *, chat: bool) -> dict[str, Any]:
    """The request fields that ask for each new token's logprob and ``top`` alternatives."""
    return {"logprobs": True, "top_logprobs": top} if chat else {"logprobs": top}


def entries(choice: dict[str, Any], top: int, *, chat: bool) -> list[dict[str, Any]]:
    """The ``--logprobs`` entries one streamed choice carries (none when it carries no logprobs)."""
    said = choice.get("logprobs")
    if not isinstance(said, dict):
        return []
    out = []
    if chat:
        for item in said.get("content") or ():
            if not isinstance(item, dict) or not isinstance(item.get("logprob"), (int, float)):
                continue
            alternatives = [(a.get("token"), a.get("logprob")) for a in item.get("top_logprobs") or ()
                            if isinstance(a, dict)]
            out.append(_entry(str(item.get("token", "")), float(item["logprob"]), alternatives, top))
        return out
    tokens = said.get("tokens") or []
    values = said.get("token_logprobs") or []
    tops = said.get("top_logprobs") or []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) else None
        if not isinstance(value, (int, float)):
            continue
        alternatives = list((tops[i] or {}).items()) if i < len(tops) and isinstance(tops[i], dict) else []
        out.append(_entry(str(token), float(value), alternatives, top))
    return out


def _entry(token: str, logprob: float, alternatives: Sequence[tuple[Any, Any]], top: int) -> dict[str, Any]:
    """An entry as :func:`nbllm.tokens.entry` makes one, from texts: the ``top`` most likely alternatives
    (a server may add the drawn token to them when it is not among the most likely: left out)."""
    kept = sorted(((str(t), float(v)) for t, v in alternatives if isinstance(v, (int, float))),
                  key=lambda a: -a[1])[:top]
    return {"id": None, "token": token, "logprob": logprob, "top": [[t, None, v] for t, v in kept]}


class ServerScorer:
    """The log-probabilities of given tokens from llama-cpp-python's server: its ``/extras/tokenize`` and
    ``/extras/detokenize``, and ``/completions`` with ``echo`` and ``logprobs``."""

    def __init__(self, client: Any, url: str, root: str, model_id: str) -> None:
        self.client, self.url, self.root, self.model_id = client, url, root, model_id
        self._prefix: list[int] | None = None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        import httpx

        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise GenerationError(f"the request to the server at {self.url} failed ({type(exc).__name__})",
                                  "check that the server is running, then score again") from None
        if response.status_code != 200:
            raise GenerationError(f"the server at {self.url} answered {response.status_code} to {path.rsplit('/', 1)[-1]}",
                                  "check the server's log; score the model with a local loader instead")
        return response.json()

    @property
    def prefix(self) -> list[int]:
        """What the server's tokenizer puts before every text (its BOS, if the model has one)."""
        if self._prefix is None:
            self._prefix = list(self._post(f"{self.root}/extras/tokenize", {"input": "", "model": self.model_id})["tokens"])
        return self._prefix

    @property
    def first_scored(self) -> int:
        """The first position of a row that can be scored: the server's echo gives ``null`` for the
        prompt's first token (after its BOS), as OpenAI's echo does."""
        return len(self.prefix) + 1

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        ids = list(self._post(f"{self.root}/extras/tokenize", {"input": text, "model": self.model_id})["tokens"])
        prefix = self.prefix
        if not add_special and prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix):]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._post(f"{self.root}/extras/detokenize", {"tokens": list(ids), "model": self.model_id})["text"])

    def token_scores(self, rows: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0) -> list[Scores]:
        """Each row is sent as its text, echoed with logprobs; the row's ids must come back from that text."""
        if top:
            raise GenerationError("llama-cpp-python's server names a position's alternatives by text, not by id",
                                  "ask for no alternatives here, or use a local loader")
        prefix = self.prefix
        results = []
        for row, start in zip(rows, starts, strict=True):
            if start < self.first_scored:
                raise GenerationError(
                    "llama-cpp-python's server gives no log-probability for a prompt's first token (its echo "
                    "gives null there), and this asks for it",
                    "give a context before the scored text, or score it with a local loader")
            if list(row[: len(prefix)]) != prefix:  # a window inside a text: the server puts its BOS before it
                row, start = prefix + list(row), start + len(prefix)
            text = self.decode(row[len(prefix):])
            if self.tokenize(text, add_special=True) != list(row):
                raise GenerationError(
                    "the server takes prompts as text, and these tokens do not come back from their text (the "
                    "continuation merges with the context's last token)",
                    "score it with a local loader, or end the context with a space")
            said = self._post(f"{self.url}/completions", {
                "model": self.model_id, "prompt": text, "echo": True, "logprobs": max(1, top), "max_tokens": 1,
                "temperature": 0})
            logprobs = (said.get("choices") or [{}])[0].get("logprobs") or {}
            values, tops = logprobs.get("token_logprobs") or [], logprobs.get("top_logprobs") or []
            first, last = start - len(prefix), len(row) - len(prefix)  # echo positions: the row without its prefix
            if len(values) < last:
                raise GenerationError(f"the server at {self.url} echoed {len(values)} log-probabilities for a "
                                      f"prompt of {last} tokens", "score it with a local loader")
            picked, greedy = [], []
            for value, alternatives in zip(values[first:last], tops[first:last], strict=True):
                if not isinstance(value, (int, float)) or not isinstance(alternatives, dict):
                    raise GenerationError(f"the server at {self.url} gave no log-probability for a prompt token",
                                          "score it with a local loader")
                picked.append(float(value))
                greedy.append(float(value) >= max(float(v) for v in alternatives.values()) - 1e-6)
            results.append(Scores(picked, greedy))
        return results
