"""What a schedule costs a run on the embedded default: scheduled time → RUNNING.

Everything on 127.0.0.1, each in its own process, as `dev` runs it: a Prefect server
(`prefect server start`, SQLite in a temporary PREFECT_HOME, `EMBEDDED_PREFECT_ENV`: the
scheduler on with our loop settings), one runner server, a page server (in this process),
and `runners-orchestrator serve-flows` (its defaults: --poll 0.2, fork server) in a
temporary project with the repository's workflows and one check suite,
`checks/lag.toml`: one page, one runner, every `--interval` seconds.

For each of `--runs` scheduled runs (after `--warmup` runs that are not counted), from the
run's state history: its scheduled time (the SCHEDULED state's `scheduled_time`) → the
RUNNING state's timestamp, split into scheduled → PENDING (negative: serve-flows picks up
runs up to 10 s ahead, Prefect's prefetch) and PENDING → RUNNING. Prefect's server makes a
run that asks for RUNNING early wait (whole seconds, rounded), so a run may also start up
to half a second early: the lag can be negative.

For reference, in the same session: `--adhoc` runs of the same deployment created at once
(as the API starts them), created → RUNNING.

Usage: python bench/schedule_lag.py [--runs 20] [--interval 3] [--warmup 2] [--adhoc 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "runners_orchestrator.cli"]
PAGE = b"<html><head><title>Lag</title></head><body>ok</body></html>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *_: Any) -> None:
        pass


def wait_for(url: str, process: subprocess.Popen[Any], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer within {timeout}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(name: str, values: list[float]) -> str:
    return (
        f"{name:<32} n={len(values):<3} p50={statistics.median(values):7.3f}s "
        f"p95={percentile(values, 0.95):7.3f}s min={min(values):7.3f}s max={max(values):7.3f}s"
    )


async def timings(client: PrefectClient, run_id: Any) -> tuple[float, float, float] | None:
    """(scheduled → RUNNING, scheduled → PENDING, PENDING → RUNNING) in seconds."""
    states = await client.read_flow_run_states(run_id)
    scheduled = next((s for s in states if s.type == StateType.SCHEDULED), None)
    pending = next((s for s in states if s.type == StateType.PENDING), None)
    running = next((s for s in states if s.type == StateType.RUNNING), None)
    if scheduled is None or running is None or pending is None:
        return None
    at = scheduled.state_details.scheduled_time
    if at is None:
        return None
    return (
        (running.timestamp - at).total_seconds(),
        (pending.timestamp - at).total_seconds(),
        (running.timestamp - pending.timestamp).total_seconds(),
    )


async def measure(api: str, args: argparse.Namespace) -> None:
    async with PrefectClient(api) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                deployment = await client.read_deployment_by_name("orchestrate_runners/suite-lag")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        log(f"suite-lag registered; waiting for {args.warmup + args.runs} completed runs")
        ours = FlowRunFilterDeploymentId(any_=[deployment.id])
        done = FlowRunFilter(
            deployment_id=ours,
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
        )
        wanted = args.warmup + args.runs
        deadline = time.monotonic() + wanted * args.interval * 3 + 180
        while len(runs := await client.read_flow_runs(flow_run_filter=done, limit=200)) < wanted:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(runs)} runs completed in time")
            await asyncio.sleep(1)
        scheduled_runs = sorted(
            (r for r in runs if r.auto_scheduled), key=lambda r: r.expected_start_time
        )
        measured = [await timings(client, r.id) for r in scheduled_runs[args.warmup :]]
        lags = [m for m in measured if m is not None][: args.runs]
        await client.pause_deployment(deployment.id)

        adhoc: list[float] = []
        for _ in range(args.adhoc):
            run = await client.create_flow_run_from_deployment(deployment.id)
            while True:
                state = (await client.read_flow_run(run.id)).state
                if state is not None and state.is_final():
                    break
                await asyncio.sleep(0.2)
            states = await client.read_flow_run_states(run.id)
            running = next(s for s in states if s.type == StateType.RUNNING)
            adhoc.append((running.timestamp - run.created).total_seconds())  # type: ignore[operator]
    load = os.getloadavg()[0]
    print(f"schedule lag, interval {args.interval:g}s, 1-min load {load:.2f}")
    print(describe("scheduled -> RUNNING", [lag[0] for lag in lags]))
    print(describe("  scheduled -> PENDING", [lag[1] for lag in lags]))
    print(describe("  PENDING -> RUNNING", [lag[2] for lag in lags]))
    if adhoc:
        print(describe("ad-hoc run: created -> RUNNING", adhoc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--adhoc", type=int, default=10)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="schedule-lag-"))
    pages = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    page = f"http://127.0.0.1:{pages.server_address[1]}/"
    prefect_port, runner_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    project = workdir / "project"
    shutil.copytree(ROOT / "flows", project / "flows")
    (project / "pyproject.toml").write_text('[project]\nname = "lag"\n')
    (project / "checks").mkdir()
    (project / "checks" / "lag.toml").write_text(
        f'schedule = {{ interval = "{args.interval:g}s" }}\n[[jobs]]\nurl = "{page}"\n'
        'runners = ["exampleTitleVisibleTest"]\nregions = ["us-east-1"]\n'
    )
    registry = {
        "servers": [
            {"id": "us", "url": f"http://127.0.0.1:{runner_port}/api/runner", "region": "us-east-1"}
        ]
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "PREFECT_"))}
    env |= {"PREFECT_HOME": str(workdir / "prefect"), "PREFECT_API_URL": api}
    env["ORCHESTRATOR_REGISTRY"] = json.dumps(registry)
    processes: list[subprocess.Popen[Any]] = []

    def start(command: list[str], name: str, extra: dict[str, str] | None = None) -> None:
        out = (workdir / f"{name}.log").open("w")
        processes.append(
            subprocess.Popen(
                command,
                cwd=project,
                env={**env, **(extra or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        prefect = str(Path(sys.executable).parent / "prefect")
        server_env = {**EMBEDDED_PREFECT_ENV, "PREFECT_SERVER_UI_ENABLED": "false"}
        start(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            "prefect",
            server_env,
        )
        start(
            [*CLI, "runner-server", "--port", str(runner_port), "--region", "us-east-1"], "runner"
        )
        wait_for(f"{api}/health", processes[0], "the Prefect server")
        wait_for(f"http://127.0.0.1:{runner_port}/api/runner/health", processes[1], "runner")
        start([*CLI, "serve-flows"], "serve-flows")
        asyncio.run(measure(api, args))
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        pages.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
