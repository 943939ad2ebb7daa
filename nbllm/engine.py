"""The engine: the one loaded model of this kernel, and everything done with it.

It owns the model's lifecycle (loading another model releases the first; the same model with the same
options is not loaded again; unloading frees the memory) and turns a loader's token ids or text pieces
into a :class:`~nbllm.result.Result`, the same way for every loader.

**Ownership.** An unfinished result owns the model. Anything else that needs the model — a generation
from any thread or front end, a chat message, tokenizing, unload, load — first settles it: a result
being read on another thread (the chat panel's reply) is waited for; any other unfinished result (one
left half read in a variable, or never read) is stopped cleanly, its ``finish_reason`` saying
``superseded``, its partial text kept. Two generations never interleave on one model, and a model is
never released under a generation.
"""

from __future__ import annotations

import concurrent.futures
import copy
import datetime as _dt
import gc
import html
import os
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat_template import FALLBACK_NOTE, ChatNote, render_chat, starts_with_bos
from .errors import GenerationError, NbllmError, NbllmWarning, NoModelLoadedError, OptionError
from .fingerprint import weights_sha256
from .loaders import Loader, Placement, Request, TextLoader, TokenLoader, choose_loader, resolve_source
from .options import GenerationOptions, LoadOptions
from .result import Record, Result, Timings, clock, library_versions
from .source import ModelSource
from .streaming import IncrementalDecoder, StopHoldback, TokenStream


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
    already_loaded: bool = False
    """The last load asked for the model already loaded with the same options: nothing was done."""

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



@dataclass
class Prompt:
    """A prompt ready for a loader: its text, its token ids (``None`` for a loader that does not
    tokenize) and, in chat mode, the messages it was rendered from."""

    text: str
    ids: list[int] | None
    messages: list[dict[str, str]] | None = None


