"""The one contract every loader implements, whatever engine it drives.

A loader declares what it is — the model formats it loads, the load options it understands, the
libraries whose versions go into records — and turns a :class:`~nbllm.source.ModelSource` plus
:class:`~nbllm.options.LoadOptions` into a loaded model. It then answers a :class:`Request` with a
stream of either

- **token ids** (:class:`TokenLoader`: a local model; the engine detokenizes incrementally), or
- **text pieces** (:class:`TextLoader`: an engine that gives text, such as an inference server).

Everything else is the engine's and the same for both kinds: stop strings, context limits, timings,
records, interrupts, cancellation, ownership of the model by an unfinished result, and chat.

Adding a loader is one module with a subclass and one line: ``nbllm.loaders.register(MyLoader)``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..options import GenerationOptions, LoadOptions
from ..result import Result
from ..source import ModelSource

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters import Adapter
    from ..tools import ToolCalling


@dataclass
class Placement:
    """Where a loaded model lives: its layers per device and the memory it uses there."""

    devices: dict[str, int] = field(default_factory=dict)
    """Device name → number of modules (layers) placed on it."""
    memory_bytes: dict[str, int] = field(default_factory=dict)
    """Device name → bytes used by the model there."""
    notes: list[str] = field(default_factory=list)
    """Choices the loader made for the user (e.g. which attention it picked)."""


@dataclass
class Request:
    """One generation, as the engine hands it to a loader."""

    prompt: str
    """The prompt text: raw, or rendered through the model's chat template (empty when the loader
    renders chats itself and ``messages`` is given)."""
    prompt_ids: list[int] | None
    """The prompt's token ids (``None`` for a loader that does not tokenize)."""
    options: GenerationOptions
    """The options to generate with; ``max_new_tokens`` is already capped to the context."""
    seed: int
    cancel: threading.Event
    """Set when the generation must stop (Stop, an interrupt, another request taking the model):
    check it at every step."""
    messages: list[dict[str, Any]] | None = None
    """Chat mode: the messages the prompt was rendered from."""
    continue_final: bool = False
    """Chat mode: the last message is the assistant's, to be extended rather than answered."""
    reuse_prefix: bool = False
    """May the loader serve the part of the prompt it shares with its kept state (a conversation's
    history) from that state? Without it the whole prompt is computed, so a seed reproduces exactly."""
    images: list[Any] = field(default_factory=list)
    """The :class:`~nbllm.images.ChatImage` of each image part of ``messages``, in order (a loader whose
    :attr:`Loader.takes_images`)."""
    tools: list[dict[str, Any]] | None = None
    """Chat mode at a loader that renders chats (:attr:`Loader.tool_calls_as`): the JSON schemas of the
    functions the model may call, and ``tool_choice`` in OpenAI's form."""
    tool_choice: Any = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """With ``options.logprobs`` set (a loader whose :attr:`Loader.gives_logprobs`): the loader appends
    one entry per token it yields, before yielding it (:func:`nbllm.tokens.entry`)."""


class LoadInstead(Exception):
    """Raised by :meth:`Loader.answer` of a stand-in that cannot answer a request and was told to fall
    back (``%llm_replay SOURCE --fallback run``): the engine loads ``model`` with ``options`` for real
    (the stand-in is not used again) and runs the request on it."""

    def __init__(self, model: str, options: LoadOptions, loaded: Callable[[], None] | None = None) -> None:
        super().__init__(model)
        self.model = model
        self.options = options
        self.loaded = loaded
        """Called once the real model is loaded (a replay re-applies the stand-in's adapters to it)."""


