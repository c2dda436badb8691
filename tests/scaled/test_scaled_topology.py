"""Past one machine: Prefect on PostgreSQL and Redis, two of everything, HAProxy in front.

The topology is ``tests/topology.py``, started with the commands of ``docs/scaling.md``.
Run these alone with ``pytest -m scaled``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from helpers import HITS
from topology import CRASH_AFTER, ScaledTopology

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(600)]

PREFIX = "/api/orchestrator"
FINISHED = {"completed", "failed", "crashed", "cancelled"}


@pytest.fixture(scope="module")
def topology() -> Iterator[ScaledTopology]:
    with ScaledTopology(runner_servers=4, runner_capacity=4) as scaled:
        yield scaled


def jobs_for(topology: ScaledTopology, pages: Any, count: int) -> list[dict[str, Any]]:
    return [
        {"url": pages.url(f"/slow?s=0.2&n={i}"), "runners": ["exampleTitleVisibleTest"]}
        for i in range(count)
    ]


async def start(
    http: httpx.AsyncClient, jobs: list[dict[str, Any]], options: dict[str, Any] | None = None
) -> str:
    body: dict[str, Any] = {"jobs": jobs, **({"options": options} if options else {})}
    response = await http.post(f"{PREFIX}/orchestrate_runners", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["runId"])


async def wait_result(
    http: httpx.AsyncClient, run_id: str, timeout: float = 300, every: float = 0.5
) -> Any:
    """Poll the status route through the load balancer until the run ends; count 5xx seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await http.get(f"{PREFIX}/orchestrate_runners", params={"runId": run_id})
        if response.status_code == httpx.codes.OK:
            return response.json()
        if response.status_code != httpx.codes.ACCEPTED:
            body = response.json()
            if body.get("status") in FINISHED:
                pytest.fail(f"run {run_id} ended {body['status']}: {body.get('error')}")
        await asyncio.sleep(every)
    pytest.fail(f"run {run_id} did not finish within {timeout:.0f}s")


def runner_health(topology: ScaledTopology) -> list[dict[str, Any]]:
    return [
        httpx.get(f"http://127.0.0.1:{topology.ports[f'runner-{i}']}/api/runner/health").json()
        for i in range(topology.runner_servers)
    ]


async def test_runs_started_through_the_load_balancer_complete_on_either_server(topology, pages):
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        run_ids = [await start(http, jobs_for(topology, pages, 3)) for _ in range(6)]
        summaries = await asyncio.gather(*(wait_result(http, r) for r in run_ids))
    assert all(s["summary"]["total"] == 3 for s in summaries)
    assert all(s["state"] == "completed" for s in summaries)
    # Each API replica reads every run's result: ask each one directly.
    for replica in ("api-1", "api-2"):
        base = f"http://127.0.0.1:{topology.ports[replica]}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as direct:
            envelope = (await direct.get(f"{PREFIX}/runs/{run_ids[0]}")).json()
        assert envelope["status"] == "completed"
        assert envelope["result"] == summaries[0]


@pytest.mark.timeout(1200)  # 1000 jobs through 16 serving slots on 2 cores: minutes, not hung
async def test_200_concurrent_orchestrations_never_exceed_runner_capacity(topology, pages):
    """200 runs of 5 jobs through the load balancer, 4 runner servers of capacity 4.

    ``SCALED_TEST_LOAD_RUNS`` changes the number of runs (CI keeps 200).
    """
    runs = int(os.environ.get("SCALED_TEST_LOAD_RUNS", "200"))
    async with httpx.AsyncClient(
        base_url=topology.api, timeout=120, limits=httpx.Limits(max_connections=50)
    ) as http:
        submitted: dict[str, float] = {}

        async def one(index: int) -> tuple[str, float, Any]:
            url = pages.url(f"/title?run={index}")
            jobs = [{"url": url, "runners": ["exampleTitleVisibleTest"]} for _ in range(5)]
            began = time.monotonic()
            run_id = await start(http, jobs)
            submitted[run_id] = began
            summary = await wait_result(http, run_id, timeout=1100, every=2)
            return run_id, time.monotonic() - began, summary

        began_all = time.monotonic()
        outcomes = await asyncio.gather(*(one(i) for i in range(runs)))
    elapsed = time.monotonic() - began_all
    latencies = sorted(took for _, took, _ in outcomes)
    jobs = [job for _, _, summary in outcomes for job in summary["jobs"]]
    assert len(jobs) == 5 * runs  # zero jobs missing
    assert {job["state"] for job in jobs} == {"completed"}
    health = runner_health(topology)
    assert all(h["peakInFlight"] <= h["capacity"] for h in health), health
    assert sum(h["served"] for h in health) >= 5 * runs
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(  # noqa: T201 - the figures for docs/scaling.md, seen with -s
        f"{runs} runs x 5 jobs in {elapsed:.1f}s: submit->result p50 {p50:.2f}s "
        f"p99 {p99:.2f}s; runner peaks {[h['peakInFlight'] for h in health]}, "
        f"429s {[h['refused'] for h in health]}"
    )


async def test_one_api_replica_killed_status_and_results_still_served(topology, pages):
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        run_id = await start(http, jobs_for(topology, pages, 4))
        topology.processes["api-1"].kill()
        try:
            summary = await wait_result(http, run_id)  # every poll through the load balancer
            assert summary["summary"]["total"] == 4
            again = await start(http, jobs_for(topology, pages, 1))  # starts still accepted
            assert (await wait_result(http, again))["state"] == "completed"
        finally:
            topology.restart("api-1")
    base = f"http://127.0.0.1:{topology.ports['api-1']}"
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=10) as direct:
        while True:  # the restarted replica serves what was done while it was away
            try:
                envelope = (await direct.get(f"{PREFIX}/runs/{run_id}")).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, topology.processes["api-1"].tail()
                await asyncio.sleep(0.3)
    assert envelope["result"] == summary


