"""The command line, run as a user runs it: a real process on real ports."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from helpers import CLI, cli_process, free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_runner_server_command_serves_the_contract(cli_runner_server, pages):
    health = httpx.get(f"{cli_runner_server}/api/runner/health").json()
    assert health == {
        "status": "ok",
        "region": "us-east-1",
        "inFlight": 0,
        "capacity": 4,
        "peakInFlight": 0,
        "served": 0,
        "refused": 0,
    }
    response = httpx.post(
        f"{cli_runner_server}/api/runner/execute",
        json={"url": pages.url("/banner-visible"), "runners": ["cookieBannerVisibleTest"]},
    )
    assert response.json()["results"][0]["status"] == "pass"


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "runner-server" in result.stdout
    result = run_cli("runner-server", "--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--region", "--capacity", "--deny", "--allow"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runner-server", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["runner-server", "--port", "http"],
            "argument --port: expected a port number, got 'http'",
        ),
        (["runner-server", "--capacity", "0"], "expected a number of at least 1, got 0"),
        (["runner-server", "--deny", "intranet"], "deny: 'intranet' is not an address range"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runners-orchestrator")
    assert message in lines[0]


def test_port_in_use_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("runner-server", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"runners-orchestrator: error: port {port} on 127.0.0.1 is already in use; "
        "choose another with --port"
    )


def test_an_idle_connection_outlives_uvicorns_five_seconds(cli_runner_server):
    """A load balancer reusing an idle connection must not meet one the server is closing.

    uvicorn's default closes idle connections after 5 s, inside HAProxy's idle pool; the
    served commands keep them 75 s (``--keep-alive``). ``http.client`` does not reconnect
    behind the test's back (httpx would): a closed connection is ``RemoteDisconnected``.
    """
    host, port = cli_runner_server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for pause in (0, 6):
            time.sleep(pause)
            connection.request("GET", "/api/runner/health")
            response = connection.getresponse()
            assert response.status == httpx.codes.OK, pause
            assert response.read()
    finally:
        connection.close()


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_stops_the_runner_server_cleanly():
    port = free_port()
    health = f"http://127.0.0.1:{port}/api/runner/health"
    with cli_process("runner-server", "--port", str(port), health_url=health) as process:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(timeout=15) in {0, -signal.SIGTERM}
        assert "Application shutdown complete" in process.stderr.read()  # type: ignore[union-attr]


async def test_run_table_shows_a_failover(pages, runner_url, capsys):
    from runners_orchestrator import RunnerJob  # noqa: PLC0415
    from runners_orchestrator.balancing import RoundRobinBalancer  # noqa: PLC0415
    from runners_orchestrator.cli.run import _print_results  # noqa: PLC0415
    from runners_orchestrator.execution import JobExecutor, RetryPolicy  # noqa: PLC0415
    from runners_orchestrator.registry import (  # noqa: PLC0415
        AvailableServer,
        HealthChecker,
        ServerPool,
    )
    from runners_orchestrator.settings import ServerConfig  # noqa: PLC0415
    from runners_orchestrator.steps import summarise  # noqa: PLC0415

    dead, alive = (
        AvailableServer(server=ServerConfig(id=sid, url=f"{base}/api/runner"), capacity=10)
        for sid, base in (("us-dead", f"http://127.0.0.1:{free_port()}"), ("us-1", runner_url))
    )
    executor = JobExecutor(
        pool=ServerPool(available=[dead, alive]),
        balancer=RoundRobinBalancer(),
        health=HealthChecker(),
        policy=RetryPolicy(backoff=0.01),
    )
    job = RunnerJob(url=pages.url("/title"), runners=["exampleTitleVisibleTest"])
    result = await executor.run(job, "job-1", timeout=10, first=dead)
    _print_results(summarise([result], [job], run_id="r1").to_wire())  # as the API returns it
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    assert header.split("┃")[-2].strip() == "tries"
    assert "us-dead refused → us-1 ok" in out
