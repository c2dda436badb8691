"""Cold starts of `runners-orchestrator dev`: is a start sent the moment the API first answers accepted?

Each round starts `dev` on free ports with a new, empty state folder (a cold Prefect
database), polls the API's list route every 20 ms from the moment the command starts, and at
its first 200 immediately POSTs a run of `orchestrate_runners` (one job against the first
runner server's own /info page, so nothing leaves 127.0.0.1). Then it waits for the ready
banner and stops `dev` with SIGTERM.

Reported per round and in all: the start's status (goal: 202 every time), the time from the
command to the API's first answer, and to the ready banner.

Usage: python bench/dev_ready.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
PREFIX = "/api/orchestrator"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runner_ports() -> int:
    while True:
        port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port


def launch_dev(
    state: str,
    ports: tuple[int, int, int],
    *options: str,
    settings: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`runners-orchestrator dev` on ``(api, prefect, runner)`` ports and a state folder.

    With the caller's environment minus every ``PREFECT_``/``ORCHESTRATOR_`` variable, plus
    ``settings``; its output on a pipe for the caller to read; a session of its own.
    """
    api_port, prefect_port, runner_port = ports
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    env.update(settings or {})
    command = [sys.executable, "-m", "runners_orchestrator.cli", "dev", "--port", str(api_port)]
    command += ["--prefect-port", str(prefect_port), "--runner-port", str(runner_port)]
    command += ["--state-dir", state, "--log-level", "warning", *options]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def one_round() -> dict[str, float | int | str]:
    api_port, prefect_port, runner_port = free_port(), free_port(), runner_ports()
    with tempfile.TemporaryDirectory(prefix="dev-ready-") as state:
        started = time.monotonic()
        process = launch_dev(state, (api_port, prefect_port, runner_port))
        ready = threading.Event()
        ready_at: list[float] = []

        def watch() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if "is ready" in line and not ready.is_set():
                    ready_at.append(time.monotonic() - started)
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        api = f"http://127.0.0.1:{api_port}"
        job = {
            "url": f"http://127.0.0.1:{runner_port}/api/runner/info",
            "runners": ["exampleTitleVisibleTest"],
        }
        result: dict[str, float | int | str] = {}
        try:
            with httpx.Client(timeout=30) as http:
                deadline = started + 180
                while time.monotonic() < deadline:
                    try:
                        if http.get(f"{api}{PREFIX}").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.02)
                answered = time.monotonic() - started
                response = http.post(f"{api}{PREFIX}/orchestrate_runners", json={"jobs": [job]})
                result = {"status": response.status_code, "answered_s": answered}
                if response.status_code != 202:
                    result["body"] = response.text[:200]
            ready.wait(120)
            result["ready_s"] = ready_at[0] if ready_at else float("nan")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rounds = []
    for index in range(1, args.rounds + 1):
        result = one_round()
        rounds.append(result)
        print(
            f"round {index}: start {result['status']}, API answered after "
            f"{result['answered_s']:.1f}s, ready banner after {result['ready_s']:.1f}s"
            f"{'  ' + str(result.get('body')) if 'body' in result else ''}",
            flush=True,
        )
    accepted = sum(r["status"] == 202 for r in rounds)
    answered = [float(r["answered_s"]) for r in rounds]
    ready = [float(r["ready_s"]) for r in rounds]
    print(
        f"accepted {accepted}/{len(rounds)}; API first answered p50 "
        f"{statistics.median(answered):.1f}s (min {min(answered):.1f}, max {max(answered):.1f}); "
        f"ready banner p50 {statistics.median(ready):.1f}s"
    )


if __name__ == "__main__":
    main()
