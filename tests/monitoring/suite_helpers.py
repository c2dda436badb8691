"""Reading a test's suite deployments and their runs from the Prefect server."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.exceptions import ObjectNotFound

if TYPE_CHECKING:
    import uuid

    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import DeploymentResponse

    from conftest import ServeFlows


async def deployment(api: str, name: str) -> DeploymentResponse | None:
    async with PrefectClient(api) as client:
        try:
            return await client.read_deployment_by_name(f"orchestrate_runners/{name}")
        except ObjectNotFound:
            return None


async def wait_deployment(
    api: str, name: str, served: ServeFlows, *, newer_than: Any = None, timeout: float = 120
) -> DeploymentResponse:
    """The deployment ``name`` once it exists (and was updated after ``newer_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await deployment(api, name)
        if found is not None and (newer_than is None or found.updated > newer_than):
            return found
        if served.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name} was not registered; serve-flows said:\n{served.output()[-4000:]}")
        await asyncio.sleep(0.3)


async def runs_of(
    api: str, deployment_id: uuid.UUID, *states: StateType, limit: int = 200
) -> list[Any]:
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))) if states else None
    flow_runs = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=state
    )
    async with PrefectClient(api) as client:
        return await client.read_flow_runs(flow_run_filter=flow_runs, limit=limit)
