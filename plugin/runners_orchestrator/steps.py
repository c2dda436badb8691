"""The durable steps of an orchestration, as Prefect tasks.

Named as in the TypeScript design so the Prefect UI reads the same:
``find_available_servers`` → ``select_best_server`` → ``execute_runner`` →
``aggregate_results``. The logic lives in plain modules (``registry``, ``balancing``,
``execution``); the tasks are thin and take plain data (pydantic models), so Prefect can
record them. Tasks use ``cache_policy=NONE``: a check must run again when asked again.

Granularity (measured; see ``docs/architecture.md``): a Prefect task costs a few
milliseconds of bookkeeping and events, more than the HTTP request of a check. Up to
``task_per_job_limit`` jobs, every job gets its own ``execute_runner`` task run, named for
the job and the server chosen for it (the choice is ``select_best_server``'s logic, called
plainly), so each is visible in the UI; above it, jobs run in
``execute_runner_batch`` tasks of ``batch_size`` jobs, under the same sliding window, and
every job's outcome is still in the returned results.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.runtime import task_run as current_task_run

from runners_orchestrator.balancing import LOCAL_LOAD, load_balancer_from_config
from runners_orchestrator.checkpoints import Checkpoint
from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.execution import JobExecutor, RetryPolicy, job_label, runner_client
from runners_orchestrator.last_writes import write_last
from runners_orchestrator.models import (
    JobResult,
    OrchestrateOptions,
    RunnerJob,
    RunSummary,
    SummaryCounts,
)
from runners_orchestrator.registry import HealthChecker, ServerPool, registry_from_config
from runners_orchestrator.reporting import ProgressReporter, publish_summary
from runners_orchestrator.settings import LoadBalancerConfig, RegistryConfig, get_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from runners_orchestrator.balancing import LoadBalancer
    from runners_orchestrator.registry import AvailableServer

__all__ = [
    "aggregate_results",
    "dispatch_jobs",
    "execute_runner",
    "execute_runner_batch",
    "find_available_servers",
    "requested_registry",
    "select_best_server",
]

_health: dict[tuple[float, float], HealthChecker] = {}


def _health_checker() -> HealthChecker:
    """The process's health checker (it remembers ejections across runs)."""
    settings = get_settings()
    key = (settings.health_timeout, settings.ejection_seconds)
    if key not in _health:
        _health[key] = HealthChecker(settings.health_timeout, settings.ejection_seconds)
    return _health[key]


def _balancer(load_balancer: LoadBalancerConfig | str | None) -> LoadBalancer:
    if load_balancer is None:
        config = get_settings().load_balancer
    elif isinstance(load_balancer, str):
        config = LoadBalancerConfig(type=load_balancer)
    else:
        config = load_balancer
    return load_balancer_from_config(config)


def _executor(servers: ServerPool, load_balancer: LoadBalancerConfig | str | None) -> JobExecutor:
    return JobExecutor(
        pool=servers,
        balancer=_balancer(load_balancer),
        health=_health_checker(),
        policy=RetryPolicy.from_settings(get_settings()),
    )


def _job_timeout(job: RunnerJob, timeout_ms: int | None) -> float:
    if job.timeout is not None:
        return job.timeout / 1000
    if timeout_ms is not None:
        return timeout_ms / 1000
    return get_settings().job_timeout


@task(name="find_available_servers", cache_policy=NONE)
async def find_available_servers(
    registry: RegistryConfig | None = None, region: str | None = None
) -> ServerPool:
    """Look up the registered runner servers and probe their health.

    Args:
        registry: the registry to read; the ``registry`` setting when omitted.
        region: only servers of this region; every region when omitted.

    Returns:
        The healthy servers with their reported load, and why the others were left out.
    """
    config = registry or get_settings().registry
    servers = await registry_from_config(config).servers()
    candidates = [s for s in servers if region is None or s.region == region]
    return await _health_checker().check(runner_client(), candidates, LOCAL_LOAD.snapshot(), region)


@task(name="select_best_server", cache_policy=NONE)
async def select_best_server(
    servers: ServerPool,
    load_balancer: LoadBalancerConfig | str | None = None,
    region: str | None = None,
    runners: list[str] | None = None,
) -> AvailableServer | None:
    """Choose the server for a job of ``region`` with the load balancer.

    Only servers that have every runner the job names take part (as their ``/info`` told
    the health probe); the balancer chooses among those.

    Args:
        servers: the result of ``find_available_servers``.
        load_balancer: a balancer type or config; the ``load_balancer`` setting when omitted.
        region: the job's region; any region when omitted.
        runners: the job's runners; any server of the region when omitted.

    Returns:
        The chosen server, or ``None`` when no healthy server of the region has them.
    """
    return _executor(servers, load_balancer).select(region, runners=runners or ())


