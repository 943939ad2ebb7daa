"""What a download (or a ``--check``) reports back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..frontend import command
from ..models import format_size

Echo = Callable[[str], None]
"""Where the notes and the final line go (``print`` by default)."""


@dataclass(frozen=True)
class DownloadResult:
    """What a download (or a ``--check``) did: where the model is and which files were fetched."""

    repo_id: str | None
    revision: str | None
    """The commit sha the files come from."""
    path: Path
    """The model folder, or the GGUF file at the models folder's root."""
    name: str
    """What to type after ``%llm_load``."""
    files: tuple[str, ...]
    downloaded: tuple[str, ...] = ()
    bytes_downloaded: int = 0
    resumed: tuple[str, ...] = ()
    checked: bool = False
    notes: tuple[str, ...] = ()
    """Lines shown before the download: which GGUF file was chosen, what was skipped."""
    adapter: bool = False
    """A LoRA adapter (in the adapters folder ``loras/``), not a model."""

    @property
    def next_step(self) -> str:
        """What to run next: load the model, or apply the adapter."""
        return f"Apply it with {command('lora add', self.name)}." if self.adapter else f"Load it with {command('load', self.name)}."

    @property
    def summary(self) -> str:
        """The final one-line report."""
        at = f" at {self.revision[:10]}" if self.revision else ""
        what = f"{self.repo_id}{at}" if self.repo_id else self.name
        if self.checked:
            return f"Checked {self.name}: all {len(self.files)} file(s) match the Hub's checksums ({what})."
        if not self.downloaded:
            return f"{what} is already complete in {self.path} ({len(self.files)} file(s)). {self.next_step}"
        extra = [f"{len(self.resumed)} resumed"] if self.resumed else []
        kept = len(self.files) - len(self.downloaded)
        if kept:
            extra.append(f"{kept} already there")
        detail = f"{len(self.downloaded)} file(s), {format_size(self.bytes_downloaded)}" + (
            f"; {', '.join(extra)}" if extra else ""
        )
        return f"Downloaded {what} ({detail}) into {self.path}. {self.next_step}"

    def __str__(self) -> str:
        return self.summary
