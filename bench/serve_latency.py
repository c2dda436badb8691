"""Start latency of API-submitted flow runs under `serve-flows`, and its idle polling cost.

Everything on 127.0.0.1, each in its own process: a real Prefect server (uvicorn, SQLite,
temporary PREFECT_HOME, access log on so that every HTTP request is one log line) and, one
configuration at a time, `runners-orchestrator serve-flows` in a temporary project with one
workflow, `flows/hello.py:hello`. For each configuration:

1. idle cost: the access-log lines written during `--idle` seconds with no runs submitted
   (requests/second, top endpoints), and the CPU time of the Prefect server and of the
   serve-flows process group over that window;
2. latency: `--runs` flow runs submitted through the API (`create_flow_run_from_deployment`),
   at least `--interval` seconds apart; for each, created → first RUNNING state, split into
   created → first PENDING (the runner's poll picked it up) and PENDING → RUNNING (the
   run's process started). Also the serve-flows group's CPU time per run.

The first row is the Prefect server alone (no serve-flows): its own idle traffic. The
machine's 1-minute load average is printed per configuration: the spawn figures depend on
free CPU (each spawned run imports Prefect again), so compare them on a quiet machine.

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

from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV

QUIET_PREFECT_SERVER = EMBEDDED_PREFECT_ENV  # how `dev` runs Prefect on SQLite

CONFIGURATIONS = [
    ("(1) Prefect defaults: --poll 10 --start spawn --no-wake", "10", "spawn", False),
    ("(2) --poll 1 --start spawn --no-wake", "1", "spawn", False),
    ("(3) ours: --poll 1 --start fork, woken by events", "1", "fork", True),
    ("(4) before: --poll 0.2 --start fork --no-wake", "0.2", "fork", False),
    ("(5) --poll 0.2 --start spawn --no-wake", "0.2", "spawn", False),
]

HELLO = 'async def hello(name: str = "world") -> str:\n    return f"hello {name}"\n'

# One line per request, as Prefect's log format prints uvicorn's: HTTP requests on
# uvicorn.access, WebSocket handshakes on uvicorn.error:
#   ... | INFO | uvicorn.access - 127.0.0.1:5555 - "POST /api/x HTTP/1.1" 200
#   ... | INFO | uvicorn.error - 127.0.0.1:5555 - "WebSocket /api/events/in" [accepted]
ACCESS = re.compile(r'uvicorn\.(?:access|error) - \S+ - "(\S+) (\S+?)(?: HTTP/[\d.]+)?"')
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] is the state (Linux)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of a process group's live members, with that of the children they reaped.

    A flow run's process is reaped by serve-flows (spawn) or by its fork server (fork),
    so its CPU time shows up here once it has exited.
    """
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, IndexError):
            fields = proc_stat(pid)
            total += sum(int(f) for f in fields[11:15])
    return total / CLOCK_TICKS


