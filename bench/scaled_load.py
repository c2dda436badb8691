"""Starts and a closed loop of clients: the embedded SQLite stack beside the scaled topology.

Everything on 127.0.0.1, in one run, one stack after the other (never both at once):

1. the embedded default, ``runners-orchestrator dev --runner-engine http`` (Prefect on SQLite,
   one ``serve-flows``, one API, two runner servers);
2. the scaled topology of ``docs/scaling.md``, started by ``tests/topology.py`` (PostgreSQL,
   Redis, two Prefect API servers and a services process behind HAProxy, two ``serve-flows
   --limit 8``, two API replicas behind HAProxy, four runner servers of capacity 4).

On each, through its API (the scaled one through its load balancer):

A. starts: ``--clients`` clients, each making ``--per-client`` sequential starts of
   ``execute_single_runner`` (one job on a local page): starts accepted per second, p50/p95
   of the start's answer, 5xx answers and transport errors. The runs execute meanwhile, as
   they would: the stack serves them while it takes more. Then the time until they have all
   ended, so that phase B starts on an idle stack.
B. closed loop: ``--loop-clients`` clients for ``--duration`` seconds, each starting an
   ``orchestrate_runners`` run of one job, polling its status every 0.5 s until it ends,
   then starting the next: runs completed per second, submit-to-result p50/p99, requests
   made, 5xx answers. Runs still going when the time is up are waited for (``--drain``
   seconds) and counted: every accepted run must end completed, none lost.

The machine's load average (1 min) is printed beside each figure: on a shared machine, it
says how much the figure is worth.

Usage: python bench/scaled_load.py [--clients 20] [--per-client 10] [--loop-clients 50]
       [--duration 30] [--drain 300] [--only embedded|scaled] [--scaled-first]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from topology import ScaledTopology, free_port, wait_for  # noqa: E402

PREFIX = "/api/orchestrator"
FINISHED = {"completed", "failed", "crashed", "cancelled"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` in seconds, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    def record(self, code: int, seconds: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.latencies.append(seconds)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)


async def starts(api: str, page: str, clients: int, per_client: int) -> str:
    """Phase A: a report line."""
    tally = Tally()
    job = {"url": page, "runners": ["exampleTitleVisibleTest"]}
    async with httpx.AsyncClient(base_url=api, timeout=120) as http:

        async def client() -> None:
            for _ in range(per_client):
                began = time.monotonic()
                try:
                    response = await http.post(f"{PREFIX}/execute_single_runner", json={"job": job})
                except httpx.TransportError:
                    tally.transport_errors += 1
                    continue
                tally.record(response.status_code, time.monotonic() - began)

        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.monotonic() - began
    ok = tally.codes.get(202, 0)
    accepted = list(tally.latencies)
    return (
        f"starts: {ok}/{clients * per_client} accepted in {wall:.1f}s = {ok / wall:.1f}/s; "
        f"p50 {quantile(accepted, 0.5) * 1000:.0f} ms, p95 {quantile(accepted, 0.95) * 1000:.0f} "
        f"ms; codes {dict(sorted(tally.codes.items()))}, 5xx {tally.server_errors}, "
        f"transport errors {tally.transport_errors}; load {load()}"
    )


async def closed_loop(api: str, page: str, clients: int, duration: float, drain: float) -> str:
    """Phase B: a report line."""
    tally = Tally()
    turnarounds: list[float] = []
    ended_at: list[float] = []
    outcomes: dict[str, str] = {}
    job = {"url": page, "runners": ["exampleTitleVisibleTest"]}
    requests = 0
    async with httpx.AsyncClient(
        base_url=api, timeout=120, limits=httpx.Limits(max_connections=clients)
    ) as http:

        async def ask(method: str, url: str, **kwargs: Any) -> httpx.Response | None:
            nonlocal requests
            requests += 1
            began = time.monotonic()
            try:
                response = await http.request(method, url, **kwargs)
            except httpx.TransportError:
                tally.transport_errors += 1
                return None
            tally.record(response.status_code, time.monotonic() - began)
            return response

        async def one_run(stop_at: float) -> None:
            began = time.monotonic()
            started = await ask("POST", f"{PREFIX}/orchestrate_runners", json={"jobs": [job]})
            if started is None or started.status_code != 202:
                return
            run_id = started.json()["runId"]
            outcomes[run_id] = "accepted"
            while time.monotonic() < stop_at:
                await asyncio.sleep(0.5)
                status = await ask("GET", f"{PREFIX}/runs/{run_id}")
                if status is not None and status.status_code == 200:
                    state = status.json()["status"]
                    if state in FINISHED:
                        outcomes[run_id] = state
                        turnarounds.append(time.monotonic() - began)
                        ended_at.append(time.monotonic())
                        return

        async def client(loop_end: float) -> None:
            while time.monotonic() < loop_end:
                await one_run(loop_end + drain)

        began = time.monotonic()
        await asyncio.gather(*(client(began + duration) for _ in range(clients)))
        wall = time.monotonic() - began
    done_in_window = sum(1 for t in ended_at if t <= began + duration)
    states = {s: list(outcomes.values()).count(s) for s in sorted(set(outcomes.values()))}
    return (
        f"closed loop: {clients} clients, {duration:.0f}s (+ drain, {wall:.0f}s in all): "
        f"{len(outcomes)} runs accepted, {len(turnarounds)} ended {states}; "
        f"{done_in_window} ended within the {duration:.0f}s, {len(turnarounds) / wall:.2f} "
        f"runs/s over the {wall:.0f}s; submit->result "
        f"p50 {quantile(turnarounds, 0.5):.1f}s, p99 {quantile(turnarounds, 0.99):.1f}s; "
        f"{requests} requests, 5xx {tally.server_errors}, transport errors "
        f"{tally.transport_errors}; load {load()}"
    )


@contextlib.contextmanager
def page_server() -> Any:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "page_server.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/", timeout=30)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def embedded_stack() -> Any:
    """``runners-orchestrator dev`` on free ports and a fresh SQLite database."""
    ports = {"api": free_port(), "prefect": free_port()}
    runner = free_port()
    while True:
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", runner + 1))
            break
        except OSError:
            runner = free_port()
    state = Path(tempfile.mkdtemp(prefix="bench-dev-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    args = [
        *(sys.executable, "-m", "runners_orchestrator.cli", "dev"),
        *("--port", str(ports["api"]), "--prefect-port", str(ports["prefect"])),
        *("--runner-port", str(runner), "--runner-engine", "http"),
        *("--state-dir", str(state), "--log-level", "warning"),
    ]
    logfile = (state / "dev.log").open("wb")
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{ports['api']}"
        wait_for(f"{api}{PREFIX}", timeout=180)
        yield api, f"http://127.0.0.1:{ports['prefect']}/api"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        logfile.close()


async def until_idle(prefect_api: str, give_up: float = 900) -> str:
    """Wait until Prefect holds no run that has not ended: phase A's runs, before phase B."""
    began = time.monotonic()
    not_ended = {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}}}
    async with httpx.AsyncClient(timeout=30) as prefect:
        while time.monotonic() - began < give_up:
            with contextlib.suppress(httpx.HTTPError):
                response = await prefect.post(f"{prefect_api}/flow_runs/count", json=not_ended)
                if response.json() == 0:
                    return f"the started runs all ended {time.monotonic() - began:.0f}s later"
            await asyncio.sleep(1)
    return f"runs still not ended after {give_up:.0f}s"


