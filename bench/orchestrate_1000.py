"""Wall time of 1000 jobs over 10 local runner servers, maxConcurrency 50, vs plain asyncio.

Everything on 127.0.0.1: a page server, 10 runner servers (`runners-orchestrator
runner-server`, one process each) and a real temporary Prefect server (Prefect's test
harness, SQLite). In the same run:

1. baseline — plain `asyncio` + `httpx`: the same 1000 POSTs to /execute, round-robin over
   the servers, at most 50 in flight;
2. ours, default granularity — `orchestrate_runners` as a Prefect flow (batch tasks);
3. ours, one task per job — the same flow with `task_per_job_limit` above 1000.

Usage: python bench/orchestrate_1000.py [--jobs 1000] [--servers 10] [--concurrency 50]
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
        {"url": f"http://127.0.0.1:{page_port}/?n={i}", "runners": ["cookieBannerVisibleTest"]}
        for i in range(args.jobs)
    ]

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from runners_orchestrator.settings import get_settings

    spec = importlib.util.spec_from_file_location("seed", ROOT / "flows" / "orchestrate_runners.py")
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    orchestrate = flow(seed.orchestrate_runners)

    with processes(commands), prefect_test_harness(server_startup_timeout=60):

        async def measure() -> None:
            await baseline(jobs[:50], servers, args.concurrency)  # warm up the servers
            await ours(orchestrate, jobs[:20], args.concurrency)  # and Prefect
            rows = []
            for _ in range(2):
                rows.append(
                    ("plain asyncio + httpx", await baseline(jobs, servers, args.concurrency), None)
                )
                get_settings.cache_clear()
                os.environ.pop("ORCHESTRATOR_TASK_PER_JOB_LIMIT", None)
                rows.append(
                    (
                        "orchestrate_runners (batch tasks)",
                        *await ours(orchestrate, jobs, args.concurrency),
                    )
                )
            os.environ["ORCHESTRATOR_TASK_PER_JOB_LIMIT"] = str(args.jobs + 1)
            get_settings.cache_clear()
            rows.append(
                (
                    "orchestrate_runners (task per job)",
                    *await ours(orchestrate, jobs, args.concurrency),
                )
            )
            base = min(t for name, t, _ in rows if name.startswith("plain"))
            print(
                f"{args.jobs} jobs, {args.servers} runner servers, maxConcurrency {args.concurrency}"
            )
            print(f"{'case':<38}{'wall s':>9}{'body s':>9}{'ratio':>8}")
            for name, total, body in rows:
                body_text = f"{body:9.2f}" if body is not None else f"{'':>9}"
                print(f"{name:<38}{total:9.2f}{body_text}{total / base:8.2f}")

        asyncio.run(measure())


if __name__ == "__main__":
    main()