async def test_one_prefect_api_server_killed_mid_run_runs_carry_on(topology, pages):
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        run_ids = [await start(http, jobs_for(topology, pages, 4)) for _ in range(4)]
        topology.processes["prefect-1"].kill()
        try:
            more = [await start(http, jobs_for(topology, pages, 2)) for _ in range(2)]
            summaries = await asyncio.gather(*(wait_result(http, r) for r in run_ids + more))
        finally:
            topology.restart("prefect-1")
    assert [s["summary"]["total"] for s in summaries] == [4, 4, 4, 4, 2, 2]
    assert all(job["state"] == "completed" for s in summaries for job in s["jobs"])


async def test_runner_server_killed_and_one_hanging_every_job_accounted_for(topology, pages):
    killed, hung = topology.processes["runner-3"], topology.processes["runner-2"]
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        hung.pause()  # SIGSTOP: connections are accepted by the kernel, nothing answers
        try:
            run_id = await start(http, jobs_for(topology, pages, 16), options={"timeout": 8000})
            killed.kill()
            summary = await wait_result(http, run_id)
        finally:
            hung.resume()
            topology.restart("runner-3")
    assert len(summary["jobs"]) == 16  # every job accounted for, none lost
    states = [job["state"] for job in summary["jobs"]]
    assert set(states) <= {"completed", "timed_out"}, states
    assert states.count("completed") >= 8  # runner-0 and runner-1 did the work


async def checkpointed_jobs(topology: ScaledTopology, run_id: str) -> set[str]:
    """Job ids the run has recorded as completed in Prefect (its checkpoint artifacts)."""
    async with httpx.AsyncClient(base_url=topology.prefect_api, timeout=30) as prefect:
        response = await prefect.post(
            "/artifacts/filter",
            json={
                "artifacts": {
                    "flow_run_id": {"any_": [run_id]},
                    "type": {"any_": ["runners-orchestrator-checkpoint"]},
                },
                "limit": 200,
            },
        )
    return {
        job["jobId"]
        for artifact in response.json()
        # Prefect keeps an artifact's data as the JSON text of what was given.
        for job in (json.loads(artifact["data"]) if isinstance(artifact["data"], str) else [])
    }


def serving_process_of(topology: ScaledTopology, run_id: str) -> str:
    """Which serve-flows process runs the flow run.

    Both poll for it; the one whose claim Prefect refused logs "Aborted submission of flow
    run '<id>'", so the other one runs it. Without a race, the one that logged it runs it.
    """
    names = ("flows-1", "flows-2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = {n: topology.processes[n].log.read_text(errors="replace") for n in names}
        aborted = [n for n in names if f"Aborted submission of flow run '{run_id}'" in logs[n]]
        if aborted:
            return next(n for n in names if n not in aborted)
        mentioned = [n for n in names if run_id in logs[n]]
        if len(mentioned) == 1:
            return mentioned[0]
        time.sleep(0.2)
    msg = f"cannot tell which serving process runs flow run {run_id}"
    raise AssertionError(msg)


async def test_serving_process_killed_run_crashes_and_a_retry_resumes_it(topology, pages):
    """SIGKILL mid-run: crashed within the automation's bound, and the retry skips done jobs."""
    jobs = [
        {"url": pages.url(f"/slow?s=1&resume={i}"), "runners": ["exampleTitleVisibleTest"]}
        for i in range(12)
    ]
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        run_id = await start(http, jobs, options={"maxConcurrency": 2})
        deadline = time.monotonic() + 120
        while len(done_before := await checkpointed_jobs(topology, run_id)) < 4:
            assert time.monotonic() < deadline, "no job was checkpointed"
            await asyncio.sleep(0.2)
        serving = serving_process_of(topology, run_id)
        topology.processes[serving].kill()
        killed_at = time.monotonic()
        try:
            # The other serving process keeps serving new runs meanwhile.
            other = await start(http, jobs_for(topology, pages, 2))
            assert (await wait_result(http, other))["state"] == "completed"
            while True:  # Prefect's automation marks it crashed: no heartbeat any more
                status = await http.get(f"{PREFIX}/runs/{run_id}")
                if status.json()["status"] == "crashed":
                    break
                assert time.monotonic() - killed_at < CRASH_AFTER + 60, status.json()
                await asyncio.sleep(1)
            crashed_after = time.monotonic() - killed_at
        finally:
            topology.restart(serving)
        retried = await http.post(f"{PREFIX}/runs/{run_id}/retry")
        assert retried.status_code == 202, retried.text
        summary = await wait_result(http, run_id)
    assert [job["state"] for job in summary["jobs"]] == ["completed"] * 12  # one summary
    for job in summary["jobs"]:
        hits = HITS[urlsplit(job["job"]["url"]).path + "?" + urlsplit(job["job"]["url"]).query]
        if job["jobId"] in done_before:
            assert hits == 1, job  # completed before the crash: not run again
        else:
            assert hits >= 1, job
    print(f"crashed {crashed_after:.1f}s after SIGKILL; {len(done_before)} of 12 jobs kept")  # noqa: T201
