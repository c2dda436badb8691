"""The scaled topology with Prefect process workers on a work pool instead of ``serve-flows``.

``docs/scaling.md`` documents both ways of running the flow runs; this is the second one,
with the commands of that page: a process work pool, ``prefect deploy --all`` from the
project (its generated ``prefect.yaml``), the crash-detection automation, and two ``prefect
worker start`` processes. Run these alone with ``pytest -m scaled``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx
import pytest
from runs import PREFIX, crash_and_resume, jobs_for, start, wait_result

from topology import ScaledTopology

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def workers() -> Iterator[ScaledTopology]:
    with ScaledTopology(runner_servers=2, runner_capacity=4, serving="workers") as scaled:
        yield scaled


def test_deployments_come_from_prefect_deploy_on_the_work_pool(workers):
    found = httpx.post(
        f"{workers.prefect_api}/deployments/filter",
        json={"deployments": {"tags": {"all_": ["runners-orchestrator"]}}},
        timeout=30,
    ).json()
    assert sorted(d["name"] for d in found) == ["execute_single_runner", "orchestrate_runners"]
    assert {d["work_pool_name"] for d in found} == {"default"}
    # Entry points of the generated modules, as prefect.yaml lists them: not serve-flows'.
    assert {d["entrypoint"].split(":")[0] for d in found} == {
        "deployments/execute_single_runner.py",
        "deployments/orchestrate_runners.py",
    }


async def test_runs_through_workers_complete_and_every_replica_reads_them(workers, pages):
    async with httpx.AsyncClient(base_url=workers.api, timeout=60) as http:
        run_ids = [await start(http, jobs_for(workers, pages, 3)) for _ in range(4)]
        summaries = await asyncio.gather(*(wait_result(http, r) for r in run_ids))
    assert [s["summary"]["total"] for s in summaries] == [3, 3, 3, 3]
    assert all(job["state"] == "completed" for s in summaries for job in s["jobs"])
    for replica in ("api-1", "api-2"):
        base = f"http://127.0.0.1:{workers.ports[replica]}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as direct:
            for run_id, summary in zip(run_ids, summaries, strict=True):
                envelope = (await direct.get(f"{PREFIX}/runs/{run_id}")).json()
                assert envelope["status"] == "completed"
                assert envelope["result"] == summary
    # Both workers serve the pool: Prefect lists each as online (which of them picks up a
    # given run is Prefect's choice: the first to poll takes what its limit allows).
    async with httpx.AsyncClient(timeout=30) as prefect:
        pool = f"{workers.prefect_api}/work_pools/default/workers/filter"
        online = (await prefect.post(pool, json={})).json()
    assert sorted(w["name"] for w in online if w["status"] == "ONLINE") == ["worker-1", "worker-2"]


async def test_worker_killed_run_crashes_and_a_retry_resumes_it(workers, pages):
    """SIGKILL a worker (and the run's process below it): crashed, then resumed elsewhere."""
    async with httpx.AsyncClient(base_url=workers.api, timeout=60) as http:
        resumed = await crash_and_resume(workers, http, pages, "worker", deadline=180)
    print(  # noqa: T201 - the figures for docs/scaling.md, seen with -s
        f"worker killed: crashed {resumed.crashed_after:.1f}s after SIGKILL; "
        f"{len(resumed.done_before)} of 12 jobs kept"
    )


def test_crash_detection_module_refuses_a_window_shorter_than_a_heartbeat():
    """A bad ORCHESTRATOR_CRASH_AFTER is one line and exit 1, before Prefect is asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    done = subprocess.run(
        [sys.executable, "-m", "runners_orchestrator.crash_detection"],
        env={**env, "ORCHESTRATOR_CRASH_AFTER": "5", "PREFECT_API_URL": "http://127.0.0.1:9/api"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "runners-orchestrator: error: ORCHESTRATOR_CRASH_AFTER='5': expected a number of "
        "seconds of at least 30 (the heartbeat interval)"
    )
