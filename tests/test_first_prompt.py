"""A kernel's first prompt: no import chain of seconds on the generate path, no library noise in the cell.

Timings are in benchmarks/bench_first_prompt.py (fresh processes, against the library's own first call);
here the properties themselves: what the first prompt imports, that nbllm's seeding is transformers', and
that the messages nbllm keeps out of a cell are those and only those.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import need

from nbllm.loaders._quiet import quiet_library_noise

FIRST_PROMPT = """
import json, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "nbllm")
shell.run_line_magic("llm_load", sys.argv[1])
shell.run_cell_magic("llm_chat", "--max-new-tokens 2 --temperature 0.8 --seed 3", "Hi")
shell.run_cell_magic("llm", "--max-new-tokens 2 --temperature 0.8 --seed 3 -o r", "Hi")
print(json.dumps(sorted(m for m in ("transformers.trainer_utils", "peft", "bitsandbytes") if m in sys.modules)))
"""


def test_the_first_prompt_of_a_kernel_imports_no_trainer_utils_peft_or_bitsandbytes(tiny_model: Path) -> None:
    # transformers.set_seed imported transformers.trainer_utils -> peft -> bitsandbytes: seconds, and torch's
    # "Overriding a previously registered kernel" warning in the first %%llm_chat's output
    need("peft"), need("bitsandbytes")
    out = subprocess.run([sys.executable, "-c", FIRST_PROMPT, str(tiny_model)], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], out.stdout + out.stderr
    assert "Overriding a previously registered kernel" not in out.stderr and "Traceback" not in out.stderr


def test_seeding_is_transformers_set_seed() -> None:
    np = need("numpy")
    torch = need("torch")
    from transformers import set_seed as transformers_set_seed

    from nbllm.loaders._seeding import set_seed

    def state() -> tuple[object, ...]:
        return (torch.get_rng_state().tolist(), np.random.get_state()[1].tolist(), random.getstate())

    for seed in (0, 1234, 2**32 - 1):
        transformers_set_seed(seed)
        theirs = state()
        torch.manual_seed(seed + 1), np.random.seed(seed % 2**31 + 1), random.seed(seed + 1)  # something else between
        set_seed(seed)
        assert state() == theirs
        ours = torch.rand(3).tolist()
        transformers_set_seed(seed)
        assert torch.rand(3).tolist() == ours


def test_the_library_noise_is_kept_out_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        warnings.warn("Overriding a previously registered kernel for the same operator and the same dispatch key\n"
                      "  operator: bitsandbytes::int8_linear_matmul(Tensor A, Tensor B) -> Tensor", UserWarning,
                      stacklevel=1)
        warnings.warn("the attention mask is not set", UserWarning, stacklevel=1)  # another library's: still shown
    assert [str(w.message) for w in caught] == ["the attention mask is not set"]
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        logging.getLogger("bitsandbytes").warning("Failed to load CPU gemm_4bit_forward from kernels-community: no kernels")
        logging.getLogger("bitsandbytes").warning("8-bit matmul: inputs will be cast")
    assert [r.getMessage() for r in caplog.records] == ["8-bit matmul: inputs will be cast"]
