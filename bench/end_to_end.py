"""End to end, as a user sees it: submit through the API of `dev`, read the result from the API.

Everything on 127.0.0.1: `bench/page_server.py` (pages that answer after ``--delay`` s) and
`runners-orchestrator dev --runner-engine http` (Prefect on SQLite, two runner servers, the
flows served, the API) on a new, empty state folder. Then, per case, paired rounds:

- **plain**: the baseline a user could write instead: ``asyncio`` + ``httpx``, a sliding
  window of ``--window`` requests to the same two runner servers (alternated), one
  ``POST /api/runner/execute`` per job;
- **API**: ``POST /api/orchestrator/orchestrate_runners`` with the same jobs and
  ``maxConcurrency`` = window, then ``GET /api/orchestrator/runs/{id}`` every 20 ms until
  the run has ended: the time until its result is readable.

Also one job of an instant check, submitted ``--instant`` times one after another (submit →
result readable, p50/p95), and the CPU-seconds the stack's processes used per job (the
Prefect server's on its own), read from /proc.

Usage: python bench/end_to_end.py [--jobs 20 50] [--delay 1] [--window 20] [--rounds 3]
       [--instant 20] [--task-per-job-limit N] [--start fork|spawn|in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from dev_ready import free_port, launch_dev, runner_ports  # bench/ is the script's folder

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

ROOT = Path(__file__).parents[1]
PREFIX = "/api/orchestrator"
TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU-seconds) of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_of_tree(root: int) -> tuple[float, float]:
    """CPU-seconds of ``root`` and every live descendant, and of the Prefect server alone.

    Processes that ended (a flow run's own process) are counted through their parent's
    children times, which /proc adds to the parent once it reaped them.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got:
                parents[int(entry.name)], cpu[int(entry.name)] = got
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                changed = True
    total = 0.0
    prefect = 0.0
    for pid in tree:
        total += cpu.get(pid, 0.0) + _children_cpu(pid)
        if "prefect" in _cmdline(pid) and "server" in _cmdline(pid):
            prefect += cpu.get(pid, 0.0)
    return total, prefect


def _children_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / TICKS


@dataclass
class Stack:
    process: subprocess.Popen[str]
    api: str
    runners: list[str]
    pages: str
    prefect: str


def start_stack(
    state: str, settings: dict[str, str] | None = None, options: Sequence[str] = ()
) -> tuple[Stack, subprocess.Popen[str]]:
    page_port, api_port, prefect_port, runner_port = (
        free_port(),
        free_port(),
        free_port(),
        runner_ports(),
    )
    pages = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "page_server.py"), str(page_port)],
        stdin=subprocess.DEVNULL,
        text=True,
    )
    process = launch_dev(
        state,
        (api_port, prefect_port, runner_port),
        "--runner-engine",
        "http",
        *options,
        settings=settings,
    )
    ready = threading.Event()

    def watch() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if "is ready" in line:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(180):
        process.kill()
        pages.kill()
        raise SystemExit("dev did not become ready within 180 s")
    runners = [f"http://127.0.0.1:{runner_port + i}/api/runner" for i in range(2)]
    stack = Stack(
        process,
        f"http://127.0.0.1:{api_port}{PREFIX}",
        runners,
        f"http://127.0.0.1:{page_port}",
        f"http://127.0.0.1:{prefect_port}/api",
    )
    return stack, pages


@contextlib.contextmanager
def running_stack(
    prefix: str, settings: dict[str, str] | None = None, options: Sequence[str] = ()
) -> Iterator[Stack]:
    """:func:`start_stack` on a new state folder; stopped (its whole session) on the way out."""
    with tempfile.TemporaryDirectory(prefix=prefix) as state:
        stack, pages = start_stack(state, settings, options)
        try:
            yield stack
        finally:
            os.killpg(stack.process.pid, signal.SIGTERM)
            stack.process.wait(60)
            pages.terminate()
            pages.wait(10)


def jobs_for(stack: Stack, count: int, delay: float) -> list[dict[str, Any]]:
    query = f"delay={delay}&" if delay else ""
    return [
        {"url": f"{stack.pages}/?{query}job={i}", "runners": ["exampleTitleVisibleTest"]}
        for i in range(count)
    ]


