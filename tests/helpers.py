"""Real servers on 127.0.0.1 for the tests: a page server and in-thread ASGI servers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CLI = [sys.executable, "-m", "runners_orchestrator.cli"]
"""The command line as a user runs it, in this interpreter's environment."""

PAGES: dict[str, str] = {
    "/banner-visible": (
        "<html><head><title>Shop</title></head><body>"
        '<div class="cookie-banner">We use cookies</div></body></html>'
    ),
    "/banner-data-attribute": (
        "<html><head><title>Shop</title></head><body>"
        '<section data-cookie-banner="v2">Cookies?</section></body></html>'
    ),
    "/banner-missing": "<html><head><title>Plain</title></head><body><p>hi</p></body></html>",
    "/banner-all-selectors": (
        '<html><body><div id="cookie-banner" class="cookie-banner" data-cookie-banner>c</div>'
        "</body></html>"
    ),
    "/banner-two-elements": (
        '<html><body><div class="cookie-banner" hidden>old</div>'
        '<div id="cookie-banner">new</div></body></html>'
    ),
    "/banner-hidden-attribute": '<html><body><div id="cookie-banner" hidden>c</div></body></html>',
    "/banner-display-none": (
        '<html><body><div class="cookie-banner" style="color: red; DISPLAY:none">c</div>'
        "</body></html>"
    ),
    "/banner-visibility-hidden": (
        '<html><body><div class="cookie-banner" style="visibility: hidden">c</div></body></html>'
    ),
    "/banner-hidden-parent": (
        '<html><body><div style="display:none"><div class="cookie-banner">c</div></div>'
        "</body></html>"
    ),
    "/title": "<html><head><title>  Peer   Test Page </title></head><body></body></html>",
    "/title-empty": "<html><head><title>   </title></head><body></body></html>",
    "/title-missing": "<html><head></head><body><h1>No title</h1></body></html>",
    # Pages only a browser reads right: scripts and stylesheets decide what a person sees.
    "/banner-late": (
        "<html><head><title>Late</title></head><body><p>shop</p><script>"
        "setTimeout(() => { const b = document.createElement('div');"
        " b.className = 'cookie-banner'; b.textContent = 'We use cookies';"
        " document.body.appendChild(b); }, 1000);</script></body></html>"
    ),
    "/banner-stylesheet-hidden": (
        "<html><head><style>.consent .cookie-banner { display: none }</style></head>"
        '<body class="consent"><div class="cookie-banner">c</div></body></html>'
    ),
    "/banner-zero-size": (
        '<html><body><div class="cookie-banner" '
        'style="width:0;height:0;overflow:hidden">c</div></body></html>'
    ),
    "/banner-transparent": (
        '<html><body><div style="opacity:0"><div class="cookie-banner">c</div></div></body></html>'
    ),
    "/banner-removed": (
        '<html><body><div class="cookie-banner">c</div><script>'
        "document.querySelector('.cookie-banner').remove()</script></body></html>"
    ),
    "/title-script": (
        "<html><head><title></title></head><body><script>"
        "setTimeout(() => { document.title = 'Set  By Script'; }, 300)</script></body></html>"
    ),
    "/banner-until-consent": (
        # The banner shows until the visitor consents; consent is remembered in a cookie.
        "<html><body><script>"
        "if (!document.cookie.includes('consent=yes')) {"
        " const b = document.createElement('div'); b.id = 'cookie-banner';"
        " b.textContent = 'Accept?'; document.body.appendChild(b);"
        " document.cookie = 'consent=yes; max-age=3600; path=/';"
        " localStorage.setItem('consent', 'yes'); }"
        "</script></body></html>"
    ),
    "/never-loads": (
        # The image never arrives, so the load event never fires.
        '<html><head><title>Stuck</title></head><body><img src="/slow?s=30"></body></html>'
    ),
}


_barriers: dict[str, threading.Barrier] = {}
_barriers_lock = threading.Lock()

HITS: collections.Counter[str] = collections.Counter()
"""Requests each page path (with its query) received, across every PageServer."""
_hits_lock = threading.Lock()


def _barrier(key: str, parties: int) -> threading.Barrier:
    with _barriers_lock:
        return _barriers.setdefault(key, threading.Barrier(parties, timeout=10))


class _PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        with _hits_lock:
            HITS[self.path] += 1
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/redirect":
            self._send(302, b"", {"Location": query["to"][0]})
        elif parts.path == "/slow":
            time.sleep(float(query.get("s", ["2"])[0]))
            self._send(200, PAGES["/title"].encode())
        elif parts.path == "/barrier":
            # Answers only when `n` requests with this key are waiting together.
            try:
                _barrier(query["key"][0], int(query["n"][0])).wait()
            except threading.BrokenBarrierError:
                self._send(504, b"<html><title></title></html>")
                return
            self._send(200, PAGES["/title"].encode())
        elif parts.path == "/big":
            self._send(200, b"<html>" + b"x" * int(query["n"][0]) + b"</html>")
        elif parts.path == "/status":
            self._send(int(query["code"][0]), b"<html><title>err</title></html>")
        elif parts.path in PAGES:
            self._send(200, PAGES[parts.path].encode())
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


