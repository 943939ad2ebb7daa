"""Speculative decoding in the two local loaders: the libraries' own machinery, counted.

Transformers: ``generate(prompt_lookup_num_tokens=N)`` or ``generate(assistant_model=draft)``; the
candidate generator ``generate`` builds is wrapped for the generation so that its drafts
(``get_candidates``) and the matches it is told of (``update_candidate_strategy``) are counted.

llama.cpp: ``Llama.generate`` consults ``Llama.draft_model`` (a ``LlamaDraftModel``) after every checked
step; :class:`CountingDraft` is that model: it asks the drafter of the request (llama-cpp-python's
``LlamaPromptLookupDecoding``, or :class:`GGUFDraftModel`, a second small ``Llama`` run greedily) and
counts. Checking a draft needs the logits of every position of a step (llama-cpp-python's
``logits_all``): a model loaded with a draft model is built with it; a prompt-lookup request on a model
loaded without one turns it on for that generation only (:func:`llama_logits_all`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import LoadError
from ..options import LoadOptions
from ..source import ModelSource
from ..speculative import DraftCounts, vocabulary_mismatch


def draft_source(spec: str, target_format: str, loader_name: str) -> Any:
    """The :class:`~nbllm.source.ModelSource` of ``--draft-model``: a path, or a name in the models folder
    (resolved as a model is), of the loaded model's format."""
    from ..errors import ModelNotFoundError, OptionError
    from ..resolve import resolve

    try:
        source = resolve(str(spec).strip())
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"--draft-model: {exc.cause}", exc.fix) from None
    if source.format != target_format:
        kinds = {"gguf": "a GGUF file", "transformers": "a Transformers model folder"}
        raise OptionError(
            f"--draft-model {source.name} is {kinds.get(source.format, source.format)}; the {loader_name} loader "
            f"needs {kinds.get(target_format, target_format)} there, like the model it drafts for",
            "give the draft model in the loaded model's format",
        )
    return source



# ------------------------------------------------------------------------------------------ Transformers


def check_transformers_draft(source: ModelSource, options: LoadOptions) -> ModelSource | None:
    """``--draft-model`` for the Transformers loader, checked before anything is released: a model folder
    whose tokenizer has the same vocabulary as the model's."""
    if not options.draft_model:
        return None
    if source.format != "transformers":
        from ..errors import OptionError

        raise OptionError("--draft-model with the transformers loader needs a model folder, not a GGUF file",
                          "load the GGUF file with the llama.cpp loader (--loader llama.cpp), which takes a GGUF draft model")
    draft = draft_source(options.draft_model, "transformers", "transformers")
    from transformers import AutoTokenizer

    try:
        mine = AutoTokenizer.from_pretrained(str(source.files), trust_remote_code=options.trust_remote_code)
        theirs = AutoTokenizer.from_pretrained(str(draft.files), trust_remote_code=options.trust_remote_code)
    except Exception as exc:
        raise LoadError(f"--draft-model {draft.name}: its tokenizer cannot be read ({type(exc).__name__})",
                        "give a draft model folder with its tokenizer files") from exc
    if mine.get_vocab() != theirs.get_vocab():
        raise vocabulary_mismatch(source.name, draft.name, f"{len(theirs)} tokens against {len(mine)}, or other ids")
    return draft


def load_transformers_draft(draft: ModelSource, model: Any, options: LoadOptions) -> Any:
    """The draft model, on the model's device and in its data type, drafting ``--draft-max`` tokens a step."""
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(
        str(draft.files), dtype=model.dtype, device_map={"": model.device if model.device.type != "meta" else "cpu"},
        trust_remote_code=options.trust_remote_code,
    )
    assistant.eval()
    assistant.generation_config.num_assistant_tokens = options.draft_max
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return assistant


