"""Liveness, readiness and "can it start yet", on a real Prefect server over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from uuid import uuid4

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.runner import Runner
from prefect.settings import PREFECT_API_URL

from helpers import TcpProxy, serve_app
from runners_orchestrator.api import OrchestratorConfig, create_app
from runners_orchestrator.deployments import GENERATED_TAG
from runners_orchestrator.discovery import discover
from runners_orchestrator.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path
    from uuid import UUID

PREFIX = "/api/orchestrator"


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, str]:
    """A project with one workflow that nobody serves yet (a fresh name every time)."""
    name = f"not_served_{uuid4().hex[:8]}"
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "readiness-probe"\n')
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / f"{name}.py").write_text(
        f'async def {name}(count: int = 1) -> int:\n    """Count."""\n    return count\n'
    )
    return tmp_path, name


@pytest.fixture
async def registered() -> AsyncIterator[list[UUID]]:
    """Deployments a test registers; they and their runs are deleted afterwards."""
    ids: list[UUID] = []
    yield ids
    async with get_client() as client:
        if ids:
            only = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=ids))
            for run in await client.read_flow_runs(flow_run_filter=only):
                await client.delete_flow_run(run.id)
        for deployment_id in ids:
            await client.delete_deployment(deployment_id)


async def _workflows_ready(client: httpx.AsyncClient) -> dict[str, bool]:
    body = (await client.get(PREFIX)).json()
    return {w["name"]: w["ready"] for w in body["workflows"]}


async def test_ready_waits_for_the_deployment_and_start_is_503_until_then(
    prefect_server, project, registered
):
    root, name = project
    app = create_app(OrchestratorConfig(settings=load_settings(root), project_root=root))
    with serve_app(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            health = await client.get(f"{PREFIX}/health")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})

            ready = await client.get(f"{PREFIX}/ready")
            assert ready.status_code == 503, ready.text
            assert ready.headers["Retry-After"] == "2"
            body = ready.json()
            assert body["error"] == "not_ready"
            assert body["details"] == {
                "prefect": "reachable",
                "notStartable": [name],
                "startable": [],
            }
            assert f"no deployment yet for {name}" in body["message"]
            assert await _workflows_ready(client) == {name: False}

            start = await client.post(f"{PREFIX}/{name}", json={"count": 2})
            assert start.status_code == 503, start.text
            assert start.headers["Retry-After"] == "2"
            assert start.json()["error"] == "workflow_not_ready"
            assert start.json()["details"] == {"workflow": name}

            workflow = discover(root).workflows[name]
            runner = Runner(name=f"readiness-{name}", pause_on_shutdown=False)
            registered.append(
                await runner.aadd_flow(workflow.flow, name=name, tags=[GENERATED_TAG])
            )
            deadline = time.monotonic() + 10  # the answer is reused for 2 s at most
            while (ready := await client.get(f"{PREFIX}/ready")).status_code != 200:
                assert time.monotonic() < deadline, ready.text
                await asyncio.sleep(0.2)
            assert ready.json() == {"status": "ready", "workflows": [name]}
            assert await _workflows_ready(client) == {name: True}
            started = await client.post(f"{PREFIX}/{name}", json={"count": 2})
            assert started.status_code == 202, started.text


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Prefect)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


async def test_ready_is_503_within_its_bound_when_prefect_hangs_and_the_list_stays_fast(
    prefect_server, project, black_hole
):
    root, name = project
    config = OrchestratorConfig(
        settings=load_settings(root),
        project_root=root,
        prefect_api_url=f"http://127.0.0.1:{black_hole}/api",
    )
    with serve_app(create_app(config)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            started = time.monotonic()
            ready = await client.get(f"{PREFIX}/ready")
            waited = time.monotonic() - started
            assert ready.status_code == 503, ready.text
            assert ready.headers["Retry-After"] == "2"
            assert ready.json()["details"]["prefect"] == "unreachable"
            assert ready.json()["details"]["notStartable"] == [name]
            assert "did not answer within 5.0s" in ready.json()["message"]
            assert waited < 8
            assert (await client.get(f"{PREFIX}/health")).status_code == 200
            await asyncio.sleep(2.1)  # the answer expired: the list must not wait for a new one
            timings: list[float] = []
            for _ in range(5):
                started = time.monotonic()
                assert await _workflows_ready(client) == {name: False}
                timings.append(time.monotonic() - started)
            assert max(timings) < 2.5, timings  # not the 5 s a new Prefect answer takes


async def test_prefect_going_away_makes_ready_503_at_once_and_back_200(
    prefect_server, project, registered
):
    root, name = project
    workflow = discover(root).workflows[name]
    runner = Runner(name=f"readiness-{name}", pause_on_shutdown=False)
    registered.append(await runner.aadd_flow(workflow.flow, name=name, tags=[GENERATED_TAG]))
    proxy = TcpProxy(urlsplit(str(PREFECT_API_URL.value())).port or 0)
    proxy.start()
    config = OrchestratorConfig(
        settings=load_settings(root),
        project_root=root,
        prefect_api_url=f"http://127.0.0.1:{proxy.port}/api",
    )
    try:
        with serve_app(create_app(config)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                assert (await client.get(f"{PREFIX}/ready")).status_code == 200
                proxy.stop()
                await asyncio.sleep(2.1)
                started = time.monotonic()
                down = await client.get(f"{PREFIX}/ready")
                assert down.status_code == 503, down.text
                assert time.monotonic() - started < 2
                details: dict[str, Any] = down.json()["details"]
                assert (details["prefect"], details["notStartable"]) == ("unreachable", [name])
                proxy.start()
                await asyncio.sleep(2.1)
                assert (await client.get(f"{PREFIX}/ready")).status_code == 200
    finally:
        proxy.close()


async def test_a_workflow_named_like_a_route_is_refused(prefect_server, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "reserved"\n')
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "probes.py").write_text("async def ready() -> None:\n    pass\n")
    app = create_app(OrchestratorConfig(settings=load_settings(tmp_path), project_root=tmp_path))
    with serve_app(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            listing = await client.get(PREFIX)
            assert listing.status_code == 500
            assert listing.json()["error"] == "configuration_error"
            assert "'ready'" in listing.json()["message"]
            ready = await client.get(f"{PREFIX}/ready")
            assert ready.status_code == 503
            assert "rename the function" in ready.json()["message"]
            assert (await client.get(f"{PREFIX}/health")).status_code == 200
