"""The engine: the one loaded model of this kernel, and everything done with it.

It owns the model's lifecycle (loading another model releases the first; the same model with the same
options is not loaded again; unloading frees the memory), serializes generations with a lock, and
turns a loader's token ids into a :class:`~nbllm.result.Result`.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import gc
import html
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models
from .chat_template import FALLBACK_NOTE, ChatNote, render_chat, starts_with_bos
from .errors import GenerationError, NbllmError, NoModelLoadedError
from .fingerprint import weights_sha256
from .loaders import Loader, Placement, choose_loader, loader_class
from .source import ModelSource
from .options import GenerationOptions, LoadOptions
from .result import Record, Result, Timings, clock
from .streaming import IncrementalDecoder, StopHoldback


@dataclass
class Status:
    """What is loaded, how, and where it lives."""

    loaded: bool
    model: str | None = None
    path: str | None = None
    format: str | None = None
    loader: str | None = None
    revision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Load options that differ from the defaults."""
    placement: Placement = field(default_factory=Placement)
    details: dict[str, Any] = field(default_factory=dict)
    load_seconds: float | None = None
    loaded_at: str | None = None
    process_rss_bytes: int = 0

    def lines(self) -> list[str]:
        if not self.loaded:
            return ["No model loaded. Load one with %llm_load MODEL (or nbllm.load(...))."]
        opts = " ".join(f"{LoadOptions.spec(k).flag} {v}" if v is not True else LoadOptions.spec(k).flag
                        for k, v in self.options.items()) or "defaults"
        out = [
            f"model:     {self.model} ({self.format}) — {self.path}",
            f"loader:    {self.loader}" + (f", revision {self.revision}" if self.revision else ""),
            f"options:   {opts}",
        ]
        layers = ", ".join(f"{dev}: {n}" for dev, n in self.placement.devices.items())
        memory = ", ".join(f"{dev}: {format_memory(b)}" for dev, b in self.placement.memory_bytes.items())
        out.append(f"placement: {layers or 'n/a'}")
        out.append(f"memory:    {memory or 'n/a'} (process RSS {format_memory(self.process_rss_bytes)})")
        for key, value in self.details.items():
            if value not in (None, {}, [], ""):
                out.append(f"{key + ':':<10} {value}")
        out.extend(f"note:      {n}" for n in self.placement.notes)
        if self.load_seconds is not None:
            out.append(f"loaded in: {self.load_seconds:.2f} s at {self.loaded_at}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(str(self)) + "</pre>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


def format_memory(n: int) -> str:
    """Bytes of memory in binary units, as a status line shows them (``0.7 MiB``, ``3.52 GiB``)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Engine:
    """Holds one model at a time. Thread-safe: one load or generation runs at a time."""

    def __init__(self) -> None:
        self._loader: Loader | None = None
        self._source: ModelSource | None = None
        self._options: LoadOptions | None = None
        self._lock = threading.RLock()
        self._hashes: concurrent.futures.Future[dict[str, str]] | None = None
        self._loaded_at: str | None = None
        self._load_seconds: float | None = None
        self.defaults = GenerationOptions()
        """Generation options used when a call gives none (the settings panel sets them)."""
        self.reuse_prefix = True
        """Let conversations reuse the computed state of their history (see ``stream_prompt``)."""
        self.last_result: Result | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, model: str | Path, options: LoadOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> Status:
        """Load ``model`` (a path, a models-folder name or a hub id) with ``options``.

        Options are checked before anything happens; an invalid one leaves the current model loaded.
        The same model with the same options returns at once. Another model releases the current one
        first, so peak memory is never the sum of both; if the new one then fails to load, the previous
        one is loaded again.
        """
        opts = _load_options(options, kwargs)
        source = models.resolve(model, revision=opts.revision, file=opts.file)
        name = choose_loader(source, opts)
        cls = loader_class(name)
        with self._lock:
            if self._loader is not None and self._source == source and self._options == opts:
                return self.status()
            cls.check(source, opts)
            previous = (self._source, self._options) if self._loader is not None else None
            self._release()
            try:
                self._load(cls, source, opts)
            except NbllmError as exc:
                if previous is None:
                    raise
                restored = self._restore(*previous)  # type: ignore[arg-type]
                if restored:
                    exc.cause += f" ({previous[0].name} is loaded again)"  # type: ignore[union-attr]
                    exc.args = (exc.message,)
                raise
            return self.status()

    def _load(self, cls: type[Loader], source: ModelSource, opts: LoadOptions) -> None:
        loader = cls()
        start = time.perf_counter()
        hashes = None
        if source.revision is None and source.path is not None:
            hashes = _hasher().submit(weights_sha256, source.path)
        loader.load(source, opts)
        self._loader, self._source, self._options, self._hashes = loader, source, opts, hashes
        self._load_seconds = time.perf_counter() - start
        self._loaded_at = _dt.datetime.now().strftime("%H:%M:%S")

    def _restore(self, source: ModelSource, opts: LoadOptions) -> bool:
        try:
            self._load(loader_class(choose_loader(source, opts)), source, opts)
            return True
        except NbllmError:
            self._release()
            return False

    def unload(self) -> bool:
        """Release the model and its memory. Returns whether a model was loaded."""
        with self._lock:
            had = self._loader is not None
            self._release()
            return had

    def _release(self) -> None:
        loader, self._loader = self._loader, None
        self._source = self._options = None
        self._hashes = None
        if loader is not None:
            loader.unload()
            del loader
        self.last_result = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        return self._loader is not None

    @property
    def loader(self) -> Loader:
        """The loaded model's loader (raises when nothing is loaded)."""
        if self._loader is None:
            raise NoModelLoadedError("no model is loaded", "load one first: %llm_load MODEL or nbllm.load(MODEL)")
        return self._loader

    def status(self) -> Status:
        if self._loader is None or self._source is None or self._options is None:
            return Status(loaded=False, process_rss_bytes=process_rss())
        return Status(
            loaded=True,
            model=self._source.name,
            path=self._source.location,
            format=self._source.format,
            loader=self._loader.name,
            revision=self._source.revision,
            options=self._options.changed(),
            placement=self._loader.placement,
            details=self._loader.describe(),
            load_seconds=self._load_seconds,
            loaded_at=self._loaded_at,
            process_rss_bytes=process_rss(),
        )

    # -- generation ------------------------------------------------------------------------------
    def generation_options(
        self, options: GenerationOptions | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> GenerationOptions:
        """``options`` and keyword overrides on top of the engine's defaults, validated."""
        if isinstance(options, GenerationOptions):
            base = options
        else:
            base = GenerationOptions.from_dict({**self.defaults.to_dict(), **dict(options or {})})
        return base.replace(**kwargs) if kwargs else base

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text`` with the loaded model's tokenizer, under the engine's lock: a fast
        tokenizer used from two threads at once (a cell and the chat panel) raises "Already borrowed"."""
        with self._lock:
            return self.loader.tokenize(text, add_special=add_special)

    def prompt_for(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        *,
        chat: bool = False,
        system: str | None = None,
        warn_fallback: bool = True,
    ) -> tuple[str, list[int], list[dict[str, str]] | None]:
        """The prompt text, its token ids and (in chat mode) the messages it was rendered from.

        A model without a chat template gets :data:`FALLBACK_TEMPLATE` and a :class:`ChatNote`
        warning (conversations say it once themselves: ``warn_fallback=False``)."""
        loader = self.loader
        if isinstance(prompt, str) and not chat:
            return prompt, self.tokenize(prompt, add_special=True), None
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if system is not None:
            messages = [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
        if loader.chat_template is None and warn_fallback:
            warnings.warn(FALLBACK_NOTE, ChatNote, stacklevel=3)
        text = render_chat(loader.chat_template, messages, special_tokens=loader.special_tokens)
        add_special = not starts_with_bos(text, loader.special_tokens)
        return text, self.tokenize(text, add_special=add_special), messages

    def stream(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        chat: bool = False,
        system: str | None = None,
        conversation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Result:
        """Start generating; iterate the returned :class:`Result` to receive text as it comes.

        ``prompt`` is raw text, or (with ``chat=True`` or a list of ``{"role", "content"}``
        messages) rendered through the model's chat template. Nothing runs until iteration starts.
        """
        opts = self.generation_options(options, **kwargs)
        text, ids, messages = self.prompt_for(prompt, chat=chat, system=system)
        return self.stream_prompt(text, ids, opts, messages=messages, conversation=conversation)

    def stream_prompt(
        self,
        text: str,
        ids: list[int],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        conversation: dict[str, Any] | None = None,
        reuse_prefix: bool = False,
    ) -> Result:
        """Like :meth:`stream`, for a prompt already rendered (``text``) and tokenized (``ids``).

        Conversations render their own prompts (a continued reply, a history cut to fit the
        context) and pass them here; ``messages`` (chat mode) and ``conversation`` go to the record.
        ``reuse_prefix`` (conversations; only while the engine's ``reuse_prefix`` is on) lets the
        loader take the history's computed state from the previous turn instead of computing it
        again. Raw prompts compute everything, so a recorded seed reproduces their text exactly:
        computing part of a prompt in another batch shape is not bit-for-bit the same arithmetic.
        """
        opts = self.generation_options(options)
        loader = self.loader
        limit = loader.context_length
        if limit is not None and len(ids) >= limit:
            raise GenerationError(
                f"the prompt is {len(ids)} tokens and the model's context holds {limit}",
                "shorten the prompt" + (" or load with a larger --n-ctx" if loader.name == "llama.cpp" else ""),
            )
        seed = opts.seed if opts.seed is not None else secrets.randbelow(2**32)
        result = Result(text, seed)
        result.prompt_tokens = len(ids)
        record = Record(
            model=self._model_record(),
            loader=loader.name,
            load_options=self._options.to_dict() if self._options else {},
            generation_options={**opts.to_dict(), "seed": seed},
            seed=seed,
            prompt=text,
            mode="chat" if messages is not None else "raw",
            messages=messages,
            conversation=conversation,
        )
        self.last_result = result
        reuse = reuse_prefix and self.reuse_prefix
        return result.attach(self._run(loader, ids, opts, seed, result, record, reuse))

    def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Result:
        """Generate to the end and return the finished :class:`Result`."""
        result = self.stream(prompt, options, **kwargs)
        _ = result.text
        return result

    def _model_record(self) -> dict[str, Any]:
        src = self._source
        assert src is not None
        out = src.identity()
        if self._hashes is not None:
            out["sha256"] = self._hashes.result()
        return out

    def _run(
        self,
        loader: Loader,
        prompt_ids: list[int],
        opts: GenerationOptions,
        seed: int,
        result: Result,
        record: Record,
        reuse_prefix: bool = False,
    ) -> Iterator[str]:
        """The generation itself: token ids → safe text pieces, with timings and the end reason."""
        with self._lock:
            if self._loader is not loader:
                result.finish("error", record, Timings())  # finished, so waiters and on_done callbacks see it
                raise NoModelLoadedError(
                    "the model this prompt was prepared for has been unloaded", "run the prompt again"
                )
            decoder = IncrementalDecoder(loader.decode, context=prompt_ids)
            holdback = StopHoldback(opts.stop)
            eos = loader.eos_token_ids
            timings = Timings()
            reason = "length"
            start = clock()
            first = last = None
            tokens = loader.generate_tokens(prompt_ids, opts, seed, result.cancel_event, reuse_prefix=reuse_prefix)
            try:
                for token in tokens:
                    last = clock()
                    if first is None:
                        first = last
                    result.token_ids.append(token)
                    if token in eos:
                        reason = "eos"
                        break
                    piece = holdback.feed(decoder.add(token))
                    if piece:
                        yield piece
                    if holdback.stopped:
                        reason = "stop"
                        break
                if result.cancel_event.is_set() and reason == "length":
                    reason = "cancelled"
                tail = holdback.feed(decoder.flush()) + holdback.flush()
                if tail:
                    yield tail
            except (KeyboardInterrupt, GeneratorExit):
                reason = "interrupted"
                tail = holdback.feed(decoder.flush()) + holdback.flush()
                if tail:
                    result.chunks.append(tail)
                raise
            except NbllmError:
                reason = "error"
                raise
            except Exception as exc:
                reason = "error"
                raise GenerationError(
                    f"generation failed in {loader.name}: {type(exc).__name__}: {exc}".splitlines()[0],
                    "the model is still loaded; check the options, or reload the model if this repeats",
                ) from exc
            finally:
                tokens.close()  # type: ignore[attr-defined]
                end = clock()
                timings.total_seconds = end - start
                record.reused_prefix_tokens = loader.reused_tokens
                if first is not None:
                    timings.time_to_first_token = first - start
                    if last is not None and len(result.token_ids) > 1 and last > first:
                        timings.decode_tokens_per_second = (len(result.token_ids) - 1) / (last - first)
                result.finish(reason, record, timings)


def _load_options(options: LoadOptions | Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> LoadOptions:
    if isinstance(options, LoadOptions):
        return options.replace(**kwargs) if kwargs else options
    return LoadOptions.from_dict({**dict(options or {}), **kwargs})


_HASHER: concurrent.futures.ThreadPoolExecutor | None = None


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    """One background thread that hashes weights while they load (for records)."""
    global _HASHER
    if _HASHER is None:
        _HASHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbllm-sha256")
    return _HASHER


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine() -> Engine:
    """This process's engine (one per kernel), shared by the API, the magics and the panels."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = Engine()
        return _ENGINE
