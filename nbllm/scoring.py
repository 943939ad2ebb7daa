"""Measuring a model instead of reading it: how likely it finds given continuations (:func:`score`), its
perplexity on a text (:func:`perplexity`), and the tokens of a text (:func:`tokenize`).

Each runs on the kernel's loaded model (a loader that gives token log-probabilities: Transformers,
llama.cpp), holds the model while it runs, is recorded in the run log like a generation, and is answered
from the recording while a replay is on (:func:`nbllm.replay`), without the model.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .engine import Engine, get_engine
from .errors import GenerationError, NbllmError, OptionError, ReplayError
from .loaders import Loader, TokenLoader
from .result import Record


@dataclass
class Choice:
    """One continuation's log-likelihood after the context."""

    continuation: str
    logprob: float
    """The sum of its tokens' log-probabilities (lm-eval's ``acc``)."""
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float]
    is_greedy: bool
    """Whether each of its tokens is the model's most likely one (greedy decoding would write it)."""

    @property
    def per_token(self) -> float:
        """The mean log-probability of its tokens."""
        return self.logprob / len(self.token_ids)

    @property
    def per_byte(self) -> float:
        """The log-probability per UTF-8 byte of the continuation (lm-eval's ``acc_bytes``)."""
        return self.logprob / len(self.continuation.encode("utf-8"))

    @property
    def per_char(self) -> float:
        """The log-probability per character (lm-eval's ``acc_norm``)."""
        return self.logprob / len(self.continuation)


@dataclass
class Scores:
    """What :func:`score` gives: the choices in the order given, ranked by :attr:`ranked`; shown as a table."""

    context: str
    choices: list[Choice]
    record: Record | None = None
    replayed: bool = False

    def __iter__(self) -> Iterator[Choice]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __getitem__(self, i: int) -> Choice:
        return self.choices[i]

    def ranked(self, by: str = "logprob") -> list[Choice]:
        """The choices, most likely first, by ``logprob`` (the sum), ``per_token``, ``per_byte`` or ``per_char``."""
        if by not in ("logprob", "per_token", "per_byte", "per_char"):
            raise OptionError(f"cannot rank by {by!r}", "use logprob, per_token, per_byte or per_char")
        return sorted(self.choices, key=lambda c: getattr(c, by), reverse=True)

    @property
    def best(self) -> Choice:
        """The most likely continuation (by the sum of log-probabilities)."""
        return self.ranked()[0]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per choice, most likely first: what :meth:`frame` and the table show."""
        out = []
        for rank, c in enumerate(self.ranked(), start=1):
            out.append({"rank": rank, "continuation": c.continuation, "logprob": c.logprob, "prob": math.exp(c.logprob),
                        "per_token": c.per_token, "per_byte": c.per_byte, "tokens": len(c.token_ids),
                        "is_greedy": c.is_greedy})
        return out

    def frame(self) -> Any:
        """A pandas DataFrame, one row per choice, most likely first."""
        from .errors import pandas_module

        return pandas_module().DataFrame(self.rows())

    def to_json(self) -> str:
        return json.dumps({"context": self.context, "choices": [asdict(c) for c in self.choices]}, ensure_ascii=False)

    def __str__(self) -> str:
        lines = [f"{'rank':>4}  {'logprob':>9}  {'per token':>9}  {'per byte':>8}  greedy  continuation"]
        for r in self.rows():
            lines.append(f"{r['rank']:>4}  {r['logprob']:>9.4f}  {r['per_token']:>9.4f}  {r['per_byte']:>8.4f}  "
                         f"{'yes' if r['is_greedy'] else 'no':>6}  {r['continuation']!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("rank", "continuation", "logprob", "prob", "per token", "per byte",
                                                   "tokens", "greedy"))
        body = "".join(
            f"<tr><td>{r['rank']}</td><td><code>{html.escape(repr(r['continuation']))}</code></td>"
            f"<td>{r['logprob']:.4f}</td><td>{r['prob']:.4f}</td><td>{r['per_token']:.4f}</td>"
            f"<td>{r['per_byte']:.4f}</td><td>{r['tokens']}</td><td>{'yes' if r['is_greedy'] else 'no'}</td></tr>"
            for r in self.rows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Perplexity:
    """What :func:`perplexity` gives."""

    perplexity: float
    nll: float
    """The mean negative log-likelihood per scored token (natural log): ``perplexity = exp(nll)``."""
    tokens: int
    """The tokens of the text."""
    scored: int
    """The tokens the mean is over (the sliding-window method's count)."""
    windows: int
    max_length: int
    stride: int
    record: Record | None = None
    replayed: bool = False

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (mean NLL {self.nll:.4f}) over {self.tokens} tokens, "
                f"{self.windows} window{'s' if self.windows != 1 else ''} of {self.max_length}, stride {self.stride}")

    def __repr__(self) -> str:
        return f"<nbllm.Perplexity {self}>"