class Loader(ABC):
    """What every loader is: declarations, load and unload, and facts about the loaded model."""

    name: ClassVar[str]
    """The name users type after ``--loader``."""
    formats: ClassVar[frozenset[str]] = frozenset()
    """The :attr:`ModelSource.format` values this loader loads (``--loader auto`` picks by these)."""
    format_words: ClassVar[str] = ""
    """What a model of this loader's format is, in a user's words (``a GGUF file``), for messages."""
    model_files: ClassVar[tuple[str, ...]] = ()
    """How the names of the files holding a model of this loader's format end (``.gguf``, lower case): such a
    file is of this loader's format, and so is a folder holding one (model files win over markers). A
    loader that declares them has one format."""
    model_markers: ClassVar[tuple[str, ...]] = ()
    """Files whose presence makes a folder a model of this loader's format (``config.json``). This and
    :attr:`model_files` are the one place that decides which format a path is
    (:func:`nbllm.loaders.path_format`), and so which loader ``--loader auto`` gives it."""
    formats_when_asked: ClassVar[frozenset[str]] = frozenset()
    """Formats this loader also loads when it is named (``--loader NAME``) but that ``--loader auto``
    leaves to a loader made for them (Transformers dequantizes a GGUF file that llama.cpp runs as is)."""
    load_options: ClassVar[frozenset[str]] = frozenset()
    """The :class:`LoadOptions` fields this loader understands; any other one set by the user is
    refused before anything is released."""
    libraries: ClassVar[tuple[str, ...]] = ()
    """Distributions whose versions go into records, the loader's own library first."""
    renders_chat: ClassVar[bool] = False
    """True when the engine behind the loader applies the chat template itself (a server's chat
    endpoint): the engine then passes messages, not rendered text."""
    tool_calls_as: ClassVar[str | None] = None
    """A loader that renders chats and passes ``tools`` on (a server's): the tool-call format
    (:mod:`nbllm.tools`) its text gives the server's tool calls in."""
    adapters: ClassVar[frozenset[str]] = frozenset()
    """The adapter formats (:attr:`nbllm.adapters.Adapter.format`: ``peft``, ``gguf``) this loader applies
    to a loaded model with :meth:`set_adapters`; empty: none."""
    structured_output: ClassVar[bool] = False
    """True when the loader holds its output to a request's constraint (``--json-schema``, ``--regex``...:
    :mod:`nbllm.constraints`); the engine refuses a constrained request for any other in one line."""
    sampler_options: frozenset[str] = frozenset()
    """The text-generation-webui sampler switches (:data:`nbllm.options.SAMPLER_SWITCHES`) this loader
    applies; a request that sets another is refused in one line
    (:func:`nbllm.loaders._samplers.refuse_samplers`). A remote loader's depends on its server."""
    sampler_refusal: str | None = None
    """What to do instead, for that refusal (default: load the model with the transformers loader)."""
    batch_size: ClassVar[int] = 1
    """How many prompts the loader generates at once (:meth:`TokenLoader.generate_batch`); 1: one
    after another. Sweeps ask the engine for batches of up to this many rows."""
    gives_logprobs: bool = False
    """Whether the loader fills :attr:`Request.logprobs` when ``--logprobs`` asks for them (the remote
    loader: per server, set when it loads)."""
    scores_tokens: bool = False
    """Whether the loader gives the log-probabilities of given tokens (:meth:`TokenLoader.token_scores`;
    the remote loader: at a server that gives them, with ``tokenize``, ``decode`` and ``token_scores`` of
    its own): scoring, perplexity and evaluation need it."""
    speculation: ClassVar[bool] = False
    """Whether the loader drafts tokens and checks them in one step (``--prompt-lookup``, and the load option
    ``--draft-model`` when it lists it): :mod:`nbllm.speculative`. The engine refuses ``--prompt-lookup``
    for any other in one line."""
    parallel_requests: int = 1
    """How many requests the loaded model serves side by side (a server: up to ``--max-concurrency``).
    Above 1, :func:`nbllm.generate_many` runs that many at once, and the per-generation facts a
    loader keeps (a text loader's ``finish_reason``, ``usage``, ``fingerprint``) must be per thread."""

    def __init__(self) -> None:
        self.source: ModelSource | None = None
        self.options: LoadOptions | None = None
        self.placement = Placement()
        self.reused_tokens = 0
        """How many prompt tokens the last generation took from the kept state instead of computing."""
        self.compile_seconds: float | None = None
        """Seconds the last generation spent compiling (``--compile``'s first generation), else ``None``."""
        self.grammar_seconds: float | None = None
        """Seconds the last generation spent compiling its constraint (structured output; 0 when it came
        from the cache), ``None`` without one."""
        self.constraints: Any = None
        self.draft_counts: Any = None
        """Tokens drafted and accepted by the last generation (:class:`nbllm.speculative.DraftCounts`), ``None``
        when it drafted nothing (no speculative decoding asked for)."""
        """The loaded model's compiled constraints (:class:`nbllm.constraints.Compiler`), made on first use."""

    # -- what a user typed, before anything is released --------------------------------------------
    @classmethod
    def claim(cls, spec: str, options: LoadOptions) -> ModelSource | None:
        """The source for ``spec`` when it names a model of this loader's own kind that the models
        folder does not know (e.g. a server URL); ``None`` otherwise. Must be cheap: no imports of
        heavy libraries, no network."""
        return None

    @classmethod
    def check(cls, source: ModelSource, options: LoadOptions) -> None:
        """Cheap checks run before the current model is released: missing library, impossible
        options for this machine, unreadable files. Raise an ``NbllmError``; load nothing."""
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    @abstractmethod
    def load(self, source: ModelSource, options: LoadOptions) -> None:
        """Load the model; raise an ``NbllmError`` that names the cause and the fix on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Drop every reference to the model so its memory can be reclaimed."""

    # -- facts about the loaded model --------------------------------------------------------------
    @property
    def takes_images(self) -> bool:
        """Whether the loaded model takes images in chat messages (:attr:`Request.images`); the engine
        refuses an image for any other model in one line."""
        return False

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` as the chat template renders them: as they are, unless the loader marks images its
        own way (llama.cpp: a media marker in the text)."""
        return messages

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (jinja source), if it has one."""
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` texts for rendering chat templates."""
        return {}

    @property
    def context_length(self) -> int | None:
        """How many tokens the loaded model can attend to, when known."""
        return None

    def tool_calling(self) -> ToolCalling:
        """How the loaded model takes tools (:class:`~nbllm.tools.ToolCalling`), the one thing a chat with
        tools asks: a loader that renders chats passes them on to its server when it declares
        :attr:`tool_calls_as`; any other renders them with the model's own template, in its tool format.
        A model that cannot take tools raises :class:`~nbllm.tools.ToolError` in one line."""
        from ..tools import ToolCalling, ToolError, require_format

        if self.renders_chat:
            if self.tool_calls_as is None:
                raise ToolError(f"the {self.name} loader does not pass tools on",
                                "chat with tools on a model loaded with the transformers or llama.cpp loader")
            return ToolCalling(self.tool_calls_as, server=True)
        return ToolCalling(require_format(self.chat_template, "the loaded model"))

    def describe(self) -> dict[str, Any]:
        """Loader-specific facts for status and records (e.g. the attention implementation used)."""
        return {}

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Apply exactly ``adapters`` (each with its scale) to the loaded model, replacing the ones applied
        before; empty: none. Only formats in :attr:`adapters` are passed. Check every new adapter against
        the model first and raise an ``NbllmError`` (cause and fix) leaving the model as it was."""
        raise NotImplementedError(f"the {self.name} loader applies no adapters")
    # -- a stand-in that answers from records ------------------------------------------------------
    def answer(self, request: Request) -> Result | None:
        """A loader that answers from records instead of a model (replay) returns the result for
        ``request`` here, and the engine returns it as it is: nothing runs, nothing is logged. It may
        refuse the request with an ``NbllmError``, or raise :class:`LoadInstead`. Every loader of a
        real model returns ``None`` (the default)."""
        return None


