"""History read latency and alert latency on the embedded default (SQLite).

Everything on 127.0.0.1, in a temporary project and PREFECT_HOME:

- a Prefect server (``prefect server start``, configured as ``dev`` runs it) whose SQLite
  file also holds the history tables;
- ``runners-orchestrator serve`` (the API, with its recorder and alert sender), a runner
  server, a page whose cookie banner this script turns on and off, a webhook receiver.

1. **History read**: one check with ``--results`` recorded results (10 000) and 99 others
   with 100 each are written straight into the tables; then ``--requests`` sequential GETs of
   each route: one check's first page of results (limit 100), that page with ``since=24h``
   and ``status=fail``, one check's summary (uptime and p50/p95 over its 10 000 results),
   and the listing of all 100 checks (their stats over 24 h).
2. **Alert latency**: ``--alerts`` runs of a suite whose one check flips between failing and
   passing on every run (``alert_after = 1``), so that every run raises one alert; latency is
   from the run's end (its ``end_time`` in Prefect) to the webhook receiving the alert.

Usage: python bench/history_read.py [--results 10000] [--requests 200] [--alerts 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV
from runners_orchestrator.monitoring.store import (
    HistoryStore,
    checks_table,
    naive_utc,
    results_table,
)
from runners_orchestrator.monitoring.suites import check_key

ROOT = Path(__file__).parents[1]
PREFIX = "/api/orchestrator"
PASSING = b"<html><title>Up</title><body><div class='cookie-banner'>ok</div></body></html>"
FAILING = b"<html><title>Down</title><body><p>no banner</p></body></html>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p * len(ordered) + 0.5) - 1))]


class Local:
    """The toggled page and the webhook receiver, one threaded server."""

    def __init__(self) -> None:
        self.page = PASSING
        self.received: list[tuple[float, dict[str, Any]]] = []
        local = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(local.page)))
                self.end_headers()
                self.wfile.write(local.page)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                local.received.append((time.time(), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout}s")


async def seed(url: str, results: int) -> str:
    """One check with ``results`` results and 99 with 100 each; the big one's key."""
    now = datetime.now(UTC)
    async with HistoryStore(url) as store:
        big = ""
        for index in range(100):
            page = f"https://shop.example.com/page-{index}"
            key = check_key(page, "cookieBannerVisibleTest", "us-east-1")
            count = results if index == 0 else 100
            big = big or key
            rows = [
                {
                    "check_key": key,
                    "at": naive_utc(now - timedelta(minutes=count - i)),
                    "status": "fail" if random.random() < 0.05 else "pass",  # noqa: S311
                    "duration_ms": random.randint(50, 2000),  # noqa: S311
                    "server": "us-east-1",
                    "region": "us-east-1",
                    "flow_run_id": "00000000-0000-0000-0000-000000000000",
                    "run_state": "completed",
                    "error": None,
                    "details": json.dumps({"visible": True}),
                    "screenshot": None,
                }
                for i in range(count)
            ]
            async with store.writer.begin() as connection:
                for start_at in range(0, len(rows), 2000):
                    await connection.execute(
                        results_table.insert(), rows[start_at : start_at + 2000]
                    )
                await connection.execute(
                    checks_table.insert().values(
                        key=key,
                        url=page,
                        runner="cookieBannerVisibleTest",
                        region="us-east-1",
                        suite="bench",
                        tags="[]",
                        first_at=rows[0]["at"],
                        last_at=rows[-1]["at"],
                        last_status=rows[-1]["status"],
                        failures_in_row=0,
                        alerting=False,
                    )
                )
    return big


