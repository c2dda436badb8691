"""Browser checks per second for one runner server, against the naive way, and its memory.

Starts, on 127.0.0.1 only: a page server (bench/page_server.py) and a runner server with
the browser engine (`runners-orchestrator runner-server --engine browser`, its default
capacity unless --capacity), each its own process. Then, in the same run:

1. throughput: C concurrent clients (default 4) send N title checks (default 40), as the
   TypeScript runner server was measured (6.05 checks/s, p50 0.61 s, on this kind of
   machine);
2. the naive way: the same checks, each launching its own Chromium (launch, page, goto,
   title, close), with the same concurrency;
3. optionally (--sweep), throughput at 1, 2, 4, 8 and 16 clients against a server of
   capacity 64, to choose the default capacity;
4. memory: the RSS of the runner server's whole process tree (Python, Playwright's
   driver, Chromium and its renderers) and the number of Chromium processes, after 50, 250,
   500 and --memory-checks (default 1000) checks;
5. with --kill only: what a killed browser costs: Chromium is SIGKILLed during a check;
   how long that check takes to answer its error, and the next check (which relaunches).

The machine is shared, so every figure is printed with the load average at that moment
(``/proc/loadavg``) and the CPU-seconds spent per check, which moves less with the load
than wall time: for the runner server, its whole process tree (Python, Playwright's
driver, Chromium and its renderers, dead ones included); for the naive way, this
process's tree (its Playwright drivers and the Chromiums they launch).

6. with --steps only: the CPU of each step of a check, in Chromium alone (no runner
   server): a context, a page in it, the navigation, the target-policy route, and a new page
   in one shared context for reference.

With --where, the CPU per check of the first runner-server measurement is also split by
process kind (the server's Python, Playwright's Node driver, the Chromium browser process,
its renderers, GPU and utility processes).

Usage: python bench/browser_runner.py [--checks 40] [--clients 4] [--memory-checks 1000]
       python bench/browser_runner.py --kill
       python bench/browser_runner.py --steps
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "plugin"))

from runners_orchestrator.runner_server.engines.browser import (  # noqa: E402
    CHROMIUM_ARGS,
    find_chromium,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], health: str):
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def tree(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages, as ``/proc/loadavg`` has them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid``'s tree, its reaped descendants included.

    A process that exits is reaped by its parent, whose ``cutime``/``cstime`` then hold its
    time, so the sum over the live tree only grows.
    """
    total = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def cpu_by_kind(pid: int) -> dict[int, tuple[str, float]]:
    """Per process of ``pid``'s tree: its kind and its CPU-seconds, reaped children included.

    Renderers exit with their page and are reaped by Chromium's zygote, so their time shows
    in the zygote's ``cutime``: that is the "renderers" figure.
    """
    found: dict[int, tuple[str, float]] = {}
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        kind_of = re.search(r"--type=(\S+)", cmdline)
        if member == pid:
            kind = "runner server (Python)"
        elif kind_of is None:
            kind = (
                "Chromium browser" if "--remote-debugging-pipe" in cmdline else "Playwright driver"
            )
        elif kind_of.group(1) == "zygote":
            kind = "renderers (reaped by the zygote)"
        elif kind_of.group(1) == "utility":
            kind = "utility (network, storage, ...)"
        else:
            kind = kind_of.group(1)
        found[member] = (kind, sum(int(f) for f in fields[11:15]) / TICKS)
    return found


def report_by_kind(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], checks: int
) -> None:
    totals: dict[str, float] = {}
    for member, (kind, seconds) in after.items():
        totals[kind] = totals.get(kind, 0.0) + seconds - before.get(member, (kind, 0.0))[1]
    for kind, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"    {kind:<36} {seconds / checks * 1000:6.1f} ms CPU/check", flush=True)


def rss_by_kind(pid: int) -> str:
    """``kind MB, ...`` over ``pid``'s tree, named as by :func:`cpu_by_kind` (live renderers
    are ``renderer``; the zygotes that fork them are ``zygote``)."""
    totals: dict[str, float] = {}
    for member, (kind, _) in cpu_by_kind(pid).items():
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        lines = status.splitlines()
        rss = next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)
        label = "zygote" if kind.startswith("renderers") else kind
        totals[label] = totals.get(label, 0.0) + rss / 1024
    ordered = sorted(totals.items(), key=lambda item: -item[1])
    return ", ".join(f"{kind} {mb:.0f} MB" for kind, mb in ordered)


def memory(pid: int) -> tuple[float, float, int]:
    """RSS and PSS in MB summed over the tree under ``pid``, and its Chromium processes.

    The RSS sum counts pages shared between Chromium's processes once per process (as `ps`
    totals do); PSS shares them out, so it is the memory the tree really holds.
    """
    rss = pss = 0
    chromium = 0
    for member in tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
            cmdline = Path(f"/proc/{member}/cmdline").read_bytes()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
        if b"chrom" in cmdline.split(b"\0")[0]:
            chromium += 1
    return rss / 1024, pss / 1024, chromium


