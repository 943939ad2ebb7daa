"""The panels end to end: a real JupyterLab server on 127.0.0.1 and a real headless Chromium.

The test opens a notebook, loads a built-in tiny model from the settings panel, chats in the chat panel
(the reply streams in), presses Stop during a long reply and checks the partial reply is kept. It takes
the screenshots of both panels shown in the README: into ``docs/img/`` with ``NBLLM_UPDATE_SCREENSHOTS=1``,
else into the test's temporary folder (so that running the tests does not change tracked files).

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and Playwright for Python; it never downloads a
browser. Every wait is on a condition of the page or the kernel, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import need, unavailable

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "img"
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    url: str
    token: str
    notebook: str
    log: Path


def _notebook() -> dict[str, Any]:
    cells = [
        "%load_ext nbllm",
        "%llm_settings",
        "%llm_chat_panel browser",
    ]
    return {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {}, "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.fixture(scope="module")
def long_model() -> Path:
    """A bigger tiny model with a long context: slow enough to press Stop in the middle of a reply."""
    from nbllm.testing import tiny_transformers_model

    return tiny_transformers_model(hidden_size=256, num_layers=8, num_heads=4, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def hub_server(tiny_model: Path) -> Iterator[Any]:
    """The local hub server, serving the default tiny model as ``org/tiny-download``."""
    try:
        from hubserver import HubServer
    except ImportError:  # tests/ imported as a package
        from tests.hubserver import HubServer

    with HubServer() as server:
        server.add_repo("org/tiny-download", {p.name: p for p in tiny_model.iterdir() if p.is_file()})
        yield server


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, long_model: Path, hub_server: Any) -> Iterator[Lab]:
    """A JupyterLab server with fresh settings, workspaces, config and runtime folders, a models
    folder holding the tiny model, and its kernels pointed at the local hub server."""
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    need("playwright.sync_api", "needs playwright (pip install playwright)")
    need("jupyterlab", "needs jupyterlab")
    need("ipywidgets", "needs ipywidgets")

    base = tmp_path_factory.mktemp("lab")
    dirs = {name: base / name for name in ("notebooks", "settings", "workspaces", "config", "runtime", "models",
                                           "hf-home")}
    for d in dirs.values():
        d.mkdir()
    (dirs["models"] / "org_tiny-long").symlink_to(long_model, target_is_directory=True)
    notification = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (dirs["notebooks"] / "panels.ipynb").write_text(json.dumps(_notebook()))

    port, token = _free_port(), "nbllm-browser-test"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "NBLLM_MODELS_DIR": str(dirs["models"]),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub_server.url,
        "HF_HOME": str(base / "hf-home"),  # no token of this machine goes anywhere
        "HOME": str(base),  # a fresh ~ (the panel shows the models folder as ~/models)
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    log = base / "lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={dirs['notebooks']}",
        f"--LabApp.user_settings_dir={dirs['settings']}", f"--LabApp.workspaces_dir={dirs['workspaces']}",
        "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
    ]
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=dirs["notebooks"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Lab(url, token, "panels.ipynb", log)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def page(lab: Lab, tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
                  "--disable-extensions", "--no-first-run", "--disable-component-update", "--disable-sync"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 2400}, device_scale_factor=1)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        try:
            yield pg
        finally:
            try:  # what the page looked like at the end, for a failure's report
                pg.screenshot(path=str(tmp_path / "last-page.png"), full_page=True)
            except Exception:
                pass
            context.close()
            browser.close()


def _text(locator: Any) -> str:
    return str(locator.inner_text()).strip()


def test_settings_and_chat_panels_in_jupyterlab(lab: Lab, page: Any, tmp_path: Path, long_model: Path) -> None:
    started = time.monotonic()
    shots = SCREENSHOTS if os.environ.get("NBLLM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    page.goto(f"{lab.url}/lab/tree/{lab.notebook}?token={lab.token}")
    # The notebook toolbar says "idle" before any kernel exists: wait for the kernel itself.
    page.wait_for_function(
        """() => {
            const app = window.jupyterapp;
            const w = app && app.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
        }"""
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

    # -- settings panel: download a model (a progress bar shows), choose one, Load -------------------
    settings = page.locator(".nbllm-settings")
    settings.wait_for()
    model = page.locator(".nbllm-model select")
    assert "org_tiny-long" in _text(model)
    page.locator(".nbllm-download-id input").fill("org/tiny-download")
    page.locator(".nbllm-download").click()
    page.wait_for_function(
        "() => document.querySelector('.nbllm-note').innerText.includes('Downloaded org/tiny-download')"
    )
    page.locator(".nbllm-download-progress .widget-hprogress").first.wait_for()  # the download's own bar
    _wait_last_text(page, ".nbllm-download-progress", "100%")
    assert model.input_value().startswith("org_tiny-download ")  # the new model is selected
    model.select_option(label=next(o for o in model.locator("option").all_inner_texts() if "org_tiny-long" in o))
    assert page.locator(".nbllm-opt-load_in_4bit").is_visible()  # a Transformers model: its options
    assert not page.locator(".nbllm-opt-n_ctx").is_visible()  # not llama.cpp's
    page.locator(".nbllm-opt-dtype select").select_option("float32")
    page.locator(".nbllm-preset-deterministic").click()
    _set_number(page, ".nbllm-opt-max_new_tokens input", 24)
    page.locator(".nbllm-load").click()
    status = page.locator(".nbllm-status")
    page.wait_for_function(
        "() => document.querySelector('.nbllm-status').innerText.includes('Loaded org_tiny-long')"
    )
    assert "transformers" in _text(status) and "on cpu" in _text(status)
    assert not page.locator(".nbllm-settings .nbllm-error").is_visible()
    assert "deterministic" in _text(page.locator(".nbllm-preset"))
    shots.mkdir(parents=True, exist_ok=True)
    _screenshot(settings, shots / "settings-panel.png")

    # -- chat panel: a short reply streams in ---------------------------------------------------------
    chat = page.locator(".nbllm-chat-panel")
    chat.wait_for()
    page.locator(".nbllm-system textarea").fill("You are a helpful assistant.")
    page.locator(".nbllm-system textarea").blur()
    page.locator(".nbllm-input textarea").fill("Hello! Who are you?")
    page.locator(".nbllm-send").click()
    _wait_last_text(page, ".nbllm-msg-user", "Hello! Who are you?")
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled")  # the reply ended
    summary = _text(page.locator(".nbllm-chat-status"))
    assert ("24 tokens" in summary and "ended: length" in summary) or "ended: eos" in summary, summary
    _wait_last_length(page, ".nbllm-msg-assistant", len("Assistant") + 5)
    # The reply shown is the model's own: the library's greedy reply to the same messages.
    expected = _library_reply(long_model, "You are a helpful assistant.", "Hello! Who are you?", 24)
    assert _body(_text(page.locator(".nbllm-msg-assistant").last)) == _alnum(expected), expected

    # -- a long reply: watch it grow, press Stop, the partial reply stays ------------------------------
    _set_number(page, ".nbllm-opt-max_new_tokens input", 4000)
    page.locator(".nbllm-input textarea").fill("Tell me a very long story.")
    page.locator(".nbllm-send").click()
    _wait_last_text(page, ".nbllm-msg-user", "Tell me a very long story.")
    page.wait_for_function("() => !document.querySelector('.nbllm-stop').disabled")
    # Two ever longer texts seen while it is being written: the reply streams in.
    seen = _wait_last_length(page, ".nbllm-msg-assistant", 60, count=2)
    grown = _wait_last_length(page, ".nbllm-msg-assistant", seen + 60, count=2)
    assert grown > seen
    streamed = _body(_text(page.locator(".nbllm-msg-assistant").last))
    assert page.locator(".nbllm-send").is_disabled()  # still writing: Stop comes in the middle
    page.locator(".nbllm-stop").click()
    page.wait_for_function("() => document.querySelector('.nbllm-chat-status').innerText.includes('ended: cancelled')")
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled")
    # The reply is redrawn from the conversation, which kept it, marked partial.
    _wait_last_text(page, ".nbllm-msg-assistant", "partial: cancelled")
    kept = _body(_text(page.locator(".nbllm-msg-assistant").last))
    assert kept.startswith(streamed) and len(streamed) > 60, (kept, streamed)  # what had streamed in is kept
    assert page.locator(".nbllm-msg-assistant").count() == 2
    assert page.locator(".nbllm-msg-user").count() == 2
    assert not page.locator(".nbllm-chat-panel .nbllm-error").is_visible()

    # -- the chat's screenshot for the README ----------------------------------------------------------
    _screenshot(chat, shots / "chat-panel.png")
    elapsed = time.monotonic() - started
    print(f"browser flow took {elapsed:.1f} s")


def _screenshot(panel: Any, path: Path) -> None:
    """A screenshot of one panel, its top scrolled to the top of the notebook (under no toolbar)."""
    panel.evaluate("el => el.scrollIntoView({block: 'start'})")
    box = panel.bounding_box()
    assert box is not None and box["height"] < 2200, f"the panel is {box} tall: it does not fit the viewport"
    panel.screenshot(path=str(path))


def _alnum(text: str) -> str:
    """Letters and digits only: what markdown rendering never changes."""
    return "".join(c for c in text if c.isalnum())


def _body(shown: str) -> str:
    """A chat message's text as the page shows it, without its label and note (letters and digits)."""
    text = _alnum(shown)
    for label in ("Assistantpartialcancelled", "Assistant"):
        if text.startswith(label):
            return text[len(label) :]
    return text


