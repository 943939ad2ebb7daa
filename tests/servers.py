"""Real HTTP servers on 127.0.0.1 for the remote-engine tests.

- :class:`LlamaCppServer`: llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``)
  in a subprocess, on a free port.
- :class:`CountingProxy`: a streaming reverse proxy (Starlette + httpx, run by uvicorn in a thread) that
  counts the requests in flight, and can hold each one until N are in flight (proof that they overlap).
- :class:`SilentServer`: a socket that accepts connections and never answers (timeouts).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_listening(url: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 60.0,
                         headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers (any status), in a bounded loop; each wait between tries is a wait
    on the process's exit (so a server that died is reported at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0, headers=headers)
            return
        except httpx.HTTPError:
            pass
        if proc is not None:
            try:
                proc.wait(timeout=0.1)
                raise RuntimeError(f"the server exited with {proc.returncode} before answering {url}")
            except subprocess.TimeoutExpired:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout} s")


class LlamaCppServer:
    """``python -m llama_cpp.server --model F.gguf`` on a free loopback port."""

    def __init__(self, model: Path, *, alias: str = "tiny", api_key: str | None = None,
                 interrupt_requests: bool = False, chat_format: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-cpp-server-{self.port}.log"
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
                "--host", "127.0.0.1", "--port", str(self.port), "--verbose", "False",
                # False: queue concurrent requests (by default a new one cuts the running one short)
                "--interrupt_requests", str(interrupt_requests)]
        if api_key is not None:
            args += ["--api_key", api_key]
        if chat_format is not None:
            args += ["--chat_format", chat_format]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until_listening(f"{self.url}/models", self.proc)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-reply if it was answering."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        self.log_path.unlink(missing_ok=True)


class ThreadedApp:
    """An ASGI app served by uvicorn on a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn's own flag; each wait is a wait on the thread's end
            self.thread.join(0.01)
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class CountingProxy(ThreadedApp):
    """Forwards every request to ``upstream`` (streaming), counting the generations (POST) in flight at
    once. With ``hold_until=N`` the first N wait (at most ``hold_timeout`` s) until N are in flight.
    ``anonymous``: the model list says no server name and nothing else answers, so the loader sees an
    unknown OpenAI-compatible server (one it does not run one request at a time)."""

    def __init__(self, upstream: str, *, hold_until: int = 0, hold_timeout: float = 20.0,
                 anonymous: bool = False) -> None:
        import asyncio

        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        self.in_flight = 0
        self.peak = 0
        self.seen = 0
        lock = asyncio.Lock()
        changed = asyncio.Condition(lock)

        async def forward(request: Request) -> Any:
            if anonymous and request.method == "GET":  # an OpenAI-compatible server that does not say which
                if not request.url.path.endswith("/models"):
                    return Response(status_code=404)
                listed = httpx.get(upstream + request.url.path, timeout=30).json()
                for entry in listed["data"]:
                    entry["owned_by"] = "someone"
                return JSONResponse(listed)
            if request.method != "POST":  # only generations are counted and held
                return await relay_only(request)
            async with changed:
                self.in_flight += 1
                self.seen += 1
                self.peak = max(self.peak, self.in_flight)
                changed.notify_all()
                if self.seen <= hold_until:  # the first ones wait for each other: proof that they overlap
                    try:
                        await asyncio.wait_for(changed.wait_for(lambda: self.in_flight >= hold_until), hold_timeout)
                    except asyncio.TimeoutError:
                        pass
            return await relay_only(request, counted=True)

        async def relay_only(request: Request, counted: bool = False) -> Any:
            client = httpx.AsyncClient(timeout=60)
            body = await request.body()
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
            upstream_request = client.build_request(request.method, upstream + request.url.path, content=body,
                                                    headers=headers)
            response = await client.send(upstream_request, stream=True)

            ended = False

            async def end() -> None:
                nonlocal ended
                if counted and not ended:
                    ended = True
                    async with changed:
                        self.in_flight -= 1
                        changed.notify_all()

            async def relay() -> Any:
                try:
                    async for data in response.aiter_raw():
                        if b"[DONE]" in data:  # over before the client can know it: it cannot have sent its next one
                            await end()
                        yield data
                finally:
                    await end()
                    await response.aclose()
                    await client.aclose()

            return StreamingResponse(relay(), status_code=response.status_code,
                                     media_type=response.headers.get("content-type"))

        app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
        super().__init__(app)


class SilentServer:
    """Accepts TCP connections (the kernel's backlog does) and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def stop(self) -> None:
        self.sock.close()


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run ``code`` in a second Python process (this worktree first on the path); its stdout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the second process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
