"""A served run's process, as `serve-flows` starts it: warm, and still suspendable.

`serve-flows` starts a run when Prefect announces it (``runners_orchestrator.wake``), and
the fork server changes two Prefect behaviours in the processes it forks
(``runners_orchestrator.run_process``): Prefect's clients share one TLS context, and the
suspension observer starts beside the flow instead of before it. Both are checked here in
real served runs against a real Prefect server: the first by what the run's own process
reports, the second by suspending a run from outside, as the Prefect UI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL
from prefect.states import Suspended

from helpers import CLI, wait_for_deployment
from runners_orchestrator.crash_detection import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    import uuid
    from collections.abc import Iterator
    from pathlib import Path

PROBE = '''
import os

import certifi
import prefect.flow_engine
from prefect import task
from prefect.client import orchestration


async def probe() -> dict:
    """What the run's own process looks like."""
    from prefect.settings import get_current_settings

    ssl = orchestration.ssl
    first = ssl.create_default_context(cafile=certifi.where())
    settings = get_current_settings()
    return {
        "pid": os.getpid(),
        "tls_shared": first is ssl.create_default_context(cafile=certifi.where()),
        "observer": prefect.flow_engine.observe_flow_run_suspension.__name__,
        # Handed over as environment only (run_process): still the serving process's.
        "api_url": settings.api.url,
        "heartbeat": settings.flows.heartbeat_frequency,
        "client_retries": settings.client.max_retries,
        "version_check": settings.client.server_version_check_enabled,
    }


@task
async def tick(n: int) -> int:
    return n


async def ticking(ticks: int = 80) -> int:
    """A task every 0.25 s: a suspension requested meanwhile stops it at the next one."""
    import asyncio

    for n in range(ticks):
        await tick(n)
        await asyncio.sleep(0.25)
    return ticks
'''


@contextlib.contextmanager
def serving(project: Path, poll: str) -> Iterator[subprocess.Popen[str]]:
    """`serve-flows --poll POLL` on a project whose workflows are PROBE's."""
    (project / "pyproject.toml").write_text('[project]\nname = "probe"\n')
    (project / "flows").mkdir()
    (project / "flows" / "probe.py").write_text(textwrap.dedent(PROBE))
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_CLIENT_MAX_RETRIES": "7",
    }
    process = subprocess.Popen(
        [*CLI, "serve-flows", "--poll", poll, "--log-level", "warning"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, prefect_server
) -> Iterator[subprocess.Popen[str]]:
    with serving(tmp_path_factory.mktemp("probe"), poll="1") as process:
        yield process


@pytest.fixture
def served_polling_rarely(tmp_path: Path, prefect_server) -> Iterator[subprocess.Popen[str]]:
    with serving(tmp_path, poll="120") as process:
        yield process


async def start(name: str, process: subprocess.Popen[str], **parameters: object) -> uuid.UUID:
    deployment = await wait_for_deployment(f"{name}/{name}", process)
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return run.id


async def wait_for(flow_run_id: uuid.UUID, done, timeout: float = 60):
    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and done(run.state):
                return run
            await asyncio.sleep(0.1)
    pytest.fail(f"flow run {flow_run_id} did not get there within {timeout}s: {run.state}")


async def test_a_served_runs_process_shares_tls_and_observes_beside_the_flow(served):
    run_id = await start("probe", served)
    run = await wait_for(run_id, lambda state: state.is_final())
    assert run.state.is_completed(), run.state
    facts = await run.state.result()
    assert facts["pid"] != served.pid  # its own process, forked from the warm fork server
    assert facts["tls_shared"] is True
    assert facts["observer"] == "observe_suspension_in_background"
    # The serving process's settings reached the run: its environment and the one it set.
    assert facts["api_url"] == str(PREFECT_API_URL.value())
    assert facts["heartbeat"] == HEARTBEAT_SECONDS  # set by serve-flows for its runs
    assert facts["client_retries"] == 7
    assert facts["version_check"] is False  # serve-flows checked the server for its runs


async def test_a_run_suspended_from_outside_stops_at_its_next_task(served):
    run_id = await start("ticking", served)
    await wait_for(run_id, lambda state: state.is_running())
    async with get_client() as client:
        # Two ticks in: the observer, started beside the flow, is watching by now.
        deadline = time.monotonic() + 30
        while await tick_count(run_id) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await client.set_flow_run_state(run_id, Suspended(timeout_seconds=300), force=True)
    # The flow stops at its next task: the run stays suspended and no tick runs after that
    # (uninterrupted, it would tick 80 times over 20 s).
    await wait_for(run_id, lambda state: state.is_paused(), timeout=10)
    before = await tick_count(run_id)
    await asyncio.sleep(2)
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
    assert run.state.is_paused(), run.state
    assert run.state.name == "Suspended"
    assert await tick_count(run_id) == before < 80


async def tick_count(run_id: uuid.UUID) -> int:
    async with get_client() as client:
        ticks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return len(ticks)


async def test_a_new_run_is_picked_up_when_prefect_announces_it_not_at_the_next_poll(
    served_polling_rarely,
):
    """With a poll every two minutes, only the Scheduled event can start the run this soon."""
    served = served_polling_rarely
    await start("probe", served)  # the first poll, at start-up, has passed once it is served
    await asyncio.sleep(1)
    started = time.monotonic()
    run_id = await start("probe", served)
    run = await wait_for(run_id, lambda state: state.is_final(), timeout=30)
    assert run.state.is_completed(), run.state
    assert time.monotonic() - started < 30
