"""Past one machine: Prefect on PostgreSQL and Redis, two of everything, HAProxy in front.

The topology is ``tests/topology.py``, started with the commands of ``docs/scaling.md``.
Run these alone with ``pytest -m scaled``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from runs import (
    FINISHED,
    PREFIX,
    crash_and_resume,
    jobs_for,
    start,
    wait_result,
)

from topology import ScaledTopology

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def topology() -> Iterator[ScaledTopology]:
    with ScaledTopology(runner_servers=4, runner_capacity=4) as scaled:
        yield scaled


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
    # Both replicas record finished runs into Prefect's PostgreSQL: each run once, and
    # either replica serves the same history.
    urls = {job["job"]["url"] for job in summaries[0]["jobs"]}
    deadline = time.monotonic() + 60
    while True:
        rows = await topology.query(
            "SELECT flow_run_id, count(*) FROM runners_orchestrator_results "
            "WHERE flow_run_id = ANY($1::text[]) GROUP BY flow_run_id",
            run_ids,
        )
        if len(rows) == len(run_ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert {row["flow_run_id"]: row["count"] for row in rows} == dict.fromkeys(run_ids, 3)
    for replica in ("api-1", "api-2"):
        base = f"http://127.0.0.1:{topology.ports[replica]}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as direct:
            listing = (await direct.get(f"{PREFIX}/checks", params={"limit": 500})).json()
        runs = {check["url"]: check["runs"] for check in listing["checks"] if check["url"] in urls}
        assert runs == dict.fromkeys(urls, len(run_ids)), replica


@pytest.mark.timeout(1200)  # 1000 jobs through 16 serving slots on 2 cores: minutes, not hung
async def test_200_concurrent_orchestrations_never_exceed_runner_capacity(topology, pages):
    """200 runs of 5 jobs through the load balancer, 4 runner servers of capacity 4.

    ``SCALED_TEST_LOAD_RUNS`` changes the number of runs (CI keeps 200).
    """
    runs = int(os.environ.get("SCALED_TEST_LOAD_RUNS", "200"))
    server_errors: list[str] = []

    async def count_5xx(response: httpx.Response) -> None:
        if response.status_code >= httpx.codes.INTERNAL_SERVER_ERROR:
            server_errors.append(
                f"{response.request.method} {response.url}: {response.status_code}"
            )

    async with httpx.AsyncClient(
        base_url=topology.api,
        timeout=120,
        limits=httpx.Limits(max_connections=50),
        event_hooks={"response": [count_5xx]},
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
    assert server_errors == []  # no 5xx, on any start or status poll (goal: zero)
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
        f"429s {[h['refused'] for h in health]}; 5xx {len(server_errors)}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


async def test_closed_loop_of_clients_sees_no_5xx_and_loses_no_run(topology, pages):
    """20 clients for 15 s, each starting a run and polling it to its end, then the next.

    The short form of ``bench/scaled_load.py``'s closed loop (50 clients, 30 s): every
    answer through the load balancer is a 2xx, and every accepted run ends completed.
    """
    answers: list[int] = []
    accepted: dict[str, str] = {}
    job = {"url": pages.url("/title?loop"), "runners": ["exampleTitleVisibleTest"]}
    async with httpx.AsyncClient(base_url=topology.api, timeout=120) as http:

        async def client(until: float) -> None:
            while time.monotonic() < until:
                started = await http.post(f"{PREFIX}/orchestrate_runners", json={"jobs": [job]})
                answers.append(started.status_code)
                if started.status_code != httpx.codes.ACCEPTED:
                    continue
                run_id = started.json()["runId"]
                accepted[run_id] = "accepted"
                deadline = time.monotonic() + 300  # catches a lost run, not a slow one
                while accepted[run_id] not in FINISHED:
                    assert time.monotonic() < deadline, f"run {run_id} never ended"
                    await asyncio.sleep(0.5)
                    status = await http.get(f"{PREFIX}/runs/{run_id}")
                    answers.append(status.status_code)
                    if status.status_code == httpx.codes.OK:
                        accepted[run_id] = status.json()["status"]

        await asyncio.gather(*(client(time.monotonic() + 15) for _ in range(20)))
    assert [code for code in answers if code >= httpx.codes.INTERNAL_SERVER_ERROR] == []
    assert set(answers) <= {200, 202}, sorted(set(answers))
    assert len(accepted) >= 20  # every client started at least one run
    assert set(accepted.values()) == {"completed"}, accepted
    print(f"closed loop: {len(accepted)} runs, {len(answers)} answers, no 5xx")  # noqa: T201


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


async def test_serving_process_killed_run_crashes_and_a_retry_resumes_it(topology, pages):
    """SIGKILL mid-run: crashed within the automation's bound, and the retry skips done jobs."""
    async with httpx.AsyncClient(base_url=topology.api, timeout=60) as http:
        resumed = await crash_and_resume(topology, http, pages, "resume", deadline=120)
    print(  # noqa: T201 - the figures for docs/scaling.md, seen with -s
        f"crashed {resumed.crashed_after:.1f}s after SIGKILL; "
        f"{len(resumed.done_before)} of 12 jobs kept"
    )
