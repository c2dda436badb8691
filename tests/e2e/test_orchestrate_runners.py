"""The seed workflows as Prefect flows, on a real Prefect server and real runner servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from litestar import Litestar
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from conftest import use_registry
from helpers import ScriptedRunnerServer, blackhole, cli_process, free_port, serve_app
from runners_orchestrator import RunSummary
from runners_orchestrator.runner_server import RunnerServerConfig, RunnerServerPlugin

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def two_regions() -> Iterator[dict[str, str]]:
    apps = {
        "us-1": RunnerServerConfig(region="us-east-1"),
        "us-2": RunnerServerConfig(region="us-east-1"),
        "eu-1": RunnerServerConfig(region="eu-west-1"),
    }
    with ExitStack() as stack:
        yield {
            sid: stack.enter_context(serve_app(Litestar(plugins=[RunnerServerPlugin(cfg)])))
            for sid, cfg in apps.items()
        }


def register(monkeypatch, urls: dict[str, str], **extra: tuple[str, str]) -> None:
    regions = {"us-1": "us-east-1", "us-2": "us-east-1", "eu-1": "eu-west-1"}
    servers = [(sid, url, regions[sid], 10) for sid, url in urls.items()]
    servers += [(sid, url, region, 10) for sid, (url, region) in extra.items()]
    use_registry(monkeypatch, *servers)


async def run_flow(flow_fn, **parameters: Any) -> tuple[Any, str]:
    state = await flow_fn(**parameters, return_state=True)
    assert state.is_completed(), state
    return await state.result(), str(state.state_details.flow_run_id)


async def task_run_names(flow_run_id: str) -> list[str]:
    async with get_client() as client:
        for _ in range(50):  # task runs are recorded from events, a moment later
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if any(r.name.startswith("aggregate_results") for r in runs):
                return sorted(r.name for r in runs)
            await asyncio.sleep(0.1)
    return sorted(r.name for r in runs)


async def test_happy_path_across_regions(seed_flows, two_regions, pages, monkeypatch):
    register(monkeypatch, two_regions)
    jobs = [
        {
            "url": pages.url("/banner-visible"),
            "runners": ["cookieBannerVisibleTest"],
            "region": "us-east-1",
        },
        {
            "url": pages.url("/banner-missing"),
            "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
            "region": "eu-west-1",
        },
        {
            "url": pages.url("/title-empty"),
            "runners": ["exampleTitleVisibleTest"],
            "name": "empty title page",  # a label of the client's own comes back with the job
        },
    ]
    summary, flow_run_id = await run_flow(
        seed_flows["orchestrate_runners"], jobs=jobs, options={"maxConcurrency": 2}
    )
    assert isinstance(summary, RunSummary)
    assert summary.run_id == flow_run_id
    assert summary.state == "completed"
    assert summary.summary.model_dump() == {
        "total": 4,
        "passed": 2,
        "failed": 2,
        "errored": 0,
        "failovers": 0,
    }
    us, eu, anywhere = summary.jobs
    assert us.region == "us-east-1"
    assert us.server in {"us-1", "us-2"}
    assert (eu.region, eu.server) == ("eu-west-1", "eu-1")
    assert [r.status for r in eu.results] == ["fail", "pass"]
    assert anywhere.results[0].status == "fail"
    assert [j.job_id for j in summary.jobs] == ["job-1", "job-2", "job-3"]
    assert [j.job.to_wire() for j in summary.jobs] == jobs  # each result names its job

    names = await task_run_names(flow_run_id)
    assert sum(n.startswith("find_available_servers") for n in names) == 1
    # One task run per job: the server choice is a plain call (a task run costs the Prefect
    # server ~35 ms of CPU, more than the choice itself).
    assert sum(n.startswith("execute_runner[") for n in names) == 3
    assert not any(n.startswith("select_best_server") for n in names)
    assert "execute_runner[job-1 · us-east-1 · 127.0.0.1]" in names
    assert "execute_runner[job-2 · eu-west-1 · 127.0.0.1]" in names
    assert sum(n.startswith("aggregate_results") for n in names) == 1

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_type = {a.type: a for a in artifacts}
    table = json.loads(by_type["table"].data)
    assert len(table) == 4
    assert {row["runner"] for row in table} == {
        "cookieBannerVisibleTest",
        "exampleTitleVisibleTest",
    }
    assert table[0]["url"] == pages.url("/banner-visible")
    assert {row["region"] for row in table} == {"us-east-1", "eu-west-1"}
    assert "4** checks in **3** jobs" in by_type["markdown"].data
    assert "🔀 0 failovers" in by_type["markdown"].data
    assert {row["tries"] for row in table} == {""}  # every job ran where it was sent
    assert by_type["progress"].data == 100
    assert by_type["progress"].description == "jobs done: 3/3"


async def test_execute_single_runner(seed_flows, two_regions, pages, monkeypatch):
    register(monkeypatch, two_regions)
    job = {
        "url": pages.url("/title"),
        "runners": ["exampleTitleVisibleTest"],
        "region": "eu-west-1",
    }
    result, _ = await run_flow(seed_flows["execute_single_runner"], job=job)
    assert (result.state, result.server, result.results[0].details) == (
        "completed",
        "eu-1",
        {"title": "Peer Test Page"},
    )


async def test_region_without_healthy_server_fails_its_jobs_and_the_run_completes(
    seed_flows, two_regions, pages, monkeypatch
):
    dead = f"http://127.0.0.1:{free_port()}"
    register(monkeypatch, {"us-1": two_regions["us-1"]}, **{"ap-dead": (dead, "ap-south-1")})
    jobs = [
        {
            "url": pages.url("/title"),
            "runners": ["exampleTitleVisibleTest"],
            "region": "ap-south-1",
        },
        {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"], "region": "us-east-1"},
    ]
    summary, _ = await run_flow(seed_flows["orchestrate_runners"], jobs=jobs)
    ap, us = summary.jobs
    assert ap.state == "failed"
    assert ap.error.startswith(
        "no healthy runner server in region 'ap-south-1' (ap-dead: unreachable"
    )
    assert us.state == "completed"
    assert summary.state == "failed"
    assert summary.summary.model_dump() == {
        "total": 2,
        "passed": 1,
        "failed": 0,
        "errored": 1,
        "failovers": 0,
    }


async def test_hung_server_times_out_and_the_run_completes(seed_flows, pages, monkeypatch):
    hung = ScriptedRunnerServer().always(200, "hang")
    with serve_app(hung) as base:
        use_registry(monkeypatch, ("hung", base, "us-east-1", 10))
        jobs = [{"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}] * 2
        started = time.monotonic()
        summary, _ = await run_flow(
            seed_flows["orchestrate_runners"], jobs=jobs, options={"timeout": 800}
        )
        elapsed = time.monotonic() - started
    assert [j.state for j in summary.jobs] == ["timed_out", "timed_out"]
    assert summary.jobs[0].error.startswith("job timed out after 0.8s")
    assert elapsed < 10


async def test_server_killed_mid_run_every_job_accounted_for(seed_flows, pages, monkeypatch):
    ports = [free_port() for _ in range(3)]
    servers = []
    with (
        cli_process(
            "runner-server",
            "--port",
            str(ports[0]),
            "--region",
            "us-east-1",
            health_url=f"http://127.0.0.1:{ports[0]}/api/runner/health",
        ) as first,
        cli_process(
            "runner-server",
            "--port",
            str(ports[1]),
            "--region",
            "us-east-1",
            health_url=f"http://127.0.0.1:{ports[1]}/api/runner/health",
        ),
        cli_process(
            "runner-server",
            "--port",
            str(ports[2]),
            "--region",
            "us-east-1",
            health_url=f"http://127.0.0.1:{ports[2]}/api/runner/health",
        ),
    ):
        servers = [
            (f"us-{i}", f"http://127.0.0.1:{p}", "us-east-1", 10) for i, p in enumerate(ports)
        ]
        use_registry(monkeypatch, *servers)
        monkeypatch.setenv("ORCHESTRATOR_RETRY_BACKOFF", "0.05")
        jobs = [
            {"url": pages.url("/slow?s=0.3"), "runners": ["exampleTitleVisibleTest"]}
            for _ in range(24)
        ]

        def kill_soon() -> None:
            # Kill it while it has work in flight, however slowly the run starts on a loaded
            # machine (a fixed delay could kill it before the run probed it).
            health = f"http://127.0.0.1:{ports[0]}/api/runner/health"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(health, timeout=1).json()["inFlight"] > 0:
                        break
                time.sleep(0.02)
            os.kill(first.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        summary, _ = await run_flow(
            seed_flows["orchestrate_runners"], jobs=jobs, options={"maxConcurrency": 6}
        )
        killer.join()
    assert first.poll() is not None  # it really died mid-run
    assert len(summary.jobs) == 24
    assert {j.job_id for j in summary.jobs} == {f"job-{i}" for i in range(1, 25)}
    assert all(j.state == "completed" for j in summary.jobs), [j.error for j in summary.jobs]
    assert summary.summary.passed == 24
    failed_over = [j for j in summary.jobs if j.failovers]
    assert failed_over, "some job must have been in flight on the killed server"
    assert all(j.server != "us-0" for j in failed_over)
    assert summary.summary.failovers == sum(j.failovers for j in summary.jobs)
    # Once one job learned that us-0 was gone, no job was sent there: only jobs that were
    # already on their way to it (at most the window of 6) ever met it failing.
    met_the_dead = [
        j for j in summary.jobs if any(t.server == "us-0" and t.outcome != "ok" for t in j.tries)
    ]
    assert len(met_the_dead) <= 6


async def test_concurrent_runs_never_exceed_server_capacity(seed_flows, pages, monkeypatch):
    plugins = [
        RunnerServerPlugin(RunnerServerConfig(region="us-east-1", capacity=2)) for _ in range(2)
    ]
    peak = [0, 0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for i, plugin in enumerate(plugins):
                peak[i] = max(peak[i], plugin.in_flight)
            time.sleep(0.001)

    with (
        serve_app(Litestar(plugins=[plugins[0]])) as a,
        serve_app(Litestar(plugins=[plugins[1]])) as b,
    ):
        use_registry(monkeypatch, ("cap-a", a, "us-east-1", 2), ("cap-b", b, "us-east-1", 2))
        watcher = threading.Thread(target=watch)
        watcher.start()
        jobs = [{"url": pages.url("/slow?s=0.15"), "runners": ["exampleTitleVisibleTest"]}] * 6
        try:
            outcomes = await asyncio.gather(
                *(
                    run_flow(
                        seed_flows["orchestrate_runners"], jobs=jobs, options={"maxConcurrency": 4}
                    )
                    for _ in range(4)
                )
            )
        finally:
            stop.set()
            watcher.join()
    summaries = [summary for summary, _ in outcomes]
    assert all(j.state == "completed" for s in summaries for j in s.jobs)
    assert sum(s.summary.passed for s in summaries) == 24
    assert peak == [2, 2]  # both saturated, neither beyond its capacity


async def test_large_runs_use_batch_tasks_and_keep_every_job(
    seed_flows, two_regions, pages, monkeypatch
):
    register(monkeypatch, two_regions)
    monkeypatch.setenv("ORCHESTRATOR_TASK_PER_JOB_LIMIT", "3")
    monkeypatch.setenv("ORCHESTRATOR_BATCH_SIZE", "4")
    jobs = [{"url": pages.url("/banner-visible"), "runners": ["cookieBannerVisibleTest"]}] * 10
    summary, flow_run_id = await run_flow(
        seed_flows["orchestrate_runners"], jobs=jobs, options={"maxConcurrency": 3}
    )
    assert [j.job_id for j in summary.jobs] == [f"job-{i}" for i in range(1, 11)]
    assert summary.summary.passed == 10
    names = await task_run_names(flow_run_id)
    batches = [n for n in names if n.startswith("execute_runner_batch")]
    assert batches == [
        "execute_runner_batch[1/3 · jobs job-1…job-4]",
        "execute_runner_batch[2/3 · jobs job-5…job-8]",
        "execute_runner_batch[3/3 · jobs job-9…job-10]",
    ]
    assert not any(n.startswith("select_best_server") for n in names)


async def test_silent_server_costs_the_run_little(seed_flows, two_regions, pages, monkeypatch):
    """A registered server that drops connects, next to a healthy one: 40 jobs."""
    jobs = [
        {"url": pages.url("/slow?s=0.1"), "runners": ["exampleTitleVisibleTest"]} for _ in range(40)
    ]
    options = {"maxConcurrency": 10, "region": "us-east-1"}
    use_registry(monkeypatch, ("us-1", two_regions["us-1"], "us-east-1", 10))
    started = time.monotonic()
    await run_flow(seed_flows["orchestrate_runners"], jobs=jobs, options=options)
    healthy = time.monotonic() - started
    with blackhole() as silent:
        use_registry(
            monkeypatch,
            ("silent", silent, "us-east-1", 10),
            ("us-1", two_regions["us-1"], "us-east-1", 10),
        )
        started = time.monotonic()
        summary, _ = await run_flow(seed_flows["orchestrate_runners"], jobs=jobs, options=options)
        elapsed = time.monotonic() - started
    assert all(j.state == "completed" for j in summary.jobs)
    tries = Counter(t.server for j in summary.jobs for t in j.tries)
    assert tries["silent"] <= 1  # its health probe timed out: it was out before any job
    # Only catches a hang (a silent server would cost its jobs 45 s each), with room for a
    # loaded machine; the count above is the proof.
    assert elapsed < 3 * healthy + 10
