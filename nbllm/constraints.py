"""Structured output: what a generation's text must match, and the engine that makes it match.

A :class:`Constraint` is one kind and its source text, read from :class:`~nbllm.options.GenerationOptions`:

- ``json_schema``: a JSON Schema (text or a ``.json`` file; from Python also a dict or a pydantic model
  class), or simonw/llm's short syntax (``schema``: ``'name, age int'``; ``schema_multi``: many items);
- ``json``: any JSON object;
- ``regex``: a regular expression the whole output matches;
- ``choice``: one of several strings;
- ``grammar``: a GBNF grammar (text or a file), the format of llama.cpp and text-generation-webui.

Local models (both loaders) enforce it with `llguidance <https://github.com/guidance-ai/llguidance>`_:
each step, one :class:`Matcher` per row says which tokens may come next, and the others are masked
out of the logits before sampling (see docs/structured.md for why llguidance). A model at a server gets
the constraint in the server's own dialect (:func:`request_fields`).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GenerationError, NbllmError, OptionError, missing_dependency

KINDS = ("json_schema", "json", "regex", "choice", "grammar")
"""The kinds of constraint, as :attr:`Constraint.kind` names them."""

OPTIONS = ("json_schema", "schema", "json", "regex", "choice", "grammar")
"""The generation options that set a constraint (at most one of them per request)."""

_SHORT_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}

_PYDANTIC: dict[str, Any] = {}
"""Schema text → the pydantic model class it came from (``r.parsed`` builds an instance of it)."""

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
"""llguidance's JSON compilation: compact JSON, no free whitespace (a small model given room for
whitespace fills it; compact output is what a program reads anyway)."""


class ConstraintError(OptionError):
    """A schema, regular expression or grammar that cannot be used: invalid (with its position), or
    asking for something the engine cannot enforce (named)."""


class ParseError(NbllmError, ValueError):
    """A constrained output that cannot be read as asked: cut off at ``max_new_tokens``, or (at a server)
    not valid."""


# -- reading what the user gave ----------------------------------------------------------------------


def short_schema(text: str, *, multi: bool = False) -> dict[str, Any]:
    """simonw/llm's short schema syntax as a JSON Schema: fields separated by commas (or newlines),
    each ``name [type][: description]`` with type ``str`` (the default), ``int``, ``float`` or ``bool``;
    every field is required, and no other field is allowed (a small model otherwise adds its own). ``multi``: ``{"items": [...]}``, many such objects per answer."""
    lines = text.split("\n") if "\n" in text else text.split(",")
    properties: dict[str, Any] = {}
    for field in (part.strip() for part in lines):
        if not field:
            continue
        head, _, description = field.partition(":")
        words = head.split()
        if not words or len(words) > 2:
            raise ConstraintError(
                f"the short schema field {field!r} is not 'name [type][: description]'",
                "write it like --schema 'name, age int, bio: a short biography'",
            )
        kind = words[1] if len(words) == 2 else "str"
        if kind not in _SHORT_TYPES:
            raise ConstraintError(f"the short schema field {words[0]!r} has unknown type {kind!r}",
                                  f"use one of: {', '.join(_SHORT_TYPES)}")
        prop: dict[str, Any] = {"type": _SHORT_TYPES[kind]}
        if description.strip():
            prop["description"] = description.strip()
        properties[words[0]] = prop
    if not properties:
        raise ConstraintError("the short schema names no field", "write it like --schema 'name, age int'")
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": list(properties),
                              "additionalProperties": False}
    return many(schema) if multi else schema


def many(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Many items per answer: ``{"items": [item, ...]}`` of ``schema``'s objects."""
    return {"type": "object", "properties": {"items": {"type": "array", "items": dict(schema)}}, "required": ["items"]}


