"""The engine: the one loaded model of this kernel, and everything done with it.

It owns the model's lifecycle (loading another model releases the first; the same model with the same
options is not loaded again; unloading frees the memory) and turns a loader's token ids or text pieces
into a :class:`~nbllm.result.Result`, the same way for every loader.

**Ownership.** An unfinished result owns the model. Anything else that needs the model — a generation
from any thread or front end, a chat message, tokenizing, unload, load — first settles it: a result
being read on another thread (the chat panel's reply) is waited for; any other unfinished result (one
left half read in a variable, or never read) is stopped cleanly, its ``finish_reason`` saying
``superseded``, its partial text kept. Two generations never interleave on one model, and a model is
never released under a generation — except side by side on a loader that serves several requests at
once (a server, ``parallel_requests`` > 1), where :meth:`Engine.generate_rows` (under
:func:`nbllm.generate_many` and sweeps) runs results ``beside`` one another; anything else still waits
for all of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import gc
import os
import secrets
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import Adapter, adapters_line, check_format
from .chat_template import FALLBACK_NOTE, ChatNote, render_chat, starts_with_bos
from .constraints import refuse_unconstrained
from .decode import Row, decode_steps, generation_error, single, text_loader_facts
from .errors import GenerationError, LoadError, NbllmError, NbllmWarning, NoModelLoadedError, OptionError
from .frontend import command
from .loaders import Loader, Placement, Request, TextLoader, TokenLoader, choose_loader, resolve_source
from .loaders._samplers import refuse_samplers
from .loaders.base import LoadInstead
from .memory import drop_frames, format_memory, process_rss
from .options import GenerationOptions, LoadOptions
from .result import Record, Result, Timings, clock, library_versions
from .shown import ShownAsLines
from .source import ModelSource
from .speculative import refuse_unspeculative
from .store import weights_sha256
from .tokens import logprobs_refusal

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler


@dataclass
class Status(ShownAsLines):
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
            return [f"No model loaded. Load one with {command('load', 'MODEL')}."]
        opts = " ".join(LoadOptions.spec(k).flag if v is True else "--no-" + LoadOptions.spec(k).flag[2:]
                        if v is False else f"{LoadOptions.spec(k).flag} {v}"
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




@dataclass
class Prompt:
    """A prompt ready for a loader: its text, its token ids (``None`` for a loader that does not
    tokenize) and, in chat mode, the messages it was rendered from."""

    text: str
    ids: list[int] | None
    messages: list[dict[str, Any]] | None = None
    images: list[Any] = field(default_factory=list)
    """The :class:`~nbllm.images.ChatImage` of each image part of ``messages``, in order."""
    tools: list[dict[str, Any]] | None = None
    """Chat mode: the tools' JSON schemas (rendered in ``text`` already, except for a loader that renders chats,
    which passes them on), kept in the record."""
    tool_choice: Any = None
    """Chat mode at a loader that renders chats: the ``tool_choice`` it passes on."""


class Engine:
    """Holds one model at a time. Thread-safe: an unfinished result owns the model (see the module)."""

    def __init__(self) -> None:
        self._loader: Loader | None = None
        self._source: ModelSource | None = None
        self._options: LoadOptions | None = None
        self._cond = threading.Condition(threading.RLock())
        self._owners: list[Result] = []
        """The unfinished results that own the model: one, or several side by side (see the module)."""
        self._asked: ModelSource | None = None
        """The source as resolved from what the user typed (the loader may complete it: a server's model id)."""
        self._hashes: concurrent.futures.Future[dict[str, str]] | None = None
        self._loaded_at: str | None = None
        self._load_seconds: float | None = None
        self._adapters: tuple[Adapter, ...] = ()
        self.defaults = GenerationOptions()
        """Generation options used when a call gives none (the settings panel sets them)."""
        self.reuse_prefix = True
        """Let conversations reuse the computed state of their history (see ``stream_prompt``)."""
        self.last_result: Result | None = None
        self.route: Callable[[str, LoadOptions], tuple[ModelSource, type[Loader]] | None] | None = None
        """While set, decides what a load loads before the loaders' registry is asked (replay sets it:
        its stand-in loader records the model asked for and loads nothing); ``None`` from it: as usual."""
        self._listeners: list[Callable[[Result], None]] = []
        self._scheduler: Scheduler | None = None
        self._waiting = threading.local()
        self.name: str | None = None
        """The name this model was loaded as (``--as NAME``, :mod:`nbllm.registry`); ``None`` for the
        kernel's unnamed model. Records carry it (``Record.model_name``)."""
        self.stood_in_by: Loader | None = None
        """The stand-in (replay) whose miss loaded the model now loaded (``--fallback run``), else ``None``:
        a sweep goes on across that change, and stops at any other."""

    def on_result(self, callback: Callable[[Result], None]) -> Callable[[], None]:
        """Call ``callback(result)`` each time a generation of this engine finishes, however it was
        started (magics, API, chat, panels, sweeps): the run log records them so. Returns a function
        that removes the callback. A callback that raises is reported as a warning, never to the
        generation."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self, result: Result) -> None:
        for callback in list(self._listeners):
            try:
                callback(result)
            except Exception as exc:
                warnings.warn(f"a result listener failed: {type(exc).__name__}: {exc}", NbllmWarning, stacklevel=2)

    # -- ownership -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def on_wait(self, callback: Callable[[Result], None]) -> Iterator[None]:
        """While in the block, ``callback(result)`` is called once, on this thread, when a request made
        here has to wait for a result another thread is reading (the chat panel's reply), so that a
        front end can say it is waiting (``%%llm`` does)."""
        previous = getattr(self._waiting, "callback", None)
        self._waiting.callback = callback
        try:
            yield
        finally:
            self._waiting.callback = previous

    def _settle(self, *, beside: bool = False) -> None:
        """Wait for, or stop, the unfinished results that own the model. Called holding the lock.
        ``beside``: results being read on other threads are left running (side by side)."""
        told = False
        while True:
            busy = None
            for owner in list(self._owners):
                if owner.done:
                    continue
                if owner.read_elsewhere():
                    busy = owner
                else:
                    owner.supersede()
            self._owners = [r for r in self._owners if not r.done]
            if beside or busy is None:
                return
            callback = getattr(self._waiting, "callback", None)
            if callback is not None and not told:
                told = True
                callback(busy)
            self._cond.wait(0.05)

    def _released_by(self, result: Result) -> None:
        with self._cond:
            if result in self._owners:
                self._owners.remove(result)
            self._cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------------------
    def load(
        self,
        model: str | Path,
        options: LoadOptions | Mapping[str, Any] | None = None,
        *,
        fit: bool = False,
        save_settings: bool = False,
        **kwargs: Any,
    ) -> Status:
        """Load ``model`` (a path, a models-folder name, a hub id, or what a registered loader claims,
        such as a server URL) with ``options``.

        A model in the models folder gets its saved settings (``config-user.yaml``, a note says so);
        ``fit`` adds the recommendation of :func:`nbllm.fit.recommend` for this machine (its reasons
        are notes, shown before loading); options given here win over both. ``save_settings`` stores
        the options as the model's settings after it loaded. Options are checked before anything
        happens; an invalid one leaves the current model loaded. The same model with the same options
        returns at once. Another model releases the current one first, so peak memory is never the sum
        of both; if the new one then fails to load, the previous one is loaded again.
        """
        from .fit import plan

        opts = _load_options(options, kwargs)
        if not isinstance(model, (str, Path)):
            raise OptionError(f"the model must be a path, a name or a hub id, not {type(model).__name__}",
                              "give it as text, e.g. nbllm.load('org/model')")
        routed = self.route(str(model), opts) if self.route is not None else None
        if routed is not None:
            source, cls = routed
        else:
            source = resolve_source(str(model), opts)
            opts, saved = plan.load_options(source, opts, fit=fit)
            if saved:
                self.defaults = saved.generation_options(self.defaults)
            cls = choose_loader(source, opts)
        with self._cond:
            if self._loader is not None and self._asked == source and self._options == opts:
                if save_settings:
                    plan.after_load(source, opts, cls.name, 0.0, save=True, defaults=self.defaults)
                status = self.status()
                status.already_loaded = True
                return status
            cls.check(source, opts)
            self._settle()
            previous = (self._source, self._options) if self._loader is not None else None
            dropped = " without its adapters" if self._adapters else ""
            self._release()
            plan.before_load()
            try:
                self._load(cls, source, opts)
            except Exception as failure:  # a loader's own NbllmError, or anything a loader let through
                error = plan.explained(failure, source, opts, during="load") or _load_error(failure, cls, source)
                cause = failure.__cause__ if isinstance(failure, NbllmError) and failure.__cause__ else failure
                drop_frames(failure)  # what the failed load built (a partial model) goes before the previous comes back
                if previous is not None:
                    if self._restore(*previous):  # type: ignore[arg-type]
                        error.cause += f" ({previous[0].name} is loaded again{dropped})"  # type: ignore[union-attr]
                    else:
                        error.cause += (f" (and {previous[0].name}, the model loaded before, could not be loaded "  # type: ignore[union-attr]
                                        "again: no model is loaded now)")
                    error.args = (error.message,)
                raise error from (None if cause is error else cause)
            plan.after_load(source, opts, cls.name, self._load_seconds or 0.0, save=save_settings,
                            defaults=self.defaults)
            return self.status()

    def _load(self, cls: type[Loader], source: ModelSource, opts: LoadOptions) -> None:
        loader = cls()
        start = time.perf_counter()
        loader.load(source, opts)
        hashes = None
        if source.revision is None and source.path is not None:  # a hub commit names the files already
            hashes = _hasher().submit(weights_sha256, source.path)
        self._loader, self._options, self._hashes = loader, opts, hashes
        self._asked, self._source = source, loader.source or source  # a loader may complete it (a server's model id)
        self._load_seconds = time.perf_counter() - start
        self._loaded_at = _dt.datetime.now().strftime("%H:%M:%S")

    def _restore(self, source: ModelSource, opts: LoadOptions) -> bool:
        try:
            self._load(choose_loader(source, opts), source, opts)
            return True
        except Exception:  # whatever it is (its file gone...), the load's own error is the one to show
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
        self._source = self._options = self._asked = None
        self._hashes = None
        self._adapters = ()
        self.stood_in_by = None
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
        """The loaded model's loader (raises when nothing is loaded). A load running on another thread
        (the settings panel's) is waited for: its lock is held for the whole load."""
        with self._cond:
            loader = self._loader
        if loader is None:
            raise NoModelLoadedError("no model is loaded", f"load one first: {command('load', 'MODEL')}")
        return loader

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
            details={**self._loader.describe(), **({"adapters": adapters_line(self._adapters)} if self._adapters else {})},
            load_seconds=self._load_seconds,
            loaded_at=self._loaded_at,
            process_rss_bytes=process_rss(),
        )

    # -- adapters --------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[Adapter, ...]:
        """The LoRA adapters applied to the loaded model, in order, with their scales."""
        return self._adapters

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Apply exactly ``adapters`` to the loaded model (see :mod:`nbllm.lora`), replacing those applied
        before; empty: none. The model is settled first (see the module); an adapter that does not fit is
        refused in one line and the model keeps the adapters it had. Loading a model drops them."""
        with self._cond:
            self._settle()
            loader = self.loader
            for adapter in adapters:
                check_format(adapter, type(loader))
            loader.set_adapters(list(adapters))
            self._adapters = tuple(adapters)

    def model_identity(self) -> dict[str, Any]:
        """What names the loaded model in records (and so in run logs, history and replay): the source's
        identity, plus the applied adapters (name, format, scale, sha256, hub revision) when there are any."""
        assert self._source is not None
        identity = self._source.identity()
        if self._adapters:
            identity["adapters"] = [a.identity() for a in self._adapters]
        return identity

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

    @contextlib.contextmanager
    def model_held(self) -> Iterator[Loader]:
        """The loaded model's loader, held for a computation that is not a generation (scoring,
        perplexity, evaluation: :mod:`nbllm.scoring`): unfinished results are settled first, and nothing
        else uses the model until the block ends."""
        with self._cond:
            self._settle()
            yield self.loader

    def measurement_record(self, loader: Loader, kind: str, text: str, inputs: Mapping[str, Any]) -> Record:
        """The record of a measurement of the loaded model (``kind``: score, perplexity, eval) on ``text``
        with ``inputs`` (they stand where a generation's options stand, so they are part of its identity)."""
        record = self._record(loader, Prompt(text, None), self.defaults, 0, None)
        record.generation_options = {"measure": kind, **inputs}
        record.mode, record.seed_drawn = kind, False
        return record

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
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> Prompt:
        """The prompt for ``prompt``: raw text, or (``chat`` or a list of messages) rendered through
        the model's chat template. An empty ``system`` means none.

        A model without a chat template gets :data:`FALLBACK_TEMPLATE` and a :class:`ChatNote`
        warning (conversations say it once themselves: ``warn_fallback=False``). A loader that
        renders chats itself (a server) gets the messages. ``tools``: JSON schemas of functions the
        template renders (:mod:`nbllm.tools`)."""
        loader = self.loader
        if isinstance(prompt, str) and not chat:
            return Prompt(prompt, self.prompt_ids(prompt, add_special=True))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            if system:
                messages.insert(0, {"role": "system", "content": system})
        images = self.images_for(messages)
        schemas = [dict(t) for t in tools] if tools else None  # in the record (and passed on by a server's loader)
        if loader.renders_chat:
            return Prompt("", None, messages, images, tools=schemas)
        if loader.chat_template is None and warn_fallback:
            warnings.warn(FALLBACK_NOTE, ChatNote, stacklevel=3)
        text = render_chat(loader.chat_template, loader.template_messages(messages), special_tokens=loader.special_tokens,
                           tools=tools)
        add_special = not starts_with_bos(text, loader.special_tokens)
        return Prompt(text, self.prompt_ids(text, add_special=add_special, images=images), messages, images,
                      tools=schemas)

    def images_for(self, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The images of ``messages``' image parts, in order; a loaded model that takes no images, or an
        image no longer held in memory, raises :class:`~nbllm.errors.ImageError` in one line."""
        from .images import image_hashes, recall

        hashes = image_hashes(messages)
        if not hashes:
            return []
        loader = self.loader
        if not loader.takes_images:
            from .errors import ImageError

            name = self._source.name if self._source is not None else "the loaded model"
            raise ImageError(f"{name} takes no images (a text-only model); the message has {len(hashes)}",
                             "load a vision model (an image-text-to-text model folder, or a GGUF with its mmproj "
                             "projector), or send text only")
        return [recall(h) for h in hashes]

    def prompt_ids(self, text: str, *, add_special: bool, images: Sequence[Any] = ()) -> list[int] | None:
        """The token ids of ``text``; with ``images``, as the loader's processor expands their placeholders."""
        if not isinstance(self.loader, TokenLoader):
            return None
        if not images:
            return self.tokenize(text, add_special=add_special)
        with self._cond:
            self._settle()
            return self.loader.tokenize_with_images(text, images, add_special=add_special)

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

        The request goes through the model's :attr:`scheduler`: alone, it runs as :meth:`stream_prompt`
        runs it; beside requests of other callers (``%llm_serve``'s clients, other threads) it joins
        them, batched where the loader can batch (:mod:`nbllm.scheduler`).
        """
        if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt)):
            raise OptionError(f"the prompt must be text or a list of messages, not {type(prompt).__name__}",
                              'give a string, or [{"role": "user", "content": "..."}]')
        if isinstance(prompt, str) and not prompt.strip():
            raise OptionError("the prompt is empty", "write the text to continue (or the message, with chat=True)")
        opts = self.generation_options(options, **kwargs)
        ready = self.prompt_for(prompt, chat=chat or system is not None, system=system)
        return self.stream_front(ready, opts, conversation=conversation)

    def stream_front(self, prompt: Prompt, opts: GenerationOptions, **kwargs: Any) -> Result:
        """A front end's request (a cell, ``nbllm.generate``, a chat): through the model's :attr:`scheduler`,
        which runs it as :meth:`stream_prompt` does while it is idle; before anything made the scheduler
        (the usual cell alone), directly, without importing it on a first prompt."""
        if self._scheduler is None:
            return self.stream_prompt(prompt, opts, **kwargs)
        return self._scheduler.stream_prompt(prompt, opts, direct_when_idle=True, **kwargs)

    def stream_prompt(
        self,
        prompt: Prompt,
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        conversation: dict[str, Any] | None = None,
        reuse_prefix: bool = False,
        continue_final: bool = False,
        beside: bool = False,
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

        ``beside`` (:func:`nbllm.generate_many`): on a loader that serves several requests at once,
        results being read on other threads keep running beside this one instead of being waited for.
        """
        opts = self.generation_options(options)
        with self._cond:
            loader = self.loader
            self._settle(beside=beside and loader.parallel_requests > 1)
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
                    capped = opts.with_valid(max_new_tokens=room)
                    if conversation is None:
                        warnings.warn(
                            f"the prompt is {len(ids)} tokens and the model's context holds {limit}: at most "
                            f"{room} of the {opts.max_new_tokens} new tokens asked for fit (reason 'context' "
                            "if the reply reaches the end)",
                            NbllmWarning, stacklevel=2,
                        )
            refuse_what_it_cannot_do(loader, opts)
            result, request = self._begin(loader, prompt, opts, capped=capped, conversation=conversation,
                                          continue_final=continue_final, reuse_prefix=reuse_prefix and self.reuse_prefix)
            try:
                answered = loader.answer(request)
            except LoadInstead as instead:  # a stand-in (replay) gave up: the real model from here on
                self._load_instead(instead)
                return self.stream_prompt(self._prepared_again(prompt, continue_final), opts, conversation=conversation,
                                          reuse_prefix=reuse_prefix, continue_final=continue_final)
            if answered is not None:  # a stand-in answered from its records: nothing runs
                self.last_result = answered
                return answered
            if capped.logprobs is not None and not loader.gives_logprobs:
                raise GenerationError(*logprobs_refusal(loader))
            self._owners.append(result)
            self.last_result = result
            result.on_done(self._released_by)
            result.on_done(self._notify)
            return result.attach(self._run(loader, request, result, context_capped=capped is not opts))

    def _load_instead(self, instead: LoadInstead) -> None:
        """Load the real model a stand-in gave up for. If that fails the stand-in stays, its route (the
        replay stays on) and its adapters with it, and the error says so: one state, told alike."""
        route, stand_in, adapters = self.route, self._loader, self._adapters
        self.route = None
        try:
            self.load(instead.model, instead.options)
        except NbllmError as error:
            self.route = route
            if self._loader is not stand_in:  # released by the failed load: stand in again (loads nothing)
                self.load(instead.model, instead.options)
                if adapters:
                    self.set_adapters(adapters)
            error.cause += "; the replay stays on (recorded requests still replay, the next miss tries the load again)"
            error.args = (error.message,)
            raise
        self.stood_in_by = stand_in
        if instead.loaded is not None:
            instead.loaded()

    def _record(self, loader: Loader, prompt: Prompt, opts: GenerationOptions, seed: int,
                conversation: dict[str, Any] | None, batch: dict[str, Any] | None = None) -> Record:
        """The record of a generation about to start (the weights' hash joins it when ready)."""
        assert self._source is not None and self._options is not None
        record = Record(
            model=self.model_identity(),
            loader=loader.name,
            load_options=self._options.to_dict(),
            generation_options={**opts.to_dict(), "seed": seed},
            seed=seed,
            prompt=prompt.text,
            mode="chat" if prompt.messages is not None else "raw",
            messages=prompt.messages,
            conversation=conversation,
            versions=library_versions(loader.libraries),
            seed_drawn=opts.seed is None,
            batch=batch,
            model_name=self.name,
            tools=prompt.tools,
            tool_choice=prompt.tool_choice,
            tool_calling=_tool_calling(loader) if prompt.tools else None,
        )
        if self._hashes is not None:
            record.complete_later("sha256", self._hashes)
        return record

    def _prepared_again(self, prompt: Prompt, continue_final: bool) -> Prompt:
        """``prompt``, prepared by a stand-in, prepared again for the loader now loaded."""
        if continue_final:
            raise GenerationError("a continued reply cannot move from the replay to the model halfway",
                                  "the model is loaded now: run the cell again")
        if prompt.messages is None:
            return self.prompt_for(prompt.text)
        again = self.prompt_for(prompt.messages, chat=True, tools=prompt.tools)
        again.tool_choice = prompt.tool_choice
        return again

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
        """The generation itself, a batch of one through the one decode loop (:mod:`nbllm.decode`): the
        loader's token ids or text pieces → safe text pieces, with timings and the end reason. Runs
        while the result is iterated; holds no lock between pieces."""
        record = result.pending_record
        if self._loader is not loader:
            result.finish("error", Timings())  # finished, so waiters and on_done callbacks see it
            raise NoModelLoadedError("the model this prompt was prepared for has been unloaded", "run the prompt again")
        if isinstance(loader, TokenLoader):
            row = Row(result, request, loader.decode, loader.eos_token_ids)
            stream: Any = loader.generate_tokens(request)
        else:
            assert isinstance(loader, TextLoader)
            row = Row(result, request, None)
            stream = loader.generate_text(request)
        start = clock()
        try:
            for _, piece in decode_steps((row,), single(stream), stamps=stream):
                if piece:
                    yield piece
            if row.reason is None:
                own, _ = text_loader_facts(loader)
                row.reason = own or "length"
            if result.cancel_event.is_set() and row.reason == "length":
                row.reason = "cancelled"
            elif context_capped and row.reason == "length" and row.produced >= request.options.max_new_tokens:
                row.reason = "context"
            tail = row.tail()
            if tail:
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            row.reason = "superseded" if result.superseded else "interrupted"
            tail = row.tail()
            if tail:
                result.chunks.append(tail)
            raise
        except NbllmError:
            row.reason = "error"
            raise
        except Exception as exc:
            row.reason = "error"
            raise self._failure(exc, loader, "the model is still loaded; check the options, or reload the model "
                                             "if this repeats") from exc
        finally:
            stream.close()
            if request.options.logprobs is not None:
                # a server's entries are per token, not per text piece: all of them
                record.logprobs = request.logprobs if isinstance(loader, TextLoader) else \
                    request.logprobs[: len(result.token_ids) or row.produced]
            timings = row.timings(start, clock(), text_loader_facts(loader)[1])
            timings.compile_seconds, timings.grammar_seconds = loader.compile_seconds, loader.grammar_seconds
            if getattr(loader, "draft_counts", None) is not None:  # speculative decoding (nbllm/speculative.py)
                counts = loader.draft_counts
                timings.draft_tokens, timings.accepted_tokens, timings.speculative = counts.drafted, counts.accepted, counts.method
            self._loader_facts(loader, result)
            result.finish(row.reason or "length", timings)

    def _failure(self, exc: Exception, loader: Loader, fix: str) -> NbllmError:
        """A loader's failure while generating, as one line (an out-of-memory explained by the fit plan)."""
        from .fit import plan

        mapped = plan.explained(exc, self._source, self._options, during="generation")
        drop_frames(exc)  # its frames hold the KV cache and activations; IPython keeps the error after the cell
        return mapped or generation_error(exc, loader, fix)

    @staticmethod
    def _loader_facts(loader: Loader, result: Result) -> None:
        """What the loader says about the generation that just ended, into its result and record."""
        record = result.pending_record
        record.reused_prefix_tokens = loader.reused_tokens
        if isinstance(loader, TextLoader):  # counts the engine behind did not give stay unknown (None)
            result.prompt_tokens, result.counted_tokens = loader.usage
            result.counts_unknown = result.counted_tokens is None
            result.reasoning = loader.reasoning
            record.model.update(loader.notes)
            if loader.fingerprint:
                record.model["system_fingerprint"] = loader.fingerprint

    # -- several prompts at once -------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        """This model's queue of requests from callers that may run beside one another (``%llm_serve``'s
        clients, threads): concurrent requests are batched where the loader can (:mod:`nbllm.scheduler`)."""
        with self._cond:
            if self._scheduler is None:
                from .scheduler import Scheduler

                self._scheduler = Scheduler(self)
            return self._scheduler

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions | Mapping[str, Any] | None = None,
        *,
        seeds: Sequence[int | None] | None = None,
    ) -> list[Result]:
        """Generate ``prompts`` (from :meth:`prompt_for`) with the same options, each with its own seed
        from ``seeds`` (drawn where ``None``), and return the finished results in order.

        A loader that runs several prompts at once (``batch_size`` above 1) gets them as padded batches
        of up to that many rows, and each record says the batch it ran in; a loader that serves several
        requests at once (``parallel_requests`` above 1: a server) gets up to that many side by side
        (:meth:`generate_rows`); any other loader runs them one after another, reusing the computed
        state of the prompt prefix the rows share (the record says how many tokens). A row that would
        not fit the context runs alone. An interrupt finishes the rows that were running as
        ``interrupted`` and propagates; the exception's ``finished`` holds the results that finished,
        in row order, ``None`` for the others.
        """
        opts = self.generation_options(options)
        row_seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        if len(row_seeds) != len(prompts):
            raise OptionError(f"{len(prompts)} prompts and {len(row_seeds)} seeds", "give one seed (or None) per prompt")

        def seeded(rows: Iterable[tuple[Prompt, int | None]]) -> list[tuple[Prompt, GenerationOptions]]:
            return [(p, opts if seed is None else opts.with_valid(seed=seed)) for p, seed in rows]

        if self.loaded and self.loader.parallel_requests > 1 and len(prompts) > 1:
            return self.generate_rows(seeded(zip(prompts, row_seeds)))
        scheduler = self._scheduler
        if (scheduler is not None and self.loaded and not scheduler.idle
                and all(scheduler.takes(self.loader, p, opts) for p in prompts)):
            return self._beside_others(scheduler, seeded(zip(prompts, row_seeds)))
        results: list[Result] = []
        with self._cond, _finished_on_interrupt(results):
            self._settle()
            loader = self.loader
            refuse_what_it_cannot_do(loader, opts)
            size = loader.batch_size if isinstance(loader, TokenLoader) and not opts.active_samplers() else 1
            limit = loader.context_length
            for start in range(0, len(prompts), max(size, 1)):
                rows = list(zip(prompts[start : start + size], row_seeds[start : start + size]))
                fits = all(p.ids is not None and (limit is None or len(p.ids) + opts.max_new_tokens <= limit)
                           and not p.images for p, _ in rows)  # images: one by one, each with its pixels
                if size > 1 and len(rows) > 1 and fits and opts.logprobs is None:  # logprobs: one by one
                    assert isinstance(loader, TokenLoader)
                    results.extend(self._run_batch(loader, rows, opts))
                else:
                    self._one_after_another(seeded(rows), results)
        return results

    @staticmethod
    def _beside_others(scheduler: Scheduler, rows: Sequence[tuple[Prompt, GenerationOptions]]) -> list[Result]:
        """:meth:`generate_batch` while other requests are queued or running on the model (``%llm_serve``'s
        clients, other threads): the rows join the scheduler's queue and are batched with those of the same
        options, then read in order. An interrupt cancels the rows not yet finished and propagates as the
        batch path's does (``finished``)."""
        results: list[Result | None] = [None] * len(rows)
        started: list[Result] = []
        with _finished_on_interrupt(results):
            try:
                started = [scheduler.stream_prompt(prompt, opts) for prompt, opts in rows]
                for i, result in enumerate(started):
                    _ = result.text
                    results[i] = result
            except KeyboardInterrupt:
                for result in started:
                    if not result.done:
                        result.cancel()
                raise
        return [r for r in results if r is not None]

    def generate_rows(self, rows: Sequence[tuple[Prompt, GenerationOptions]]) -> list[Result]:
        """Generate each ``(prompt, options)`` row, each with its own options, and return the finished
        results in row order.

        On a loader that serves several requests at once (``parallel_requests``: a server, up to
        ``--max-concurrency``) up to that many rows run side by side, each on its own thread and its
        own :class:`~nbllm.result.Result` (own seed, own record): the server batches them. Elsewhere the
        rows run one after another. The first error is raised once the rows running beside it have
        ended, and no further row starts; an interrupt cancels every row (their partial texts kept) and
        propagates, its ``finished`` holding the finished results in row order (``None`` for the others).
        """
        with self._cond:
            self._settle()  # a reply being read elsewhere (the chat panel) ends first
            width = min(self.loader.parallel_requests, len(rows))
        if width <= 1:
            results: list[Result] = []
            with _finished_on_interrupt(results):
                self._one_after_another(rows, results)
            return results
        return self._side_by_side(rows, width)

    def _one_after_another(self, rows: Sequence[tuple[Prompt, GenerationOptions]], results: list[Result]) -> None:
        """Run the rows in turn (reusing the prompt prefix they share), adding each finished result."""
        for prompt, opts in rows:
            result = self.stream_prompt(prompt, opts, reuse_prefix=True)
            try:
                _ = result.text
            finally:  # an interrupt that lands as it finishes (in an on_done callback) keeps it; one that
                results.append(result)  # stopped it marks it interrupted, which is left out of ``finished``

    def _side_by_side(self, rows: Sequence[tuple[Prompt, GenerationOptions]], width: int) -> list[Result]:
        results: list[Result | None] = [None] * len(rows)
        stopping = threading.Event()
        lock = threading.Lock()

        def run(i: int) -> None:
            if stopping.is_set():
                return
            result = self.stream_prompt(rows[i][0], rows[i][1], beside=True)
            with lock:
                results[i] = result
            if stopping.is_set():
                result.cancel()
            _ = result.text

        def cancel_all() -> None:
            stopping.set()
            with lock:
                for result in results:
                    if result is not None:
                        result.cancel()

        pool = concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="nbllm-many")
        futures = [pool.submit(run, i) for i in range(len(rows))]
        first: BaseException | None = None
        with _finished_on_interrupt(results):
            try:
                for future in concurrent.futures.as_completed(futures):
                    exc = future.exception()
                    if exc is not None and first is None:
                        first = exc
                        cancel_all()
            except BaseException:  # an interrupt while waiting: stop everything, keep what came
                cancel_all()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        if first is not None:
            raise first
        return [r for r in results if r is not None]

    def _run_batch(self, loader: TokenLoader, rows: list[tuple[Prompt, int | None]], opts: GenerationOptions) -> list[Result]:
        """One padded batch through the one decode loop: each row's text, stop strings, end reason and
        timings, as :meth:`_run` makes them for one prompt. Called holding the lock."""
        batch = {"id": uuid.uuid4().hex[:12], "size": len(rows)}
        cancel = threading.Event()
        begun = [self._begin(loader, prompt, opts if seed is None else opts.with_valid(seed=seed),
                             batch={**batch, "row": i}, cancel=cancel)
                 for i, (prompt, seed) in enumerate(rows)]
        results = [result for result, _ in begun]
        for result in results:
            result.on_done(self._notify)

        def deliver(row: int, piece: str) -> None:
            results[row].chunks.append(piece)

        self.decode_batch(loader, [request for _, request in begun], results, deliver,
                          fix="the model is still loaded; run the rows one by one (batch=False) if this repeats")
        self.last_result = results[-1]
        return results

    def _begin(self, loader: Loader, prompt: Prompt, opts: GenerationOptions, *, capped: GenerationOptions | None = None,
               conversation: dict[str, Any] | None = None, batch: dict[str, Any] | None = None,
               cancel: threading.Event | None = None, **fields: Any) -> tuple[Result, Request]:
        """A generation about to start: its seed (``opts.seed``, else drawn), its result with its record,
        and the request for the loader (``capped``: the options after the context's cap; ``cancel``: the
        event the loader watches, the result's own unless the request runs in a batch)."""
        seed = opts.seed if opts.seed is not None else secrets.randbelow(2**32)
        result = Result(prompt.text, seed, self._record(loader, prompt, opts, seed, conversation, batch))
        result.prompt_tokens = len(prompt.ids) if prompt.ids is not None else 0
        request = Request(prompt=prompt.text, prompt_ids=prompt.ids, options=capped or opts, seed=seed,
                          cancel=cancel if cancel is not None else result.cancel_event, messages=prompt.messages,
                          images=list(prompt.images), tools=prompt.tools, tool_choice=prompt.tool_choice, **fields)
        return result, request

    def queued(self, loader: Loader, prompt: Prompt, opts: GenerationOptions, *,
               conversation: dict[str, Any] | None = None) -> tuple[Result, Request]:
        """A request about to join the scheduler's queue: its result (the run log hears when it ends) and
        its request for the loader (``conversation``: a chat's name and turn, for the record)."""
        refuse_what_it_cannot_do(loader, opts)
        with self._cond:
            result, request = self._begin(loader, prompt, opts, conversation=conversation)
        result.on_done(self._notify)
        self.last_result = result
        return result, request

    def take_turn(self, loader: Loader, results: Sequence[Result]) -> None:
        """Let ``results`` (a batch the scheduler is about to run) own the model, once the results that own
        it now are settled (see the module). Raises when ``loader`` is no longer the loaded model."""
        with self._cond:
            self._settle()  # a reply being read elsewhere (a cell, the chat panel) ends first
            if self._loader is not loader:
                raise NoModelLoadedError("the model this request was prepared for has been unloaded",
                                         "send the request again")
            for result in results:
                self._owners.append(result)
                result.on_done(self._released_by)

    def decode_batch(self, loader: TokenLoader, requests: Sequence[Request], results: Sequence[Result],
                     deliver: Callable[[int, str], None], *, fix: str,
                     cancelled: Callable[[int], str] | None = None, ended: Callable[[int], None] | None = None) -> None:
        """Run ``requests`` (same options but the seed, one cancel event) as one batch of the loader and
        decode it (:mod:`nbllm.decode`): ``deliver(row, piece)`` gets each row's text as it comes, and each
        result is finished as soon as its row ends (then ``ended(row)`` is called), the others when the
        batch ends. A row whose own result is cancelled ends ``cancelled`` (or what ``cancelled(row)``
        says) while the others go on; the batch stops once every row has ended. One request alone runs as
        the loader runs one (``generate_tokens``)."""
        rows = [Row(result, request, loader.decode, loader.eos_token_ids, limit=request.options.max_new_tokens,
                    watch_cancel=True) for result, request in zip(results, requests)]
        start = clock()
        steps: Any = None

        def end(i: int) -> None:
            row = rows[i]
            tail = row.tail()
            if tail:
                deliver(i, tail)
            timings = row.timings(start)
            timings.grammar_seconds = loader.grammar_seconds
            row.result.pending_record.reused_prefix_tokens = 0
            reason = row.reason or ("cancelled" if row.result.cancel_event.is_set() else "length")
            row.result.finish(cancelled(i) if cancelled is not None and reason == "cancelled" else reason, timings)
            if ended is not None:
                ended(i)

        try:
            if len(requests) == 1:
                steps = loader.generate_tokens(requests[0])
                stepped: Iterable[Sequence[int]] = single(steps)
            else:
                steps = stepped = loader.generate_batch(requests)
            for index, piece in decode_steps(rows, stepped, stamps=steps):
                if piece:
                    deliver(index, piece)
                if rows[index].reason is not None:
                    end(index)
        except KeyboardInterrupt:
            for row in rows:
                row.reason = row.reason or "interrupted"
            raise
        except NbllmError:
            for row in rows:
                row.reason = row.reason or "error"
            raise
        except Exception as exc:
            for row in rows:
                row.reason = row.reason or "error"
            raise self._failure(exc, loader, fix) from exc
        finally:
            if steps is not None and hasattr(steps, "close"):
                steps.close()
            for i, row in enumerate(rows):
                if not row.result.done:
                    end(i)


def refuse_what_it_cannot_do(loader: Loader, opts: GenerationOptions) -> None:
    """Refuse, in one line, options the loaded model cannot honour: output constraints, speculation, samplers
    (each loader declares what it can do). Every path that starts a generation asks here first."""
    refuse_unconstrained(loader, opts)
    refuse_unspeculative(loader, opts)
    refuse_samplers(loader, opts)


@contextlib.contextmanager
def _finished_on_interrupt(results: Sequence[Result | None]) -> Iterator[None]:
    """An interrupt propagates with ``finished``: the rows' results that finished, in row order,
    ``None`` for the others (those stopped by it, and those that never started)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.finished = [r if r is not None and not r.interrupted else None for r in results]  # type: ignore[attr-defined]
        raise


def _tool_calling(loader: Loader) -> dict[str, Any] | None:
    """How ``loader``'s model took the tools of a request, for its record (``None`` if it cannot say)."""
    from .tools import ToolError

    try:
        return loader.tool_calling().to_dict()
    except ToolError:
        return None


def _load_error(failure: Exception, cls: type[Loader], source: ModelSource) -> NbllmError:
    """A loader's failure as one line: its own error, or any other exception worded for the user."""
    if isinstance(failure, NbllmError):
        return failure
    first = (str(failure).strip().splitlines() or [""])[0]
    return LoadError(f"the {cls.name} loader could not load {source.name}: {type(failure).__name__}: {first}",
                     "check the model and the options; reload if this repeats")


def _messages(prompt: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as plain dicts, checked: each a role and text content, or (a user message) a list of
    content parts where images may stand (:mod:`nbllm.images`)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if role == "user" and isinstance(content, list):  # text and images: nbllm.images.parts
            from .images import parts

            out.append({"role": "user", "content": parts(content)})
            continue
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise OptionError(f"message {i + 1} needs a role (system, user or assistant) and text content",
                              'write it as {"role": "user", "content": "..."}')
        # a tool chat's messages keep their calls and call ids (nbllm.tools)
        out.append({"role": str(role), "content": content,
                    **{k: m[k] for k in ("tool_calls", "tool_call_id", "name") if k in m}})
    return out


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
    """This process's engine (one per kernel), shared by the API, the magics and the panels; every
    result it finishes goes to the run log (:mod:`nbllm.runlog`)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            from .runlog import log_results

            _ENGINE = Engine()
            log_results(_ENGINE)
        return _ENGINE
