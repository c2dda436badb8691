"""Schemathesis's own command line against the live API: the OpenAPI document tells the truth.

``st run --checks all`` generates requests from ``/schema/openapi.json`` (examples, coverage,
fuzzing and stateful phases) and checks every answer against the document: status codes,
bodies, headers, that valid data is accepted and invalid data refused, 405 with ``Allow``.

Everything stays on 127.0.0.1: the API, a runner server (the only one in its registry),
the Prefect test server, and every job URL, which a hook rewrites to a local page. The
deployments are registered but nobody serves them, so the runs schemathesis starts stay
scheduled (no flow fetches anything) and are deleted afterwards, before another module's
``serve-flows`` could pick them up.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.runner import Runner

from helpers import serve_app
from runners_orchestrator.api import OrchestratorConfig, create_app
from runners_orchestrator.deployments import GENERATED_TAG
from runners_orchestrator.discovery import discover
from runners_orchestrator.runner_server import RunnerServerConfig, create_runner_app
from runners_orchestrator.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from uuid import UUID

ROOT = Path(__file__).parents[2]
ST = Path(sys.executable).with_name("st")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")

MAX_EXAMPLES = 10
"""Fuzzed cases per operation; the coverage and stateful phases add their own."""
MAX_RESPONSE_TIME = 30
"""Seconds: the API may hold a start that long retrying a locked SQLite Prefect (its
``prefect_retry_seconds``), which a loaded 2-core machine does meet."""


async def _register_deployments() -> list[UUID]:
    """The workflows' deployments, as ``serve-flows`` registers them, without serving them."""
    discovery = discover(ROOT)
    runner = Runner(name="schemathesis-deployments", pause_on_shutdown=False)
    return [
        await runner.aadd_flow(workflow.flow, name=workflow.name, tags=[GENERATED_TAG])
        for workflow in (discovery.workflows[name] for name in discovery.names())
    ]


async def _delete_runs(deployment_ids: list[UUID]) -> int:
    """Delete the runs schemathesis started, 50 per request (Prefect's bulk limit)."""
    only_ours = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids))
    body = {"flow_runs": only_ours.model_dump(mode="json", exclude_unset=True), "limit": 50}
    deleted = 0
    async with get_client() as client:
        while True:
            response = await client._client.post("/flow_runs/bulk_delete", json=body)
            response.raise_for_status()
            if not (batch := response.json()["deleted"]):
                return deleted
            deleted += len(batch)


@pytest.fixture(scope="module")
def unserved_deployments(prefect_server) -> Iterator[list[UUID]]:
    """The deployments exist (starts answer 202); their runs are deleted at the end."""
    ids = asyncio.run(_register_deployments())
    yield ids
    asyncio.run(_delete_runs(ids))


def test_schemathesis_command_line_finds_no_failure(unserved_deployments, pages, tmp_path):
    page = pages.url("/banner-visible")
    with serve_app(create_runner_app(RunnerServerConfig(region="us-east-1"))) as runner:
        registry = {"servers": [{"id": "local", "url": f"{runner}/api/runner"}]}
        settings = load_settings(ROOT, registry=registry)
        app = create_app(OrchestratorConfig(settings=settings, project_root=ROOT))
        with serve_app(app) as api:
            env = {
                key: value
                for key, value in os.environ.items()
                if key.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
            }
            env |= {
                "SCHEMATHESIS_HOOKS": str(HOOKS),
                "ST_LOCAL_PAGE": page,
                "NO_PROXY": "127.0.0.1",
            }
            command = [
                str(ST),
                "run",
                f"{api}/schema/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--max-response-time",
                str(MAX_RESPONSE_TIME),
                # One worker: Python 3.11's ast.parse is not thread-safe, and Hypothesis
                # parses lambdas while describing strategies ("AST constructor recursion
                # depth mismatch" with two).
                "--workers",
                "1",
                "--seed",
                "1",
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
                "--no-color",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path),
            ]
            started = time.monotonic()
            result = subprocess.run(
                command,
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts is not None, output[-5000:]
    generated, passed = map(int, counts.groups())
    assert generated == passed
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    assert selected is not None, output
    assert selected.group(1) == selected.group(2), output  # every operation is exercised
    assert int(selected.group(2)) >= 12, output  # list, start, status, run, cancel, retry, probes
    operations = selected.group(2)
    print(f"schemathesis: {generated} cases over {operations} operations in {elapsed:.0f}s")  # noqa: T201
    assert generated >= 100
