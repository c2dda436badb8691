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
import time
from typing import TYPE_CHECKING

import pytest
from prefect.settings import PREFECT_API_URL
from served_probe import serving, start, suspended_from_outside_stops_at_its_next_task, wait_for

from runners_orchestrator.crash_detection import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator
    from pathlib import Path


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
    await suspended_from_outside_stops_at_its_next_task(served)


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