@contextlib.contextmanager
def counted_candidates(model: Any, counts: DraftCounts) -> Iterator[None]:
    """While ``generate`` runs on ``model``: the candidate generator it builds counts its drafts and the
    tokens the model accepted of them (one instance attribute, removed afterwards)."""
    build = model._get_candidate_generator

    def counting(*args: Any, **kwargs: Any) -> Any:
        generator = build(*args, **kwargs)
        get, update = generator.get_candidates, generator.update_candidate_strategy

        def get_candidates(input_ids: Any, *a: Any, **k: Any) -> Any:
            out = get(input_ids, *a, **k)
            counts.drafted += int(out[0].shape[1] - input_ids.shape[1])
            return out

        def update_candidate_strategy(input_ids: Any, scores: Any, num_matches: Any) -> Any:
            counts.checked(int(num_matches))
            return update(input_ids, scores, num_matches)

        generator.get_candidates = get_candidates
        generator.update_candidate_strategy = update_candidate_strategy
        return generator

    model._get_candidate_generator = counting
    try:
        yield
    finally:
        del model._get_candidate_generator


# ------------------------------------------------------------------------------------------ llama.cpp


def check_gguf_draft(source: ModelSource, options: LoadOptions) -> ModelSource | None:
    """``--draft-model`` for the llama.cpp loader, checked before anything is released: a GGUF file whose
    vocabulary is the model's, token for token (both read with ``vocab_only``: no weights)."""
    if not options.draft_model:
        return None
    draft = draft_source(options.draft_model, "gguf", "llama.cpp")
    mine, theirs = _vocabulary(source.files), _vocabulary(draft.files)
    if mine != theirs:
        what = f"{len(theirs)} tokens against {len(mine)}" if len(mine) != len(theirs) else "the same ids are other tokens"
        raise vocabulary_mismatch(source.name, draft.name, what)
    return draft


def _vocabulary(path: Any) -> list[bytes]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n = int(llm.n_vocab())
        return [bytes(llama_cpp.llama_vocab_get_text(vocab, i) or b"") for i in range(n)]
    finally:
        llm.close()


def draft_classes() -> tuple[type, type]:
    """:class:`CountingDraft` and :class:`GGUFDraftModel`, defined on first use (they subclass
    llama-cpp-python's ``LlamaDraftModel``, which is imported only with llama.cpp)."""
    return _draft_classes()


_CLASSES: tuple[type, type] | None = None


def _draft_classes() -> tuple[type, type]:
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import numpy as np
    from llama_cpp.llama_speculative import LlamaDraftModel

    class CountingDraft(LlamaDraftModel):
        """The ``draft_model`` the main ``Llama`` consults: the request's drafter (none: no draft), counted."""

        def __init__(self) -> None:
            self.drafter: Any = None
            self.counts: DraftCounts | None = None

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            if self.drafter is None:
                return np.array([], dtype=np.intc)
            draft = self.drafter(input_ids)
            if self.counts is not None:
                self.counts.proposed(draft)
            return draft

    class GGUFDraftModel(LlamaDraftModel):
        """A second, small ``Llama`` that drafts greedily: ``num_pred_tokens`` tokens after the ids it is
        given, keeping its own KV cache of the prefix they share with the last call."""

        def __init__(self, llm: Any, num_pred_tokens: int) -> None:
            self.llm = llm
            self.num_pred_tokens = num_pred_tokens
            self.stop: frozenset[int] = frozenset({int(llm.token_eos())})

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            ids = [int(i) for i in input_ids]
            room = int(self.llm.n_ctx()) - len(ids)
            out: list[int] = []
            if room <= 1:
                return np.array([], dtype=np.intc)
            tokens = self.llm.generate(ids, reset=True, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            try:
                for token in tokens:
                    out.append(int(token))
                    if len(out) >= min(self.num_pred_tokens, room - 1) or token in self.stop:
                        break
            finally:
                tokens.close()
            return np.array(out, dtype=np.intc)

    _CLASSES = (CountingDraft, GGUFDraftModel)
    return _CLASSES


@contextlib.contextmanager
def llama_logits_all(llm: Any) -> Iterator[None]:
    """Keep the logits of every position for one generation of a ``Llama`` built without ``logits_all`` (a
    drafted step checks several positions at once). The array for them is as llama-cpp-python makes it for
    ``logits_all``, ``n_ctx`` rows, whose pages the system gives only as rows are written."""
    import numpy as np

    if llm._logits_all:
        yield
        return
    scores = llm.scores
    llm.scores = np.ndarray((llm._n_ctx, llm._n_vocab), dtype=np.single)
    llm._logits_all = True
    try:
        yield
    finally:
        llm._logits_all = False
        llm.scores = scores
