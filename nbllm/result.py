"""The result of one generation: streamed text, counts, timings, the seed and the run record."""

from __future__ import annotations

import datetime as _dt
import functools
import html
import importlib.metadata
import json
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

_VERSIONED = ("nbllm", "torch", "transformers", "accelerate", "bitsandbytes", "llama_cpp_python", "huggingface_hub")


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """Looked up once per process: reading package metadata costs milliseconds, and the libraries a
    process has imported do not change under it."""
    from . import __version__

    out = {"python": platform.python_version(), "nbllm": __version__}
    for dist in _VERSIONED[1:]:
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(out.items())


def library_versions() -> dict[str, str]:
    """Installed versions of nbllm and the libraries that shape its outputs (no imports needed)."""
    return dict(_installed_versions())


@dataclass
class Record:
    """Everything needed to reproduce an output: model, options, seed, prompt and versions."""

    model: dict[str, Any]
    """name, path, format, revision (hub commit) and/or sha256 of the weights."""
    loader: str
    load_options: dict[str, Any]
    generation_options: dict[str, Any]
    seed: int
    prompt: str
    mode: str = "raw"
    """``raw`` (text as is) or ``chat`` (rendered through the model's chat template)."""
    messages: list[dict[str, str]] | None = None
    conversation: dict[str, Any] | None = None
    """For chat replies: the conversation's name and the turn number."""
    reused_prefix_tokens: int = 0
    """Prompt tokens taken from the previous turn's computed state (chat prefix reuse), not computed.
    0 means the whole prompt was computed, as a re-run with the recorded seed computes it."""
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)


@dataclass
class Timings:
    """Seconds and rates of one generation."""

    time_to_first_token: float | None = None
    total_seconds: float = 0.0
    decode_tokens_per_second: float | None = None
    """Tokens per second after the first one (the decode speed)."""


class Result:
    """One generation. Iterating streams the text as it is produced; ``.text`` waits for all of it.

    A result can be iterated again after it finished (it replays the chunks). ``cancel()`` stops the
    generation from another thread (the chat panel's Stop); a KeyboardInterrupt while iterating stops
    it too, keeps the partial text, sets ``interrupted`` and propagates.
    """

    def __init__(self, prompt: str, seed: int) -> None:
        self.prompt = prompt
        self.seed = seed
        self.chunks: list[str] = []
        self.token_ids: list[int] = []
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        """``eos`` (the model ended), ``stop`` (a stop string), ``length`` (max_new_tokens),
        ``cancelled`` (cancel()) or ``interrupted`` (KeyboardInterrupt)."""
        self.timings = Timings()
        self.record: Record | None = None
        self.cancel_event = threading.Event()
        self._source: Iterator[str] | None = None
        self._running: Iterator[str] | None = None
        self._done = threading.Event()
        self._on_done: list[Callable[[Result], None]] = []

    # -- streaming -------------------------------------------------------------------------------
    def attach(self, source: Iterator[str]) -> Result:
        self._source = source
        return self

    def __iter__(self) -> Iterator[str]:
        yield from list(self.chunks)
        if self._source is None:
            return
        source, self._source = self._source, None
        self._running = source
        try:
            for chunk in source:
                self.chunks.append(chunk)
                yield chunk
        finally:
            self._running = None

    def close(self) -> None:
        """Stop the generation where it is (e.g. after an interrupt that landed outside it, between
        two chunks); the result finishes with what it has."""
        source = self._source or self._running
        self._source = self._running = None
        if source is not None:
            source.close()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        """Ask the generation to stop at the next token (safe from any thread)."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation finished (when another thread is consuming it)."""
        return self._done.wait(timeout)

    def on_done(self, callback: Callable[[Result], None]) -> None:
        """Call ``callback(result)`` when the generation finishes (at once if it already has)."""
        if self.done:
            callback(self)
        else:
            self._on_done.append(callback)

    def finish(self, reason: str, record: Record, timings: Timings) -> None:
        """Called once by the engine when generation ends, however it ends."""
        self.finish_reason, self.record, self.timings = reason, record, timings
        self._done.set()
        for callback in self._on_done:
            callback(self)

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The whole text (consumes the stream if it is still running)."""
        for _ in self:
            pass
        return "".join(self.chunks)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def interrupted(self) -> bool:
        return self.finish_reason in ("interrupted", "cancelled")

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": "".join(self.chunks),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seed": self.seed,
            "timings": asdict(self.timings),
            "record": self.record.to_dict() if self.record else None,
        }

    def summary(self) -> str:
        """One line: tokens, speed, seed, why it ended."""
        t = self.timings
        parts = [f"{self.completion_tokens} tokens"]
        if t.decode_tokens_per_second:
            parts.append(f"{t.decode_tokens_per_second:.1f} tok/s")
        if t.time_to_first_token is not None:
            parts.append(f"first token {t.time_to_first_token * 1000:.0f} ms")
        parts.append(f"seed {self.seed}")
        parts.append(f"ended: {self.finish_reason or 'running'}")
        return " · ".join(parts)

    def __str__(self) -> str:
        return "".join(self.chunks)

    def __repr__(self) -> str:
        text = "".join(self.chunks)
        short = text if len(text) <= 60 else text[:57] + "..."
        return f"<nbllm.Result {short!r} ({self.summary()})>"

    def _repr_html_(self) -> str:
        return (
            f"<pre style='white-space: pre-wrap'>{html.escape(''.join(self.chunks))}</pre>"
            f"<small>{html.escape(self.summary())}</small>"
        )


def clock() -> float:
    return time.perf_counter()
