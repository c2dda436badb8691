"""Execute one job on runner servers: attempts, retries with backoff, failover, deadlines.

This is the logic behind the ``execute_runner`` task, kept free of Prefect so it can be
read and tested on its own. How each answer of a runner server is judged:

================================  =======================  ===============================
answer                            whose fault              what happens
================================  =======================  ===============================
200 with one result per runner    —                        job completed
429 (``Retry-After``)             nobody: server is full   another server of the region,
                                                           or wait ``Retry-After`` and retry
error ``code`` RUNNER_NOT_FOUND   the server lacks a runner  what it has is learned from
                                                           ``availableRunners``; fail over
                                                           to a peer that has them, else
                                                           the job fails (never retried)
error ``code``                    the job's                job failed at once, never
INPUT_VALIDATION_FAILED,                                   retried (even when it came as
BAD_REQUEST (any status)                                   a 500 from a TypeScript server)
connection refused / reset, or    the server's (down)      server ejected for every job;
no connection in                                           fail over at once to a peer, or
``connect_timeout``                                        retry it if it has none
no answer in ``request_timeout``  the server's (hung)      fail over at once to a peer
                                                           (server ejected), or retry it
                                                           if it has none
other 5xx, 408, bad body          the server's             retry with backoff and jitter,
                                                           then eject and fail over
================================  =======================  ===============================

What one job learns about a server is kept in the process's :class:`HealthChecker`, so no
other job of the run (or of later runs) is sent to a server that is out. Every attempt is
recorded in the result's ``tries``.

**Capability comes first**: a job is only ever sent to servers of its region that have every
runner it names (or whose runners are unknown), as the health checker learned them; the
balancer, failover and waits for a full server all choose among those. When none of the
region's healthy servers has them, the job fails at once with ``RUNNER_NOT_FOUND`` and a
message saying which server has what.

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
from runners_orchestrator._tls import certifi_tls_context
from runners_orchestrator.balancing import LOCAL_LOAD, LoadBalancer, LocalLoad, candidates_for
from runners_orchestrator.models import (
    Attempt,
    AttemptOutcome,
    ExecuteResponse,
    JobResult,
    RunnerJob,
    RunnerResult,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Collection

    from runners_orchestrator.registry import AvailableServer, HealthChecker, ServerPool
    from runners_orchestrator.settings import OrchestratorSettings

__all__ = [
    "JOB_FAULT_CODES",
    "RUNNER_NOT_FOUND",
    "JobExecutor",
    "RetryPolicy",
    "close_runner_client",
    "runner_client",
]

RUNNER_NOT_FOUND = "RUNNER_NOT_FOUND"
"""The error code of a job whose runners no healthy server of its region has."""

JOB_FAULT_CODES = frozenset({"RUNNER_NOT_FOUND", "INPUT_VALIDATION_FAILED", "BAD_REQUEST"})
"""Error codes that mean the job itself is wrong: retrying or failing over cannot help."""

USER_AGENT = "runners-orchestrator/0.1"

TRIAL_POLL = 0.02
"""How often a job waiting for a server's trial to end looks again (seconds)."""

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
            verify=certifi_tls_context(),  # built once per process, not per run's client
        )
        _clients[loop] = client
    return client


async def close_runner_client() -> None:
    """Close this event loop's runner client, if it has one: its loop is about to end.

    A run's own process closed its connections by exiting; a run on a thread of the serving
    process (``in_process``) ends its loop instead, and the connections of a client left
    open there would stay open until the garbage collector found them (two file
    descriptors per run, measured).
    """
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one server before failing over."""

    max_attempts: int = 3
    backoff: float = 0.2
    backoff_max: float = 5.0
    request_timeout: float = 45.0
    connect_timeout: float = 3.0

    @classmethod
    def from_settings(cls, settings: OrchestratorSettings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
            request_timeout=settings.request_timeout,
            connect_timeout=settings.connect_timeout,
        )

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter before retry number ``attempt`` (1-based)."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography


@dataclass(frozen=True)
class _Answer:
    kind: Literal["ok", "job_fault", "server_fault", "server_down", "server_hung", "busy"]
    outcome: AttemptOutcome
    results: list[RunnerResult] = field(default_factory=list)
    reason: str = ""
    retry_after: float = 0.0
    status: int | None = None
    code: str | None = None
    available: list[str] | None = None
    """With ``RUNNER_NOT_FOUND``: the runners the server said it has."""


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        # A floor, so that "Retry-After: 0" cannot make every job spin on a full server.
        return max(0.1, float(value))
    except ValueError:
        return 1.0


def _available_runners(response: httpx.Response) -> list[str] | None:
    """A ``RUNNER_NOT_FOUND`` envelope's ``data.availableRunners``, if it lists names."""
    try:
        body, _ = unwrap(response.json())
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    available = data.get("availableRunners") if isinstance(data, dict) else None
    if isinstance(available, list) and all(isinstance(name, str) for name in available):
        return available
    return None


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


