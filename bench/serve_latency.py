"""Start latency of API-submitted flow runs under `serve-flows`, and its idle polling cost.

Everything on 127.0.0.1, each in its own process: a real Prefect server (uvicorn, SQLite,
temporary PREFECT_HOME, access log on so that every HTTP request is one log line) and, one
configuration at a time, `runners-orchestrator serve-flows` in a temporary project with one
workflow, `flows/hello.py:hello`. For each configuration:

1. idle cost: the access-log lines written during `--idle` seconds with no runs submitted
   (requests/second, top endpoints) and the Prefect server's CPU time over that window;
2. latency: `--runs` flow runs submitted through the API (`create_flow_run_from_deployment`),
   `--interval` seconds apart; for each, created → first RUNNING state.

The first row is the Prefect server alone (no serve-flows): its own idle traffic.

Usage: python bench/serve_latency.py [--runs 20] [--interval 1.0] [--idle 20]
       [--only 1 3] [--default-runs N] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

QUIET_PREFECT_SERVER = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
}

CONFIGURATIONS = [
    ("(1) Prefect defaults: --poll 10 --start spawn", "10", "spawn"),
    ("(2) --poll 1 --start spawn", "1", "spawn"),
    ("(3) ours: --poll 0.2 --start fork", "0.2", "fork"),
    ("(4) --poll 0.2 --start spawn", "0.2", "spawn"),
]

HELLO = 'async def hello(name: str = "world") -> str:\n    return f"hello {name}"\n'

# uvicorn's access line, as Prefect's log format prints it:
#   ... | INFO | uvicorn.access - 127.0.0.1:5555 - "POST /api/x HTTP/1.1" 200
#   ... | INFO | uvicorn.access - 127.0.0.1:5555 - "WebSocket /api/events/in" [accepted]
ACCESS = re.compile(r'uvicorn\.access - \S+ - "(\S+) (\S+?)(?: HTTP/[\d.]+)?"')
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def endpoint(method: str, path: str) -> str:
    return f"{method} {UUID.sub('{id}', path.split('?', 1)[0])}"


class AccessLog:
    """Reads the access lines appended to the server's log since the last mark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self) -> list[str]:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        # Only complete lines; a line being written stays for the next read.
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        text = complete.decode(errors="replace")
        return [endpoint(*m.groups()) for m in ACCESS.finditer(text)]