def requested_registry(options: OrchestrateOptions) -> RegistryConfig | None:
    """The registry a run's caller sent in its options, if the operator allows that.

    Server URLs from a client are a server-side request forgery risk, so they are refused
    unless ``allow_client_registry`` is on (checked here, in the flow, as well as at the
    HTTP API).

    Raises:
        ConfigurationError: the options carry a registry and that is not allowed, or it is
            not a valid registry.
    """
    if options.registry is None:
        return None
    if not get_settings().allow_client_registry:
        raise ConfigurationError(
            "a run may not bring its own registry (server URLs); the operator can allow it "
            "with ORCHESTRATOR_ALLOW_CLIENT_REGISTRY=true"
        )
    return RegistryConfig.model_validate(options.registry)


def _execute_runner_name() -> str:
    parameters = current_task_run.get_parameters()
    job = parameters.get("job")
    if not isinstance(job, RunnerJob):
        return "execute_runner"
    label = job_label(job, parameters.get("server"))
    job_id = parameters.get("job_id")
    return f"execute_runner[{job_id} · {label}]" if job_id else f"execute_runner[{label}]"


@task(name="execute_runner", cache_policy=NONE, task_run_name=_execute_runner_name)
async def execute_runner(
    server: AvailableServer | None,
    job: RunnerJob,
    servers: ServerPool | None = None,
    *,
    job_id: str = "job-1",
    load_balancer: LoadBalancerConfig | str | None = None,
    timeout_ms: int | None = None,
) -> JobResult:
    """Run one job on ``server``, retrying it and failing over within the job's region.

    Args:
        server: where to run it first (from ``select_best_server``); chosen here if ``None``.
        job: the job.
        servers: the lookup to fail over within; just ``server`` when omitted.
        job_id: the job's id within its run (sent to the runner server as ``runId``).
        load_balancer: how a failover server is chosen.
        timeout_ms: the job's timeout when the job has none; the ``job_timeout`` setting
            when neither has one.

    Returns:
        The job's result: ``completed``, or ``failed``/``timed_out`` with the reason.
    """
    pool = servers or ServerPool(available=[server] if server else [])
    executor = _executor(pool, load_balancer)
    result = await executor.run(job, job_id, timeout=_job_timeout(job, timeout_ms), first=server)
    _log_outcome(result)
    return result


def _log_outcome(result: JobResult) -> None:
    """Log a job that could not run on the run's own logger (with its run id in Prefect)."""
    if result.state == "completed":
        return
    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("runners_orchestrator.steps")
    logger.warning(
        "%s (%s) %s after %d attempts: %s",
        result.job_id,
        result.job.url,
        result.state,
        result.attempts,
        result.error,
    )


@task(
    name="execute_runner_batch",
    cache_policy=NONE,
    task_run_name="execute_runner_batch[{label}]",
)
async def execute_runner_batch(
    jobs: list[tuple[str, RunnerJob]],
    servers: ServerPool,
    window: asyncio.Semaphore,
    *,
    progress: ProgressReporter | None = None,
    checkpoint: Checkpoint | None = None,
    label: str = "",
    load_balancer: LoadBalancerConfig | str | None = None,
    timeout_ms: int | None = None,
) -> list[JobResult]:
    """Run a batch of jobs, each through the run's sliding ``window``.

    Args:
        jobs: ``(job_id, job)`` pairs.
        servers: the result of ``find_available_servers``.
        window: the run's semaphore: a job starts when any job of the run ends.
        progress: counts finished jobs for the run page and ``run --wait``.
        checkpoint: keeps each completed job, so that a retry of the run skips it.
        label: shown in the task-run name.
        load_balancer: how servers are chosen.
        timeout_ms: the per-job timeout for jobs without one.

    Returns:
        One result per job, in order.
    """
    del label
    executor = _executor(servers, load_balancer)

    async def one(job_id: str, job: RunnerJob) -> JobResult:
        async with window:
            result = await executor.run(job, job_id, timeout=_job_timeout(job, timeout_ms))
        _log_outcome(result)
        if checkpoint is not None:
            checkpoint.record(result)
        if progress is not None:
            await progress.job_done()
        return result

    return list(await asyncio.gather(*(one(job_id, job) for job_id, job in jobs)))


