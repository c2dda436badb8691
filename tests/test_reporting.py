"""What a run shows: the results table and the summary, from a run that failed over."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from helpers import free_port
from runners_orchestrator import JobResult, RunnerJob, RunnerResult, RunSummary
from runners_orchestrator.balancing import RoundRobinBalancer
from runners_orchestrator.execution import JobExecutor, RetryPolicy
from runners_orchestrator.registry import AvailableServer, HealthChecker, ServerPool
from runners_orchestrator.reporting import results_table, summary_markdown
from runners_orchestrator.settings import ServerConfig
from runners_orchestrator.steps import summarise


def avail(sid: str, base: str) -> AvailableServer:
    config = ServerConfig(id=sid, url=f"{base}/api/runner", region="us-east-1")
    return AvailableServer(server=config, capacity=10)


@pytest.fixture
async def failed_over(pages, runner_url) -> RunSummary:
    """Two jobs on real servers: the first sent to a dead one, so it failed over."""
    dead = avail("us-dead", f"http://127.0.0.1:{free_port()}")
    alive = avail("us-1", runner_url)
    run = JobExecutor(
        pool=ServerPool(available=[dead, alive]),
        balancer=RoundRobinBalancer(),
        health=HealthChecker(),
        policy=RetryPolicy(backoff=0.01),
    )
    jobs = [
        RunnerJob(url=pages.url("/title"), runners=["exampleTitleVisibleTest"]),
        RunnerJob(url=pages.url("/banner-visible"), runners=["cookieBannerVisibleTest"]),
    ]
    first = await run.run(jobs[0], "job-1", timeout=10, first=dead)
    second = await run.run(jobs[1], "job-2", timeout=10)
    return summarise([first, second], jobs, run_id="r1")


async def test_summary_counts_the_failover(failed_over):
    assert failed_over.summary.failovers == 1
    assert [j.failovers for j in failed_over.jobs] == [1, 0]


async def test_table_shows_the_way_a_job_took_when_it_failed_over(failed_over):
    rows = results_table(failed_over)
    assert [row["tries"] for row in rows] == ["us-dead refused → us-1 ok", ""]
    assert [row["server"] for row in rows] == ["us-1", "us-1"]


async def test_markdown_counts_failovers_and_lists_each_with_its_tries(failed_over):
    text = summary_markdown(failed_over)
    assert "🔀 1 failovers" in text
    assert "### Jobs that failed over" in text
    (line,) = [line for line in text.splitlines() if line.startswith("- `job-1`")]
    assert "us-dead refused (cannot connect:" in line
    assert line.endswith(" ms")
    assert "→ us-1 ok" in line
    assert "job-2" not in text  # it ran where it was sent


def test_summary_shows_failed_checks_screenshots_and_ignores_urls_that_would_break_it(pages):
    shot = "http://127.0.0.1:3002/api/runner/screenshots/ab12.jpg"
    now = datetime.now(UTC)
    job = RunnerJob(url=pages.url("/x"), runners=["a", "b", "c", "d"])
    results = [
        RunnerResult(name="a", status="fail", details={"screenshot": shot}),
        RunnerResult(name="b", status="pass", details={"screenshot": shot + "?pass"}),
        RunnerResult(name="c", status="error", details={"screenshot": "http://x/a.jpg) ![y](z"}),
        RunnerResult(name="d", status="fail", details={"screenshot": "javascript:alert(1)"}),
    ]
    outcome = JobResult(
        job_id="job-1",
        job=job,
        server="br",
        state="completed",
        results=results,
        started_at=now,
        completed_at=now,
        duration_ms=0,
    )
    summary = summarise([outcome], [job], run_id="r")
    text = summary_markdown(summary)
    assert f"· a **fail** on br: [screenshot]({shot})" in text
    assert f"\n![job-1 a fail]({shot})\n" in text
    assert text.count("](") == 2  # the fail's link and image; nothing of the others
    assert [row["screenshot"] for row in results_table(summary)] == [shot, shot + "?pass", "", ""]
    assert "### Screenshots" not in summary_markdown(summarise([], [], run_id="r"))
