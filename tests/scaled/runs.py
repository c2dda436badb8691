"""What the scaled tests do as a client: start runs, wait for them, look into Prefect."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

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
