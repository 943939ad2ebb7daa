"""The magics in a real Jupyter kernel: streamed display updates, output metadata, interrupts."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

TESTS = Path(__file__).resolve().parent


def run_notebook(cells: list[str], timeout: int = 120) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=timeout, kernel_name="python3").execute()
    return nb


def test_notebook_streams_into_one_display_with_the_record_in_its_metadata(tiny_model):
    nb = run_notebook([
        "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n%load_ext nbllm",
        f"%llm_load {tiny_model}",
        "%%llm --temperature 0 --max-new-tokens 40 --seed 3 -o r\nThe {{ answer }} is {what}",
        "print(r.text, end='')",
        "import nbllm; print(nbllm.get_engine().loader.model.generate(**nbllm.get_engine().loader.tokenizer("
        "r.prompt, return_tensors='pt'), do_sample=False, max_new_tokens=40)[0, r.prompt_tokens:].tolist()"
        " == r.token_ids)",
    ])
    printed = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.get("name") == "stdout")
    assert printed.startswith(f"Loaded {tiny_model.name} with transformers")
    (display,) = nb.cells[2].outputs
    assert display["output_type"] == "display_data"
    text = display["data"]["text/plain"]
    assert text == nb.cells[3].outputs[0]["text"]
    record = display["metadata"]["nbllm"]
    assert record["seed"] == 3 and record["generation_options"]["temperature"] == 0
    assert record["prompt"] == "The {{ answer }} is {what}"  # no such variable, no escaped name: unchanged
    assert record["model"]["path"] == str(tiny_model) and record["versions"]["transformers"]
    assert nb.cells[4].outputs[0]["text"].strip() == "True"


class Kernel:
    """A kernel driven message by message, to interrupt it mid-cell."""

    def __init__(self) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def execute(self, code: str, timeout: float = 60, on_message=None) -> list[dict]:
        msg_id = self.kc.execute(code)
        messages, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(msg)
            if on_message:
                on_message(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                reply = self.kc.get_shell_msg(timeout=timeout)
                while reply["parent_header"].get("msg_id") != msg_id:  # an earlier request's late reply
                    reply = self.kc.get_shell_msg(timeout=timeout)
                self.last_status = reply["content"]["status"]
                return messages
        raise TimeoutError(code)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel():
    k = Kernel()
    yield k
    k.close()


@pytest.mark.timeout(180)  # an interrupt that did not stop the generation ends here
def test_kernel_interrupt_stops_generation_keeps_partial_text_and_model(kernel, tiny_model, tmp_path):
    kernel.execute(f"import os; os.environ['HF_HUB_OFFLINE'] = '1'\n%load_ext nbllm\n%llm_load {tiny_model}")
    # In the kernel: count the model's steps; at the 10th, tell this test (through a pipe) and hold that
    # step until the generation was told to stop, as one slow step of a big model would be.
    at_step = tmp_path / "at-step"
    os.mkfifo(at_step)
    kernel.execute(
        f"import sys, nbllm\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from stepping import count_steps, stop_at_step, step_model, steps_once_the_generation_thread_is_free\n"
        "steps, counting = count_steps(step_model(nbllm.get_engine()))\n"
        f"at, stopping = stop_at_step(nbllm.get_engine(), 10, lambda: open({str(at_step)!r}, 'w').write('10'))"
    )
    assert kernel.last_status == "ok"

    def interrupt_at_the_step() -> None:
        with open(at_step) as pipe:  # opens when the kernel writes: its 10th step has started
            if pipe.read() == "10":
                kernel.km.interrupt_kernel()  # SIGINT, as the notebook's Interrupt button sends

    interrupter = threading.Thread(target=interrupt_at_the_step, daemon=True)
    interrupter.start()
    updates = []

    def on_message(msg):
        if msg["msg_type"] == "update_display_data":
            updates.append(msg)

    try:
        messages = kernel.execute("%%llm --temperature 0 --max-new-tokens 2000 -o r\nOnce", on_message=on_message)
    finally:
        with contextlib.suppress(OSError):  # a reader still waiting (the step never came) is let go
            os.close(os.open(at_step, os.O_WRONLY | os.O_NONBLOCK))
    # one line, no traceback, and the cell counts as failed so "Run All" stops here
    stderr = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    assert stderr.startswith("UsageError: Generation interrupted after") and stderr.count("\n") == 1
    assert kernel.last_status == "error"
    final = updates[-1]["content"]
    assert "[interrupted after" in final["data"]["text/plain"]
    assert final["metadata"]["nbllm"]["seed"] >= 0

    # Within a step: the step under way when the interrupt came ends, no other one starts, and the 9
    # tokens read before it are kept; the model stays loaded and generates.
    out = kernel.execute(
        "stopping.remove(); counting.remove()\n"
        "print(at.get('told'), len(steps), at['steps'], steps_once_the_generation_thread_is_free(steps))\n"
        "print(r.finish_reason, r.completion_tokens, at['tokens'], nbllm.status().loaded)\n"
        "print(len(nbllm.generate('Once', temperature=0, max_new_tokens=5).token_ids))")
    printed = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    assert printed == "True 10 10 10\ninterrupted 9 9 True\n5\n"
    assert final["data"]["text/plain"].startswith(
        "".join(m["content"].get("text", "") for m in kernel.execute("print(r.text, end='')")
                if m["msg_type"] == "stream"))


def test_display_updates_are_coalesced(kernel, tiny_model):
    kernel.execute(f"import os; os.environ['HF_HUB_OFFLINE'] = '1'\n%load_ext nbllm\n%llm_load {tiny_model}")
    messages = kernel.execute("%%llm --temperature 0 --max-new-tokens 400 -o r\nOnce")
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    out = kernel.execute("print(r.completion_tokens, r.timings.total_seconds)")
    tokens, seconds = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream").split()
    assert int(tokens) == 400
    # one update per 50 ms at most (plus the final one), far fewer than one per token
    assert len(updates) <= float(seconds) / 0.05 + 2
    assert len(updates) < int(tokens)  # fewer than one per token, however slow a busy machine makes it
    assert updates[-1]["content"]["data"]["text/plain"] == "".join(
        m["content"].get("text", "") for m in kernel.execute("print(r.text, end='')") if m["msg_type"] == "stream")