class PageServer:
    """A threaded HTTP server of test pages, bound to one loopback address."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = ThreadingHTTPServer((host, 0), _PageHandler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_app(app: Callable[..., Any], host: str = "127.0.0.1") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a real socket in a thread; yield its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            msg = "uvicorn did not start within 10s"
            raise RuntimeError(msg)
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until_healthy(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    """Poll ``url`` until it answers 200; fail early with its stderr if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            msg = f"process exited with {process.returncode}: {stderr}"
            raise RuntimeError(msg)
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    msg = f"{url} did not answer within {timeout}s"
    raise RuntimeError(msg)


async def wait_for_deployment(
    name: str, process: subprocess.Popen[str], timeout: float = 60
) -> Any:
    """The deployment ``flow/deployment`` once ``process`` (a serving process) registered it."""
    from prefect.client.orchestration import get_client  # noqa: PLC0415 - slow import

    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{name} was not served")
                await asyncio.sleep(0.2)


@contextlib.contextmanager
def cli_process(*args: str, health_url: str) -> Iterator[subprocess.Popen[str]]:
    """Start ``runners-orchestrator ARGS`` and stop it with SIGTERM afterwards."""
    process = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_until_healthy(health_url, process)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class ScriptedRunnerServer:
    """A runner server whose answers a test scripts, for what a real one will not do.

    Our runner server never answers 500 or hangs on purpose, and the TypeScript server cannot
    run here (no network to fetch it); this ASGI app replays the behaviours recorded in
    shared/TS-CONTRACT.md and the failures a test needs, on a real socket. It counts every
    execute request it receives.
    """

    def __init__(
        self, region: str = "us-east-1", *, health: bool = True, runners: list[str] | None = None
    ) -> None:
        self.region = region
        self.health = health
        self.runners = runners
        """What its /info lists; unset, /info lists nothing, so it may be sent any runner."""
        self.execute_calls = 0
        self.answers: list[tuple[int, Any, dict[str, str]]] = []
        """Queued (status, body, headers) answers; "hang" as body never answers."""
        self.default: tuple[int, Any, dict[str, str]] | None = None

    def then(self, status: int, body: Any, headers: dict[str, str] | None = None) -> Self:
        self.answers.append((status, body, headers or {}))
        return self

    def always(self, status: int, body: Any, headers: dict[str, str] | None = None) -> Self:
        self.default = (status, body, headers or {})
        return self

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path.endswith("/health") and self.health:
            body = {"status": "ok", "region": self.region, "inFlight": 0, "capacity": 10}
            await self._send(send, 200, body, {})
        elif path.endswith("/info"):
            info: dict[str, Any] = {"region": self.region}
            if self.runners is not None:
                info.update(runners=self.runners, count=len(self.runners))
            await self._send(send, 200, info, {})
        elif path.endswith("/execute"):
            while (await receive()).get("more_body"):
                pass
            self.execute_calls += 1
            status, body, headers = self.answers.pop(0) if self.answers else self.default  # type: ignore[misc]
            if body == "hang":
                await asyncio.Event().wait()
            await self._send(send, status, body, headers)
        else:
            await self._send(send, 404, "Not found", {})

    @staticmethod
    async def _send(send: Any, status: int, body: Any, headers: dict[str, str]) -> None:
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        kind = b"text/plain" if isinstance(body, str) else b"application/json"
        header_list = [(b"content-type", kind)] + [
            (k.lower().encode(), v.encode()) for k, v in headers.items()
        ]
        await send({"type": "http.response.start", "status": status, "headers": header_list})
        await send({"type": "http.response.body", "body": raw})


def ts_results(*names_and_status: tuple[str, str]) -> dict[str, Any]:
    """A 200 body as the TypeScript server gives it: results named after *its* runners."""
    return {
        "region": "us-east-1",
        "results": [
            {"name": name, "status": status, "durationMs": 5} for name, status in names_and_status
        ],
    }


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 that a test can stop and start again on the same port.

    It stands between a client and a real server, to take the server away and bring it
    back without restarting it (the server itself is untouched and real).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self._thread.start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._streams.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def serve() -> None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                for stream in list(self._streams):
                    stream.close()
                self._streams.clear()
                await self._server.wait_closed()
                self._server = None

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1") -> Iterator[str]:
    """A base URL on ``host`` where a connect hangs, as to a host that drops packets.

    A socket listening with a backlog of 0 that never accepts: Linux queues one connection
    (backlog + 1), so connections opened here fill the queue and every later SYN is dropped
    without an answer. A connect then waits for its timeout, not for a refusal. Checked
    before use, so a kernel that behaves otherwise fails the test loudly.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)  # noqa: FBT003 - the stdlib's signature
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect((host, port))
        except TimeoutError:
            pass  # it hangs, as wanted
        else:
            msg = "the blackhole accepted a connection: this kernel does not drop SYNs here"
            raise RuntimeError(msg)
        finally:
            probe.close()
        yield f"http://{host}:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, whatever its session or group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
