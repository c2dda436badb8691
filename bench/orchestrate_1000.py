"""Wall time of 1000 jobs over 10 local runner servers, maxConcurrency 50, vs plain asyncio.

Everything on 127.0.0.1: a page server, 10 runner servers (`runners-orchestrator
runner-server`, one process each) and a real temporary Prefect server (Prefect's test
harness, SQLite). In the same run:

1. baseline — plain `asyncio` + `httpx`: the same 1000 POSTs to /execute, round-robin over
   the servers, at most 50 in flight;
2. ours, default granularity — `orchestrate_runners` as a Prefect flow (batch tasks);
3. ours, one task per job — the same flow with `task_per_job_limit` above 1000.

For each case it also reports the CPU-seconds the Prefect server's processes spent on it
(read from /proc, so Linux only), per job: measured from the case's start until ``--settle``
seconds after its end (the server records task runs from events a moment later), minus what
the idle server spends in as long (measured first). And the CPU of this process (the flow,
or the plain client).

Usage: python bench/orchestrate_1000.py [--jobs 1000] [--servers 10] [--concurrency 50]
           [--rounds 2] [--delay SECONDS] [--settle 3] [--no-task-per-job]
           [--also-batch] [--pause-for-profiler]

``--delay`` makes every page answer after that many seconds; ``--also-batch`` adds rounds
with every job in batch tasks (``task_per_job_limit`` 0), whatever the number of jobs; ``--pause-for-profiler``
prints the Prefect server's pid and waits for Enter before measuring (attach py-spy then).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV

ROOT = Path(__file__).parents[1]

QUIET_PREFECT_SERVER = EMBEDDED_PREFECT_ENV  # how `dev` runs Prefect on SQLite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_TICKS = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int, exclude: set[int]) -> list[int]:
    """Every process under ``pid`` except the ``exclude``d ones and theirs."""
    tree, found, stack = _children(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            if child not in exclude:
                found.append(child)
                stack.append(child)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` so far (their own threads, not their children)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(url)


@contextlib.contextmanager
def processes(commands: list[tuple[list[str], str]]):
    procs = [
        subprocess.Popen(c, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for c, _ in commands
    ]
    try:
        for _, health in commands:
            wait(health)
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)


async def baseline(jobs: list[dict], servers: list[str], concurrency: int) -> float:
    window = asyncio.Semaphore(concurrency)
    cycle = itertools.cycle(servers)
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(index: int, job: dict) -> str:
            async with window:
                server = next(cycle)
                body = {"url": job["url"], "runners": job["runners"], "runId": f"job-{index}"}
                response = await client.post(f"{server}/execute", json=body)
                return response.json()["results"][0]["status"]

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        elapsed = time.perf_counter() - started
    assert statuses.count("pass") == len(jobs), statuses[:5]
    return elapsed


async def ours(flow_fn, jobs: list[dict], concurrency: int) -> tuple[float, float]:
    started = time.perf_counter()
    state = await flow_fn(jobs=jobs, options={"maxConcurrency": concurrency}, return_state=True)
    elapsed = time.perf_counter() - started
    summary = await state.result()
    assert summary.summary.passed == len(jobs), summary.summary
    body = (summary.completed_at - summary.created_at).total_seconds()
    return elapsed, body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--no-task-per-job", action="store_true")
    parser.add_argument("--also-batch", action="store_true", help="add a one-batch-task row")
    parser.add_argument("--pause-for-profiler", action="store_true")
    args = parser.parse_args()

    page_port = free_port()
    ports = [free_port() for _ in range(args.servers)]
    cli = [
        sys.executable,
        "-m",
        "runners_orchestrator.cli",
        "runner-server",
        "--log-level",
        "warning",
    ]
    commands = [
        (
            [sys.executable, str(ROOT / "bench" / "page_server.py"), str(page_port)],
            f"http://127.0.0.1:{page_port}/",
        )
    ]
    commands += [
        (
            [*cli, "--port", str(p), "--region", "us-east-1", "--capacity", "64"],
            f"http://127.0.0.1:{p}/api/runner/health",
        )
        for p in ports
    ]
    servers = [f"http://127.0.0.1:{p}/api/runner" for p in ports]
    registry = {
        "servers": [
            {"id": f"s{i}", "url": u, "region": "us-east-1", "capacity": 64}
            for i, u in enumerate(servers)
        ]
    }
    os.environ["ORCHESTRATOR_REGISTRY"] = json.dumps(registry)
    os.environ.update(QUIET_PREFECT_SERVER)
    jobs = [
        {
            "url": f"http://127.0.0.1:{page_port}/?n={i}"
            + (f"&delay={args.delay}" if args.delay else ""),
            "runners": ["cookieBannerVisibleTest"],
        }
        for i in range(args.jobs)
    ]

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from runners_orchestrator.settings import get_settings

    spec = importlib.util.spec_from_file_location("seed", ROOT / "flows" / "orchestrate_runners.py")
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    orchestrate = flow(seed.orchestrate_runners)

    with processes(commands) as procs, prefect_test_harness(server_startup_timeout=60):
        prefect_pids = descendants(os.getpid(), {p.pid for p in procs})

        idle_rate = 0.0

        async def case(name: str, run) -> tuple[str, float, float | None, float, float]:
            server_cpu, own_cpu = cpu_seconds(prefect_pids), time.process_time()
            started = time.monotonic()
            total, body = await run
            own_cpu = time.process_time() - own_cpu
            await asyncio.sleep(args.settle)
            window = time.monotonic() - started
            server_cpu = cpu_seconds(prefect_pids) - server_cpu - idle_rate * window
            return name, total, body, server_cpu, own_cpu

        async def plain() -> tuple[float, None]:
            return await baseline(jobs, servers, args.concurrency), None

        async def measure() -> None:
            await baseline(jobs[:50], servers, args.concurrency)  # warm up the servers
            await ours(orchestrate, jobs[:20], args.concurrency)  # and Prefect
            nonlocal idle_rate
            await asyncio.sleep(args.settle)  # let the warm-up's events be recorded
            idle_cpu, idle_started = cpu_seconds(prefect_pids), time.monotonic()
            await asyncio.sleep(5)
            idle_rate = (cpu_seconds(prefect_pids) - idle_cpu) / (time.monotonic() - idle_started)
            print(f"idle Prefect server: {idle_rate * 1000:.0f} ms of CPU per second")
            if args.pause_for_profiler:
                print(f"Prefect server pids: {prefect_pids}; flow pid {os.getpid()}")
                await asyncio.to_thread(input, "attach the profiler, then press Enter ")
            rows = []
            for _ in range(args.rounds):
                rows.append(await case("plain asyncio + httpx", plain()))
                get_settings.cache_clear()
                os.environ.pop("ORCHESTRATOR_TASK_PER_JOB_LIMIT", None)
                rows.append(
                    await case(
                        "orchestrate_runners (default)",
                        ours(orchestrate, jobs, args.concurrency),
                    )
                )
            if args.also_batch:
                for _ in range(args.rounds):
                    os.environ["ORCHESTRATOR_TASK_PER_JOB_LIMIT"] = "0"
                    get_settings.cache_clear()
                    rows.append(
                        await case(
                            "orchestrate_runners (batch tasks)",
                            ours(orchestrate, jobs, args.concurrency),
                        )
                    )
                os.environ.pop("ORCHESTRATOR_TASK_PER_JOB_LIMIT", None)
                get_settings.cache_clear()
            if not args.no_task_per_job:
                os.environ["ORCHESTRATOR_TASK_PER_JOB_LIMIT"] = str(args.jobs + 1)
                get_settings.cache_clear()
                rows.append(
                    await case(
                        "orchestrate_runners (task per job)",
                        ours(orchestrate, jobs, args.concurrency),
                    )
                )
            base = min(t for name, t, *_ in rows if name.startswith("plain"))
            print(
                f"{args.jobs} jobs, {args.servers} runner servers, "
                f"maxConcurrency {args.concurrency}, page delay {args.delay} s"
            )
            print(
                f"{'case':<38}{'wall s':>9}{'body s':>9}{'ratio':>8}"
                f"{'prefect CPU s':>15}{'ms/job':>8}{'own CPU s':>11}"
            )
            for name, total, body, server_cpu, own_cpu in rows:
                body_text = f"{body:9.2f}" if body is not None else f"{'':>9}"
                print(
                    f"{name:<38}{total:9.2f}{body_text}{total / base:8.2f}"
                    f"{server_cpu:15.2f}{server_cpu / len(jobs) * 1000:8.1f}{own_cpu:11.2f}"
                )

        asyncio.run(measure())


if __name__ == "__main__":
    main()