def _library_reply(model: Path, system: str, message: str, n: int) -> str:
    """The greedy reply nbllm's library gives (in this process) with the panel's settings."""
    from nbllm import GenerationOptions
    from nbllm.engine import Engine

    engine = Engine()
    engine.load(model, dtype="float32")
    try:
        options = GenerationOptions.preset("deterministic", GenerationOptions(max_new_tokens=n))
        return engine.generate([{"role": "system", "content": system}, {"role": "user", "content": message}],
                               options).text
    finally:
        engine.unload()


def _wait_last_text(page: Any, selector: str, text: str) -> None:
    """Wait until the last element matching ``selector`` shows ``text`` (markdown renders later)."""
    page.wait_for_function(
        """([sel, text]) => {
            const all = document.querySelectorAll(sel);
            return all.length > 0 && all[all.length - 1].innerText.includes(text);
        }""",
        arg=[selector, text],
    )


def _wait_last_length(page: Any, selector: str, minimum: int, count: int = 1) -> int:
    """Wait until there are ``count`` elements matching ``selector`` and the last one shows at least
    ``minimum`` characters; return how many it shows."""
    handle = page.wait_for_function(
        """([sel, min, count]) => {
            const all = document.querySelectorAll(sel);
            const n = all.length >= count ? all[all.length - 1].innerText.length : 0;
            return n >= min ? n : false;
        }""",
        arg=[selector, minimum, count],
    )
    return int(handle.json_value())


def _set_number(page: Any, selector: str, value: int) -> None:
    """Type a number into an ipywidgets number field (it sends its value on Enter)."""
    field = page.locator(selector)
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_function(
        "([sel, v]) => document.querySelector(sel).value === v", arg=[selector, str(value)]
    )

