"""`dev`'s Prefect server (SQLite) killed mid-run: 503 with Retry-After meanwhile, nothing lost.

``dev`` restarts the Prefect server it started when it dies, on the same port and database
(see ``runners_orchestrator.embedded``). While it is away, every answer of the orchestrator
API is either what it would have been or a 503 with ``Retry-After``: never a 500, never a
hang. The run in flight ends completed (Prefect's clients in its process retry through the
outage), or crashed and then resumed by a retry; a start accepted during the outage exists
and completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from helpers import CLI, free_port
from runners_orchestrator.api._errors import RETRY_AFTER_SECONDS

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).parents[2]
PREFIX = "/api/orchestrator"
RETRY_SECONDS = 2
"""The API's ``prefect_retry_seconds`` here: how long it retries Prefect before a 503."""
pytestmark = pytest.mark.timeout(420)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def prefect_server_pid(dev_pid: int) -> int:
    """The ``prefect server start`` that ``dev`` runs (a child of it)."""
    for pid in children(dev_pid):
        args = cmdline(pid)
        if len(args) > 3 and args[1].endswith("/prefect") and args[2:4] == ["server", "start"]:
            return pid
    msg = f"no prefect server below dev ({dev_pid})"
    raise AssertionError(msg)


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> Iterator[dict[str, Any]]:
    ports = {"api": free_port(), "prefect": free_port(), "runner": free_port()}
    while True:  # the second runner server takes the next port: it must be free too
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", ports["runner"] + 1))
            break
        except OSError:
            ports["runner"] = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    env["ORCHESTRATOR_PREFECT_RETRY_SECONDS"] = str(RETRY_SECONDS)
    args = [
        *CLI,
        "dev",
        "--port",
        str(ports["api"]),
        "--prefect-port",
        str(ports["prefect"]),
        "--runner-port",
        str(ports["runner"]),
        "--runner-engine",
        "http",
        "--state-dir",
        str(tmp_path_factory.mktemp("dev-restart-state")),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    deadline = time.monotonic() + 150
    while not any("is ready" in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            process.kill()
            pytest.fail("dev was not ready in 150s:\n" + "".join(seen[-40:]))
    try:
        yield {
            "process": process,
            "api": f"http://127.0.0.1:{ports['api']}",
            "prefect": f"http://127.0.0.1:{ports['prefect']}/api",
            "lines": lines,
            "seen": seen,
        }
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def drain(dev: dict[str, Any]) -> str:
    while True:
        try:
            dev["seen"].append(dev["lines"].get_nowait())
        except queue.Empty:
            return "".join(dev["seen"])


async def final(http: httpx.AsyncClient, run_id: str, timeout: float = 240) -> dict[str, Any]:
    """The run's envelope once it ends (completed, failed, crashed or cancelled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await http.get(f"{PREFIX}/runs/{run_id}")
        if response.status_code == httpx.codes.OK:
            envelope = response.json()
            if envelope["status"] in {"completed", "failed", "crashed", "cancelled"}:
                return dict(envelope)
        await asyncio.sleep(0.5)
    pytest.fail(f"run {run_id} did not end within {timeout:.0f}s")


async def ask_until_prefect_is_back(
    http: httpx.AsyncClient, dev: dict[str, Any], pages: Any, run_id: str
) -> tuple[list[tuple[str, int, str | None, str]], list[str]]:
    """Start, status and envelope, again and again, until Prefect answers and 5 s more.

    Returns every answer (what, status code, Retry-After, error code) and the run ids of the
    starts accepted meanwhile. A request without an answer within 60 s fails the test.
    """
    answers: list[tuple[str, int, str | None, str]] = []
    accepted: list[str] = []

    async def ask(what: str, method: str, url: str, **kwargs: Any) -> None:
        try:
            response = await http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            pytest.fail(f"{what} hung (no answer within 60s) while Prefect restarted")
        error = ""
        if response.status_code >= httpx.codes.INTERNAL_SERVER_ERROR:
            error = response.json().get("error", "")
        elif what == "start" and response.status_code == httpx.codes.ACCEPTED:
            accepted.append(response.json()["runId"])
        answers.append((what, response.status_code, response.headers.get("Retry-After"), error))

    back_at: float | None = None
    deadline = time.monotonic() + 180
    async with httpx.AsyncClient(timeout=2) as prefect:
        while back_at is None or time.monotonic() < back_at + 5:
            assert time.monotonic() < deadline, "Prefect did not come back in 180s"
            one = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
            await asyncio.gather(
                ask("start", "POST", f"{PREFIX}/execute_single_runner", json={"job": one}),
                ask("status", "GET", f"{PREFIX}/orchestrate_runners", params={"runId": run_id}),
                ask("envelope", "GET", f"{PREFIX}/runs/{run_id}"),
            )
            if back_at is None:
                with contextlib.suppress(httpx.TransportError):
                    if (await prefect.get(f"{dev['prefect']}/health")).status_code == 200:
                        back_at = time.monotonic()
            await asyncio.sleep(0.5)
    return answers, accepted


async def test_prefect_server_killed_mid_run_is_restarted_and_nothing_is_lost(dev, pages):
    jobs = [
        {"url": pages.url(f"/slow?s=1.5&restart={i}"), "runners": ["exampleTitleVisibleTest"]}
        for i in range(12)
    ]
    async with httpx.AsyncClient(base_url=dev["api"], timeout=60) as http:
        started = await http.post(
            f"{PREFIX}/orchestrate_runners", json={"jobs": jobs, "options": {"maxConcurrency": 2}}
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["runId"]
        deadline = time.monotonic() + 120
        while (await http.get(f"{PREFIX}/runs/{run_id}")).json()["status"] != "running":
            assert time.monotonic() < deadline, "the run never started"
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # a job or two done: the run is mid-way

        old = prefect_server_pid(dev["process"].pid)
        os.killpg(old, signal.SIGKILL)  # the server runs in a process group of its own
        answers, accepted = await ask_until_prefect_is_back(http, dev, pages, run_id)

        assert dev["process"].poll() is None, drain(dev)  # dev itself carried on
        assert prefect_server_pid(dev["process"].pid) != old
        assert "prefect exited (code -9); restarting it" in drain(dev)
        codes = {code for _, code, _, _ in answers}
        assert codes <= {200, 202, 503}, answers  # never a 500
        unavailable = [(retry, error) for _, code, retry, error in answers if code == 503]
        assert unavailable, answers  # the outage was seen (retries last RETRY_SECONDS)
        assert set(unavailable) == {(str(RETRY_AFTER_SECONDS), "prefect_unavailable")}

        # The run in flight ends; if it crashed, a retry resumes it.
        envelope = first = await final(http, run_id)
        if envelope["status"] == "crashed":
            assert (await http.post(f"{PREFIX}/runs/{run_id}/retry")).status_code == 202
            envelope = await final(http, run_id)
        assert envelope["status"] == "completed", envelope
        assert [job["state"] for job in envelope["result"]["jobs"]] == ["completed"] * 12
        # Every start accepted during the outage exists and completes.
        for accepted_id in accepted:
            assert (await final(http, accepted_id))["status"] == "completed"
    print(  # noqa: T201 - the figures for docs/reliability.md, seen with -s
        f"answers during the restart: {len(answers)}, 503: {len(unavailable)}, "
        f"starts accepted: {len(accepted)}; the run in flight ended {first['status']}"
    )


def test_a_prefect_server_that_keeps_dying_is_given_up_on(tmp_path, monkeypatch):
    """Past the restart budget, dev stops restarting and reports the death (it then stops)."""
    from runners_orchestrator import embedded  # noqa: PLC0415
    from runners_orchestrator.settings import get_settings  # noqa: PLC0415

    monkeypatch.setattr(embedded, "PREFECT_RESTARTS", 2)
    lines: list[str] = []
    stack = embedded.DevStack(settings=get_settings(), project_root=tmp_path, out=lines.append)
    dies = [sys.executable, "-c", "raise SystemExit(3)"]  # a server that cannot start
    stack._start("prefect", dies, dict(os.environ))
    try:
        for _ in range(3):
            stack.children[0].process.wait(30)
            stack._restart_prefect()
        assert [line.split(";")[0] for line in lines] == ["prefect exited (code 3)"] * 2
        assert stack._dead() == "prefect (exit code 3)"
    finally:
        stack.stop()