class Engine:
    """Holds one model at a time. Thread-safe: an unfinished result owns the model (see the module)."""

    def __init__(self) -> None:
        self._loader: Loader | None = None
        self._source: ModelSource | None = None
        self._options: LoadOptions | None = None
        self._cond = threading.Condition(threading.RLock())
        self._owner: Result | None = None
        self._hashes: concurrent.futures.Future[dict[str, str]] | None = None
        self._loaded_at: str | None = None
        self._load_seconds: float | None = None
        self.defaults = GenerationOptions()
        """Generation options used when a call gives none (the settings panel sets them)."""
        self.reuse_prefix = True
        """Let conversations reuse the computed state of their history (see ``stream_prompt``)."""
        self.last_result: Result | None = None

    # -- ownership -------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Wait for, or stop, the unfinished result that owns the model. Called holding the lock."""
        while (owner := self._owner) is not None and not owner.done:
            if owner.read_elsewhere():
                self._cond.wait(0.05)
            else:
                owner.supersede()
        self._owner = None

    def _released_by(self, result: Result) -> None:
        with self._cond:
            if self._owner is result:
                self._owner = None
            self._cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self, model: str | Path, options: LoadOptions | Mapping[str, Any] | None = None, **kwargs: Any) -> Status:
        """Load ``model`` (a path, a models-folder name, a hub id, or what a registered loader claims,
        such as a server URL) with ``options``.

        Options are checked before anything happens; an invalid one leaves the current model loaded.
        The same model with the same options returns at once. Another model releases the current one
        first, so peak memory is never the sum of both; if the new one then fails to load, the previous
        one is loaded again.
        """
        opts = _load_options(options, kwargs)
        if not isinstance(model, (str, Path)):
            raise OptionError(f"the model must be a path, a name or a hub id, not {type(model).__name__}",
                              "give it as text, e.g. nbllm.load('org/model')")
        source = resolve_source(str(model), opts)
        cls = choose_loader(source, opts)
        with self._cond:
            if self._loader is not None and self._source == source and self._options == opts:
                status = self.status()
                status.already_loaded = True
                return status
            cls.check(source, opts)
            self._settle()
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
        loader.load(source, opts)
        hashes = None
        if source.revision is None and source.path is not None:  # a hub commit names the files already
            hashes = _hasher().submit(weights_sha256, source.path)
        self._loader, self._source, self._options, self._hashes = loader, source, opts, hashes
        self._load_seconds = time.perf_counter() - start
        self._loaded_at = _dt.datetime.now().strftime("%H:%M:%S")

    def _restore(self, source: ModelSource, opts: LoadOptions) -> bool:
        try:
            self._load(choose_loader(source, opts), source, opts)
            return True
        except NbllmError:
            self._release()
            return False

    def unload(self) -> bool:
        """Release the model and its memory (an unfinished result is settled first). Returns whether a
        model was loaded."""
        with self._cond:
            self._settle()
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
        elif options is None or isinstance(options, Mapping):
            base = GenerationOptions.from_dict({**self.defaults.to_dict(), **dict(options or {})})
        else:
            raise OptionError(f"options must be GenerationOptions or a dict, not {type(options).__name__}",
                              "pass keyword arguments, e.g. temperature=0")
        return base.replace(**kwargs) if kwargs else base

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text`` with the loaded model's tokenizer. The model is settled first: a fast
        tokenizer used while another thread decodes (a cell and the chat panel) raises "Already borrowed"."""
        with self._cond:
            self._settle()
            loader = self.loader
            if not isinstance(loader, TokenLoader):
                raise GenerationError(f"the {loader.name} loader does not tokenize here", "count tokens at the server")
            return loader.tokenize(text, add_special=add_special)

    def prompt_for(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        *,
        chat: bool = False,
        system: str | None = None,
        warn_fallback: bool = True,
    ) -> Prompt:
        """The prompt for ``prompt``: raw text, or (``chat`` or a list of messages) rendered through
        the model's chat template. An empty ``system`` means none.

        A model without a chat template gets :data:`FALLBACK_TEMPLATE` and a :class:`ChatNote`
        warning (conversations say it once themselves: ``warn_fallback=False``). A loader that
        renders chats itself (a server) gets the messages."""
        loader = self.loader
        if isinstance(prompt, str) and not chat:
            return Prompt(prompt, self._ids(prompt, add_special=True))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            if system:
                messages.insert(0, {"role": "system", "content": system})
        if loader.renders_chat:
            return Prompt("", None, messages)
        if loader.chat_template is None and warn_fallback:
            warnings.warn(FALLBACK_NOTE, ChatNote, stacklevel=3)
        text = render_chat(loader.chat_template, messages, special_tokens=loader.special_tokens)
        return Prompt(text, self._ids(text, add_special=not starts_with_bos(text, loader.special_tokens)), messages)

    def _ids(self, text: str, *, add_special: bool) -> list[int] | None:
        return self.tokenize(text, add_special=add_special) if isinstance(self.loader, TokenLoader) else None

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

        ``prompt`` is raw text, or (with ``chat=True``, a ``system`` prompt, or a list of
        ``{"role", "content"}`` messages) rendered through the model's chat template. Nothing runs
        until iteration starts; the result owns the model until it finishes (see the module).
        """
        if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt)):
            raise OptionError(f"the prompt must be text or a list of messages, not {type(prompt).__name__}",
                              'give a string, or [{"role": "user", "content": "..."}]')
        opts = self.generation_options(options, **kwargs)
        ready = self.prompt_for(prompt, chat=chat or system is not None, system=system)
        return self.stream_prompt(ready, opts, conversation=conversation)

    def stream_prompt(
        self,
        prompt: Prompt,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        conversation: dict[str, Any] | None = None,
        reuse_prefix: bool = False,
        continue_final: bool = False,
    ) -> Result:
        """Like :meth:`stream`, for a prompt already rendered and tokenized (:meth:`prompt_for`).

        Conversations render their own prompts (a continued reply, a history cut to fit the
        context) and pass them here with ``conversation`` (its name and turn, for the record).
        ``reuse_prefix`` (conversations; only while the engine's ``reuse_prefix`` is on) lets the
        loader take the history's computed state from the previous turn instead of computing it
        again. Raw prompts compute everything, so a recorded seed reproduces their text exactly:
        computing part of a prompt in another batch shape is not bit-for-bit the same arithmetic.

        A prompt that leaves less room in the context than ``max_new_tokens`` is generated up to the
        context's end, with a note (a conversation says it itself), and ends with reason ``context``.
        """
        opts = self.generation_options(options)
        with self._cond:
            self._settle()
            loader = self.loader
            ids = prompt.ids
            limit = loader.context_length
            capped = opts
            if limit is not None and ids is not None:
                if len(ids) >= limit:
                    raise GenerationError(
                        f"the prompt is {len(ids)} tokens and the model's context holds {limit}",
                        "shorten the prompt" + (" or load with a larger --n-ctx" if "n_ctx" in loader.load_options else ""),
                    )
                room = limit - len(ids)
                if opts.max_new_tokens > room:
                    capped = _with_max_new_tokens(opts, room)
                    if conversation is None:
                        warnings.warn(
                            f"the prompt is {len(ids)} tokens and the model's context holds {limit}: at most "
                            f"{room} of the {opts.max_new_tokens} new tokens asked for fit (reason 'context' "
                            "if the reply reaches the end)",
                            NbllmWarning, stacklevel=2,
                        )
            seed = opts.seed if opts.seed is not None else secrets.randbelow(2**32)
            assert self._source is not None and self._options is not None
            record = Record(
                model=self._source.identity(),
                loader=loader.name,
                load_options=self._options.to_dict(),
                generation_options={**opts.to_dict(), "seed": seed},
                seed=seed,
                prompt=prompt.text,
                mode="chat" if prompt.messages is not None else "raw",
                messages=prompt.messages,
                conversation=conversation,
                versions=library_versions(loader.libraries),
            )
            if self._hashes is not None:
                record.complete_later("sha256", self._hashes)
            result = Result(prompt.text, seed, record)
            result.prompt_tokens = len(ids) if ids is not None else 0
            request = Request(
                prompt=prompt.text, prompt_ids=ids, options=capped, seed=seed, cancel=result.cancel_event,
                messages=prompt.messages, continue_final=continue_final,
                reuse_prefix=reuse_prefix and self.reuse_prefix,
            )
            self._owner = result
            self.last_result = result
            result.on_done(self._released_by)
            return result.attach(self._run(loader, request, result, context_capped=capped is not opts))

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

    def _run(self, loader: Loader, request: Request, result: Result, *, context_capped: bool) -> Iterator[str]:
        """The generation itself: the loader's token ids or text → safe text pieces, with timings
        and the end reason. Runs while the result is iterated; holds no lock between pieces."""
        record = result.pending_record
        if self._loader is not loader:
            result.finish("error", Timings())  # finished, so waiters and on_done callbacks see it
            raise NoModelLoadedError("the model this prompt was prepared for has been unloaded", "run the prompt again")
        holdback = StopHoldback(request.options.stop)
        timings = Timings()
        reason = "length"
        start = clock()
        first = last = None
        produced = 0
        stream: Any  # the loader's generator: token ids or text pieces
        if isinstance(loader, TokenLoader):
            decoder: IncrementalDecoder | None = IncrementalDecoder(loader.decode, context=request.prompt_ids or ())
            eos = loader.eos_token_ids
            stream = loader.generate_tokens(request)
        else:
            assert isinstance(loader, TextLoader)
            decoder, eos = None, frozenset()
            stream = loader.generate_text(request)
        stamped = isinstance(stream, TokenStream)  # it hands over tokens in batches, each stamped when made
        try:
            for item in stream:
                last = stream.emitted_at if stamped else clock()
                if first is None:
                    first = last
                produced += 1
                if decoder is not None:
                    result.token_ids.append(item)
                    if item in eos:
                        reason = "eos"
                        break
                    text = decoder.add(item)
                else:
                    text = item
                piece = holdback.feed(text)
                if piece:
                    yield piece
                if holdback.stopped:
                    reason = "stop"
                    break
            else:
                if isinstance(loader, TextLoader) and loader.finish_reason:
                    reason = loader.finish_reason
            if result.cancel_event.is_set() and reason == "length":
                reason = "cancelled"
            elif context_capped and reason == "length" and produced >= request.options.max_new_tokens:
                reason = "context"
            tail = holdback.feed(decoder.flush() if decoder is not None else "") + holdback.flush()
            if tail:
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            reason = "superseded" if result.superseded else "interrupted"
            tail = holdback.feed(decoder.flush() if decoder is not None else "") + holdback.flush()
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
            stream.close()
            end = clock()
            timings.total_seconds = end - start
            record.reused_prefix_tokens = loader.reused_tokens
            timings.compile_seconds = loader.compile_seconds
            if isinstance(loader, TextLoader):
                prompt_tokens, completion = loader.usage
                if prompt_tokens is not None:
                    result.prompt_tokens = prompt_tokens
                result.counted_tokens = completion if completion is not None else produced
            if first is not None:
                timings.time_to_first_token = first - start
                n = result.completion_tokens
                if last is not None and n > 1 and last > first:
                    timings.decode_tokens_per_second = (n - 1) / (last - first)
            result.finish(reason, timings)