def stop(proc: subprocess.Popen, name: str, timeout: float = 30) -> float:
    """SIGTERM the process, wait; then clear what is left of its process group."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} ignored SIGTERM for {timeout:.0f} s; killing it")
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    # Children it started (flow run processes, the fork server) are in its process group.
    grace = time.monotonic() + 5
    while (left := group_members(proc.pid)) and time.monotonic() < grace:
        time.sleep(0.2)
    if left:
        log(f"{name}: still in its process group 5 s after it exited: {'; '.join(left)}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
    return elapsed


def group_members(pgid: int) -> list[str]:
    """`pid command` of the live processes in a process group (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                members.append(f"{stat.parent.name} {cmd[:90]}")
    return members


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"process exited ({proc.returncode}) before {what}:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Row:
    name: str
    idle_requests: int = 0
    idle_seconds: float = 0.0
    idle_cpu: float = 0.0
    top: list[tuple[str, int]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    """created -> first RUNNING, per run that reached RUNNING."""
    pickups: list[float] = field(default_factory=list)
    """created -> first PENDING: until the runner picked the run up (polling)."""
    starts: list[float] = field(default_factory=list)
    """first PENDING -> first RUNNING: the run's process starting."""
    create_seconds: list[float] = field(default_factory=list)
    """How long each create_flow_run_from_deployment call took."""
    submitted: int = 0
    completed: int = 0
    stop_seconds: float | None = None


def measure_idle(row: Row, access: AccessLog, server_pid: int, seconds: float) -> None:
    access.mark()
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    time.sleep(seconds)
    lines = access.since_mark()
    row.idle_seconds = time.monotonic() - t0
    row.idle_cpu = cpu_seconds(server_pid) - cpu0
    row.idle_requests = len(lines)
    row.top = collections.Counter(lines).most_common(3)


async def measure_latency(row: Row, runs: int, interval: float, finish_timeout: float) -> None:
    from prefect.client.orchestration import get_client  # after PREFECT_API_URL is set
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("hello/hello")
        created = {}
        for i in range(runs):
            # At least `interval` between submissions; a slow call delays the next one
            # rather than causing a burst to catch up.
            began = time.monotonic()
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"name": f"run{i}"}
            )
            created[run.id] = run.created
            row.create_seconds.append(time.monotonic() - began)
            if i < runs - 1:
                await asyncio.sleep(max(0.0, began + interval - time.monotonic()))
        row.submitted = runs
        log(
            f"  submitted {runs} runs (slowest create call {max(row.create_seconds):.2f} s);"
            " waiting for them to finish"
        )
        deadline = time.monotonic() + finish_timeout
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=list(created)))
        while True:
            current = await client.read_flow_runs(flow_run_filter=flow_filter, limit=runs)
            final = [r for r in current if r.state is not None and r.state.is_final()]
            if len(final) == runs or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        row.completed = sum(1 for r in final if r.state.type == StateType.COMPLETED)
        if len(final) < runs:
            log(f"  {runs - len(final)} runs not finished after {finish_timeout:.0f} s")
        for run_id, created_at in created.items():
            states = await client.read_flow_run_states(run_id)
            running = [s.timestamp for s in states if s.type == StateType.RUNNING]
            pending = [s.timestamp for s in states if s.type == StateType.PENDING]
            if running:
                row.latencies.append((min(running) - created_at).total_seconds())
            if pending:
                row.pickups.append((min(pending) - created_at).total_seconds())
            if pending and running:
                row.starts.append((min(running) - min(pending)).total_seconds())


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--default-runs", type=int, default=None, help="runs for configuration (1) only"
    )
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after the deployment appears"
    )
    parser.add_argument(
        "--only", type=int, nargs="+", default=None, help="configuration numbers to run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and the database")
    args = parser.parse_args()

    load_start = f"{os.getloadavg()[0]:.2f}"
    tmp = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    project, home = tmp / "project", tmp / "prefect-home"
    (project / "flows").mkdir(parents=True)
    home.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "bench"\n')
    (project / "flows" / "hello.py").write_text(HELLO)

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base_env["PREFECT_HOME"] = str(home)
    server_env = {
        **base_env,
        **QUIET_PREFECT_SERVER,
        # Prefect's logging config sets the `uvicorn` loggers to this level (WARNING by
        # default, which hides uvicorn.access); INFO lets each request through as one line.
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO",
    }
    client_env = {**base_env, "PREFECT_API_URL": api}
    os.environ.update(client_env)  # for get_client() in this process
    for key in [k for k in os.environ if k.startswith("PREFECT_") and k not in client_env]:
        del os.environ[key]

    server_log = tmp / "prefect-server.log"
    log(f"temporary files in {tmp}; Prefect server on {api}")
    rows: list[Row] = []
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=tmp,
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
            "the Prefect server's /api/health",
            90,
            server,
            server_log,
        )
        access = AccessLog(server_log)
        time.sleep(args.settle)
        row = Row("Prefect server alone (no serve-flows)")
        log(f"{row.name}: {args.idle:.0f} s idle")
        measure_idle(row, access, server.pid, args.idle)
        rows.append(row)

        chosen = [
            (n, c) for n, c in enumerate(CONFIGURATIONS, 1) if not args.only or n in args.only
        ]
        for number, (name, poll, start) in chosen:
            row = Row(name)
            runs = args.default_runs if number == 1 and args.default_runs else args.runs
            serve_log = tmp / f"serve-flows-{number}.log"
            log(f"{name}: starting serve-flows")
            with serve_log.open("wb") as out:
                serve = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "runners_orchestrator.cli",
                        "serve-flows",
                        "--poll",
                        poll,
                        "--start",
                        start,
                        "--log-level",
                        "warning",
                    ],
                    cwd=project,
                    env=client_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                launched = time.monotonic()
                wait_until(
                    lambda: (
                        httpx.get(f"{api}/deployments/name/hello/hello", timeout=2).status_code
                        == 200
                    ),
                    "the deployment hello/hello",
                    90,
                    serve,
                    serve_log,
                )
                log(f"  deployment registered {time.monotonic() - launched:.1f} s after start")
                time.sleep(args.settle)
                log(f"  {args.idle:.0f} s idle")
                measure_idle(row, access, server.pid, args.idle)
                log(f"  {runs} runs, {args.interval} s apart")
                finish_timeout = 60 + 3 * float(poll)
                asyncio.run(measure_latency(row, runs, args.interval, finish_timeout))
            finally:
                row.stop_seconds = stop(serve, "serve-flows")
                log(f"  serve-flows stopped {row.stop_seconds:.1f} s after SIGTERM")
            rows.append(row)
            # The next serve-flows registers it again: that is how we know it is up.
            deployment = httpx.get(f"{api}/deployments/name/hello/hello", timeout=5).json()
            httpx.delete(f"{api}/deployments/{deployment['id']}", timeout=5).raise_for_status()
    finally:
        stop(server, "Prefect server")

    print(
        f"Prefect server (SQLite) + serve-flows, {args.idle:.0f} s idle window, "
        f"runs {args.interval} s apart; latency = flow run created -> first RUNNING"
    )
    print(
        f"{os.cpu_count()} CPUs; load average at start {load_start}, at end {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'configuration':<46}{'runs':>5}{'done':>5}{'p50 s':>7}{'p95 s':>7}{'max s':>7}"
        f"{'pickup p50':>11}{'start p50':>10}{'idle req/s':>11}{'srv CPU %':>10}"
    )
    for row in rows:
        rps = row.idle_requests / row.idle_seconds
        cpu = 100 * row.idle_cpu / row.idle_seconds
        if row.submitted:
            lat = row.latencies
            timing = (
                f"{row.submitted:>5}{row.completed:>5}{percentile(lat, 50):>7.2f}"
                f"{percentile(lat, 95):>7.2f}{max(lat, default=float('nan')):>7.2f}"
                f"{percentile(row.pickups, 50):>11.2f}{percentile(row.starts, 50):>10.2f}"
            )
        else:
            timing = f"{'-':>5}{'-':>5}{'-':>7}{'-':>7}{'-':>7}{'-':>11}{'-':>10}"
        print(f"{row.name:<46}{timing}{rps:>11.2f}{cpu:>10.1f}")
    print(
        "pickup = created -> first PENDING (the runner's poll); "
        "start = first PENDING -> first RUNNING (the run's process starting)"
    )
    print("\ntop idle endpoints (requests in the idle window)")
    for row in rows:
        top = ", ".join(f"{path} x{count}" for path, count in row.top) or "none"
        print(f"  {row.name}: {top}")
    if args.keep:
        print(f"\nlogs: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
