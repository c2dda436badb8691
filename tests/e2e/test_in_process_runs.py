"""A served run on a thread of the serving process: what a process gave, still given.

With ``--start in-process`` (``runners_orchestrator.in_process``) an
async flow's run is a thread of the serving process instead of a process of its own.
Checked with a real `serve-flows` and a real Prefect server: the run gets the settings a
process would have had, a cancel from outside ends it ``Cancelled`` and stops its task,
a suspension stops it at its next task, a failing or blocking run leaves the others alone,
and a sync flow's run still gets a process of its own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling
from served_probe import (
    serving,
    start,
    suspended_from_outside_stops_at_its_next_task,
    tick_count,
    wait_for,
)

from runners_orchestrator.crash_detection import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def served_in_process(
    tmp_path_factory: pytest.TempPathFactory, prefect_server
) -> Iterator[subprocess.Popen[str]]:
    with serving(tmp_path_factory.mktemp("probe"), "1", "--start", "in-process") as process:
        yield process


async def test_an_in_process_run_is_a_thread_of_the_serving_process_with_its_settings(
    served_in_process,
):
    run_id = await start("probe", served_in_process)
    run = await wait_for(run_id, lambda state: state.is_final())
    assert run.state.is_completed(), run.state
    facts = await run.state.result()
    assert facts["pid"] == served_in_process.pid  # no process of its own
    assert facts["tls_shared"] is True
    assert facts["observer"] == "observe_suspension_in_background"
    # The settings a run's process would have built from the serving process's environment.
    assert facts["api_url"] == str(PREFECT_API_URL.value())
    assert facts["heartbeat"] == HEARTBEAT_SECONDS  # crash detection still sees it alive
    assert facts["client_retries"] == 7
    assert facts["version_check"] is False


async def test_an_in_process_run_cancelled_from_outside_ends_cancelled_and_serving_goes_on(
    served_in_process,
):
    run_id = await start("ticking", served_in_process)
    await wait_for(run_id, lambda state: state.is_running())
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Cancelling(), force=True)  # as the API does
    run = await wait_for(run_id, lambda state: state.is_final(), timeout=30)
    assert run.state.is_cancelled(), run.state  # the runner's Cancelled, not a crash
    async with get_client() as client:
        history = [state.type.value for state in await client.read_flow_run_states(run_id)]
    assert "CRASHED" not in history, history  # the engine saw the runner's cancel intent
    stopped_at = await tick_count(run_id)
    await asyncio.sleep(1)
    assert await tick_count(run_id) == stopped_at < 80  # its task stopped, not orphaned
    # The serving process, which held the run, serves the next one.
    assert served_in_process.poll() is None
    after = await wait_for(await start("probe", served_in_process), lambda s: s.is_final())
    assert after.state.is_completed(), after.state


async def test_an_in_process_run_suspended_from_outside_stops_at_its_next_task(
    served_in_process,
):
    await suspended_from_outside_stops_at_its_next_task(served_in_process)


async def test_a_failing_or_blocking_in_process_run_leaves_the_other_runs_alone(
    served_in_process,
):
    blocking = await start("blocking", served_in_process, seconds=6)
    await wait_for(blocking, lambda state: state.is_running())
    failing = await start("failing", served_in_process)
    probe = await start("probe", served_in_process)
    # Both end while the blocking run still holds its own loop (its thread, not theirs).
    failed = await wait_for(failing, lambda state: state.is_final(), timeout=30)
    assert failed.state.is_failed(), failed.state
    assert "fails on purpose" in (failed.state.message or "")
    probed = await wait_for(probe, lambda state: state.is_final(), timeout=30)
    assert probed.state.is_completed(), probed.state
    async with get_client() as client:
        still = await client.read_flow_run(blocking)
    assert still.state.is_running(), still.state
    done = await wait_for(blocking, lambda state: state.is_final(), timeout=30)
    assert done.state.is_completed(), done.state
    assert await done.state.result() == 6  # the run's own parameters, read from the flow run
    assert probed.state.timestamp < done.state.timestamp


async def test_a_sync_flow_still_gets_a_process_of_its_own_beside_in_process_runs(
    served_in_process,
):
    run_id = await start("synchronous", served_in_process)
    run = await wait_for(run_id, lambda state: state.is_final())
    assert run.state.is_completed(), run.state
    assert (await run.state.result())["pid"] != served_in_process.pid
