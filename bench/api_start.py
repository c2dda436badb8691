"""Cost of starting a run through our HTTP API, next to Prefect's own create_flow_run.

Everything on 127.0.0.1, each in its own process: one real Prefect server (`prefect server
start`, SQLite, temporary PREFECT_HOME, background services off) and our API
(`runners-orchestrator serve`) against it. The deployments are registered by a short-lived
`runners-orchestrator serve-flows --limit 1`, stopped before measuring: the runs created
stay SCHEDULED, so only the start path is measured, not the runs.

In the same run, against that one server:

A. latency: `--latency-runs` sequential starts each way, alternated (ours first on even
   turns, Prefect first on odd ones) so that noise hits both:
   - ours: POST /api/orchestrator/execute_single_runner {"job": ...} (expects 202);
   - raw:  POST {PREFECT_API_URL}/deployments/{id}/create_flow_run
           {"parameters": {"job": ...}} (expects 201);
   - bare ASGI: the same raw request through `bench/bare_proxy.py asgi`, an ASGI callable
           on uvicorn that forwards it (the second HTTP exchange alone);
   - bare Litestar: the same through `bench/bare_proxy.py litestar`, one Litestar route
           handler that forwards it (the framework on top, still no validation);
   p50/p95 of each and each one's ratio to raw.
B. load: `--clients` concurrent clients, each making `--per-client` sequential starts, through
   our API and then straight at Prefect with a plain httpx client that does not retry:
   successful starts/s, p95 latency, non-2xx answers (503s counted apart) and transport
   errors; then the flow runs Prefect holds for the deployment, to check every 2xx made one.
   "errors" are transport errors: after answering 503, Prefect's server drops the
   keep-alive connection, so a client that does not retry may see ReadError next.

Usage: python bench/api_start.py [--latency-runs 100] [--clients 20] [--per-client 20]
       [--warmup 10] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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

ROOT = Path(__file__).parents[1]

QUIET_PREFECT_SERVER = EMBEDDED_PREFECT_ENV  # how `dev` runs Prefect on SQLite

WORKFLOW = "execute_single_runner"
DEPLOYMENT = f"{WORKFLOW}/{WORKFLOW}"  # flow name / deployment name, as serve-flows names it
JOB = {"url": "http://127.0.0.1:9/", "runners": ["exampleTitleVisibleTest"]}
OURS_STATUS = 202
RAW_STATUS = 201
UNAVAILABLE = 503


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Processes:
    """Child processes, each in its own session (so its own process group) with a log file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.running[name] = proc
        return proc

    def tail(self, name: str, lines: int = 20) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(self, name: str, ready, what: str, timeout: float = 120) -> None:
        """Poll ``ready()`` until it is true; fail with the log's tail if the process exits."""
        proc = self.running[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")
            with contextlib.suppress(httpx.TransportError):
                if ready():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name}: no {what} after {timeout:.0f}s:\n{self.tail(name)}")

    def check_alive(self) -> None:
        """Fail, with the log's tail, if a process this script still needs has exited."""
        for name, proc in self.running.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.tail(name, 40)}")

    def stop(self, name: str, timeout: float = 20) -> None:
        """SIGTERM the process group this script started; SIGKILL what is left after it."""
        proc = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} ignored SIGTERM for {timeout:.0f}s; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
        proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def status_is(url: str, code: int) -> bool:
    return httpx.get(url, timeout=2).status_code == code


@dataclass
class Tally:
    """Latencies (s) of the starts that got the expected answer, and what the others got."""

    expected: int
    latencies: list[float] = field(default_factory=list)
    other: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def record(self, status: int | str, seconds: float) -> None:
        if status == self.expected:
            self.latencies.append(seconds)
        elif isinstance(status, int):
            self.other[status] = self.other.get(status, 0) + 1
        else:
            self.errors[status] = self.errors.get(status, 0) + 1

    def merge(self, other: Tally) -> None:
        self.latencies += other.latencies
        for code, n in other.other.items():
            self.other[code] = self.other.get(code, 0) + n
        for name, n in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + n

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.other.items() if not 200 <= code < 300)

    @property
    def n503(self) -> int:
        return self.other.get(UNAVAILABLE, 0)

    def quantile_ms(self, q: int) -> float:
        """The q-th percentile in ms (inclusive method); NaN with fewer than two values."""
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000

    def max_ms(self) -> float:
        return max(self.latencies, default=float("nan")) * 1000

    def detail(self) -> str:
        parts = [f"{code}x{n}" for code, n in sorted(self.other.items())]
        parts += [f"{name}x{n}" for name, n in sorted(self.errors.items())]
        return ", ".join(parts) or "-"