async def post_job(  # noqa: PLR0911 - one return per kind of answer, as the table lists
    client: httpx.AsyncClient,
    server: AvailableServer,
    job: RunnerJob,
    job_id: str,
    timeout: float,  # noqa: ASYNC109 - a per-request timeout for httpx, not a cancel scope
    *,
    connect_timeout: float | None = None,
) -> _Answer:
    """POST the job to the server's ``/execute`` once and judge the answer.

    ``connect_timeout`` bounds the connection alone (a silent host costs that, not
    ``timeout``); ``timeout`` bounds the rest of the request.
    """
    body: dict[str, object] = {"url": job.url, "runners": job.runners, "runId": job_id}
    if job.input:
        body["input"] = job.input
    connect = timeout if connect_timeout is None else min(connect_timeout, timeout)
    limits = httpx.Timeout(timeout, connect=connect)
    try:
        response = await client.post(f"{server.server.url}/execute", json=body, timeout=limits)
    except httpx.ConnectTimeout:
        return _Answer(
            "server_down", "connect_timeout", reason=f"no connection within {connect:.1f}s"
        )
    except httpx.ConnectError as exc:
        return _Answer("server_down", "refused", reason=f"cannot connect: {exc or 'refused'}")
    except httpx.TimeoutException:
        return _Answer("server_hung", "timed_out", reason=f"no answer within {timeout:.1f}s")
    except httpx.TransportError as exc:
        return _Answer("server_fault", "bad_answer", reason=f"{type(exc).__name__}: {exc}")
    if response.status_code == httpx.codes.OK:
        return _judge_results(response, job)
    if response.status_code == httpx.codes.TOO_MANY_REQUESTS:
        return _Answer(
            "busy",
            "busy",
            reason="at capacity (429)",
            retry_after=_retry_after(response),
            status=response.status_code,
        )
    return _judge_error(response)


def _judge_results(response: httpx.Response, job: RunnerJob) -> _Answer:
    try:
        parsed = ExecuteResponse.model_validate(unwrap(response.json())[0])
    except (ValueError, ValidationError):
        return _Answer(
            "server_fault",
            "bad_answer",
            reason="answered 200 with a body that is not results",
            status=200,
        )
    if len(parsed.results) != len(job.runners):
        return _Answer(
            "server_fault",
            "bad_answer",
            reason=f"answered {len(parsed.results)} results for {len(job.runners)} runners",
            status=200,
        )
    # The TypeScript server names results after its runners (or "unknown"): match them by
    # position and report the names the job asked for.
    results = [
        r.model_copy(update={"name": name})
        for r, name in zip(parsed.results, job.runners, strict=True)
    ]
    return _Answer("ok", "ok", results=results, status=200)