async def closed_loop(check, total: int, clients: int) -> tuple[float, list[float], int]:
    """``clients`` workers share ``total`` checks; return checks/s, latencies, failures."""
    remaining = total
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            ok = await check()
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return total / (time.perf_counter() - started), latencies, failures


def report(
    name: str, rate: float, latencies: list[float], failures: int, cpu: float | None = None
) -> None:
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else p50
    per_check = f"   CPU {cpu * 1000:4.0f} ms/check" if cpu is not None else ""
    print(
        f"  {name:<34} {rate:6.2f} checks/s   p50 {p50:.2f} s   p95 {p95:.2f} s"
        f"   failures {failures}{per_check}   load {loadavg()}",
        flush=True,
    )


async def measured(
    pid: int, check, total: int, clients: int
) -> tuple[float, list[float], int, float]:
    """:func:`closed_loop`, plus the CPU-seconds per check that ``pid``'s tree spent."""
    before = cpu_seconds(pid)
    rate, latencies, failures = await closed_loop(check, total, clients)
    return rate, latencies, failures, (cpu_seconds(pid) - before) / total


async def naive_check(page: str, chromium: str) -> bool:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            tab = await browser.new_page()
            await tab.goto(page)
            return bool((await tab.title()).strip())
        finally:
            await browser.close()


def browser_pid(root: int) -> int:
    """The Chromium browser process (not a renderer) below ``root``."""
    for member in tree(root):
        try:
            cmdline = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--remote-debugging-pipe" in cmdline and not any(
            arg.startswith(b"--type=") for arg in cmdline
        ):
            return member
    raise RuntimeError("no Chromium below the runner server")


async def kill_cost() -> None:
    page_port, port = free_port(), free_port()
    page = f"http://127.0.0.1:{page_port}/"
    runner = f"http://127.0.0.1:{port}/api/runner"
    cli = [sys.executable, "-m", "runners_orchestrator.cli", "runner-server", "--engine", "browser"]
    with (
        process([sys.executable, str(HERE / "page_server.py"), str(page_port)], page),
        process([*cli, "--port", str(port), "--log-level", "warning"], f"{runner}/health") as proc,
    ):
        async with httpx.AsyncClient(timeout=120) as client:
            title = {"url": page, "runners": ["exampleTitleVisibleTest"]}
            for _ in range(5):
                await client.post(f"{runner}/execute", json=title)
            started = time.perf_counter()
            await client.post(f"{runner}/execute", json=title)
            usual = time.perf_counter() - started
            # A check that stays in flight: its page never answers (a socket that listens
            # and never replies).
            with socket.socket() as silent:
                silent.bind(("127.0.0.1", 0))
                silent.listen()
                stuck = {
                    "url": f"http://127.0.0.1:{silent.getsockname()[1]}/",
                    "runners": ["exampleTitleVisibleTest"],
                }
                slow = asyncio.create_task(client.post(f"{runner}/execute", json=stuck))
                await asyncio.sleep(2)
                os.kill(browser_pid(proc.pid), signal.SIGKILL)
                killed_at = time.perf_counter()
                answer = (await slow).json()["results"][0]
                error_after = time.perf_counter() - killed_at
            started = time.perf_counter()
            after = (await client.post(f"{runner}/execute", json=title)).json()["results"][0]
            relaunch = time.perf_counter() - started
    print(f"a usual title check:                      {usual:.2f} s")
    print(f"killed check answered {answer['status']} after the kill:  {error_after:.2f} s")
    print(f"next check ({after['status']}, relaunches Chromium):  {relaunch:.2f} s")


