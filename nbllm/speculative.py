"""Speculative decoding: what the loaders share (docs/speculative.md).

Two ways of drafting tokens that the loaded model then checks in one step, keeping the tokens it would
have produced itself (greedy text is unchanged; only the speed moves):

- ``--prompt-lookup N`` (a generation option): the draft is the text that followed the last words
  where they occur earlier in the prompt or the reply (transformers' ``prompt_lookup_num_tokens``,
  llama-cpp-python's ``LlamaPromptLookupDecoding``);
- ``--draft-model PATH`` (a load option, the draft model is loaded beside the model): a small model with
  the same tokenizer drafts greedily (transformers' ``assistant_model``, a ``LlamaDraftModel`` running a
  second ``Llama`` for llama.cpp).

A loader that does this declares :attr:`~nbllm.loaders.Loader.speculation`; it counts the tokens drafted
and the ones accepted in :class:`DraftCounts`, which the result's timings show ("accepted 40 of 52
drafted", as LM Studio says). No heavy import here: ``%load_ext nbllm`` imports this module's caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import OptionError

METHODS = ("prompt lookup", "draft model")


@dataclass
class DraftCounts:
    """Tokens drafted and accepted in one generation, and by which method."""

    method: str
    drafted: int = 0
    accepted: int = 0
    _pending: tuple[int, ...] = ()

    def proposed(self, tokens: Any) -> None:
        """A draft was made: ``tokens`` (ids) will be checked by the model next."""
        self._pending = tuple(int(t) for t in tokens)
        self.drafted += len(self._pending)

    def produced(self, token: int) -> None:
        """The model produced ``token``: it accepts the draft's next token when they are the same (for a
        loader that sees its tokens one by one, not the number accepted per step)."""
        if self._pending:
            if self._pending[0] == token:
                self.accepted += 1
                self._pending = self._pending[1:]
            else:
                self._pending = ()

    def checked(self, accepted: int) -> None:
        """One step checked its draft and kept ``accepted`` of its tokens."""
        self.accepted += int(accepted)


def check_options(options: Any) -> None:
    """``--prompt-lookup`` against the other generation options (called by their ``validate``): what it
    cannot be combined with raises, in one line."""
    if options.logprobs is not None:
        raise OptionError("--prompt-lookup cannot be combined with --logprobs (the drafted steps compute several "
                          "tokens at once)", "drop one of them")
    from .constraints import Constraint

    if Constraint.from_options(options) is not None:
        raise OptionError("--prompt-lookup cannot be combined with a constraint on the output (structured output)",
                          "drop --prompt-lookup, or the constraint")


def refuse_unspeculative(loader: Any, options: Any) -> None:
    """Refuse, in one line, ``--prompt-lookup`` for a loader that does not declare ``speculation``."""
    if options.prompt_lookup and not getattr(loader, "speculation", False):
        raise OptionError(f"--prompt-lookup means nothing to the {loader.name} loader (it cannot check drafted tokens)",
                          "drop --prompt-lookup, or load the model with the transformers or llama.cpp loader")


def vocabulary_mismatch(model: str, draft: str, what: str) -> OptionError:
    return OptionError(f"--draft-model {draft} has another tokenizer than {model} ({what})",
                       "give a draft model of the same family (same tokenizer), or use --prompt-lookup")