def group_pids(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = proc_stat(stat.parent.name)
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(stat.parent.name)
    return pids


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
    """`pid command` of the live processes in a process group."""
    members = []
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            members.append(f"{pid} {cmd[:90]}")
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
    """Prefect server CPU seconds during the idle window."""
    serve_idle_cpu: float = 0.0
    """serve-flows process group CPU seconds during the idle window."""
    serve_run_cpu: float = 0.0
    """serve-flows process group CPU seconds from the first submission to the last finish."""
    load: float = float("nan")
    """1-minute load average at the end of the latency phase."""
    failure: str = ""
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


def measure_idle(
    row: Row, access: AccessLog, server_pid: int, seconds: float, serve_pgid: int | None = None
) -> None:
    access.mark()
    serve0 = group_cpu_seconds(serve_pgid) if serve_pgid else 0.0
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    time.sleep(seconds)
    lines = access.since_mark()
    row.idle_seconds = time.monotonic() - t0
    row.idle_cpu = cpu_seconds(server_pid) - cpu0
    if serve_pgid:
        row.serve_idle_cpu = group_cpu_seconds(serve_pgid) - serve0
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


def start_server(tmp: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    with (tmp / "prefect-server.log").open("wb") as out:
        return subprocess.Popen(
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
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    api: str
    env: dict[str, str]
    """serve-flows' environment."""
    server: subprocess.Popen
    access: AccessLog

    def configuration(self, number: int, name: str, poll: str, start: str, *, wake: bool) -> Row:
        """Start serve-flows, measure idle cost then latency, stop it."""
        args, api = self.args, self.api
        row = Row(name)
        runs = args.default_runs if number == 1 and args.default_runs else args.runs
        serve_log = self.tmp / f"serve-flows-{number}.log"
        log(f"{name}: starting serve-flows")
        command = [sys.executable, "-m", "runners_orchestrator.cli", "serve-flows"]
        command += ["--poll", poll, "--start", start, "--log-level", "warning"]
        command += ["--wake" if wake else "--no-wake"]
        with serve_log.open("wb") as out:
            serve = subprocess.Popen(
                command,
                cwd=self.tmp / "project",
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            launched = time.monotonic()
            wait_until(
                lambda: (
                    httpx.get(f"{api}/deployments/name/hello/hello", timeout=2).status_code == 200
                ),
                "the deployment hello/hello",
                90,
                serve,
                serve_log,
            )
            log(f"  deployment registered {time.monotonic() - launched:.1f} s after start")
            time.sleep(args.settle)
            log(f"  {args.idle:.0f} s idle")
            measure_idle(row, self.access, self.server.pid, args.idle, serve.pid)
            if serve.poll() is None:
                log(f"  {runs} runs, at least {args.interval} s apart")
                finish_timeout = 60 + 3 * float(poll)
                cpu0 = group_cpu_seconds(serve.pid)
                asyncio.run(measure_latency(row, runs, args.interval, finish_timeout))
                row.serve_run_cpu = group_cpu_seconds(serve.pid) - cpu0
                row.load = os.getloadavg()[0]
            if serve.poll() is not None:
                # Not by us: we have not stopped it yet. The measurement is void.
                tail = serve_log.read_text(errors="replace").strip().splitlines()[-3:]
                row.failure = f"serve-flows exited ({serve.returncode}) during the measurement"
                log(f"  {row.failure}; its log ends: {' | '.join(tail)}")
        finally:
            row.stop_seconds = stop(serve, "serve-flows")
            log(f"  serve-flows stopped {row.stop_seconds:.1f} s after SIGTERM")
        # The next serve-flows registers it again: that is how we know it is up.
        deployment = httpx.get(f"{api}/deployments/name/hello/hello", timeout=5)
        if deployment.status_code == 200:
            url = f"{api}/deployments/{deployment.json()['id']}"
            httpx.delete(url, timeout=5).raise_for_status()
        return row


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    print(
        f"Prefect server (SQLite) + serve-flows on {os.cpu_count()} CPUs; idle window "
        f"{args.idle:.0f} s; runs submitted at least {args.interval} s apart; "
        "latency = flow run created -> first RUNNING"
    )
    print(f"{'configuration':<46}{'done':>7}{'p50 s':>8}{'p95 s':>8}{'idle req/s':>12}")
    for row in rows:
        rps = row.idle_requests / row.idle_seconds if row.idle_seconds else float("nan")
        if row.submitted:
            lat = row.latencies
            done = f"{row.completed}/{row.submitted}"
            timing = f"{done:>7}{percentile(lat, 50):>8.2f}{percentile(lat, 95):>8.2f}"
        else:
            timing = f"{'-':>7}{'-':>8}{'-':>8}"
        print(f"{row.name:<46}{timing}{rps:>12.2f}{' INVALID' if row.failure else ''}")

    print("\ndetails")
    print(
        f"{'configuration':<46}{'max s':>7}{'pickup':>8}{'start':>7}{'create':>8}"
        f"{'load':>6}{'srv idle':>10}{'sf idle':>9}{'sf CPU':>8}"
    )
    print(
        f"{'':<46}{'':>7}{'p50 s':>8}{'p50 s':>7}{'max s':>8}"
        f"{'1m':>6}{'CPU %':>10}{'CPU %':>9}{'s/run':>8}"
    )
    for row in rows:
        srv = 100 * row.idle_cpu / row.idle_seconds if row.idle_seconds else float("nan")
        if row.submitted:
            sf_idle = 100 * row.serve_idle_cpu / row.idle_seconds
            details = (
                f"{max(row.latencies, default=float('nan')):>7.2f}"
                f"{percentile(row.pickups, 50):>8.2f}{percentile(row.starts, 50):>7.2f}"
                f"{max(row.create_seconds):>8.2f}{row.load:>6.2f}{srv:>10.1f}{sf_idle:>9.1f}"
                f"{row.serve_run_cpu / row.submitted:>8.2f}"
            )
        else:
            details = f"{'-':>7}{'-':>8}{'-':>7}{'-':>8}{'-':>6}{srv:>10.1f}{'-':>9}{'-':>8}"
        print(f"{row.name:<46}{details}")
    print(
        "pickup = created -> first PENDING (the runner's poll found it); start = first PENDING"
        " -> first RUNNING (the run's process starting);\ncreate = slowest"
        " create_flow_run_from_deployment call; load = 1-minute load average after the runs;"
        "\nsf = the serve-flows process group (with the flow run processes it reaped); sf CPU"
        " s/run = its CPU time from the first submission to the last finish, per run"
    )
    for row in rows:
        if row.failure:
            print(f"INVALID {row.name}: {row.failure}")

    print("\ntop idle endpoints (requests in the idle window)")
    for row in rows:
        top = ", ".join(f"{path} x{count}" for path, count in row.top) or "none"
        print(f"  {row.name}: {top}")


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

    log(f"temporary files in {tmp}; Prefect server on {api}")
    rows: list[Row] = []
    server = start_server(tmp, port, server_env)
    try:
        wait_until(
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200,
            "the Prefect server's /api/health",
            90,
            server,
            tmp / "prefect-server.log",
        )
        bench = Bench(args, tmp, api, client_env, server, AccessLog(tmp / "prefect-server.log"))
        time.sleep(args.settle)
        row = Row("Prefect server alone (no serve-flows)")
        log(f"{row.name}: {args.idle:.0f} s idle")
        measure_idle(row, bench.access, server.pid, args.idle)
        rows.append(row)
        for number, (name, poll, start, wake) in enumerate(CONFIGURATIONS, 1):
            if not args.only or number in args.only:
                rows.append(bench.configuration(number, name, poll, start, wake=wake))
    finally:
        stop(server, "Prefect server")

    report(args, rows)
    if args.keep:
        print(f"\nlogs: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