def _judge_error(response: httpx.Response) -> _Answer:
    code, message = _error_code(response)
    status = response.status_code
    if code in JOB_FAULT_CODES:
        available = _available_runners(response) if code == RUNNER_NOT_FOUND else None
        return _Answer(
            "job_fault",
            "job_error",
            reason=f"{code}: {message}",
            status=status,
            code=code,
            available=available,
        )
    if status in {httpx.codes.BAD_REQUEST, httpx.codes.REQUEST_ENTITY_TOO_LARGE}:
        return _Answer("job_fault", "job_error", reason=f"HTTP {status}: {message}", status=status)
    return _Answer(
        "server_fault",
        "server_error",
        reason=f"HTTP {status}{f' {code}' if code else ''}: {message}",
        status=status,
    )


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobExecutor:
    """Runs jobs on the servers of one lookup, with retries and failover.

    Which servers are out (ejected) or on trial is the process's :class:`HealthChecker`'s
    knowledge, shared by every executor, so what one job learns every job uses at once.
    Which servers answered 429 is the executor's, and any number of jobs may run through
    it at once.
    """

    pool: ServerPool
    balancer: LoadBalancer
    health: HealthChecker
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    client: httpx.AsyncClient | None = None
    local_load: LocalLoad = field(default_factory=lambda: LOCAL_LOAD)
    _busy_until: dict[str, float] = field(default_factory=dict)

    def _capable(
        self, region: str | None, exclude: set[str], runners: Collection[str]
    ) -> list[AvailableServer]:
        """Servers of the region, not excluded, that have every runner in ``runners``."""
        return [
            s
            for s in candidates_for(self.pool.available, region, tuple(exclude))
            if self.health.can_run(s, runners)
        ]

    def _candidates(
        self, region: str | None, exclude: set[str], runners: Collection[str] = ()
    ) -> list[AvailableServer]:
        """Servers of the region that are not out, not excluded, and have the runners."""
        return [s for s in self._capable(region, exclude, runners) if not self.health.is_out(s.id)]

    def can_run(self, server: AvailableServer, runners: Collection[str]) -> bool:
        """``server`` has every runner in ``runners`` (or what it has is unknown)."""
        return self.health.can_run(server, runners)

    def usable(self, server: AvailableServer) -> bool:
        """``server`` may take a job now: not out, not full, not on another job's trial."""
        return (
            not self.health.is_out(server.id)
            and not self.health.on_trial(server.id)
            and self._busy_until.get(server.id, 0) <= time.monotonic()
        )

    def select(
        self,
        region: str | None,
        exclude: set[str] | None = None,
        runners: Collection[str] = (),
    ) -> AvailableServer | None:
        """Choose a server for a job of ``region`` naming ``runners``.

        Among the servers that have the runners; not out, excluded, full or on trial.
        """
        candidates = self._candidates(region, exclude or set(), runners)
        return self.balancer.select([s for s in candidates if self.usable(s)])

    def has_peer(
        self,
        server: AvailableServer,
        region: str | None,
        exclude: set[str],
        runners: Collection[str] = (),
    ) -> bool:
        """Another server could take the job (maybe after a wait): failing over makes sense."""
        return any(s.id != server.id for s in self._candidates(region, exclude, runners))

    def next_wake(
        self, region: str | None, exclude: set[str], runners: Collection[str] = ()
    ) -> tuple[float, bool] | None:
        """When a server of the region that is full, on trial or being probed may take work.

        Returns:
            ``(when, full)``: the monotonic time to look again, and whether only full (429)
            servers are left.
        """
        now = time.monotonic()
        waits: list[tuple[float, bool]] = []
        for s in self._capable(region, exclude, runners):
            if self.health.is_out(s.id):
                if self.health.is_probing(s.id):  # it may be back in a moment
                    waits.append((now + TRIAL_POLL, False))
            elif self._busy_until.get(s.id, 0) > now:
                waits.append((self._busy_until[s.id], True))
            elif self.health.on_trial(s.id):
                waits.append((now + TRIAL_POLL, False))
        return min(waits) if waits else None

    def why_none(self, region: str | None, runners: Collection[str] = ()) -> str:
        """Why no server can take a job of ``region`` naming ``runners``.

        ``RUNNER_NOT_FOUND: ...`` with which server has what, when healthy servers of the
        region are there but none has every runner; else why none is healthy, counting
        those ejected during the run.
        """
        healthy = [s for s in self.pool.in_region(region) if not self.health.is_out(s.id)]
        if healthy and not any(self.health.can_run(s, runners) for s in healthy):
            return self.runner_not_found(region, runners)
        out = [
            f"{s.id}: {self.health.why_out(s.id)}"
            for s in self.pool.in_region(region)
            if self.health.is_out(s.id)
        ]
        if not out:
            return self.pool.why_none(region)
        where = f"in region {region!r}" if region else "in any region"
        before = [u for u in self.pool.unavailable if region is None or u.region == region]
        detail = "; ".join(out + [f"{u.id}: {u.reason}" for u in before])
        return f"no healthy runner server {where} ({detail})"

    def runner_not_found(self, region: str | None, runners: Collection[str]) -> str:
        """``RUNNER_NOT_FOUND: no healthy runner server ... has ...: who has what``."""
        where = f"in region {region!r}" if region else "in any region"
        wanted = ", ".join(runners)
        has: list[str] = []
        for s in self.pool.in_region(region):
            known = self.health.runners_of(s.id) if self.health.knows_runners(s.id) else None
            if known is None and s.runners is not None:
                known = frozenset(s.runners)
            listed = (
                f"has {', '.join(sorted(known)) or 'no runners'}"
                if known is not None
                else ("runners unknown")
            )
            why = self.health.why_out(s.id)
            has.append(f"{s.id} {listed}" + (f" (not healthy: {why})" if why else ""))
        for u in self.pool.unavailable:
            if region is None or u.region == region:
                known = self.health.runners_of(u.id)
                listed = f"has {', '.join(sorted(known))}" if known else "runners unknown"
                has.append(f"{u.id} {listed} (not healthy: {u.reason})")
        return (
            f"{RUNNER_NOT_FOUND}: no healthy runner server {where} has every runner the job "
            f"names ({wanted}): {'; '.join(has)}"
        )

    def start_due_probes(self, region: str | None) -> Awaitable[object] | None:
        """Probe again, in the background, the ejected servers of the region that are due.

        Returns the probes to await when the job ends (they take at most the health
        timeout), or ``None`` when none was due or another job probes them already.
        """
        due = [s for s in self.pool.in_region(region) if self.health.claim_probe(s.id)]
        if not due:
            return None
        client = self.client or runner_client()
        return asyncio.ensure_future(
            asyncio.gather(*(self.health.reprobe(client, s.server) for s in due))
        )

    async def run(
        self,
        job: RunnerJob,
        job_id: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the job's budget, spread over its attempts
        first: AvailableServer | None = None,
    ) -> JobResult:
        """Run ``job`` to a :class:`JobResult`; never raises for what servers do."""
        probes = self.start_due_probes(job.region)
        try:
            return await _JobRun(self, job, job_id, timeout).run(first)
        finally:
            if probes is not None:
                await probes

    def server_failed(self, server: AvailableServer, reason: str) -> None:
        """No job should try ``server`` until a probe brings it back."""
        self.health.eject(server.id, reason)

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
        self.tries: list[Attempt] = []
        self.problems: list[str] = []
        self.dead: set[str] = set()
        """Servers this job will not try again: down, or lacking one of its runners."""
        self.runners = list(dict.fromkeys(job.runners))

    async def run(self, first: AvailableServer | None) -> JobResult:
        region = self.job.region
        executor = self.executor
        runners = self.runners
        server = (
            first
            if first is not None and executor.usable(first) and executor.can_run(first, runners)
            else None
        )
        server = server or executor.select(region, runners=runners)
        while True:
            if server is None:
                wake = self.executor.next_wake(region, self.dead, runners)
                if wake is not None:
                    when, full = wake
                    if when >= self.deadline:
                        # Only busy servers are left, and none frees up before the deadline.
                        if full:
                            self.problems.append("every runner server left was at capacity (429)")
                        return self.timed_out()
                    await asyncio.sleep(max(0.0, when - time.monotonic()))
                    server = self.executor.select(region, self.dead, runners)
                    continue
                return self.give_up()
            outcome = await self.try_server(server)
            if outcome is not None:
                return outcome
            server = self.executor.select(region, self.dead, runners)

    async def attempt(self, server: AvailableServer, timeout: float) -> _Answer:  # noqa: ASYNC109
        """One request to ``server``, recorded in ``tries``."""
        executor = self.executor
        started = time.monotonic()
        with executor.local_load.track(server.id), executor.health.attempt(server.id):
            answer = await post_job(
                self.client,
                server,
                self.job,
                self.job_id,
                timeout,
                connect_timeout=executor.policy.connect_timeout,
            )
        if answer.status is not None:
            executor.health.confirm(server.id)  # it answered: its trial is over
        self.tries.append(
            Attempt(
                server=server.id,
                outcome=answer.outcome,
                duration_ms=round((time.monotonic() - started) * 1000),
                status=answer.status,
                error=answer.reason or None,
            )
        )
        return answer

    async def try_server(self, server: AvailableServer) -> JobResult | None:  # noqa: PLR0911 - one per answer
        """Attempt the job on ``server``; ``None`` means: go on with another server."""
        executor = self.executor
        policy = executor.policy
        answer: _Answer | None = None
        for attempt in range(1, policy.max_attempts + 1):
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return self.timed_out()
            answer = await self.attempt(server, min(policy.request_timeout, remaining))
            if answer.kind == "ok":
                executor.health.restore(server.id)
                return self.finish("completed", answer.results, where=server)
            if answer.code == RUNNER_NOT_FOUND:
                return self.lacks_runners(server, answer)
            if answer.kind == "job_fault":
                return self.finish("failed", error=answer.reason, where=server)
            if answer.kind == "busy":
                executor.server_busy(server, answer.retry_after)
                return None
            if self.leave_now(server, answer):
                break
            if attempt < policy.max_attempts:
                await asyncio.sleep(min(policy.delay(attempt), self.deadline - time.monotonic()))
        if time.monotonic() >= self.deadline:
            return self.timed_out()
        executor.server_failed(server, answer.reason if answer else "failed")
        self.dead.add(server.id)
        return None

    def lacks_runners(self, server: AvailableServer, answer: _Answer) -> JobResult | None:
        """``server`` said it lacks a runner: remember what it has; a peer may have them.

        ``None`` means: go on with a peer. Learned for every job of the process, so a server
        whose ``/info`` could not be read costs one such answer, not one per job.
        """
        executor = self.executor
        if answer.available is not None:  # else it did not say: only this job leaves it
            executor.health.learn_runners(server.id, answer.available)
        self.dead.add(server.id)
        if executor.has_peer(server, self.job.region, self.dead, self.runners):
            self.problems.append(f"{server.id}: {answer.reason}")
            return None
        if answer.available is None:
            return self.finish("failed", error=answer.reason, where=server)
        error = executor.runner_not_found(self.job.region, self.runners)
        return self.finish("failed", error=error, where=server)

    def leave_now(self, server: AvailableServer, answer: _Answer) -> bool:
        """Note a failed attempt; ``True`` when the job should not try ``server`` again."""
        problem = f"{server.id}: {answer.reason}"
        if problem not in self.problems:
            self.problems.append(problem)
        if answer.kind == "server_down":
            # Unambiguous: no job should wait on this server until a probe says so.
            self.executor.server_failed(server, answer.reason)
        gone = answer.kind in {"server_down", "server_hung"} or self.executor.health.is_out(
            server.id  # another job found it down: no point retrying it
        )
        if gone and self.executor.has_peer(server, self.job.region, self.dead, self.runners):
            return True  # a peer now beats another wait on this one
        return time.monotonic() >= self.deadline

    def give_up(self) -> JobResult:
        if time.monotonic() >= self.deadline:
            return self.timed_out()
        if not self.tries:
            error = self.executor.why_none(self.job.region, self.runners)
            return self.finish("failed", error=error)
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
            server=where.id if where else (self.tries[-1].server if self.tries else None),
            region=where.region if where else self.job.region,
            state=state,
            results=results,
            error=error,
            attempts=len(self.tries),
            tries=self.tries,
            started_at=self.started_at,
            completed_at=completed_at,
            duration_ms=round((completed_at - self.started_at).total_seconds() * 1000),
        )


def job_label(job: RunnerJob, server: AvailableServer | None) -> str:
    """``us-east-1 · example.org``: which job, where, for task-run names."""
    host = urlsplit(job.url).hostname or job.url
    region = (server.region if server else None) or job.region or "any region"
    return f"{region} · {host}"