@task(name="aggregate_results", cache_policy=NONE)
async def aggregate_results(
    results: list[JobResult],
    jobs: list[RunnerJob],
    run_id: str | None = None,
    created_at: datetime | None = None,
) -> RunSummary:
    """Summarise the jobs' results into the run's :class:`RunSummary`.

    Args:
        results: one result per job, in job order.
        jobs: the jobs, to check that every one is accounted for.
        run_id: the run's id; the Prefect flow run's id when omitted.
        created_at: when the run started; now when omitted.

    Returns:
        The summary: ``completed`` when every job ran, ``failed`` otherwise; counts per
        runner result (a job that could not run counts each of its runners as errored).
    """
    summary = summarise(results, jobs, run_id=run_id, created_at=created_at)
    await publish_summary(summary)
    return summary


def summarise(
    results: Sequence[JobResult],
    jobs: Sequence[RunnerJob],
    *,
    run_id: str | None = None,
    created_at: datetime | None = None,
) -> RunSummary:
    """The plain logic of ``aggregate_results``."""
    if len(results) != len(jobs):
        msg = f"{len(results)} results for {len(jobs)} jobs: every job must be accounted for"
        raise ValueError(msg)
    counts = SummaryCounts()
    for result in results:
        for runner in result.results:
            counts.total += 1
            if runner.status == "pass":
                counts.passed += 1
            elif runner.status == "fail":
                counts.failed += 1
            else:
                counts.errored += 1
        counts.failovers += result.failovers
    completed_at = datetime.now(UTC)
    started = created_at or min((r.started_at for r in results), default=completed_at)
    return RunSummary(
        run_id=run_id or str(flow_run.id or uuid.uuid4()),
        state="completed" if all(r.state == "completed" for r in results) else "failed",
        jobs=list(results),
        summary=counts,
        created_at=started,
        completed_at=completed_at,
        duration_ms=round((completed_at - started).total_seconds() * 1000),
    )


async def dispatch_jobs(
    jobs: Sequence[RunnerJob],
    servers: ServerPool,
    options: OrchestrateOptions | None = None,
) -> list[JobResult]:
    """Run every job with at most ``max_concurrency`` in flight; results in job order.

    A sliding window: a job starts as soon as any running job ends, never waiting for a
    batch's slowest member. Picks task granularity by the number of jobs (see module doc).
    """
    options = options or OrchestrateOptions()
    settings = get_settings()
    window = asyncio.Semaphore(options.max_concurrency or settings.max_concurrency)
    if options.region is not None:
        jobs = [j if j.region else j.model_copy(update={"region": options.region}) for j in jobs]
    numbered = [(f"job-{index}", job) for index, job in enumerate(jobs, start=1)]
    checkpoint = Checkpoint.current()
    done = await checkpoint.completed(numbered)  # a retried run skips what it completed
    todo = [(job_id, job) for job_id, job in numbered if job_id not in done]
    progress = ProgressReporter(len(numbered), done=len(done))
    await progress.start()
    try:
        fresh = await _run_jobs(
            todo, servers, options, window=window, progress=progress, checkpoint=checkpoint
        )
    finally:
        # Among the run's last writes, made together as the workflow returns.
        await write_last(checkpoint.close())
        await write_last(progress.finish())
    by_id = {**done, **{result.job_id: result for result in fresh}}
    return [by_id[job_id] for job_id, _ in numbered]


async def _run_jobs(
    numbered: list[tuple[str, RunnerJob]],
    servers: ServerPool,
    options: OrchestrateOptions,
    *,
    window: asyncio.Semaphore,
    progress: ProgressReporter,
    checkpoint: Checkpoint,
) -> list[JobResult]:
    settings = get_settings()
    balancer = options.load_balancer
    if len(numbered) <= settings.task_per_job_limit:

        async def one(job_id: str, job: RunnerJob) -> JobResult:
            async with window:
                # The choice is a plain call, not a task run of its own: a task run costs
                # the Prefect server more than the choice (see docs/benchmarks.md), and the
                # execute_runner task run is named for the server chosen.
                server = await select_best_server.fn(servers, balancer, job.region, job.runners)
                result = await execute_runner(
                    server,
                    job,
                    servers,
                    job_id=job_id,
                    load_balancer=balancer,
                    timeout_ms=options.timeout,
                )
            checkpoint.record(result)
            await progress.job_done()
            return result

        return list(await asyncio.gather(*(one(job_id, job) for job_id, job in numbered)))

    size = settings.batch_size
    batches = [numbered[i : i + size] for i in range(0, len(numbered), size)]
    outcomes = await asyncio.gather(
        *(
            execute_runner_batch(
                batch,
                servers,
                window,
                progress=progress,
                checkpoint=checkpoint,
                label=f"{n}/{len(batches)} · jobs {batch[0][0]}…{batch[-1][0]}",
                load_balancer=balancer,
                timeout_ms=options.timeout,
            )
            for n, batch in enumerate(batches, start=1)
        )
    )
    return [result for batch_results in outcomes for result in batch_results]