async def measure(
    name: str, api: str, prefect_api: str, page: str, args: argparse.Namespace
) -> None:
    log(f"{name}: starts ({args.clients} clients x {args.per_client})")
    print(f"{name:<9} {await starts(api, page, args.clients, args.per_client)}", flush=True)
    print(f"{name:<9} {await until_idle(prefect_api)}; load {load()}", flush=True)
    log(f"{name}: closed loop ({args.loop_clients} clients, {args.duration:.0f}s)")
    line = await closed_loop(api, page, args.loop_clients, args.duration, args.drain)
    print(f"{name:<9} {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--loop-clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--drain", type=float, default=300)
    parser.add_argument("--only", choices=("embedded", "scaled"))
    parser.add_argument(
        "--scaled-first", action="store_true", help="the scaled topology first (noise on both)"
    )
    args = parser.parse_args()
    with page_server() as page:

        def embedded() -> None:
            log("starting the embedded stack (dev)")
            began = time.monotonic()
            with embedded_stack() as (api, prefect_api):
                log(f"embedded stack ready in {time.monotonic() - began:.0f}s; load {load()}")
                asyncio.run(measure("embedded", api, prefect_api, page, args))

        def scaled() -> None:
            log("starting the scaled topology")
            began = time.monotonic()
            with ScaledTopology(runner_servers=4, runner_capacity=4) as topology:
                log(f"scaled topology ready in {time.monotonic() - began:.0f}s; load {load()}")
                asyncio.run(measure("scaled", topology.api, topology.prefect_api, page, args))

        stacks = {"embedded": embedded, "scaled": scaled}
        order = ["scaled", "embedded"] if args.scaled_first else ["embedded", "scaled"]
        for name in order:
            if args.only in (None, name):
                stacks[name]()
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