async def step_costs(repeat: int = 20) -> None:
    """CPU (this process's tree: the driver, Chromium) and wall time of each step of a check."""
    from playwright.async_api import async_playwright

    page_port = free_port()
    page = f"http://127.0.0.1:{page_port}/"
    with process([sys.executable, str(HERE / "page_server.py"), str(page_port)], page):
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=find_chromium(), args=list(CHROMIUM_ARGS)
            )
            shared = await browser.new_context()

            async def context_only() -> None:
                context = await browser.new_context()
                await context.close()

            async def with_page() -> None:
                context = await browser.new_context()
                await context.new_page()
                await context.close()

            async def check(wait: str = "load", *, route: bool = False) -> None:
                context = await browser.new_context(service_workers="block")
                if route:
                    await context.route("**/*", lambda r: r.continue_())
                tab = await context.new_page()
                await tab.goto(page, wait_until=wait)
                await tab.title()
                await context.close()

            async def shared_context_page() -> None:
                tab = await shared.new_page()
                await tab.goto(page)
                await tab.title()
                await tab.close()

            steps = [
                ("a context, closed", context_only),
                ("a context and a page, closed", with_page),
                ("+ goto (load) and title", check),
                ("+ goto (domcontentloaded)", lambda: check("domcontentloaded")),
                ("+ goto (commit)", lambda: check("commit")),
                ("+ a route for every request", lambda: check(route=True)),
                ("reference: a new page in one shared context", shared_context_page),
            ]
            me = os.getpid()
            for name, step in steps:
                for _ in range(3):
                    await step()
                before, started = cpu_seconds(me), time.perf_counter()
                for _ in range(repeat):
                    await step()
                wall = (time.perf_counter() - started) / repeat
                await asyncio.sleep(1)  # the last renderer exits and is reaped
                cpu = (cpu_seconds(me) - before) / repeat
                print(
                    f"  {name:<46} CPU {cpu * 1000:5.0f} ms   wall {wall * 1000:5.0f} ms"
                    f"   load {loadavg()}",
                    flush=True,
                )
            await browser.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--memory-checks", type=int, default=1000)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--kill", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure server and naive this many times, in turn"
    )
    parser.add_argument("--where", action="store_true", help="split the CPU by process kind")
    parser.add_argument("--steps", action="store_true", help="CPU of each step, in Chromium")
    args = parser.parse_args()
    if args.kill:
        await kill_cost()
        return
    if args.steps:
        await step_costs()
        return

    chromium = find_chromium()
    page_port = free_port()
    page = f"http://127.0.0.1:{page_port}/"
    cli = [sys.executable, "-m", "runners_orchestrator.cli", "runner-server", "--engine", "browser"]
    body = {"url": page, "runners": ["exampleTitleVisibleTest"]}

    def server(capacity: int | None) -> tuple[list[str], str]:
        port = free_port()
        extra = ["--capacity", str(capacity)] if capacity else []
        return [*cli, "--port", str(port), "--log-level", "warning", *extra], (
            f"http://127.0.0.1:{port}/api/runner"
        )

    with process([sys.executable, str(HERE / "page_server.py"), str(page_port)], page):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            def via(runner: str):
                async def check() -> bool:
                    response = await client.post(f"{runner}/execute", json=body)
                    return (
                        response.status_code == 200
                        and response.json()["results"][0]["status"] == "pass"
                    )

                return check

            args_, runner = server(args.capacity)
            with process(args_, f"{runner}/health") as proc:
                capacity = (await client.get(f"{runner}/health")).json()["capacity"]
                print(f"Chromium {chromium}; runner server capacity {capacity}", flush=True)
                await closed_loop(via(runner), 8, 4)  # warm up
                print(f"{args.checks} title checks, {args.clients} concurrent clients:")
                for round_ in range(args.repeat):
                    kinds = cpu_by_kind(proc.pid)
                    rate, latencies, failures, cpu = await measured(
                        proc.pid, via(runner), args.checks, args.clients
                    )
                    report("runner server (one browser)", rate, latencies, failures, cpu)
                    if args.where and round_ == 0:
                        report_by_kind(kinds, cpu_by_kind(proc.pid), args.checks)
                    if not args.skip_naive:
                        rate, latencies, failures, cpu = await measured(
                            os.getpid(),
                            lambda: naive_check(page, chromium),
                            args.checks,
                            args.clients,
                        )
                        report("naive (a browser per check)", rate, latencies, failures, cpu)

                print("memory of the runner server's process tree (2 s after the last check):")
                done = 8 + args.checks
                for target in sorted({50, 250, 500, args.memory_checks}):
                    if target > args.memory_checks:
                        continue
                    if target > done:
                        await closed_loop(via(runner), target - done, args.clients)
                        done = target
                    await asyncio.sleep(2)  # let the last checks' renderers exit
                    rss, pss, procs = memory(proc.pid)
                    print(
                        f"  after {done:>5} checks: RSS sum {rss:6.0f} MB, PSS {pss:6.0f} MB, "
                        f"{procs} Chromium processes   load {loadavg()}",
                        flush=True,
                    )
                    if args.where:
                        print(f"    RSS by process: {rss_by_kind(proc.pid)}", flush=True)

            if args.sweep:
                args_, runner = server(64)
                with process(args_, f"{runner}/health") as sweep:
                    await closed_loop(via(runner), 8, 4)
                    print("throughput by concurrent clients (capacity 64):")
                    for clients in (1, 2, 4, 8, 16):
                        rate, latencies, failures, cpu = await measured(
                            sweep.pid, via(runner), max(40, clients * 5), clients
                        )
                        report(f"{clients:>2} clients", rate, latencies, failures, cpu)


if __name__ == "__main__":
    asyncio.run(main())
