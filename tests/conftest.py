"""Shared fixtures: offline hub, a private cache, built-in tiny models, a real IPython shell."""

from __future__ import annotations

import importlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Never touch the network: without this a failed hub call retries for ~23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("NBLLM_CACHE_DIR", str(ROOT / ".cache" / "nbllm-tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' runs go to a run log of their own, never to the user's.
os.environ.setdefault("NBLLM_RUN_LOG", str(Path(tempfile.mkdtemp(prefix="nbllm-test-runs-")) / "runs.sqlite"))


@pytest.fixture(autouse=True)
def _sigint_raises_keyboard_interrupt() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt while a test runs, as it does in a Jupyter kernel while a cell
    runs (ipykernel's ``pre_handler_hook``), whatever this process inherited: a shell starts a
    script's commands with SIGINT ignored when the script runs in the background, and then neither a
    kernel interrupt (SIGINT) nor ``_thread.interrupt_main()`` would reach the tests that use them."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def in_ci() -> bool:
    """Whether this run is CI's (CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(why: str) -> NoReturn:
    """Skip what needs a missing piece here; fail under CI, which installs every piece (``make test``),
    so that a broken install there never passes as a run that quietly tested less."""
    if in_ci():
        pytest.fail(f"{why} (CI installs it: a missing piece is a failure there)", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def need(module: str, why: str | None = None) -> ModuleType:
    """``pytest.importorskip`` that fails under CI instead of skipping (see :func:`unavailable`)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(why or f"needs {module} ({exc})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker: "gpu" in item.keywords also matches a folder named gpu
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A built-in tiny Transformers model (random Llama, real byte-level BPE tokenizer, chat template)."""
    from nbllm.testing import tiny_transformers_model

    return tiny_transformers_model()


@pytest.fixture(scope="session")
def tiny_model_64() -> Path:
    """A tiny model whose every dimension is a multiple of 64 (bitsandbytes 4-bit on CPU needs it)."""
    from nbllm.testing import tiny_transformers_model

    return tiny_transformers_model(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    """The built-in tiny model as a GGUF file."""
    from nbllm.testing import tiny_gguf_model

    return tiny_gguf_model()


@pytest.fixture
def engine() -> Iterator[object]:
    """This process's engine, emptied after the test."""
    from nbllm import get_engine

    eng = get_engine()
    yield eng
    eng.unload()
    eng.defaults = type(eng.defaults)()
    eng.reuse_prefix = True


@pytest.fixture
def shell(engine: object) -> Iterator[object]:
    """A real IPython shell with ``%load_ext nbllm`` done."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbllm")
    yield sh
    for name in [k for k in sh.user_ns if not k.startswith("_")]:
        if name not in ("In", "Out", "exit", "quit", "get_ipython"):
            sh.user_ns.pop(name, None)
