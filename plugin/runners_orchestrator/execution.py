"""Execute one job on runner servers: attempts, retries with backoff, failover, deadlines.

This is the logic behind the ``execute_runner`` task, kept free of Prefect so it can be
read and tested on its own. How each answer of a runner server is judged:

================================  =======================  ===============================
answer                            whose fault              what happens
================================  =======================  ===============================
200 with one result per runner    —                        job completed
429 (``Retry-After``)             nobody: server is full   another server of the region,
                                                           or wait ``Retry-After`` and retry
error ``code`` RUNNER_NOT_FOUND,  the job's                job failed at once, never
INPUT_VALIDATION_FAILED,                                   retried (even when it came as
BAD_REQUEST (any status)                                   a 500 from a TypeScript server)
connection refused / reset        the server's (down)      server ejected, fail over
no answer in ``request_timeout``  the server's (hung)      retry, then eject and fail over
other 5xx, 408, bad body          the server's             retry with backoff and jitter,
                                                           then eject and fail over
================================  =======================  ===============================

Bodies are read plain or wrapped as ``{"json": ...}``, the form a server built on oRPC's RPC
handler answers in (see ``_orpc``): the same rules apply to what is inside.

A job is never an exception: whatever happens, it ends as a :class:`JobResult` with
``state`` ``completed``, ``failed`` or ``timed_out`` and, for the last two, the reason.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import httpx
from pydantic import ValidationError

from runners_orchestrator._orpc import unwrap
from runners_orchestrator.balancing import LOCAL_LOAD, LoadBalancer, LocalLoad, candidates_for
from runners_orchestrator.models import ExecuteResponse, JobResult, RunnerJob, RunnerResult

if TYPE_CHECKING:
    from runners_orchestrator.registry import AvailableServer, HealthChecker, ServerPool
    from runners_orchestrator.settings import OrchestratorSettings

__all__ = ["JOB_FAULT_CODES", "JobExecutor", "RetryPolicy", "runner_client"]

JOB_FAULT_CODES = frozenset({"RUNNER_NOT_FOUND", "INPUT_VALIDATION_FAILED", "BAD_REQUEST"})
"""Error codes that mean the job itself is wrong: retrying or failing over cannot help."""

USER_AGENT = "runners-orchestrator/0.1"

_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = WeakKeyDictionary()


def runner_client() -> httpx.AsyncClient:
    """The process's client for runner servers, one per event loop (connection pooling).

    Flow runs have no application lifespan to own a client, so it lives as long as the
    loop that uses it; timeouts are set per request from the job's deadline.
    """
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )
        _clients[loop] = client
    return client


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one server before failing over."""

    max_attempts: int = 3
    backoff: float = 0.2
    backoff_max: float = 5.0
    request_timeout: float = 45.0

    @classmethod
    def from_settings(cls, settings: OrchestratorSettings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
            request_timeout=settings.request_timeout,
        )

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter before retry number ``attempt`` (1-based)."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography


@dataclass(frozen=True)
class _Answer:
    kind: Literal["ok", "job_fault", "server_fault", "server_down", "busy"]
    results: list[RunnerResult] = field(default_factory=list)
    reason: str = ""
    retry_after: float = 0.0


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        # A floor, so that "Retry-After: 0" cannot make every job spin on a full server.
        return max(0.1, float(value))
    except ValueError:
        return 1.0


def _error_code(response: httpx.Response) -> tuple[str | None, str]:
    """The envelope's ``code`` and a readable message, if the body is an error envelope."""
    try:
        body, _ = unwrap(response.json())
    except ValueError:
        return None, response.text[:200]
    if not isinstance(body, dict):
        return None, str(body)[:200]
    code = body.get("code") if isinstance(body.get("code"), str) else None
    message = str(body.get("message") or "")
    data = body.get("data")
    if code == "RUNNER_NOT_FOUND" and isinstance(data, dict):
        message = (
            f"{message}: {data.get('missingRunners')} (available: {data.get('availableRunners')})"
        )
    elif isinstance(data, dict) and isinstance(data.get("issues"), list):
        issues = "; ".join(
            f"{'.'.join(map(str, i.get('path', [])))}: {i.get('message')}"
            for i in data["issues"]
            if isinstance(i, dict)
        )
        runner = f" in runner {data['runnerName']}" if "runnerName" in data else ""
        message = f"{message}{runner}: {issues}"
    return code, message


