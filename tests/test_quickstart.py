"""notebooks/quickstart.ipynb runs top to bottom in a real kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors
    texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(t.startswith("same text with seed") for t in texts)
    assert any(t.startswith("Loaded tiny-llama") for t in texts)
    assert any(t.startswith("llama.cpp {") for t in texts)
    # the real model (nbllm[demo]): its cells assert a right answer and a repeated seeded sample
    assert any(t.startswith("<|im_start|>system") for t in texts)
    assert any(t.startswith("same sample with seed 11") for t in texts)