def timed(http: httpx.Client, path: str, params: dict[str, Any], n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = http.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


async def alert_runs(n: int, local: Local, page: str) -> list[float]:
    from prefect import tags
    from prefect.client.orchestration import get_client

    from runners_orchestrator.discovery import discover

    flow = discover(ROOT).get("orchestrate_runners").flow
    jobs = [
        {
            "url": page,
            "runners": ["cookieBannerVisibleTest"],
            "region": "us-east-1",
            "suite": "bench",
            "tags": [],
        }
    ]
    latencies = []
    for index in range(n):
        local.page = FAILING if index % 2 == 0 else PASSING
        before = len(local.received)
        with tags("runners-orchestrator", "suite:bench"):
            state = await flow(jobs=jobs, return_state=True)
        deadline = time.monotonic() + 60
        while len(local.received) == before and time.monotonic() < deadline:  # noqa: ASYNC110 - the receiver is a thread
            await asyncio.sleep(0.01)
        if len(local.received) == before:
            raise SystemExit(f"run {index}: no alert within 60 s")
        received_at = local.received[-1][0]
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
        assert run.end_time is not None
        latencies.append((received_at - run.end_time.timestamp()) * 1000)
        print(f"  run {index}: {local.received[-1][1]['event']} after {latencies[-1]:.0f} ms")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--alerts", type=int, default=10)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="history-bench-"))
    home = tmp / "prefect"
    home.mkdir()
    project = tmp / "project"
    (project / "checks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    local = Local()
    prefect_port, api_port, runner_port = free_port(), free_port(), free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    suite = f"""
alert_after = 1

[[alerts]]
type = "webhook"
url = "http://127.0.0.1:{local.port}/hook"

[[jobs]]
url = "http://127.0.0.1:{local.port}/page"
runners = ["cookieBannerVisibleTest"]
regions = ["us-east-1"]
"""
    (project / "checks" / "bench.toml").write_text(suite)
    registry = {
        "servers": [
            {
                "id": "us-east-1",
                "url": f"http://127.0.0.1:{runner_port}/api/runner",
                "region": "us-east-1",
            }
        ]
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))},
        **EMBEDDED_PREFECT_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": prefect_api,
        "ORCHESTRATOR_REGISTRY": json.dumps(registry),
        "NO_PROXY": "127.0.0.1",
    }
    os.environ.update(env)
    cli = [sys.executable, "-m", "runners_orchestrator.cli"]
    prefect = str(Path(sys.executable).parent / "prefect")
    processes = [
        start(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env,
            project,
            tmp / "prefect.log",
        )
    ]
    try:
        wait_for(f"{prefect_api}/health")
        database = f"sqlite+aiosqlite:///{home}/prefect.db"
        print(f"seeding {args.results} + 99 x 100 results into {database}")
        started = time.perf_counter()
        big = asyncio.run(seed(database, args.results))
        print(f"  seeded in {time.perf_counter() - started:.1f} s")
        processes.append(
            start(
                [*cli, "runner-server", "--port", str(runner_port), "--region", "us-east-1"],
                env,
                project,
                tmp / "runner.log",
            )
        )
        processes.append(
            start(
                [*cli, "serve", "--port", str(api_port), "--log-level", "warning"],
                env,
                project,
                tmp / "api.log",
            )
        )
        base = f"http://127.0.0.1:{api_port}"
        wait_for(f"{base}{PREFIX}/health")
        wait_for(f"http://127.0.0.1:{runner_port}/api/runner/health")
        load = os.getloadavg()[0]
        print(f"\nhistory read, {args.requests} requests each (load average {load:.1f}):")
        print("| route | p50 | p95 |\n|---|---|---|")
        routes = [
            (f"{PREFIX}/checks/{big}/results", {"limit": 100}),
            (f"{PREFIX}/checks/{big}/results", {"limit": 100, "since": "24h", "status": "fail"}),
            (f"{PREFIX}/checks/{big}", {"window": "30d"}),
            (f"{PREFIX}/checks", {"limit": 100, "window": "24h"}),
        ]
        with httpx.Client(base_url=base, timeout=60) as http:
            for path, params in routes:
                timed(http, path, params, 5)  # warm up
                times = timed(http, path, params, args.requests)
                shown = f"{path.replace(big, '{key}')}?{'&'.join(f'{k}={v}' for k, v in params.items())}"
                print(
                    f"| `GET {shown}` | {statistics.median(times):.1f} ms | "
                    f"{percentile(times, 0.95):.1f} ms |"
                )
        print(f"\nalert latency over {args.alerts} runs (run end -> webhook):")
        latencies = asyncio.run(
            alert_runs(args.alerts, local, f"http://127.0.0.1:{local.port}/page")
        )
        print(
            f"p50 {statistics.median(latencies):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms, "
            f"min {min(latencies):.0f} ms, max {max(latencies):.0f} ms "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)
        local.server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
