"""The one interface every loader implements.

A loader turns a :class:`~nbllm.models.ModelSource` plus :class:`~nbllm.options.LoadOptions` into a
loaded model, and a prompt's token ids plus :class:`~nbllm.options.GenerationOptions` into a stream of
new token ids. Detokenization, stop strings, timings and records are the engine's, shared by all.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..source import ModelSource
from ..options import GenerationOptions, LoadOptions


@dataclass
class Placement:
    """Where a loaded model lives: its layers per device and the memory it uses there."""

    devices: dict[str, int] = field(default_factory=dict)
    """Device name → number of modules (layers) placed on it."""
    memory_bytes: dict[str, int] = field(default_factory=dict)
    """Device name → bytes used by the model there."""
    notes: list[str] = field(default_factory=list)
    """Choices the loader made for the user (e.g. which attention it picked)."""


class Loader(ABC):
    """Loads one model and generates token ids from it."""

    name: ClassVar[str]
    """The name users type after ``--loader``."""
    library: ClassVar[str]
    """The distribution whose version goes into records (e.g. ``transformers``)."""

    def __init__(self) -> None:
        self.source: ModelSource | None = None
        self.options: LoadOptions | None = None
        self.placement = Placement()
        self.reused_tokens = 0
        """How many prompt tokens the last generation took from the kept state instead of computing."""

    @classmethod
    def check(cls, source: ModelSource, options: LoadOptions) -> None:
        """Cheap checks run before the current model is released: missing library, impossible
        options for this machine, unreadable files. Raise an ``NbllmError``; load nothing."""
        return None

    @abstractmethod
    def load(self, source: ModelSource, options: LoadOptions) -> None:
        """Load the model; raise an ``NbllmError`` that names the cause and the fix on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Drop every reference to the model so its memory can be reclaimed."""

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds the model's BOS when it expects one."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""

    @abstractmethod
    def generate_tokens(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        seed: int,
        cancel: threading.Event,
        *,
        reuse_prefix: bool = False,
    ) -> Iterator[int]:
        """Yield new token ids one by one until EOS, ``max_new_tokens`` or ``cancel`` is set.

        With ``reuse_prefix`` the computed state (KV cache) kept from the last prompt and reply
        serves the part of ``prompt_ids`` they share (a chat's history), and this generation's state
        is kept for the next one; ``reused_tokens`` says how many tokens were not computed. Without
        it, the whole prompt is computed, so the same seed gives bit-for-bit the same text.

        The end-of-sequence token, when produced, is yielded last so the engine can tell why
        generation ended; it is never shown (``decode`` skips special tokens).
        """

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """The model's own chat template (jinja source), if it has one."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` texts for rendering chat templates."""

    @property
    def context_length(self) -> int | None:
        """How many tokens the loaded model can attend to, when known."""
        return None

    def describe(self) -> dict[str, Any]:
        """Loader-specific facts for status and records (e.g. the attention implementation used)."""
        return {}
