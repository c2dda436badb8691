"""Runs on threads of a serving process that dies are marked ``Crashed`` by its supervisor.

``serve-flows --reload --start in-process`` (what ``dev`` runs): the serving process is
SIGKILLed with a run on one of its threads; the supervisor, which restarts it, marks that
run ``Crashed`` at once (no automation needed), leaves a run that was cancelled before
``Cancelled``, and the restarted process serves the next run. A run left listed by a
supervisor that could not reach Prefect (``dev`` stops Prefect beside it) is marked at the
next start. Real `serve-flows` and Prefect server (``runners_orchestrator.orphans``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling, Running
from served_probe import serving, start, tick_count, wait_for

from helpers import wait_for_deployment
from runners_orchestrator.orphans import LEDGER_ENV


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


async def test_a_run_left_listed_by_the_last_supervisor_is_crashed_at_the_next_start(
    tmp_path, prefect_server, monkeypatch
):
    ledger = tmp_path / "in-process-runs"  # where `dev` keeps it: its state folder
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    (tmp_path / "before").mkdir()
    with serving(tmp_path / "before", "1", "--reload", "--start", "in-process") as supervisor:
        deployment = await wait_for_deployment("ticking/ticking", supervisor)
        deadline = time.monotonic() + 60
        while not ledger.is_dir() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the supervisor makes it before it starts serving
    assert ledger.is_dir()  # (it may list a run of an earlier test's that this one took)
    # A run the last serving process had on a thread when `dev` stopped it with Prefect.
    async with get_client() as client:
        left = (await client.create_flow_run_from_deployment(deployment.id)).id
        await client.set_flow_run_state(left, Running(), force=True)
    (ledger / str(left)).touch()
    (tmp_path / "after").mkdir()
    with serving(tmp_path / "after", "1", "--reload", "--start", "in-process"):
        run = await wait_for(left, lambda state: state.is_final(), timeout=30)
    assert run.state.is_crashed(), run.state
    assert "it stopped before the run ended" in run.state.message
    assert str(left) not in {entry.name for entry in ledger.iterdir()}  # answered for