@dataclass
class Tokens:
    """What :func:`tokenize` gives: a text's tokens, ids and count (and the share of the context it takes)."""

    text: str
    ids: list[int]
    tokens: list[str]
    context_length: int | None = None
    chat: bool = False
    messages: list[dict[str, str]] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def share(self) -> float | None:
        """The fraction of the model's context the text takes (``None`` when the context is unknown)."""
        return self.count / self.context_length if self.context_length else None

    def __len__(self) -> int:
        return self.count

    def summary(self) -> str:
        share = f" ({self.share:.1%} of the {self.context_length}-token context)" if self.share is not None else ""
        return f"{self.count} tokens{share}"

    def frame(self) -> Any:
        from .errors import pandas_module

        return pandas_module().DataFrame({"token": self.tokens, "id": self.ids})

    def __str__(self) -> str:
        shown = " ".join(f"{t!r}:{i}" for t, i in zip(self.tokens, self.ids, strict=True))
        head = ("rendered chat prompt:\n" + self.text + "\n") if self.chat else ""
        return f"{head}{shown}\n{self.summary()}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        colours = ("#fde2e2", "#e2f0fd", "#e6f7e2", "#fdf3e2", "#efe2fd")
        spans = "".join(
            f"<span title='id {i}' style='background:{colours[n % len(colours)]}'>{html.escape(t)}</span>"
            for n, (t, i) in enumerate(zip(self.tokens, self.ids, strict=True)))
        head = f"<pre>{html.escape(self.text)}</pre>" if self.chat else ""
        return (f"{head}<div style='white-space:pre-wrap;font-family:monospace'>{spans}</div>"
                f"<small>{html.escape(self.summary())}</small>")


# -- the functions -----------------------------------------------------------------------------------

def score(context: str, continuations: Sequence[str] | str, *, engine: Engine | None = None,
          model: str | None = None) -> Scores:
    """The log-likelihood of each continuation after ``context`` on the loaded model (``nbllm.score``): the
    sum and per-token log-probabilities, whether it is the greedy continuation, and the normalised forms
    lm-eval reports (per token, per byte, per character). All continuations run in one batched forward
    pass (the llama.cpp loader computes their shared prefix once). Tokenized as lm-eval does: the
    continuation's tokens are those the context + continuation adds after the context's own. ``model``: the
    name of the model to score with (``%llm_load MODEL --as NAME``; ``None``: the unnamed one)."""
    engine = engine or _engine_of(model)
    items = [continuations] if isinstance(continuations, str) else list(continuations)
    _check_texts(context, items)
    inputs = {"continuations": items}
    replayed = _replayed(engine, "score", context, inputs)
    if replayed is not None:
        data = json.loads(replayed[0])
        return Scores(data["context"], [Choice(**c) for c in data["choices"]], replayed[1], replayed=True)
    with engine.model_held() as loader:
        scorer = _scorer(loader)
        rows, starts = [], []
        context_ids = scorer.tokenize(context, add_special=True)
        for text in items:
            whole = scorer.tokenize(context + text, add_special=True)
            if whole[: len(context_ids)] != context_ids:  # the boundary merged: score the continuation's own tokens
                whole = context_ids + scorer.tokenize(text, add_special=False)
            rows.append(whole)
            starts.append(len(context_ids))
        limit = scorer.context_length
        longest = max(len(r) for r in rows)
        if limit is not None and longest > limit:
            raise OptionError(f"the context and the longest continuation are {longest} tokens; the model's context "
                              f"holds {limit}", "shorten the context (scoring does not cut texts)")
        results = scorer.token_scores(rows, starts)
        choices = []
        for text, row, start, got in zip(items, rows, starts, results, strict=True):
            ids = row[start:]
            choices.append(Choice(text, float(sum(got.logprobs)), [scorer.decode([i]) for i in ids], ids,
                                  list(got.logprobs), all(got.greedy)))
        out = Scores(context, choices)
        out.record = _log(engine, loader, "score", context, inputs, out.to_json(), len(context_ids))
    return out


