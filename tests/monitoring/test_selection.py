"""Select what to run: `run --suite --tag --region` and the API's start with a suite body."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prefect.client.orchestration import PrefectClient
from suite_helpers import wait_deployment

from helpers import serve_app
from runners_orchestrator.api import OrchestratorConfig, create_app

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import Project, ServeFlows

PREFIX = "/api/orchestrator"


def shop(page: str) -> str:
    """Checkout in both regions (tags checkout, shop), the home page in us-east-1 (home, shop)."""
    return f"""
tags = ["shop"]

[[jobs]]
url = "{page}"
runners = ["cookieBannerVisibleTest"]
regions = ["us-east-1", "eu-west-1"]
tags = ["checkout"]

[[jobs]]
url = "{page}"
runners = ["exampleTitleVisibleTest"]
regions = ["us-east-1"]
tags = ["home"]
"""


@pytest.fixture(scope="module")
def served(project: Project, pages) -> Iterator[ServeFlows]:
    """The suite `shop` (no schedule: on demand only), served."""
    project.clear_suites()
    project.suite("shop", shop(pages.url("/banner-visible")))
    with project.serving() as serving:
        asyncio.run(
            wait_deployment(project.env["PREFECT_API_URL"], "suite-shop", serving, timeout=180)
        )
        yield serving


@pytest.fixture(scope="module")
def api(project: Project, served: ServeFlows) -> Iterator[str]:
    del served
    config = OrchestratorConfig(
        project_root=project.root, prefect_api_url=project.env["PREFECT_API_URL"]
    )
    with serve_app(create_app(config)) as url:
        yield url


def jobs_of(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted(
        (job["job"]["runners"][0], job["region"], ",".join(job["job"]["tags"]))
        for job in summary["jobs"]
    )


@pytest.mark.timeout(240)
async def test_run_suite_tag_region_wait_runs_exactly_the_matching_jobs(
    project: Project, served: ServeFlows
):
    del served
    result = project.cli(
        "run", "--suite", "shop", "--tag", "checkout", "--region", "eu-west-1", "--wait", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert jobs_of(summary) == [("cookieBannerVisibleTest", "eu-west-1", "checkout,shop")]
    assert summary["jobs"][0]["job"]["suite"] == "shop"
    assert summary["jobs"][0]["server"] == "eu-west-1"
    # The run is the suite's: its deployment, its tag.
    async with PrefectClient(project.env["PREFECT_API_URL"]) as client:
        flow_run = await client.read_flow_run(uuid.UUID(summary["runId"]))
        assert flow_run.deployment_id is not None
        deployment = await client.read_deployment(flow_run.deployment_id)
    assert deployment.name == "suite-shop"
    assert "suite:shop" in flow_run.tags

    # Two tags narrow (every tag must match); no region: both regions.
    result = project.cli("run", "--suite", "shop", "--tag", "shop", "--tag", "home", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["suite"] == "shop"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "shop", "--job", "{}"], "--suite takes its jobs and options from the suite"),
        (["orchestrate_runners", "--tag", "a", "--job", "{}"], "select jobs of a --suite"),
        ([], "give NAME with --jobs FILE or --job JSON, or --suite NAME"),
        (["--suite", "nope"], "no suite 'nope'; available suites: shop"),
        (["--suite", "shop", "--region", "mars-1"], "no job of suite 'shop' has a region in"),
    ],
)
def test_run_mistakes_are_one_line_and_exit_2(
    project: Project, served: ServeFlows, args: list[str], message: str
):
    del served
    result = project.cli("run", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


async def poll(client: httpx.AsyncClient, url: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.get(url)
        if response.status_code != 202:
            return response
        await asyncio.sleep(0.3)
    pytest.fail(f"{url} still 202 after {timeout}s")


@pytest.mark.timeout(240)
async def test_api_starts_a_suite_with_only_the_matching_jobs(api: str):
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        started = await client.post(
            f"{PREFIX}/orchestrateRunners", json={"suite": "shop", "regions": ["us-east-1"]}
        )
        assert started.status_code == 202, started.text
        body = started.json()
        assert (body["suite"], body["jobs"], body["orchestrator"]) == (
            "shop",
            2,
            "orchestrate_runners",
        )
        done = await poll(client, body["statusUrl"])
        assert done.status_code == 200, done.text
        assert jobs_of(done.json()) == [
            ("cookieBannerVisibleTest", "us-east-1", "checkout,shop"),
            ("exampleTitleVisibleTest", "us-east-1", "home,shop"),
        ]

        listed = (await client.get(f"{PREFIX}/suites")).json()
        (suite,) = listed["suites"]
        assert suite["name"] == "shop"
        assert suite["workflow"] == "orchestrate_runners"
        assert suite["schedule"] is None
        assert suite["jobs"] == 3
        assert suite["paused"] is False
        uuid.UUID(suite["deploymentId"])
        assert listed["problems"] == []


@pytest.mark.parametrize(
    ("path", "body", "status", "error", "needle"),
    [
        (
            "orchestrate_runners",
            {"suite": "nope"},
            404,
            "suite_not_found",
            "available suites: shop",
        ),
        (
            "orchestrate_runners",
            {"suite": "shop", "tags": ["checkout", "blog"]},
            400,
            "no_matching_jobs",
            "no job of suite 'shop' has every tag of checkout, blog",
        ),
        (
            "orchestrate_runners",
            {"suite": "shop", "jobs": [{"url": "http://127.0.0.1:9/", "runners": ["x"]}]},
            400,
            "invalid_parameters",
            "not suite with jobs",
        ),
        (
            "orchestrate_runners",
            {"suite": "shop", "regions": "eu-west-1"},
            400,
            "invalid_parameters",
            "regions",
        ),
        ("execute_single_runner", {"suite": "shop"}, 400, "invalid_parameters", "takes no jobs"),
    ],
)
async def test_api_suite_mistakes(api: str, *, path, body, status, error, needle):
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        answer = await client.post(f"{PREFIX}/{path}", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert needle in answer.json()["message"]
    if status == 404:
        assert answer.json()["details"]["availableSuites"] == ["shop"]


@pytest.mark.timeout(240)
def test_run_suite_through_the_api(project: Project, api: str):
    result = project.cli("run", "--suite", "shop", "--tag", "home", "--wait", "--api-url", api)
    assert result.returncode == 0, result.stderr
    assert "suite shop: 1 jobs" in result.stderr
    assert "exampleTitleVisibleTest" in result.stdout
    assert "cookieBannerVisibleTest" not in result.stdout
    missing = project.cli("run", "--suite", "nope", "--api-url", api)
    assert missing.returncode == 2
    assert "no suite 'nope'; available suites: shop" in missing.stderr