def schema_text(value: Any) -> str:
    """A JSON Schema as the text options keep (records, the run log): from a dict, a pydantic model
    class (remembered, so ``r.parsed`` is an instance of it), a ``.json`` file's path, or JSON text."""
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        text = json.dumps(value.model_json_schema(), ensure_ascii=False)
        _PYDANTIC[text] = value
        return text
    if isinstance(value, Path):
        return _read_file(value, "--json-schema")
    if isinstance(value, str):
        stripped = value.strip()
        if stripped and stripped[0] not in "{[" and _is_file(stripped):
            return _read_file(Path(stripped).expanduser(), "--json-schema")
        return _python_literal(value)
    raise ConstraintError(f"--json-schema takes JSON text, a file, a dict or a pydantic model class, "
                          f"not {type(value).__name__}", 'give it as e.g. {"type": "object"}')


def _python_literal(text: str) -> str:
    """JSON text as it is; a Python dict's repr (``--json-schema "$schema"`` in a magic line expands a
    dict so) as JSON text; anything else as it is (checked later)."""
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else text


def grammar_text(value: Any) -> str:
    """A GBNF grammar as text: given as text, or the path of a file (``.gbnf``) holding it."""
    if isinstance(value, Path):
        return _read_file(value, "--grammar")
    text = str(value)
    stripped = text.strip()
    if stripped and "::=" not in stripped and _is_file(stripped):
        return _read_file(Path(stripped).expanduser(), "--grammar")
    return text


def _is_file(text: str) -> bool:
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).expanduser().is_file()
    except OSError:
        return False


