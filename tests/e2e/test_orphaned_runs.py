"""Runs on threads of a serving process that dies are marked ``Crashed`` by its supervisor.

``serve-flows --reload --start in-process`` (what ``dev --start in-process`` runs): the
serving process is SIGKILLed with a run on one of its threads; the supervisor, which
restarts it, marks that run ``Crashed`` at once (no automation needed), leaves a run that
was cancelled before ``Cancelled``, and the restarted process serves the next run.
Real `serve-flows` and Prefect server (``runners_orchestrator.orphans``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling
from served_probe import serving, start, tick_count, wait_for


async def result_of(run_id):
    run = await wait_for(run_id, lambda state: state.is_final())
    assert run.state.is_completed(), run.state
    return await run.state.result()


@pytest.mark.timeout(240)  # two serving processes start, one a restart: slow, not hung, when busy
async def test_a_killed_serving_process_leaves_no_run_running(tmp_path, prefect_server):
    options = ("--reload", "--start", "in-process")
    with serving(tmp_path, "1", *options) as supervisor:
        serving_pid = (await result_of(await start("probe", supervisor)))["pid"]
        assert serving_pid != supervisor.pid  # the supervisor's child runs the runs
        cancelled = await start("ticking", supervisor)
        await wait_for(cancelled, lambda state: state.is_running())
        async with get_client() as client:
            await client.set_flow_run_state(cancelled, Cancelling(), force=True)
        await wait_for(cancelled, lambda state: state.is_cancelled(), timeout=30)
        orphan = await start("ticking", supervisor)
        await wait_for(orphan, lambda state: state.is_running())
        deadline = time.monotonic() + 30
        while await tick_count(orphan) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # until it is running its flow's tasks

        os.kill(serving_pid, signal.SIGKILL)

        run = await wait_for(orphan, lambda state: state.is_final(), timeout=15)
        assert run.state.is_crashed(), run.state
        assert "thread of a serving process" in run.state.message
        assert "exited (-9)" in run.state.message
        async with get_client() as client:
            assert (await client.read_flow_run(cancelled)).state.is_cancelled()
        # The supervisor started a new serving process, which serves the next run.
        after = await result_of(await start("probe", supervisor))
        assert after["pid"] not in {serving_pid, supervisor.pid}