async def post_job(
    client: httpx.AsyncClient,
    server: AvailableServer,
    job: RunnerJob,
    job_id: str,
    timeout: float,  # noqa: ASYNC109 - a per-request timeout for httpx, not a cancel scope
) -> _Answer:
    """POST the job to the server's ``/execute`` once and judge the answer."""
    body: dict[str, object] = {"url": job.url, "runners": job.runners, "runId": job_id}
    if job.input:
        body["input"] = job.input
    try:
        response = await client.post(f"{server.server.url}/execute", json=body, timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return _Answer("server_down", reason=f"cannot connect: {exc or type(exc).__name__}")
    except httpx.TimeoutException:
        return _Answer("server_fault", reason=f"no answer within {timeout:.1f}s")
    except httpx.TransportError as exc:
        return _Answer("server_fault", reason=f"{type(exc).__name__}: {exc}")
    if response.status_code == httpx.codes.OK:
        return _judge_results(response, job)
    if response.status_code == httpx.codes.TOO_MANY_REQUESTS:
        return _Answer("busy", reason="at capacity (429)", retry_after=_retry_after(response))
    return _judge_error(response)


def _judge_results(response: httpx.Response, job: RunnerJob) -> _Answer:
    try:
        parsed = ExecuteResponse.model_validate(unwrap(response.json())[0])
    except (ValueError, ValidationError):
        return _Answer("server_fault", reason="answered 200 with a body that is not results")
    if len(parsed.results) != len(job.runners):
        return _Answer(
            "server_fault",
            reason=f"answered {len(parsed.results)} results for {len(job.runners)} runners",
        )
    # The TypeScript server names results after its runners (or "unknown"): match them by
    # position and report the names the job asked for.
    results = [
        r.model_copy(update={"name": name})
        for r, name in zip(parsed.results, job.runners, strict=True)
    ]
    return _Answer("ok", results=results)


def _judge_error(response: httpx.Response) -> _Answer:
    code, message = _error_code(response)
    status = response.status_code
    if code in JOB_FAULT_CODES:
        return _Answer("job_fault", reason=f"{code}: {message}")
    if status in {httpx.codes.BAD_REQUEST, httpx.codes.REQUEST_ENTITY_TOO_LARGE}:
        return _Answer("job_fault", reason=f"HTTP {status}: {message}")
    return _Answer("server_fault", reason=f"HTTP {status}{f' {code}' if code else ''}: {message}")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobExecutor:
    """Runs jobs on the servers of one lookup, with retries and failover.

    One executor serves every job of a run (it remembers which servers were full), and any
    number of jobs may run through it at once.
    """

    pool: ServerPool
    balancer: LoadBalancer
    health: HealthChecker
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    client: httpx.AsyncClient | None = None
    local_load: LocalLoad = field(default_factory=lambda: LOCAL_LOAD)
    _busy_until: dict[str, float] = field(default_factory=dict)
    _failed: set[str] = field(default_factory=set)

    def select(self, region: str | None, exclude: set[str] | None = None) -> AvailableServer | None:
        """Choose a server for a job of ``region``, skipping failed, excluded and full ones."""
        now = time.monotonic()
        skip = self._failed | (exclude or set())
        candidates = candidates_for(self.pool.available, region, tuple(skip))
        free = [s for s in candidates if self._busy_until.get(s.id, 0) <= now]
        return self.balancer.select(free)

    def _earliest_free(self, region: str | None, exclude: set[str]) -> float | None:
        """When the first full server of the region may take work again, if any is full."""
        waiting = [
            self._busy_until[s.id]
            for s in candidates_for(self.pool.available, region, tuple(self._failed | exclude))
            if s.id in self._busy_until
        ]
        return min(waiting) if waiting else None

    async def run(
        self,
        job: RunnerJob,
        job_id: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the job's budget, spread over its attempts
        first: AvailableServer | None = None,
    ) -> JobResult:
        """Run ``job`` to a :class:`JobResult`; never raises for what servers do."""
        return await _JobRun(self, job, job_id, timeout).run(first)

    def server_failed(self, server: AvailableServer, reason: str) -> None:
        """No other job of the run should try ``server``; later runs skip it for a while."""
        self.health.eject(server.id, reason)
        self._failed.add(server.id)

    def server_busy(self, server: AvailableServer, retry_after: float) -> None:
        """``server`` is full: leave it alone for ``retry_after`` seconds."""
        self._busy_until[server.id] = time.monotonic() + retry_after


class _JobRun:
    """One job's way through the servers: the bookkeeping of :meth:`JobExecutor.run`."""

    def __init__(self, executor: JobExecutor, job: RunnerJob, job_id: str, timeout: float) -> None:
        self.executor = executor
        self.job = job
        self.job_id = job_id
        self.timeout = timeout
        self.client = executor.client or runner_client()
        self.started_at = _now()
        self.deadline = time.monotonic() + timeout
        self.attempts = 0
        self.tried: list[str] = []
        self.problems: list[str] = []
        self.dead: set[str] = set()

    async def run(self, first: AvailableServer | None) -> JobResult:
        server = first or self.executor.select(self.job.region)
        while True:
            if server is None:
                wake = self.executor._earliest_free(self.job.region, self.dead)  # noqa: SLF001
                if wake is not None:
                    if wake >= self.deadline:
                        # Only full servers are left, and none frees up before the deadline.
                        self.problems.append("every runner server left was at capacity (429)")
                        return self.timed_out()
                    await asyncio.sleep(max(0.0, wake - time.monotonic()))
                    server = self.executor.select(self.job.region, self.dead)
                    continue
                return self.give_up()
            outcome = await self.try_server(server)
            if outcome is not None:
                return outcome
            server = self.executor.select(self.job.region, self.dead)

    async def try_server(self, server: AvailableServer) -> JobResult | None:
        """Attempt the job on ``server``; ``None`` means: go on with another server."""
        if server.id not in self.tried:
            self.tried.append(server.id)
        policy = self.executor.policy
        answer = _Answer("server_fault")
        for attempt in range(1, policy.max_attempts + 1):
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return self.timed_out()
            self.attempts += 1
            with self.executor.local_load.track(server.id):
                timeout = min(policy.request_timeout, remaining)
                answer = await post_job(self.client, server, self.job, self.job_id, timeout)
            if answer.kind == "ok":
                self.executor.health.restore(server.id)
                return self.finish("completed", answer.results, where=server)
            if answer.kind == "job_fault":
                return self.finish("failed", error=answer.reason, where=server)
            if answer.kind == "busy":
                self.executor.server_busy(server, answer.retry_after)
                return None
            self.problems.append(f"{server.id}: {answer.reason}")
            if answer.kind == "server_down" or time.monotonic() >= self.deadline:
                break
            if attempt < policy.max_attempts:
                await asyncio.sleep(min(policy.delay(attempt), self.deadline - time.monotonic()))
        if time.monotonic() >= self.deadline:
            return self.timed_out()
        self.executor.server_failed(server, answer.reason)
        self.dead.add(server.id)
        return None

    def give_up(self) -> JobResult:
        if time.monotonic() >= self.deadline:
            return self.timed_out()
        if not self.tried:
            return self.finish("failed", error=self.executor.pool.why_none(self.job.region))
        return self.finish(
            "failed", error="every runner server failed: " + "; ".join(self.problems)
        )

    def timed_out(self) -> JobResult:
        detail = f"; {'; '.join(self.problems)}" if self.problems else ""
        return self.finish("timed_out", error=f"job timed out after {self.timeout:g}s{detail}")

    def finish(
        self,
        state: Literal["completed", "failed", "timed_out"],
        results: list[RunnerResult] | None = None,
        error: str | None = None,
        where: AvailableServer | None = None,
    ) -> JobResult:
        completed_at = _now()
        if results is None:
            results = [
                RunnerResult(name=name, status="error", error_message=error)
                for name in self.job.runners
            ]
        return JobResult(
            job_id=self.job_id,
            job=self.job,
            server=where.id if where else (self.tried[-1] if self.tried else None),
            region=where.region if where else self.job.region,
            state=state,
            results=results,
            error=error,
            attempts=self.attempts,
            started_at=self.started_at,
            completed_at=completed_at,
            duration_ms=round((completed_at - self.started_at).total_seconds() * 1000),
        )


def job_label(job: RunnerJob, server: AvailableServer | None) -> str:
    """``us-east-1 · example.org``: which job, where, for task-run names."""
    host = urlsplit(job.url).hostname or job.url
    region = (server.region if server else None) or job.region or "any region"
    return f"{region} · {host}"