def _read_file(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstraintError(f"{flag} cannot read {path}: {type(exc).__name__}", "give a readable UTF-8 file") from None


# -- the constraint ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """What the output must match: ``kind`` (one of :data:`KINDS`) and its ``source``: the schema's
    JSON text, the regular expression, the GBNF grammar, or the choices as a JSON list."""

    kind: str
    source: str

    @classmethod
    def from_options(cls, options: Any) -> Constraint | None:
        """The constraint a :class:`~nbllm.options.GenerationOptions` (or a record's dict of them) asks
        for, or ``None``."""
        get: Callable[[str], Any] = (options.get if isinstance(options, Mapping)
                                     else lambda name: getattr(options, name, None))
        multi = bool(get("schema_multi"))
        if get("json_schema"):
            schema = get("json_schema")
            if multi:
                schema = json.dumps(many(_json_value(schema, "--json-schema")), ensure_ascii=False)
            return cls("json_schema", schema)
        if get("schema"):
            return cls("json_schema", json.dumps(short_schema(get("schema"), multi=multi), ensure_ascii=False))
        if get("json"):
            return cls("json", '{"type": "object"}')
        if get("regex"):
            return cls("regex", get("regex"))
        if get("choice"):
            return cls("choice", json.dumps(list(get("choice")), ensure_ascii=False))
        if get("grammar"):
            return cls("grammar", get("grammar"))
        return None

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema (``json_schema`` and ``json``), else ``None``."""
        if self.kind not in ("json_schema", "json"):
            return None
        return _json_value(self.source, "--json-schema")

    @property
    def choices(self) -> list[str]:
        return list(json.loads(self.source)) if self.kind == "choice" else []

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json")

    def describe(self) -> str:
        """A few words for notes and errors: ``JSON schema``, ``regex '\\d+'``..."""
        if self.kind == "json_schema":
            return "the JSON schema"
        if self.kind == "json":
            return "a JSON object"
        if self.kind == "choice":
            return "one of " + ", ".join(map(repr, self.choices))
        return f"the {self.kind}" if self.kind == "grammar" else f"the regex {self.source!r}"

    # -- the engine's grammar ---------------------------------------------------------------------
    def grammar(self) -> str:
        """This constraint as an llguidance grammar (checked: an invalid one raises :class:`ConstraintError`)."""
        return _llguidance_grammar(self.kind, self.source)

    def check(self) -> None:
        """Raise :class:`ConstraintError` (one line: the cause, with its position or the keyword the
        engine cannot enforce, and the fix) unless the constraint can be used. Without llguidance
        installed, only what Python itself can check (JSON syntax, regex syntax) is checked here."""
        if self.is_json:
            schema = self.schema
            if not isinstance(schema, dict):
                raise ConstraintError("--json-schema must be a JSON object (a schema), not "
                                      f"{type(schema).__name__}", 'give e.g. {"type": "object"}')
        elif self.kind == "regex":
            try:
                re.compile(self.source)
            except re.error as exc:
                raise ConstraintError(f"--regex is invalid at position {exc.pos}: {exc.msg}",
                                      "fix the regular expression") from None
        elif self.kind == "choice":
            if not self.choices or any(c == "" for c in self.choices):
                raise ConstraintError("--choice needs non-empty strings", "give each choice, e.g. --choice yes --choice no")
        elif self.kind == "grammar" and not self.source.strip():
            raise ConstraintError("--grammar is empty", "give a GBNF grammar (root ::= ...) or its file")
        if _has_llguidance():
            self.grammar()

    # -- reading the output -----------------------------------------------------------------------
    def parse(self, text: str, finish_reason: str | None) -> Any:
        """The output as data: a JSON value (validated against the schema; a pydantic model instance
        when the schema came from one), the text itself for the other kinds. Raises :class:`ParseError`."""
        if finish_reason in ("length", "context"):
            raise ParseError(
                f"the output reached the token limit ({finish_reason}) before {self.describe()} was complete; "
                "its text is kept in r.text",
                "generate again with a larger --max-new-tokens",
            )
        if finish_reason in ("cancelled", "interrupted", "superseded", "error"):
            raise ParseError(f"the generation ended early ({finish_reason}) before {self.describe()} was complete",
                             "generate again")
        if not self.is_json:
            if self.kind == "choice" and text not in self.choices:
                raise ParseError(f"the output {text!r} is not {self.describe()}", "generate again")
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ParseError(f"the output is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                             "generate again, or look at r.text") from None
        model = _PYDANTIC.get(self.source)
        if model is not None:
            try:
                return model.model_validate(value)
            except Exception as exc:  # pydantic's ValidationError
                first = str(exc).splitlines()
                raise ParseError(f"the output does not fit {model.__name__}: {' '.join(first[:3])}",
                                 "look at r.text") from None
        problem = schema_problem(value, self.schema or {})
        if problem:
            raise ParseError(f"the output does not fit the schema: {problem}", "look at r.text")
        return value


def parsed(result: Any) -> Any:
    """``result.parsed``: its text read as its constraint says (see :meth:`Constraint.parse`)."""
    constraint = Constraint.from_options(result.pending_record.generation_options)
    if constraint is None:
        raise ParseError("this output was generated without a constraint, so there is nothing to parse",
                         "generate with --json-schema, --schema, --json, --regex, --choice or --grammar")
    if not result.done:
        _ = result.text
    return constraint.parse("".join(result.chunks), result.finish_reason)


def _json_value(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"{flag} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                              "fix the schema's JSON") from None


def schema_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    """Why ``value`` does not fit ``schema`` (one line, naming where), or ``None`` when it does
    (the ``jsonschema`` library's validation; without it, nothing is checked)."""
    try:
        import jsonschema
    except ImportError:
        return None
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return f"at {where}: {error.message}"


def without_other_constraints(start: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``start`` with ``changes`` on top; when the changes set a constraint, the constraint options they
    do not name go back to unset, so the new constraint replaces the old one instead of joining it."""
    if any(changes.get(name) for name in OPTIONS):
        start = {**start, **{name: None if name not in ("json", "choice") else (False if name == "json" else ())
                             for name in OPTIONS if name not in changes}}
        if "schema_multi" not in changes:
            start["schema_multi"] = False
    return {**start, **changes}


def refuse_unconstrained(loader: Any, options: Any) -> None:
    """Refuse, in one line, a constrained request for a loader that does not declare
    ``structured_output`` (its output would not be held to the constraint, without a word)."""
    if not getattr(loader, "structured_output", False) and Constraint.from_options(options) is not None:
        raise ConstraintError(f"the {loader.name} loader cannot hold its output to a constraint (structured output)",
                              "load the model with the transformers or llama.cpp loader, or serve it from a server")


def check_options(options: Any) -> None:
    """The constraint options of a :class:`~nbllm.options.GenerationOptions`, checked: at most one
    kind, and a usable one (called by its ``validate``)."""
    given = [name for name in OPTIONS if getattr(options, name)]
    if len(given) > 1:
        flags = " and ".join("--" + n.replace("_", "-") for n in given)
        raise ConstraintError(f"{flags} cannot be used together", "choose one constraint for the output")
    if options.schema_multi and not (options.json_schema or options.schema):
        raise ConstraintError("--schema-multi needs --schema or --json-schema", "add the schema of one item")
    constraint = Constraint.from_options(options)
    if constraint is not None:
        constraint.check()


# -- llguidance ----------------------------------------------------------------------------------------


@functools.cache
def _has_llguidance() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _import_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise missing_dependency("llguidance (structured output)", "structured") from None
    return llguidance


@functools.lru_cache(maxsize=256)
def _llguidance_grammar(kind: str, source: str) -> str:
    """The llguidance grammar for a constraint, validated (cached: options are validated often)."""
    llguidance = _import_llguidance()
    matcher = llguidance.LLMatcher
    flag = {"json": "--json", "json_schema": "--json-schema"}.get(kind, "--" + kind)
    if kind in ("json_schema", "json"):
        grammar = matcher.grammar_from_json_schema(source, defaults=dict(JSON_OPTIONS))
    elif kind == "regex":
        grammar = matcher.grammar_from_regex(source)
    elif kind == "choice":
        grammar = matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(source)))
    else:
        grammar = matcher.grammar_from_lark(gbnf_to_lark(source))
    error = matcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"{flag} cannot be used: {_engine_words(error)}", _fix_for(kind, error))
    return str(grammar)


def gbnf_to_lark(gbnf: str) -> str:
    """A GBNF grammar (llama.cpp's format) in llguidance's Lark syntax (llguidance's own converter)."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return str(any_to_lark(gbnf))
    except Exception as exc:  # its parser's own error, with the line it stopped at
        raise ConstraintError(f"--grammar is not valid GBNF: {_engine_words(str(exc))}",
                              "fix the grammar (rules like: root ::= \"yes\" | \"no\")") from None


def _engine_words(message: str) -> str:
    """An llguidance message on one line. A regex error spans several (the regex, a caret under the
    position, ``error: ...``): it becomes ``at position N: ...``."""
    lines = str(message).rstrip().splitlines()
    for i, line in enumerate(lines):
        if "regex parse error:" in line and i + 2 < len(lines):
            echo, caret = lines[i + 1], lines[i + 2]
            position = caret.find("^") - (len(echo) - len(echo.lstrip()))
            said = next((x.strip()[len("error:"):].strip() for x in lines if x.strip().startswith("error:")), "invalid")
            return f"at position {max(position, 0)}: {said}"
    words = " ".join(line.strip() for line in lines if line.strip())
    return words[:400] or "invalid"


def _fix_for(kind: str, message: str) -> str:
    if "Unimplemented keys" in message or "unimplemented" in message.lower():
        return "remove that keyword from the schema (nbllm never leaves part of a schema unenforced)"
    return {"json_schema": "fix the schema", "json": "fix the schema", "regex": "fix the regular expression",
            "choice": "give plain strings", "grammar": "fix the grammar"}.get(kind, "fix it")


class Compiled:
    """A constraint compiled for one tokenizer: makes a fresh :class:`Matcher` per row."""

    def __init__(self, constraint: Constraint, tokenizer: Any, vocab_size: int) -> None:
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.grammar = constraint.grammar()
        self.seconds = 0.0
        """Seconds the compilation took (0 when a request is served from the cache)."""

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One row's progress through its constraint: which tokens may come next, and the tokens that came."""

    def __init__(self, compiled: Compiled) -> None:
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        llguidance = _import_llguidance()
        self._np = np
        self._fill = fill_next_token_bitmask
        self._matcher = llguidance.LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        if self._matcher.is_error():
            error = self._matcher.get_error()
            raise ConstraintError(f"the constraint cannot be used: {_engine_words(error)}",
                                  _fix_for(compiled.constraint.kind, error))
        self.vocab_size = compiled.vocab_size
        self._bitmask = np.full((1, (compiled.vocab_size + 31) // 32), -1, dtype=np.int32)
        self.consumed = 0
        """How many generated tokens this matcher has seen."""

    def consume(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed). Tokens after the end (a batch's filler) are ignored."""
        self.consumed += 1
        if self._matcher.is_stopped():
            return
        if not self._matcher.consume_token(int(token)):
            raise GenerationError(
                f"the constraint engine refused token {token}: {_engine_words(self._matcher.get_error())}",
                "report this: a token the mask ruled out was chosen",
            )

    def catch_up(self, tokens: Sequence[int]) -> None:
        """Consume ``tokens``, the generated tokens not seen yet, in order."""
        for token in tokens:
            self.consume(int(token))

    def allowed(self) -> Any:
        """A boolean numpy array over the vocabulary: the tokens that may come next."""
        self._fill(self._matcher, self._bitmask, 0)
        bits = self._np.unpackbits(self._bitmask.view(self._np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(self._np.bool_)  # 0/1 bytes read as booleans: no copy


class Compiler:
    """A loaded model's constraints, compiled for its tokenizer and cached per constraint (a loader
    holds one; unloading drops it). ``make_tokenizer`` builds llguidance's view of the tokenizer
    (once, on the first constrained request)."""

    def __init__(self, make_tokenizer: Callable[[], Any], vocab_size: int, size: int = 64) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self.vocab_size = vocab_size
        self._cache: dict[Constraint, Compiled] = {}
        self._size = size
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Compiled:
        """``constraint`` compiled; its ``seconds`` is the time this call spent compiling (0 when cached)."""
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache[constraint] = self._cache.pop(constraint)  # most recently used last
                hit.seconds = 0.0
                return hit
            start = time.perf_counter()
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            compiled = Compiled(constraint, self._tokenizer, self.vocab_size)
            compiled.matcher()  # builds the grammar's lexer for this tokenizer: the cost counted here
            compiled.seconds = time.perf_counter() - start
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[constraint] = compiled
            return compiled


def torch_processor(compiled: Compiled, rows: int, prompt_width: int) -> Any:
    """A Transformers logits processor: one :class:`Matcher` per row of a (padded) batch, each masking
    its row's logits to the tokens its constraint allows. ``prompt_width``: the (padded) prompt's length."""
    import torch
    from transformers import LogitsProcessor

    class ConstraintMask(LogitsProcessor):
        def __init__(self) -> None:
            self.matchers = [compiled.matcher() for _ in range(rows)]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            produced = input_ids.shape[1] - prompt_width
            for row, matcher in enumerate(self.matchers):
                if matcher.consumed < produced:
                    matcher.catch_up(input_ids[row, prompt_width + matcher.consumed :].tolist())
                allowed = torch.from_numpy(matcher.allowed()).to(scores.device)
                width = min(scores.shape[-1], allowed.shape[0])
                scores[row, :width].masked_fill_(~allowed[:width], float("-inf"))
                if scores.shape[-1] > width:
                    scores[row, width:] = float("-inf")
            return scores

    return ConstraintMask()


def numpy_processor(compiled: Compiled, prompt_length: int) -> Callable[[Any, Any], Any]:
    """A llama-cpp-python logits processor (``input_ids``: the context so far, ``scores``: the next
    token's logits as a numpy array): the constraint's mask applied to ``scores``."""
    import numpy as np

    matcher = compiled.matcher()

    def mask(input_ids: Any, scores: Any) -> Any:
        produced = len(input_ids) - prompt_length
        if matcher.consumed < produced:
            matcher.catch_up(input_ids[prompt_length + matcher.consumed :].tolist())
        allowed = matcher.allowed()
        width = min(scores.shape[-1], allowed.shape[0])
        scores[:width][~allowed[:width]] = -np.inf
        scores[width:] = -np.inf
        return scores

    return mask


def hf_compiler(tokenizer: Any, config: Any, eos_ids: frozenset[int]) -> Compiler:
    """The :class:`Compiler` of a Transformers model: llguidance reads its (fast) tokenizer; the mask
    spans the model's whole output layer (``vocab_size``; ids the tokenizer lacks stay masked)."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    vocab_size = int(getattr(text_config, "vocab_size", 0) or len(tokenizer))

    def make() -> Any:
        from llguidance.hf import from_tokenizer

        eos = min(eos_ids) if eos_ids else None
        try:
            return from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        except Exception as exc:
            raise GenerationError(f"structured output cannot read this model's tokenizer: {type(exc).__name__}: {exc}",
                                  "use a model with a fast (tokenizer.json) tokenizer") from exc

    return Compiler(make, vocab_size)


def llamacpp_compiler(llm: Any, eos: int | None) -> Compiler:
    """The :class:`Compiler` of a llama.cpp model: llguidance reads the GGUF vocabulary through
    llama-cpp-python (its ``llguidance.llamacpp`` helper)."""
    import llama_cpp

    vocab = llm._model.vocab
    vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))

    def make() -> Any:
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():  # it calls llama_token_get_attr, deprecated once per token
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(vocab, eos_token=eos)

    return Compiler(make, vocab_size)


# -- models at a server --------------------------------------------------------------------------------


def choices_gbnf(choices: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are ``choices``."""
    return "root ::= " + " | ".join(_gbnf_literal(c) for c in choices)


def _gbnf_literal(text: str) -> str:
    escaped = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escaped.get(ch, ch) for ch in text) + '"'


def choices_regex(choices: Sequence[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def request_fields(server: str, options: Any, *, chat: bool) -> dict[str, Any]:
    """The request fields that carry ``options``' constraint to a server of kind ``server`` (the names
    of :data:`nbllm.loaders.openai.SERVERS`), in its own dialect; ``{}`` without a constraint. A kind
    of constraint that server cannot take is refused in one line (never sent and ignored)."""
    constraint = Constraint.from_options(options)
    if constraint is None:
        return {}
    schema = constraint.schema
    kind = constraint.kind
    openai_format: dict[str, Any] | None = None
    if kind == "json":
        openai_format = {"type": "json_object"}
    elif kind == "json_schema":
        openai_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    if server == "nbllm":
        if openai_format is not None:
            return {"response_format": openai_format}
        return {kind: constraint.choices if kind == "choice" else constraint.source}
    if server in ("vllm", "sglang"):
        if server == "vllm":  # vLLM's structured outputs (0.10.2+; before: guided_json, guided_regex...)
            value = {"json_schema": {"json": schema}, "json": {"json": schema}, "regex": {"regex": constraint.source},
                     "choice": {"choice": constraint.choices}, "grammar": {"grammar": constraint.source}}[kind]
            return {"structured_outputs": value}
        if openai_format is not None:
            return {"response_format": openai_format}
        if kind == "regex":
            return {"regex": constraint.source}
        if kind == "choice":
            return {"regex": choices_regex(constraint.choices)}
        return {"ebnf": constraint.source}
    if server == "llama.cpp":  # its own server: json_schema and grammar (GBNF)
        if schema is not None:
            return {"json_schema": schema}
        if kind == "choice":
            return {"grammar": choices_gbnf(constraint.choices)}
        if kind == "grammar":
            return {"grammar": constraint.source}
    if server == "llama-cpp-python":
        if schema is not None:
            return {"response_format": {"type": "json_object", "schema": schema}}
        if kind == "choice":
            return {"grammar": choices_gbnf(constraint.choices)}
        if kind == "grammar":
            return {"grammar": constraint.source}
    if server == "text-generation-webui":  # GBNF only (grammar_string)
        if kind == "choice":
            return {"grammar_string": choices_gbnf(constraint.choices)}
        if kind == "grammar":
            return {"grammar_string": constraint.source}
    if server == "tgi":
        if schema is not None:
            return {"response_format": {"type": "json", "value": schema}}
        if kind in ("regex", "choice"):
            return {"response_format": {"type": "regex", "value": constraint.source if kind == "regex"
                                        else choices_regex(constraint.choices)}}
    if server == "ollama" and schema is not None:  # Ollama's own API: `format`, a schema or "json"
        return {"format": schema if kind == "json_schema" else "json"}
    if server in ("openai", "unknown") and openai_format is not None:
        return {"response_format": openai_format}
    takes = {"text-generation-webui": "GBNF grammars and choices only", "openai": "JSON schemas and JSON only",
             "ollama": "JSON schemas and JSON only", "unknown": "JSON schemas and JSON (response_format) only",
             "tgi": "JSON schemas, JSON, regexes and choices only"}.get(server, "no such constraint")
    raise ConstraintError(f"the {server} server cannot constrain output to {constraint.describe()} ({takes})",
                          "use a constraint it takes, or load the model locally")


def server_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """The constraint options a request to nbllm's own server asks for: OpenAI's ``response_format``
    (``json_object``; ``json_schema`` with its ``schema``, ``strict`` or not: nbllm always enforces the
    whole schema), and nbllm's ``grammar`` (GBNF), ``regex`` and ``choice`` fields. Raises
    :class:`ConstraintError` (one line) for a malformed one."""
    out: dict[str, Any] = {}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        if kind == "json_object":
            out["json"] = True
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise ConstraintError("response_format json_schema needs json_schema.schema, a JSON Schema object",
                                      'send {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}')
            out["json_schema"] = json.dumps(schema, ensure_ascii=False)
        elif kind != "text":
            raise ConstraintError(f"response_format type {kind!r} is not supported",
                                  "use text, json_object or json_schema")
    for name in ("grammar", "regex"):
        if body.get(name) is not None:
            if not isinstance(body[name], str):
                raise ConstraintError(f"{name} must be a string", f"send the {name} as text")
            out[name] = body[name]
    if body.get("choice") is not None:
        choice = body["choice"]
        if not isinstance(choice, list) or not all(isinstance(c, str) for c in choice):
            raise ConstraintError("choice must be a list of strings", 'send e.g. "choice": ["yes", "no"]')
        out["choice"] = tuple(choice)
    if len(out) > 1:
        raise ConstraintError(f"{' and '.join(out)} cannot be used together", "send one constraint")
    return out


# -- tables ----------------------------------------------------------------------------------------------


def field_rows(result: Any) -> list[dict[str, Any]] | None:
    """The top-level fields of a JSON-constrained result, as table columns: one dict, or one per item
    for ``schema_multi`` (``{"items": [...]}``); ``None`` for a result without a JSON constraint. An
    output that cannot be parsed gives one row with its ``parse_error``."""
    options = result.pending_record.generation_options
    constraint = Constraint.from_options(options)
    if constraint is None or not constraint.is_json:
        return None
    try:
        value = parsed(result)
    except ParseError as exc:
        return [{"parse_error": exc.message}]
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if options.get("schema_multi") and isinstance(value, Mapping):
        items = value.get("items") or []
        return [dict(item) if isinstance(item, Mapping) else {"value": item} for item in items]
    return [dict(value) if isinstance(value, Mapping) else {"value": value}]


def with_fields(row: Mapping[str, Any], result: Any) -> list[dict[str, Any]]:
    """``row`` (a table row about ``result``) with the result's fields as columns (a field named like
    one of the row's own columns is ``parsed_<name>``); one row per item for ``schema_multi``."""
    fields = field_rows(result)
    if fields is None:
        return [dict(row)]
    out = []
    for item in fields or [{}]:
        extra = {(f"parsed_{k}" if k in row else k): v for k, v in item.items()}
        out.append({**row, **extra})
    return out


def table(results: Sequence[Any]) -> Any:
    """A pandas DataFrame of finished results (e.g. :func:`nbllm.generate_many`'s): one row per
    result (per item with ``schema_multi``) with its prompt, text, finish reason and record id, and
    one column per top-level field of a JSON-constrained output."""
    try:
        import pandas as pd
    except ImportError:
        raise missing_dependency("pandas", "experiments") from None
    rows: list[dict[str, Any]] = []
    for result in results:
        record = result.record
        base = {"prompt": (record.messages[-1]["content"] if record is not None and record.messages else result.prompt),
                "text": result.text, "finish_reason": result.finish_reason,
                "record_id": record.id if record is not None else None}
        rows.extend(with_fields(base, result))
    return pd.DataFrame(rows)
