"""A project of probe workflows, served by a real `serve-flows`, and how to drive its runs.

Shared by the tests of where a served run runs (`test_run_process`, a process forked warm;
`test_in_process_runs`, a thread of the serving process): each starts its own serving
process on this project, one module at a time, since both serve the same deployments.
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

if TYPE_CHECKING:
    import uuid
    from collections.abc import Iterator
    from pathlib import Path

PROBE = '''
import os

import certifi
import prefect.flow_engine
from prefect import flow, task
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


async def failing() -> None:
    raise RuntimeError("this workflow fails on purpose")


async def blocking(seconds: float = 4) -> float:
    """Blocks its event loop, as a careless workflow may (a sync sleep in async code)."""
    import time

    time.sleep(seconds)
    return seconds


@flow(persist_result=True)
def synchronous() -> dict:
    return {"pid": os.getpid()}


async def ticking(ticks: int = 80) -> int:
    """A task every 0.25 s: a suspension requested meanwhile stops it at the next one."""
    import asyncio

    for n in range(ticks):
        await tick(n)
        await asyncio.sleep(0.25)
    return ticks
'''


@contextlib.contextmanager
def serving(project: Path, poll: str, *options: str) -> Iterator[subprocess.Popen[str]]:
    """`serve-flows --poll POLL [OPTIONS]` on a project whose workflows are PROBE's."""
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
        [*CLI, "serve-flows", "--poll", poll, *options, "--log-level", "warning"],
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


async def suspended_from_outside_stops_at_its_next_task(served: subprocess.Popen[str]) -> None:
    """Suspend a ticking run from outside, as the Prefect UI does: it stops at its next task."""
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