@dataclass
class Target:
    name: str
    url: str
    body: dict
    expected: int


async def post(client: httpx.AsyncClient, target: Target, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        response = await client.post(target.url, json=target.body)
        status: int | str = response.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    tally.record(status, time.perf_counter() - started)


def plain_client(connections: int = 1) -> httpx.AsyncClient:
    """httpx with no retries of its own (the default transport's, made explicit)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx.AsyncHTTPTransport(retries=0, limits=limits)
    return httpx.AsyncClient(transport=transport, timeout=120)


async def latency(targets: list[Target], runs: int, warmup: int) -> tuple[list[Tally], int]:
    """The tallies of ``runs`` alternated starts per target, and the warm-up starts that took."""
    tallies = [Tally(t.expected) for t in targets]
    warm = [Tally(t.expected) for t in targets]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(plain_client()) for _ in targets]
        for _ in range(warmup):  # connections, caches (our deployment id), SQLite pages
            for client, target, tally in zip(clients, targets, warm, strict=True):
                await post(client, target, tally)
        for turn in range(runs):
            order = range(len(targets)) if turn % 2 == 0 else reversed(range(len(targets)))
            for index in order:
                await post(clients[index], targets[index], tallies[index])
    return tallies, sum(len(t.latencies) for t in warm)


async def load(target: Target, clients: int, per_client: int) -> Tally:
    async def one_client() -> Tally:
        tally = Tally(target.expected)
        async with plain_client() as client:
            for _ in range(per_client):
                await post(client, target, tally)
        return tally

    started = time.perf_counter()
    results = await asyncio.gather(*(one_client() for _ in range(clients)))
    total = Tally(target.expected, wall=time.perf_counter() - started)
    for result in results:
        total.merge(result)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured starts each way")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="api-start-"))
    home = tmp / "prefect-home"
    home.mkdir()
    prefect_port, api_port = free_port(), free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    ours_base = f"http://127.0.0.1:{api_port}/api/orchestrator"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "ORCHESTRATOR_")) or k in QUIET_PREFECT_SERVER
    }
    env.update(QUIET_PREFECT_SERVER)
    env.update({"PREFECT_HOME": str(home), "PREFECT_API_URL": prefect_api})
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    bin_dir = Path(sys.executable).parent
    cli = [str(bin_dir / "runners-orchestrator")]
    procs = Processes(tmp)
    deployment_url = f"{prefect_api}/deployments/name/{DEPLOYMENT}"
    try:
        log(f"Prefect server on :{prefect_port} (PREFECT_HOME {home})")
        procs.start(
            "prefect-server",
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
            env,
        )
        procs.wait_for("prefect-server", lambda: status_is(f"{prefect_api}/health", 200), "health")

        log("registering deployments with serve-flows --limit 1")
        procs.start("serve-flows", [*cli, "serve-flows", "--limit", "1"], env)
        procs.wait_for("serve-flows", lambda: status_is(deployment_url, 200), DEPLOYMENT)
        procs.stop("serve-flows")
        deployment = httpx.get(deployment_url, timeout=5)
        assert deployment.status_code == 200, f"{DEPLOYMENT} gone after serve-flows stopped"
        deployment_id = deployment.json()["id"]

        log(f"our API on :{api_port}")
        procs.start("api", [*cli, "serve", "--port", str(api_port), "--log-level", "warning"], env)
        procs.wait_for("api", lambda: status_is(ours_base, 200), "GET /api/orchestrator 200")

        create = f"{prefect_api}/deployments/{deployment_id}/create_flow_run"
        bare_urls = {}
        for kind in ("asgi", "litestar"):
            port = free_port()
            log(f"bare {kind} proxy on :{port}")
            proxy = ROOT / "bench" / "bare_proxy.py"
            procs.start(f"bare-{kind}", [sys.executable, str(proxy), kind, str(port), create], env)
            url = bare_urls[kind] = f"http://127.0.0.1:{port}/"
            procs.wait_for(f"bare-{kind}", lambda u=url: status_is(u, 200), "GET / 200")

        ours = Target("ours", f"{ours_base}/{WORKFLOW}", {"job": JOB}, OURS_STATUS)
        raw = Target("raw", create, {"parameters": {"job": JOB}}, RAW_STATUS)
        bare_asgi, bare_litestar = (
            Target(f"bare {kind}", bare_urls[kind], {"parameters": {"job": JOB}}, RAW_STATUS)
            for kind in ("asgi", "litestar")
        )

        log(f"A: {args.latency_runs} sequential starts each way, alternated")
        (lat_ours, lat_raw, lat_asgi, lat_litestar), warmed = asyncio.run(
            latency([ours, raw, bare_asgi, bare_litestar], args.latency_runs, args.warmup)
        )
        procs.check_alive()
        log(f"B: {args.clients} clients x {args.per_client} starts, ours then raw")
        load_ours = asyncio.run(load(ours, args.clients, args.per_client))
        procs.check_alive()
        load_raw = asyncio.run(load(raw, args.clients, args.per_client))
        procs.check_alive()

        count = httpx.post(
            f"{prefect_api}/flow_runs/count",
            json={"deployments": {"id": {"any_": [deployment_id]}}},
            timeout=30,
        ).json()
        answered = sum(
            len(t.latencies)
            for t in (lat_ours, lat_raw, lat_asgi, lat_litestar, load_ours, load_raw)
        )
        answered += warmed

        cpu = os.cpu_count()
        print(
            f"Prefect {prefect_api} on SQLite; our API {ours_base}; {cpu} CPUs, "
            f"load average {os.getloadavg()[0]:.2f} at the end"
        )
        print()
        print(
            f"A. latency: {args.latency_runs} sequential starts each way, alternated "
            f"(after {args.warmup} unmeasured)"
        )
        print(f"{'path':<44}{'ok':>6}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  other")
        for name, tally in (
            (f"ours: POST .../{WORKFLOW} ({OURS_STATUS})", lat_ours),
            (f"raw:  POST .../create_flow_run ({RAW_STATUS})", lat_raw),
            (f"bare ASGI: raw through bare_proxy ({RAW_STATUS})", lat_asgi),
            (f"bare Litestar: raw through it ({RAW_STATUS})", lat_litestar),
        ):
            print(
                f"{name:<44}{len(tally.latencies):>6}{tally.quantile_ms(50):9.1f}"
                f"{tally.quantile_ms(95):9.1f}{tally.max_ms():9.1f}  {tally.detail()}"
            )
        for name, tally in (
            ("ours", lat_ours),
            ("bare ASGI", lat_asgi),
            ("bare Litestar", lat_litestar),
        ):
            p50 = tally.quantile_ms(50) / lat_raw.quantile_ms(50)
            p95 = tally.quantile_ms(95) / lat_raw.quantile_ms(95)
            print(f"{'ratio ' + name + '/raw':<44}{'':>6}{p50:9.2f}{p95:9.2f}")
        print()
        total = args.clients * args.per_client
        print(
            f"B. load: {args.clients} concurrent clients x {args.per_client} sequential starts "
            f"= {total} each, no client retries"
        )
        print(
            f"{'path':<8}{'ok':>6}{'wall s':>8}{'ok/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
            f"{'non-2xx':>9}{'503':>6}{'errors':>8}  detail (latencies: successful starts)"
        )
        for name, tally in (("ours", load_ours), ("raw", load_raw)):
            errors = sum(tally.errors.values())
            print(
                f"{name:<8}{len(tally.latencies):>6}{tally.wall:8.2f}"
                f"{len(tally.latencies) / tally.wall:8.1f}{tally.quantile_ms(50):9.1f}"
                f"{tally.quantile_ms(95):9.1f}{tally.max_ms():9.1f}{tally.non_2xx:>9}{tally.n503:>6}{errors:>8}"
                f"  {tally.detail()}"
            )
        print()
        print(
            f"flow runs of {DEPLOYMENT} in Prefect: {count}; expected-status answers, "
            f"warm-up included: {answered}"
        )
    except BaseException:
        args.keep = True  # the processes' logs say what went wrong
        raise
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp} (logs of every process)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
