"""The seed's two workflows: plain async functions, discovered and served as Prefect flows."""

from __future__ import annotations

from datetime import UTC, datetime

from runners_orchestrator.models import JobResult, OrchestrateOptions, RunnerJob, RunSummary
from runners_orchestrator.steps import (
    aggregate_results,
    dispatch_jobs,
    execute_runner,
    find_available_servers,
    requested_registry,
    select_best_server,
)


async def orchestrate_runners(
    jobs: list[RunnerJob], options: OrchestrateOptions | None = None
) -> RunSummary:
    """Run every job on a healthy runner server of its region and summarise the results.

    Jobs run with at most `maxConcurrency` in flight; a server that fails is left for
    another of the same region; a job that cannot run is reported with the reason.
    """
    options = options or OrchestrateOptions()
    created_at = datetime.now(UTC)
    registry = requested_registry(options)
    servers = await find_available_servers(registry=registry, region=options.region)
    results = await dispatch_jobs(jobs, servers, options)
    return await aggregate_results(results, jobs, created_at=created_at)


async def execute_single_runner(job: RunnerJob) -> JobResult:
    """Run one job on the best runner server of its region and return its result."""
    servers = await find_available_servers(region=job.region)
    server = await select_best_server(servers, region=job.region)
    return await execute_runner(server, job, servers)
