"""Which files of a hub repository to download: what a loader needs, and ``--file``/``--exclude``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from ..errors import DownloadError
from ..gguf_file import is_projector, pick_projector, quantization_from_name, unsplit_name
from ..store import WEIGHT_SUFFIXES

DEFAULT_QUANTIZATION = "Q4_K_M"
"""The GGUF quantization downloaded when ``--file`` does not choose: a common size/quality balance."""

QUANTIZATION_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q5_K_S", "Q6_K", "Q8_0")
"""Fallback order when a GGUF repository has no Q4_K_M file; after these, the smallest file."""

# Small files a model needs besides its weights: configs, tokenizers, chat templates, remote code, card.
_SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py", ".md")
_PYTORCH_WEIGHTS = re.compile(r"^(?:(?:pytorch|adapter|gptq)_model.*\.bin|.*\.pt|.*\.pth)$")
_NOT_WEIGHTS = re.compile(r"^(?:training_args|optimizer|scheduler|rng_state).*$")


@dataclass(frozen=True)
class Selection:
    """Which files of a repository to download, and why."""

    files: tuple[str, ...]
    kind: Literal["transformers", "gguf"]
    note: str | None = None
    """A line for the user: which GGUF file was chosen and what else exists, or what was left out."""


def _matches(path: str, patterns: Sequence[str]) -> bool:
    name = PurePosixPath(path).name
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _gguf_groups(ggufs: Sequence[str]) -> dict[str, list[str]]:
    """GGUF files grouped by model: a split model (``-00001-of-00003``) is one group."""
    groups: dict[str, list[str]] = {}
    for path in sorted(ggufs):
        groups.setdefault(unsplit_name(path), []).append(path)
    return groups


def select_files(
    files: Mapping[str, int | None] | Sequence[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Selection:
    """Pick the files to download from a repository's file list (path → size, sizes optional).

    Rules: configuration, tokenizer and other small support files at the root are always taken; weights
    are ``*.safetensors`` when the repository has them, else PyTorch ``.bin``/``.pt``; a repository of
    GGUF files gets the ``include`` matches, else the :data:`DEFAULT_QUANTIZATION` file (then
    :data:`QUANTIZATION_PREFERENCE`, then the smallest). ``include`` patterns (``--file``, shell-style,
    matched against the path and the file name) choose the weights; ``exclude`` (``--exclude``) removes
    matches last. Raises :class:`~nbllm.errors.DownloadError` when nothing loadable is left.
    """
    sizes: dict[str, int | None] = dict(files) if isinstance(files, Mapping) else dict.fromkeys(files)
    paths = sorted(sizes)
    root = [p for p in paths if "/" not in p]
    safetensors = [p for p in root if p.endswith(".safetensors")]
    pytorch = [p for p in root if _PYTORCH_WEIGHTS.match(p) and not _NOT_WEIGHTS.match(p)]
    ggufs = [p for p in paths if p.lower().endswith(".gguf")]
    support = [p for p in root if p.endswith(_SUPPORT_SUFFIXES)]
    note: str | None = None

    if include:
        chosen = [p for p in paths if _matches(p, include)]
        if not chosen:
            available = ", ".join(
                PurePosixPath(p).name for p in (ggufs or safetensors or pytorch or paths)[:12]
            )
            raise DownloadError(f"no file matches --file {' '.join(include)}", f"pick from: {available}")
        if all(p.lower().endswith(".gguf") for p in chosen):
            kind: Literal["transformers", "gguf"] = "gguf"
            selected = chosen
        else:
            kind = "transformers"
            selected = sorted(set(chosen) | set(support))
    elif safetensors or pytorch:
        kind = "transformers"
        if safetensors:
            weights = safetensors
            support = [p for p in support if p != "pytorch_model.bin.index.json"]
            if pytorch:
                note = f"Taking the safetensors weights; skipping {len(pytorch)} PyTorch .bin/.pt file(s)."
        else:
            weights = pytorch
        if ggufs:
            extra = f"The repository also has {len(ggufs)} GGUF file(s); get one with --file PATTERN."
            note = f"{note} {extra}" if note else extra
        selected = sorted(set(weights) | set(support))
    elif ggufs:
        kind = "gguf"
        groups = _gguf_groups(ggufs)
        candidates = {k: v for k, v in groups.items() if not is_projector(PurePosixPath(k).name)}
        candidates = candidates or groups
        quant = {k: quantization_from_name(PurePosixPath(k).name) for k in candidates}
        pick = None
        for wanted in QUANTIZATION_PREFERENCE:
            pick = next((k for k, q in quant.items() if q == wanted), None)
            if pick:
                break
        if pick is None:
            pick = min(candidates, key=lambda k: (sum(sizes.get(p) or 0 for p in candidates[k]), k))
        selected = candidates[pick]
        others = sorted({quant[k] or PurePosixPath(k).name for k in candidates if k != pick})
        why = (
            f"the default quantization {DEFAULT_QUANTIZATION}"
            if quant[pick] == DEFAULT_QUANTIZATION
            else f"no {DEFAULT_QUANTIZATION} file; {quant[pick] or 'the smallest'} is the closest"
        )
        note = f"Chose {PurePosixPath(pick).name} ({why})."
        if others:
            note += f" Also available: {', '.join(others)}. Choose another with --file '*{others[0]}*'."
    else:
        raise DownloadError(
            "the repository has no model weights (safetensors, bin or GGUF) at its root",
            "choose files with --file PATTERN",
        )

    if kind == "gguf" and not any(is_projector(PurePosixPath(p).name) for p in selected):
        projector = pick_projector(ggufs)
        if projector is not None:
            selected = [*selected, projector]  # llama.cpp takes images with it (gguf_file.projector_for)
            with_it = f"With its projector {PurePosixPath(projector).name} (images)."
            note = f"{note} {with_it}" if note else with_it

    if exclude:
        selected = [p for p in selected if not _matches(p, exclude)]
        weights_left = [p for p in selected if p.endswith(WEIGHT_SUFFIXES)]
        if not weights_left:
            raise DownloadError(
                f"--exclude {' '.join(exclude)} leaves no weight files", "exclude fewer files"
            )
    return Selection(tuple(sorted(selected)), kind, note)
