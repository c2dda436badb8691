"""What the monitoring tests share: a webhook receiver, a page that toggles, suite runs.

Everything is real and on 127.0.0.1: the Prefect test server (its SQLite database also
holds the history tables, as on the embedded default), a runner server, the page server,
and a webhook receiver that can refuse connections, answer 500, then take alerts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prefect import tags

from helpers import PAGES, free_port

if TYPE_CHECKING:
    from pathlib import Path

PASSING = (
    "<html><head><title>Up</title></head><body><div class='cookie-banner'>ok</div></body></html>"
)
FAILING = "<html><head><title>Down</title></head><body><p>no banner</p></body></html>"


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST body.

    ``answer_500`` makes it answer 500 to the next N requests (then 200). It listens only
    once :meth:`start` is called, so until then a delivery is refused: a webhook that is down.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[dict[str, Any]] = []
        self.failed_answers = 0
        self.requests = 0
        self._fail_next = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def answer_500(self, times: int) -> None:
        self._fail_next = times

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests += 1
                    failing = receiver._fail_next > 0
                    if failing:
                        receiver._fail_next -= 1
                        receiver.failed_answers += 1
                    else:
                        receiver.received.append(
                            {"body": json.loads(body), "headers": dict(self.headers)}
                        )
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.received]

    async def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait (without blocking the event loop) until ``count`` alerts arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.bodies()) >= count:
                return self.bodies()
            await asyncio.sleep(0.05)
        raise AssertionError(f"{len(self.bodies())} alerts received, expected {count}")


class TogglePage:
    """A page of the page server whose cookie banner a test turns on and off."""

    def __init__(self, pages: Any) -> None:
        self.path = f"/monitored-{uuid.uuid4().hex[:8]}"
        self.url = pages.url(self.path)
        self.up()

    def up(self) -> None:
        PAGES[self.path] = PASSING

    def down(self) -> None:
        PAGES[self.path] = FAILING


def write_suite(root: Path, name: str, text: str) -> Path:
    path = root / "checks" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (root / "pyproject.toml").touch()
    return path


async def run_suite(flow: Any, suite: str | None, jobs: list[dict[str, Any]]) -> str:
    """Run the orchestration in this process as a suite's run would be: tagged, with jobs."""
    run_tags = ["runners-orchestrator", *([f"suite:{suite}"] if suite else [])]
    with tags(*run_tags):
        state = await flow(jobs=jobs, return_state=True)
    assert state.is_completed(), state
    return str(state.state_details.flow_run_id)