def perplexity(text: str | Path | Sequence[str], *, max_length: int | None = None, stride: int = 512,
               progress: bool = True, engine: Engine | None = None, model: str | None = None) -> Perplexity:
    """The loaded model's perplexity on ``text`` (a string, a text file's path, or a list of texts joined
    by blank lines), with the sliding-window method of transformers' perplexity guide (which
    text-generation-webui uses): windows of ``max_length`` tokens (default: the model's context) moved by
    ``stride``, each scoring only the tokens it adds; a text longer than a window is windowed, never cut.
    The mean is weighted as the guide weights it, so the number equals the guide's own loop. ``model``: as in
    :func:`score`."""
    engine = engine or _engine_of(model)
    content = _text_of(text)
    if stride < 1:
        raise OptionError(f"stride {stride} is below 1", "use a stride of at least 1, e.g. 512")
    if max_length is not None and max_length < 2:
        raise OptionError(f"max_length {max_length} is below 2", "use a window of at least 2 tokens, e.g. 1024")
    inputs = {"max_length": max_length, "stride": stride}
    replayed = _replayed(engine, "perplexity", content, inputs)
    if replayed is not None:
        data = json.loads(replayed[0])
        return Perplexity(**data, record=replayed[1], replayed=True)
    with engine.model_held() as loader:
        scorer = _scorer(loader)
        ids = scorer.tokenize(content, add_special=True)
        window = max_length or scorer.context_length or 1024
        if scorer.context_length is not None and window > scorer.context_length:
            raise OptionError(f"max_length {window} is longer than the model's context ({scorer.context_length})",
                              f"use max_length={scorer.context_length} or less")
        if stride > window:
            raise OptionError(f"stride {stride} is longer than the window ({window} tokens)",
                              "use a stride of at most max_length")
        if len(ids) < 2:
            raise OptionError("the text is one token long: nothing to predict", "give a longer text")
        nll_sum, counted, windows = 0.0, 0, 0
        plan = list(_windows(len(ids), window, stride))
        bar = _progress(len(plan), progress)
        try:
            for begin, end, targets in plan:
                part = ids[begin:end]
                first = max(1, len(part) - targets)  # the guide's labels: the last `targets` tokens (never the first)
                unscorable = max(0, _first_scored(scorer) - first)  # a server's echo: none for the first token
                got = scorer.token_scores([part], [first + unscorable])[0]
                mean = -sum(got.logprobs) / len(got.logprobs)
                weight = targets - 1 - unscorable  # the guide: valid labels less the batch's one (its label shift)
                nll_sum += mean * weight
                counted += weight
                windows += 1
                bar(1)
        finally:
            bar(0)
        nll = nll_sum / counted if counted else float("nan")
        out = Perplexity(math.exp(nll), nll, len(ids), counted, windows, window, stride)
        out.record = _log(engine, loader, "perplexity", content, inputs, json.dumps(_perplexity_fields(out)), len(ids))
    return out


def tokenize(text: str, *, chat: bool = False, system: str | None = None, engine: Engine | None = None) -> Tokens:
    """The tokens of ``text`` with the loaded model's tokenizer (``nbllm.tokenize``): ids, the text of each
    token and the count; with ``chat`` (or a ``system`` prompt) the text is sent as one user turn through
    the model's chat template, and the rendered prompt is what is tokenized. Counts include the BOS token
    the model adds."""
    engine = engine or get_engine()
    if not isinstance(text, str) or not text:
        raise OptionError("there is no text to tokenize", "give the text, e.g. nbllm.tokenize('Hello')")
    prompt = engine.prompt_for(text, chat=chat or system is not None, system=system)
    loader = engine.loader
    if prompt.ids is None or not isinstance(loader, TokenLoader):
        raise GenerationError(f"the {loader.name} loader does not tokenize here", "count tokens at the server")
    with engine.model_held():
        pieces = [loader.decode([i]) or _special_text(loader, i) for i in prompt.ids]
    return Tokens(prompt.text, list(prompt.ids), pieces, loader.context_length, prompt.messages is not None,
                  prompt.messages)


# -- helpers -----------------------------------------------------------------------------------------

def _engine_of(model: str | None) -> Engine:
    if model is None:
        return get_engine()
    from .registry import engine_for

    return engine_for(model)


def _scorer(loader: Loader) -> Any:
    """The loader, when it gives the log-probabilities of given tokens (a local one, or the remote loader at
    a server that gives them): ``tokenize``, ``decode``, ``token_scores`` and ``context_length``."""
    if not loader.scores_tokens:
        why = getattr(loader, "scores_why", None)  # the remote loader says why its server cannot
        raise GenerationError(why or f"the {loader.name} loader does not give the log-probabilities of given tokens",
                              "load the model with the transformers or llama.cpp loader to score it")
    return loader


