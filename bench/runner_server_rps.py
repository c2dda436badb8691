"""Requests per second one runner server sustains for the cookie check against a local page.

Starts, on 127.0.0.1 only: a page server (bench/page_server.py) and a runner server
(`runners-orchestrator runner-server`), each its own process. Then, for each concurrency
level, a closed loop of N clients POSTs `/api/runner/execute` for `duration` seconds.
The baseline, in the same run, is the same clients GETting the page directly: the ceiling
set by the page server and the load generator on this machine. The ratio runner/baseline is
the figure to compare across machines.

Usage: python bench/runner_server_rps.py [--duration 10] [--concurrency 8 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], health: str):
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(health, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


async def load(make_request, concurrency: int, duration: float) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                started = time.perf_counter()
                ok = await make_request(client)
                latencies.append(time.perf_counter() - started)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), errors, latencies


def wrk(url: str, concurrency: int, duration: float, body: dict | None) -> tuple[float, str, str]:
    """Run wrk (a C load generator: the client is not the bottleneck); return rps, p50, p95."""
    script = ""
    if body is not None:
        payload = json.dumps(json.dumps(body))
        script = (
            f'wrk.method = "POST"\nwrk.body = {payload}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{concurrency}",
                f"-d{int(duration)}s",
                "--latency",
                "-s",
                lua.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1)
    p90 = re.search(r"^\s+90%\s+(\S+)", out, re.MULTILINE).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  wrk saw {errors.group(1)} non-2xx responses")
    return rps, p50, p90


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    args = parser.parse_args()

    page_port, runner_port = free_port(), free_port()
    page = f"http://127.0.0.1:{page_port}/"
    runner = f"http://127.0.0.1:{runner_port}/api/runner"
    cli = [sys.executable, "-m", "runners_orchestrator.cli", "runner-server"]
    runner_args = [*cli, "--port", str(runner_port), "--capacity", "256", "--log-level", "warning"]
    body = {"url": page, "runners": ["cookieBannerVisibleTest"]}

    async def direct(client: httpx.AsyncClient) -> bool:
        return (await client.get(page)).status_code == 200

    async def via_runner(client: httpx.AsyncClient) -> bool:
        response = await client.post(f"{runner}/execute", json=body)
        return response.status_code == 200 and response.json()["results"][0]["status"] == "pass"

    with (
        process([sys.executable, str(HERE / "page_server.py"), str(page_port)], page),
        process(runner_args, f"{runner}/health"),
    ):
        await load(via_runner, 4, 1.0)  # warm up both servers
        print(f"{'case':<28}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
        for concurrency in args.concurrency:
            rows = {}
            for name, fn in (
                ("page direct (baseline)", direct),
                ("runner cookie check", via_runner),
            ):
                count, errors, lat = await load(fn, concurrency, args.duration)
                rps = count / args.duration
                rows[name] = rps
                print(
                    f"{name:<28}{concurrency:>6}{rps:>10.0f}{pct(lat, 50):>9.1f}"
                    f"{pct(lat, 95):>9.1f}{errors:>8}"
                )
            ratio = rows["runner cookie check"] / rows["page direct (baseline)"]
            print(f"{'ratio runner/baseline':<28}{concurrency:>6}{ratio:>10.2f}")
        if shutil.which("wrk"):
            print("\nwith wrk as the load generator (p90, not p95: wrk prints 50/75/90/99)")
            print(f"{'case':<28}{'conc':>6}{'req/s':>10}{'p50':>9}{'p90':>9}")
            for concurrency in args.concurrency:
                direct_rps, d50, d90 = wrk(page, concurrency, args.duration, None)
                name = "page direct (baseline)"
                print(f"{name:<28}{concurrency:>6}{direct_rps:>10.0f}{d50:>9}{d90:>9}")
                runner_rps, r50, r90 = wrk(f"{runner}/execute", concurrency, args.duration, body)
                name = "runner cookie check"
                print(f"{name:<28}{concurrency:>6}{runner_rps:>10.0f}{r50:>9}{r90:>9}")
                ratio = runner_rps / direct_rps
                print(f"{'ratio runner/baseline':<28}{concurrency:>6}{ratio:>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