def _messages(prompt: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Chat messages as plain dicts, checked: each a role and text content."""
    out = []
    for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise OptionError(f"message {i + 1} needs a role (system, user or assistant) and text content",
                              'write it as {"role": "user", "content": "..."}')
        out.append({"role": str(role), "content": content})
    return out


def _with_max_new_tokens(opts: GenerationOptions, n: int) -> GenerationOptions:
    """``opts`` with ``max_new_tokens`` lowered to ``n`` (already valid: no second validation, no
    second round of warnings)."""
    capped = copy.copy(opts)
    object.__setattr__(capped, "max_new_tokens", n)
    return capped


def _load_options(options: LoadOptions | Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> LoadOptions:
    if isinstance(options, LoadOptions):
        return options.replace(**kwargs) if kwargs else options
    return LoadOptions.from_dict({**dict(options or {}), **kwargs})


_HASHER: concurrent.futures.ThreadPoolExecutor | None = None


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    """One background thread, at the lowest CPU priority, that hashes weights after a load (for
    records): the first prompt never waits for it, nor competes with it for the CPU."""
    global _HASHER
    if _HASHER is None:
        _HASHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbllm-sha256", initializer=_lowest_priority)
    return _HASHER


def _lowest_priority() -> None:
    try:  # Linux: a thread's own nice value (its native id names it)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def get_engine() -> Engine:
    """This process's engine (one per kernel), shared by the API, the magics and the panels."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = Engine()
        return _ENGINE