def _first_scored(scorer: Any) -> int:
    """The first position of a row the loader scores (1; a server's echo may give none for the first token)."""
    return int(getattr(scorer, "first_scored", 1))


def _check_texts(context: str, items: list[str]) -> None:
    if not isinstance(context, str) or not context:
        raise OptionError("the context is empty", "give the text the continuations follow, e.g. 'The capital of France is'")
    if not items:
        raise OptionError("there are no continuations to score", "give one or more, e.g. [' Paris', ' Lyon']")
    for i, text in enumerate(items):
        if not isinstance(text, str) or not text:
            raise OptionError(f"continuation {i + 1} is empty", "give each continuation some text (e.g. ' Paris')")


def _text_of(text: str | Path | Sequence[str]) -> str:
    if isinstance(text, Path):
        if not text.is_file():
            raise OptionError(f"there is no file {text}", "give a text, a list of texts or a text file's path")
        return text.read_text(encoding="utf-8")
    if isinstance(text, str):
        if not text.strip():
            raise OptionError("the text is empty", "give the text to measure")
        return text
    texts = list(text)
    if not texts or not all(isinstance(t, str) for t in texts) or not any(t.strip() for t in texts):
        raise OptionError("there is no text to measure", "give a text, a list of texts or a text file's path")
    return "\n\n".join(texts)


def _windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, targets) of each window of transformers' perplexity guide over ``n`` tokens."""
    previous = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, end - previous
        previous = end
        if end == n:
            return


def _progress(total: int, shown: bool) -> Callable[[int], None]:
    """A tqdm progress bar's update (0 closes it); nothing when not shown or for one window."""
    if not shown or total <= 1:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="perplexity", unit="window")

    def update(n: int) -> None:
        if n:
            bar.update(n)
        else:
            bar.close()

    return update


def _perplexity_fields(p: Perplexity) -> dict[str, Any]:
    return {k: getattr(p, k) for k in ("perplexity", "nll", "tokens", "scored", "windows", "max_length", "stride")}


def _special_text(loader: TokenLoader, token: int) -> str:
    """The text of a special token (BOS, EOS), which ``decode`` leaves out."""
    special = {v: k for k, v in loader.special_tokens.items() if v}
    bos_eos = list(special)
    for text in bos_eos:
        try:
            if loader.tokenize(text, add_special=False) == [token]:
                return text
        except Exception:  # a tokenizer that refuses its own special text
            continue
    return f"<{token}>"


def _log(engine: Engine, loader: Loader, kind: str, text: str, inputs: dict[str, Any], outcome_text: str,
         prompt_tokens: int) -> Record:
    """Record a measurement and write it to the run log (synchronously: it is already done)."""
    from .runlog import RunLog, default_path

    record = engine.measurement_record(loader, kind, text, inputs)
    if default_path() is not None:
        try:
            RunLog().add_run(record.to_dict(), {"text": outcome_text, "finish_reason": "done",
                                                "prompt_tokens": prompt_tokens, "completion_tokens": 0})
        except NbllmError:
            pass
        except Exception as exc:  # a full disk or a read-only folder: a note, never a failed measurement
            import warnings

            from .errors import NbllmWarning

            warnings.warn(f"the run log cannot be written ({type(exc).__name__}: {exc})", NbllmWarning, stacklevel=3)
    return record


def _replayed(engine: Engine, kind: str, text: str, inputs: dict[str, Any]) -> tuple[str, Record] | None:
    """While a replay stands in for the model: the recorded outcome of this measurement and its record
    (marked replayed); a measurement it did not record is one line naming the fix. ``None`` otherwise."""
    from .identity import request_identity
    from .loaders.replay import ReplayLoader

    if not engine.loaded or not isinstance(engine.loader, ReplayLoader):
        return None
    stand_in = engine.loader
    assert stand_in.options is not None
    wanted = request_identity(model=stand_in.model, loader=stand_in.loader_name,
                              load_options=stand_in.options.to_dict(),
                              generation_options={"measure": kind, **inputs}, seed=0, prompt=text)
    recording = stand_in.replay.recording
    run = recording.take(wanted)
    if run is None:
        raise ReplayError(f"no recorded {kind} in {recording.source} matches this one",
                          "run it as it was recorded, or turn the replay off (nbllm.replay(None)) and load the model")
    record = Record.from_dict({**run.record, "replayed": {"source": str(recording.source), "run": run.where}})
    stand_in.replay.answered += 1
    return run.text, record
