"""The run page in Prefect shows each failed browser check's screenshot.

A real Prefect server, a real browser-engine runner server (headless Chromium) and a page
whose cookie banner a stylesheet hides: the check fails, and the run's artifacts link the
screenshot the runner server took, which answers as a JPEG.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from conftest import use_registry

if TYPE_CHECKING:
    from runners_orchestrator import RunSummary

pytestmark = pytest.mark.browser


async def test_the_run_page_links_and_shows_a_failed_checks_screenshot(
    seed_flows, browser_runner_url, pages, monkeypatch
):
    use_registry(monkeypatch, ("us-browser", browser_runner_url, "us-east-1", 8))
    jobs = [
        {
            "url": pages.url("/banner-stylesheet-hidden"),
            "runners": ["cookieBannerVisibleTest"],
            "input": {"waitMs": 200},
        },
        {"url": pages.url("/banner-visible"), "runners": ["cookieBannerVisibleTest"]},
    ]
    state = await seed_flows["orchestrate_runners"](jobs=jobs, return_state=True)
    assert state.is_completed(), state
    summary: RunSummary = await state.result()
    failed, passed = (job.results[0] for job in summary.jobs)
    assert (failed.status, passed.status) == ("fail", "pass")
    shot = (failed.details or {})["screenshot"]
    assert shot.startswith(f"{browser_runner_url}/api/runner/screenshots/")

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (markdown,) = [a for a in artifacts if a.type == "markdown" and a.description == "Summary"]
    (table,) = [a for a in artifacts if a.type == "table"]
    assert isinstance(markdown.data, str)
    assert "### Screenshots of failed browser checks" in markdown.data
    assert f"[screenshot]({shot})" in markdown.data  # a link
    # And the image, on a line of its own: the Prefect UI shows no image inside a link.
    assert f"\n![job-1 cookieBannerVisibleTest fail]({shot})\n" in markdown.data
    # Only the failed check has one.
    assert re.findall(r"\[screenshot\]\((\S+)\)", markdown.data) == [shot]
    rows = json.loads(str(table.data))
    assert [row["screenshot"] for row in rows] == [shot, ""]

    async with httpx.AsyncClient(timeout=30) as http:
        image = await http.get(shot)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content.startswith(b"\xff\xd8")