class TokenLoader(Loader):
    """A loader of a local model: it tokenizes, and generates token ids."""

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds the model's BOS when it expects one."""

    def tokenize_with_images(self, text: str, images: Sequence[Any], *, add_special: bool) -> list[int]:
        """Token ids of ``text`` holding the chat template's image placeholders, expanded as the model's
        processor expands them for ``images`` (a loader whose :attr:`takes_images`)."""
        raise NotImplementedError(f"the {self.name} loader takes no images")

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation."""

    @abstractmethod
    def generate_tokens(self, request: Request) -> Iterator[int]:
        """Yield new token ids one by one until EOS, ``max_new_tokens`` or ``request.cancel`` is set.

        With ``request.reuse_prefix`` the computed state (KV cache) kept from the last prompt and
        reply serves the part of ``prompt_ids`` they share, and this generation's state is kept for
        the next one; ``reused_tokens`` says how many tokens were not computed.

        The end-of-sequence token, when produced, is yielded last so the engine can tell why
        generation ended; it is never shown (``decode`` skips special tokens). Closing the iterator
        early must stop the generation and leave the model usable.
        """

    def token_scores(self, rows: Sequence[Sequence[int]], starts: Sequence[int], top: int = 0) -> list[Any]:
        """The model's log-probabilities of given tokens (a loader whose :attr:`scores_tokens`): for each
        row of token ids, a :class:`nbllm.tokens.Scores` of the tokens from ``starts[i]`` (at least 1) to the
        end of the row, each given the ones before it. Rows may be run as one batch."""
        raise NotImplementedError(f"the {self.name} loader does not score tokens")

    def generate_batch(self, requests: Sequence[Request]) -> Iterator[list[int]]:
        """Generate ``requests`` as one batch (a loader whose :attr:`batch_size` is above 1).

        The requests share their options except the seed, and one cancel event. Yield, at each step,
        the next token id of every row, in order; a row that has ended (EOS, ``max_new_tokens``)
        yields filler the engine ignores. Stop when every row has ended or the cancel event is set.
        Each row gives the tokens it gives alone: greedy the same ids, sampled the same draws from
        its own seed (only the last bits of the arithmetic may differ in a padded batch).
        """
        raise NotImplementedError(f"the {self.name} loader does not generate batches")


class TextLoader(Loader):
    """A loader of an engine that gives text (an inference server): no tokenizer needed here."""

    def __init__(self) -> None:
        super().__init__()
        self.finish_reason: str | None = None
        """Why the last generation ended, as the engine behind says it: ``eos``, ``length`` or ``stop``."""
        self.usage: tuple[int | None, int | None] = (None, None)
        """Prompt and completion tokens of the last generation, when the engine behind counts them."""
        self.fingerprint: str | None = None
        """What the engine behind says identifies its configuration for the last generation (the
        OpenAI API's ``system_fingerprint``); it goes into the record."""
        self.reasoning: str = ""
        """The reasoning (thinking) text the engine behind sent beside the reply, kept apart from it."""
        self.decode_rate: float | None = None
        """Tokens per second after the first, as measured on what the engine behind sent (``None``:
        not measurable, e.g. the token count is unknown or every piece came at once)."""
        self.notes: dict[str, Any] = {}
        """What the record's ``model`` should say about how the engine behind served the last
        generation (e.g. that its seed does not reproduce a sampled reply)."""

    @abstractmethod
    def generate_text(self, request: Request) -> Iterator[str]:
        """Yield text pieces as they come until the end, ``max_new_tokens`` or ``request.cancel``;
        set ``finish_reason``, ``usage``, ``fingerprint``, ``reasoning``, ``decode_rate`` and ``notes`` when
        known; a count the engine behind does not give stays ``None`` (nbllm never guesses it). Closing the iterator early
        must stop the generation (close the stream) and leave the model usable."""
