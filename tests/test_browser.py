"""The panels end to end: a real JupyterLab server on 127.0.0.1 and a real headless Chromium.

The test opens a notebook, downloads and loads a built-in tiny model from the settings panel (Load is
busy while it loads), types a number the schema refuses (the error shows next to the field), chats in
the chat panel (dollars and code shown as written; the reply streams in and the view follows it unless
the user scrolled up), presses Stop during a long reply and checks the partial reply is kept, and runs
a ``%%llm`` cell while the panel writes a reply (the cell says it waits), and restarts the kernel (the
panels left on the page say their kernel is gone and disable their controls). No panel scrolls sideways. It takes
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
        "%%llm --temperature 0 --max-new-tokens 5\nHi",
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
        # What the page printed, for a failure's report
        pg.nbllm_console = console = []  # type: ignore[attr-defined]
        pg.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
        pg.on("pageerror", lambda e: console.append(f"page error: {e}"))
        try:
            yield pg
        finally:
            try:  # what the page looked like at the end, for a failure's report
                pg.screenshot(path=str(tmp_path / "last-page.png"), full_page=True)
            except Exception:
                pass
            context.close()
            browser.close()


def _report(page: Any, lab: Lab) -> str:
    """What the notebook's cells hold, what the page printed and the end of JupyterLab's log."""
    try:
        cells = page.evaluate("""() => {
            const w = window.jupyterapp.shell.currentWidget;
            const k = w.sessionContext.session && w.sessionContext.session.kernel;
            const out = [`kernel: ${k ? k.status + ' / ' + k.connectionStatus : 'none'}`];
            for (const cell of w.content.widgets) {
                const texts = [];
                const outputs = cell.outputArea ? cell.outputArea.model : null;
                for (let i = 0; outputs && i < outputs.length; i++) {
                    const o = outputs.get(i).toJSON();
                    texts.push(JSON.stringify(o).slice(0, 600));
                }
                out.push(`cell [${cell.model.executionCount}] ${cell.model.sharedModel.getSource().split('\\n')[0]}: `
                         + (texts.join(' | ') || 'no output'));
            }
            return out.join('\\n');
        }""")
    except Exception as exc:  # the page itself may be what failed
        cells = f"(the notebook could not be read: {exc})"
    console = "\n".join(getattr(page, "nbllm_console", [])[-30:])
    return f"{cells}\n--- the page printed:\n{console}\n--- JupyterLab's log:\n{lab.log.read_text()[-4000:]}"


def _text(locator: Any) -> str:
    return str(locator.inner_text()).strip()


def test_settings_and_chat_panels_in_jupyterlab(lab: Lab, page: Any, tmp_path: Path, long_model: Path) -> None:
    started = time.monotonic()
    shots = SCREENSHOTS if os.environ.get("NBLLM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    page.goto(f"{lab.url}/lab/tree/{lab.notebook}?token={lab.token}")
    # The notebook toolbar says "idle" before any kernel exists: wait for the kernel itself, for the
    # notebook's cells, and for ipywidgets' comm target on the kernel (a widget sent before it is lost).
    page.wait_for_function(
        """(cells) => {
            const app = window.jupyterapp;
            const w = app && app.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return !!k && k.connectionStatus === 'connected' && k.status === 'idle'
                && w.context.isReady && w.content.widgets.length === cells
                && !!k._targetRegistry && !!k._targetRegistry['jupyter.widget'];
        }""",
        arg=len(_notebook()["cells"]),
    )
    for _ in range(3):  # Run All, awaited; once the notebook is the current one it runs every cell
        ran = page.evaluate("""async () => {
            await window.jupyterapp.commands.execute('notebook:run-all-cells');
            return window.jupyterapp.shell.currentWidget.content.widgets
                .filter(cell => cell.model.executionCount !== null).length;
        }""")
        if ran:
            break
        page.locator(".jp-Notebook").first.click()  # not yet the notebook tracker's current widget: focus it

    # -- settings panel: download a model (a progress bar shows), choose one, Load -------------------
    settings = page.locator(".nbllm-settings")
    try:  # the kernel's first cells (a loaded machine can take long to start a kernel's imports)
        settings.wait_for(timeout=3 * TIMEOUT_MS)
    except Exception as exc:
        pytest.fail(f"the settings panel did not show: {exc}\n{_report(page, lab)}")
    model = page.locator(".nbllm-model select")
    assert "org_tiny-long" in _text(model)
    page.locator(".nbllm-download-id input").fill("org/tiny-download")
    page.locator(".nbllm-download").click()
    page.wait_for_function(
        "() => document.querySelector('.nbllm-note').innerText.includes('Downloaded org/tiny-download')"
    )
    # a success is information, not a warning: in the text's colour, not orange
    assert page.locator(".nbllm-panel-messages .nbllm-note-info").inner_text().startswith("Downloaded org/tiny-download")
    assert page.locator(".nbllm-panel-messages .nbllm-note-warning").count() == 0
    page.locator(".nbllm-download-progress .widget-hprogress").first.wait_for()  # the download's own bar
    _wait_last_text(page, ".nbllm-download-progress", "100%")
    assert model.input_value().startswith("org_tiny-download ")  # the new model is selected
    model.select_option(label=next(o for o in model.locator("option").all_inner_texts() if "org_tiny-long" in o))
    assert page.locator(".nbllm-opt-load_in_4bit").is_visible()  # a Transformers model: its options
    assert not page.locator(".nbllm-opt-n_ctx").is_visible()  # not llama.cpp's
    page.locator(".nbllm-opt-dtype select").select_option("float32")
    page.locator(".nbllm-preset-deterministic").click()
    _set_number(page, ".nbllm-opt-max_new_tokens input", 24)

    # -- a number the schema refuses: the error next to the field, the text kept, nothing changed -----
    _set_number(page, ".nbllm-opt-top_k input", "2.5")
    top_k_error = page.locator(".nbllm-option:has(.nbllm-opt-top_k) .nbllm-error")
    top_k_error.wait_for()
    assert _text(top_k_error) == "⚠ the top_k field expects a whole number, not '2.5'. For example: 0. In use: 0."
    assert page.locator(".nbllm-opt-top_k.nbllm-invalid input").input_value() == "2.5"
    assert not page.locator(".nbllm-panel-messages .nbllm-error").is_visible()  # next to the field, not at the top
    assert _sideways_scrollers(page, ".nbllm-settings") == []  # the long error wraps
    _set_number(page, ".nbllm-opt-top_k input", "0")
    page.wait_for_function("() => !document.querySelector('.nbllm-option .nbllm-opt-top_k.nbllm-invalid')")

    # -- the samplers: a closed section opens on a click; a value set in it is the kernel's default -----
    dry = page.locator(".nbllm-opt-dry_multiplier input")
    assert not dry.is_visible()  # closed until opened
    page.locator(".nbllm-samplers-repetition .jupyter-widget-Collapse-header").click()
    dry.wait_for()
    assert page.locator(".nbllm-opt-presence_penalty input").is_visible()  # its group's fields with it
    assert not page.locator(".nbllm-opt-mirostat_mode").is_visible()  # another group's stay closed
    assert _sideways_scrollers(page, ".nbllm-settings") == []
    _set_number(page, ".nbllm-opt-dry_multiplier input", "0.8")
    page.wait_for_function("() => document.querySelector('.nbllm-preset').innerText.includes('custom')")
    assert _kernel_output(page, "from nbllm import get_engine; print(get_engine().defaults.dry_multiplier)") == "0.8"
    _set_number(page, ".nbllm-opt-dry_multiplier input", "0")  # (the replies below are checked greedy)
    page.wait_for_function("() => document.querySelector('.nbllm-preset').innerText.includes('deterministic')")
    assert _kernel_output(page, "from nbllm import get_engine; print(get_engine().defaults.dry_multiplier)") == "0.0"
    page.locator(".nbllm-samplers-repetition .jupyter-widget-Collapse-header").click()
    dry.wait_for(state="hidden")

    # -- Load: busy and disabled while the model loads (a second click cannot be lost), then back -----
    page.evaluate(_WATCH_BUSY)
    page.locator(".nbllm-load").click()
    status = page.locator(".nbllm-status")
    page.wait_for_function(
        "() => document.querySelector('.nbllm-status').innerText.includes('Loaded org_tiny-long')"
    )
    busy = page.evaluate("() => window.nbllmBusy")
    assert busy["load"] and busy["model"], busy  # "Loading…" and disabled, the model list too
    assert "Load, Unload and the model choice are back when it has loaded" in busy["status"], busy
    page.wait_for_function("() => !document.querySelector('.nbllm-load').disabled")
    assert _text(page.locator(".nbllm-load")) == "Load" and not model.is_disabled()
    assert model.input_value().startswith("org_tiny-long ")  # the choice did not jump
    assert "transformers" in _text(status) and "on cpu" in _text(status)
    assert not page.locator(".nbllm-panel-messages .nbllm-error").is_visible()
    assert "deterministic" in _text(page.locator(".nbllm-preset"))
    # "details" shows %llm_status as it prints it: its lines kept, no word broken
    page.locator(".nbllm-status summary").click()
    details = page.evaluate("""() => {
        const pre = document.querySelector('.nbllm-status-details');
        return {ws: getComputedStyle(pre).whiteSpace, lines: pre.innerText.split('\\n').length,
                wrap: getComputedStyle(pre).overflowWrap};
    }""")
    assert details["ws"] == "pre-wrap" and details["lines"] >= 3 and details["wrap"] != "anywhere", details
    page.locator(".nbllm-status summary").click()
    for width in (1280, 900):  # the LoRA row: Apply shows its whole label, the adapter list is not cut
        page.set_viewport_size({"width": width, "height": 2400})
        page.wait_for_function("(w) => window.innerWidth === w", arg=width)
        cut = page.evaluate(_LORA_CUT)
        assert cut == [], (width, cut)
        assert _sideways_scrollers(page, ".nbllm-settings") == [], width
    page.set_viewport_size({"width": 1280, "height": 2400})
    # a server's model: the panel takes its URL (and the name of the key's variable), not a folder
    page.locator(".nbllm-opt-loader select").select_option("openai")
    page.locator(".nbllm-server-url input").wait_for()
    assert page.locator(".nbllm-opt-api_key_env input").is_visible() and not model.is_visible()
    page.locator(".nbllm-opt-loader select").select_option("auto")
    model.wait_for()
    shots.mkdir(parents=True, exist_ok=True)
    # (the samplers' closed sections make the panel ~2500 px tall: a taller view to take it whole)
    page.set_viewport_size({"width": 1280, "height": 3000})
    page.wait_for_function("() => window.innerHeight === 3000")
    _screenshot(settings, shots / "settings-panel.png", fits=2800)
    page.set_viewport_size({"width": 1280, "height": 2400})

    # -- chat panel: a short reply streams in ---------------------------------------------------------
    chat = page.locator(".nbllm-chat-panel")
    chat.wait_for()
    page.locator(".nbllm-system textarea").fill("You are a helpful assistant.")
    page.locator(".nbllm-system textarea").blur()
    box = page.locator(".nbllm-input textarea")
    # (one fill, then the click: a click message can overtake text still queued in the page)
    box.fill("The apples cost $5 and the pears cost $10.\n\n    a < b & c")
    page.locator(".nbllm-send").click()
    _wait_last_text(page, ".nbllm-msg-user", "a < b & c")
    user = page.locator(".nbllm-msg-user").last
    assert "The apples cost $5 and the pears cost $10." in _text(user)  # dollars as written, no math
    assert user.locator("mjx-container, .MathJax, math").count() == 0
    assert _text(user.locator("pre code")) == "a < b & c"  # an indented code block, escaped once
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled")  # the reply ended
    summary = _text(page.locator(".nbllm-chat-status"))
    assert ("24 tokens" in summary and "ended: length" in summary) or "ended: eos" in summary, summary
    _wait_last_length(page, ".nbllm-msg-assistant", len("Assistant") + 5)
    # The reply shown is the model's own: the library's greedy reply to the same messages.
    expected = _library_reply(long_model, "You are a helpful assistant.",
                              "The apples cost $5 and the pears cost $10.\n\n    a < b & c", 24)
    assert _body(_text(page.locator(".nbllm-msg-assistant").last)) == _alnum(expected), expected

    # -- a long reply: watch it grow, press Stop, the partial reply stays ------------------------------
    _set_number(page, ".nbllm-opt-max_new_tokens input", 4000)
    # (a message longer than the view: the reply that follows starts below the fold)
    page.locator(".nbllm-input textarea").fill(
        "Tell me a very long story about:\n" + "\n".join(f"- thing {i}" for i in range(1, 13)))
    page.locator(".nbllm-send").click()
    _wait_last_text(page, ".nbllm-msg-user", "thing 12")
    page.wait_for_function("() => !document.querySelector('.nbllm-stop').disabled")
    # Two ever longer texts seen while it is being written: the reply streams in.
    seen = _wait_last_length(page, ".nbllm-msg-assistant", 60, count=2)
    grown = _wait_last_length(page, ".nbllm-msg-assistant", seen + 60, count=2)
    assert grown > seen
    # The view follows the reply: once it is taller than the view, its end stays in sight ...
    page.wait_for_function(_FOLLOWS)
    # ... until the user scrolls up: then what they read stays where it is while the reply grows.
    top = page.evaluate(_SCROLL_UP)
    longer = _wait_last_length(page, ".nbllm-msg-assistant", grown + 60, count=2)
    assert page.evaluate(_FIRST_TOP) == pytest.approx(top, abs=2), "the view moved under the user"
    page.evaluate("() => document.querySelector('.nbllm-chat-view').scrollBy(0, 100000)")  # back to the end
    page.wait_for_function(_FOLLOWS)
    assert page.locator(".nbllm-send").is_disabled()  # still writing: Stop comes in the middle
    page.locator(".nbllm-stop").click()
    page.wait_for_function("() => document.querySelector('.nbllm-chat-status').innerText.includes('ended: cancelled')")
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled")
    # The reply is redrawn from the conversation, which kept it, marked partial.
    _wait_last_text(page, ".nbllm-msg-assistant", "partial: cancelled")
    kept = _wait_last_length(page, ".nbllm-msg-assistant", 1, count=2)
    assert kept >= 0.9 * longer, (kept, longer)  # what had streamed is kept (markdown may re-render a little)
    assert page.locator(".nbllm-msg-assistant").count() == 2
    assert page.locator(".nbllm-msg-user").count() == 2
    assert not page.locator(".nbllm-chat-panel .nbllm-error").is_visible()

    assert _sideways_scrollers(page, ".nbllm-chat-panel") == []

    # -- the chat's screenshot for the README ----------------------------------------------------------
    _screenshot(chat, shots / "chat-panel.png")

    # -- a %%llm cell run while the panel writes a reply says it waits, then gives its own text ---------
    _set_number(page, ".nbllm-opt-max_new_tokens input", 300)
    page.evaluate(_SCROLL_UP)  # reading earlier messages: sending still shows the new one and its reply
    assert not page.evaluate(_AT_THE_END)
    page.locator(".nbllm-input textarea").fill(
        "Once more.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![a cat](https://example.org/cat.png)")
    page.locator(".nbllm-send").click()
    page.wait_for_function("() => !document.querySelector('.nbllm-stop').disabled")
    _wait_last_text(page, ".nbllm-msg-user", "[image: a cat]")
    page.wait_for_function(_AT_THE_END)
    shown = page.evaluate("""() => {
        const all = document.querySelectorAll('.nbllm-msg-user'), msg = all[all.length - 1];
        const table = msg.querySelector('table'), body = msg.querySelector('.nbllm-md');
        return {left: table.getBoundingClientRect().left - body.getBoundingClientRect().left,
                images: msg.querySelectorAll('img').length,
                link: msg.querySelector('.nbllm-image a').getAttribute('href')};
    }""")
    assert abs(shown["left"]) <= 2, shown  # the table starts where the text starts, not centred
    assert shown["images"] == 0 and shown["link"] == "https://example.org/cat.png", shown  # never fetched
    # Every text the cell's output shows is recorded (the notebook's own API: JupyterLab may take cells
    # out of view off the page).
    page.evaluate("""() => {
        const nb = window.jupyterapp.shell.currentWidget.content;
        const cell = nb.widgets[3];
        const seen = window.nbllmCellTexts = [];
        cell.outputArea.model.changed.connect(() => {
            for (let i = 0; i < cell.outputArea.model.length; i++) {
                const data = cell.outputArea.model.get(i).data;
                seen.push(String(data['text/plain'] || data['application/vnd.jupyter.stderr'] || ''));
            }
        });
        nb.activeCellIndex = 3;
        return window.jupyterapp.commands.execute('notebook:run-cell');
    }""")
    page.wait_for_function("() => window.nbllmCellTexts.some(t => t.includes(\"waiting for the chat panel's reply\"))")
    # the panel's reply ends (300 tokens: a second on a quiet machine, more than a minute on a loaded one)
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled", timeout=4 * TIMEOUT_MS)
    page.wait_for_function("() => { const t = window.nbllmCellTexts; return t.length && !t[t.length - 1].includes('waiting'); }")
    texts = page.evaluate("() => window.nbllmCellTexts")
    assert texts[-1].strip() and "Error" not in texts[-1], texts

    # -- Enter in the message box starts a new line; the Send button sends (the placeholder says so) ----
    assert "the Send button sends it; Enter starts a new line" in (box.get_attribute("placeholder") or "")
    users = page.locator(".nbllm-msg-user").count()
    box.fill("First line")
    box.press("End")
    box.press("Enter")
    box.press_sequentially("second line")
    assert box.input_value() == "First line\nsecond line"
    assert page.locator(".nbllm-msg-user").count() == users and page.locator(".nbllm-send").is_enabled()

    # -- logprobs set in the settings panel: the reply shows its token view, alternatives in each title ----
    _set_number(page, ".nbllm-opt-max_new_tokens input", 8)
    _set_number(page, ".nbllm-opt-logprobs input", 3)
    box.fill("Hi")
    page.locator(".nbllm-send").click()
    page.wait_for_function("() => !document.querySelector('.nbllm-send').disabled", timeout=2 * TIMEOUT_MS)
    tokens = page.locator(".nbllm-msg-assistant").last.locator(".nbllm-token")
    tokens.first.wait_for()
    title = tokens.first.get_attribute("title") or ""
    assert "logprob" in title and title.count("\n") == 3, title  # the token, then its 3 alternatives
    assert tokens.first.evaluate("e => getComputedStyle(e).backgroundColor") not in ("", "rgba(0, 0, 0, 0)")

    # -- the kernel restarts: the panels left on the page say that their kernel is gone ---------------
    assert page.locator(".nbllm-dead").count() == 0
    beat = page.evaluate("() => document.querySelector('.nbllm-heartbeat').textContent")
    page.wait_for_function("(b) => document.querySelector('.nbllm-heartbeat').textContent !== b", arg=beat)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()")
    page.locator(".nbllm-settings.nbllm-dead").wait_for(timeout=2 * TIMEOUT_MS)
    page.locator(".nbllm-chat-panel.nbllm-dead").wait_for()
    assert "The kernel behind this panel is gone" in _text(page.locator(".nbllm-settings .nbllm-dead-note"))
    assert page.locator(".nbllm-load").is_disabled() and page.locator(".nbllm-send").is_disabled()
    assert page.locator(".nbllm-input textarea").is_disabled()
    elapsed = time.monotonic() - started
    print(f"browser flow took {elapsed:.1f} s")


_WATCH_BUSY = """() => {
    const seen = window.nbllmBusy = {load: false, model: false, status: ''};
    const load = document.querySelector('.nbllm-load');
    const model = document.querySelector('.nbllm-model select');
    new MutationObserver(() => {
        if (load.disabled && load.innerText.includes('Loading…')) seen.load = true;
        if (model.disabled) seen.model = true;
        const status = document.querySelector('.nbllm-status').innerText;
        if (status.includes('Loading')) seen.status = status;
    }).observe(document.querySelector('.nbllm-settings'),
               {subtree: true, attributes: true, childList: true, characterData: true});
}"""

_FOLLOWS = """() => {
    const view = document.querySelector('.nbllm-chat-view');
    const all = view.querySelectorAll('.nbllm-msg');
    const last = all[all.length - 1].getBoundingClientRect(), box = view.getBoundingClientRect();
    return view.scrollHeight > view.clientHeight + 100 && last.bottom <= box.bottom + 1 && last.bottom > box.bottom - 40;
}"""

_SCROLL_UP = """() => {
    const view = document.querySelector('.nbllm-chat-view');
    view.scrollBy(0, -100000);
    return view.querySelector('.nbllm-msg').getBoundingClientRect().top;
}"""

_FIRST_TOP = "() => document.querySelector('.nbllm-chat-view .nbllm-msg').getBoundingClientRect().top"

_AT_THE_END = """() => {
    // the chat view shows its end (laid out bottom up: scrollTop 0 is the end, scrolling up goes below 0)
    const views = document.querySelectorAll('.nbllm-chat-view');
    return views.length === 1 && views[0].scrollHeight > views[0].clientHeight && Math.abs(views[0].scrollTop) <= 2;
}"""

_LORA_CUT = """() => {
    // what of the LoRA row does not show whole: a button label cut, an adapter name wider than its list
    const cut = [];
    const apply = document.querySelector('.nbllm-lora-add');
    if (apply.scrollWidth > apply.clientWidth + 1 || !apply.innerText.includes('Apply'))
        cut.push(`Apply: ${apply.scrollWidth} > ${apply.clientWidth} '${apply.innerText}'`);
    const select = document.querySelector('.nbllm-lora-choice select');
    const probe = document.createElement('span');
    probe.style.cssText = `position: absolute; visibility: hidden; white-space: pre; font: ${getComputedStyle(select).font}`;
    probe.textContent = select.options[select.selectedIndex].text;
    document.body.appendChild(probe);
    const need = probe.getBoundingClientRect().width;
    probe.remove();
    if (need + 24 > select.clientWidth) cut.push(`adapter list: ${need} + 24 > ${select.clientWidth}`);
    return cut;
}"""


def _sideways_scrollers(page: Any, selector: str) -> list[str]:
    """The elements of the panel (and the output area around it) that scroll sideways: content wider
    than the box, in a box that scrolls (or would show a scrollbar) on that axis."""
    return list(page.evaluate(
        """(sel) => {
            const panel = document.querySelector(sel);
            const found = [];
            const around = [];
            for (let el = panel.parentElement; el && !el.classList.contains('jp-Cell'); el = el.parentElement) around.push(el);
            for (const el of [...around, panel, ...panel.querySelectorAll('*')]) {
                const x = getComputedStyle(el).overflowX;
                if ((x === 'auto' || x === 'scroll') && el.scrollWidth > el.clientWidth)
                    found.push(`${el.tagName}.${[...el.classList].join('.')} ${el.scrollWidth} > ${el.clientWidth}`);
            }
            return found;
        }""",
        selector,
    ))


def _screenshot(panel: Any, path: Path, fits: int = 2200) -> None:
    """A screenshot of one panel, its top scrolled to the top of the notebook (under no toolbar)."""
    panel.evaluate("el => el.scrollIntoView({block: 'start'})")
    box = panel.bounding_box()
    assert box is not None and box["height"] < fits, f"the panel is {box} tall: it does not fit the viewport"
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


def _kernel_output(page: Any, code: str) -> str:
    """What ``code`` prints, run in the notebook's kernel through JupyterLab's own kernel connection
    (after the widget messages sent before it: one channel, in order)."""
    return str(page.evaluate("""async (code) => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const future = kernel.requestExecute({code, store_history: false});
        let out = '';
        future.onIOPub = (msg) => {
            if (msg.header.msg_type === 'stream') out += msg.content.text;
            if (msg.header.msg_type === 'error') out += msg.content.ename + ': ' + msg.content.evalue;
        };
        await future.done;
        return out;
    }""", code)).strip()


def _set_number(page: Any, selector: str, value: int | str) -> None:
    """Type a number into a panel's number field (it sends its value on Enter)."""
    field = page.locator(selector)
    field.fill(str(value))
    field.press("Enter")
    page.wait_for_function(
        "([sel, v]) => document.querySelector(sel).value === v", arg=[selector, str(value)]
    )