async def plain(stack: Stack, jobs: list[dict[str, Any]], window: int) -> float:
    """The baseline: a sliding window of execute requests over the same runner servers."""
    limit = asyncio.Semaphore(window)
    async with httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=window * 2)
    ) as http:

        async def one(index: int, job: dict[str, Any]) -> None:
            async with limit:
                server = stack.runners[index % len(stack.runners)]
                response = await http.post(f"{server}/execute", json=job)
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
        return time.perf_counter() - started


async def completed(
    http: httpx.AsyncClient, stack: Stack, started: httpx.Response, poll: float
) -> tuple[str, dict[str, Any]]:
    """The run a start answered with, read every ``poll`` s until it ended completed."""
    if started.status_code != 202:
        raise SystemExit(f"start answered {started.status_code}: {started.text[:300]}")
    run_id = started.json()["runId"]
    while True:
        envelope = (await http.get(f"{stack.api}/runs/{run_id}")).json()
        if envelope["status"] not in ("pending", "running"):
            break
        await asyncio.sleep(poll)
    if envelope["status"] != "completed":
        raise SystemExit(f"run {run_id} ended {envelope['status']}: {envelope.get('error')}")
    return run_id, envelope


async def through_api(stack: Stack, jobs: list[dict[str, Any]], window: int) -> float:
    """Submit → the run's result readable from the API."""
    async with httpx.AsyncClient(timeout=60) as http:
        started = time.perf_counter()
        response = await http.post(
            f"{stack.api}/orchestrate_runners",
            json={"jobs": jobs, "options": {"maxConcurrency": window}},
        )
        run_id, envelope = await completed(http, stack, response, poll=0.02)
        elapsed = time.perf_counter() - started
    passed = envelope["result"]["summary"]["passed"]
    if passed != len(jobs):
        raise SystemExit(f"run {run_id}: {passed} of {len(jobs)} checks passed")
    return elapsed


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(stack: Stack, args: argparse.Namespace) -> None:
    # One run first: the first flow run of a fresh stack pays imports that later ones do not.
    await through_api(stack, jobs_for(stack, 2, 0), args.window)
    for count in args.jobs:
        jobs = jobs_for(stack, count, args.delay)
        for index in range(1, args.rounds + 1):
            base = await plain(stack, jobs, args.window)
            cpu_before = cpu_of_tree(stack.process.pid)
            api = await through_api(stack, jobs, args.window)
            await asyncio.sleep(3)  # the server records task runs from events a moment later
            cpu_after = cpu_of_tree(stack.process.pid)
            total = (cpu_after[0] - cpu_before[0]) / count * 1000
            prefect = (cpu_after[1] - cpu_before[1]) / count * 1000
            print(
                f"{count} jobs x {args.delay}s, window {args.window}, round {index}: plain "
                f"{base:.2f}s, API {api:.2f}s, ratio {api / base:.2f}; CPU/job: stack "
                f"{total:.0f} ms (3 s idle included), Prefect server {prefect:.0f} ms; "
                f"load {load()}",
                flush=True,
            )
    if args.instant:
        times = [
            await through_api(stack, jobs_for(stack, 1, 0), args.window)
            for _ in range(args.instant)
        ]
        print(
            f"one instant job x {args.instant}: submit -> result p50 {statistics.median(times):.3f}s, "
            f"p95 {pct(times, 0.95):.3f}s, min {min(times):.3f}s; load {load()}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instant", type=int, default=20)
    parser.add_argument(
        "--task-per-job-limit",
        type=int,
        default=None,
        help="ORCHESTRATOR_TASK_PER_JOB_LIMIT for the stack (default: the setting's default)",
    )
    parser.add_argument(
        "--start",
        choices=("fork", "spawn", "in-process"),
        default=None,
        help="dev --start: how a run starts (default: dev's own, in-process)",
    )
    args = parser.parse_args()
    settings = {}
    if args.task_per_job_limit is not None:
        settings["ORCHESTRATOR_TASK_PER_JOB_LIMIT"] = str(args.task_per_job_limit)
    options = ("--start", args.start) if args.start else ()
    with running_stack("end-to-end-", settings, options) as stack:
        asyncio.run(bench(stack, args))


if __name__ == "__main__":
    main()
