"""What the scaled tests do as a client: start runs, wait for them, look into Prefect."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from helpers import HITS
from topology import CRASH_AFTER

if TYPE_CHECKING:
    from topology import ScaledTopology

PREFIX = "/api/orchestrator"
FINISHED = {"completed", "failed", "crashed", "cancelled"}


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
    """Which serving process (serve-flows or worker) runs the flow run.

    Both poll for it; the one whose claim Prefect refused logs "Aborted submission of flow
    run '<id>'", so the other one runs it. Without a race, the one that logged it runs it.
    """
    names = topology.serving_processes
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


@dataclass
class Resumed:
    """What :func:`crash_and_resume` saw."""

    summary: Any
    done_before: set[str]
    crashed_after: float


async def crash_and_resume(
    topology: ScaledTopology, http: httpx.AsyncClient, pages: Any, tag: str, deadline: float
) -> Resumed:
    """SIGKILL the process running a 12-job run once 4 jobs are checkpointed; retry it.

    The other serving process must keep serving new runs meanwhile; Prefect's automation
    must mark the run crashed within ``CRASH_AFTER`` (+60 s); the retry must complete every
    job, none of those checkpointed before the kill run again.
    """
    jobs = [
        {"url": pages.url(f"/slow?s=1&{tag}={i}"), "runners": ["exampleTitleVisibleTest"]}
        for i in range(12)
    ]
    run_id = await start(http, jobs, options={"maxConcurrency": 2})
    until = time.monotonic() + deadline
    while len(done_before := await checkpointed_jobs(topology, run_id)) < 4:
        assert time.monotonic() < until, "no job was checkpointed"
        await asyncio.sleep(0.2)
    serving = serving_process_of(topology, run_id)
    topology.processes[serving].kill()
    killed_at = time.monotonic()
    try:
        other = await start(http, jobs_for(topology, pages, 2))
        assert (await wait_result(http, other))["state"] == "completed"
        while True:  # Prefect's automation marks it crashed: no heartbeat any more
            status = (await http.get(f"{PREFIX}/runs/{run_id}")).json()
            if status["status"] == "crashed":
                break
            assert time.monotonic() - killed_at < CRASH_AFTER + 60, status
            await asyncio.sleep(1)
        crashed_after = time.monotonic() - killed_at
    finally:
        topology.restart(serving)
    retried = await http.post(f"{PREFIX}/runs/{run_id}/retry")
    assert retried.status_code == 202, retried.text
    summary = await wait_result(http, run_id)
    assert [job["state"] for job in summary["jobs"]] == ["completed"] * 12  # one summary
    for job in summary["jobs"]:
        url = urlsplit(job["job"]["url"])
        hits = HITS[f"{url.path}?{url.query}"]
        if job["jobId"] in done_before:
            assert hits == 1, job  # completed before the crash: not run again
        else:
            assert hits >= 1, job
    return Resumed(summary, done_before, crashed_after)
