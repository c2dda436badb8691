"""The JSON shapes shared by the runner servers, the orchestrator and its HTTP API.

Every model speaks camelCase on the wire (``durationMs``) and snake_case in Python
(``duration_ms``); input is accepted in either spelling. ``to_wire()`` gives the JSON
form and leaves out fields that are not set, as the TypeScript ``runners`` servers do
(``runId`` is echoed only when it was sent).

This module imports nothing else of ours: every other layer depends on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "Attempt",
    "AttemptOutcome",
    "ErrorEnvelope",
    "ExecuteRequest",
    "ExecuteResponse",
    "HealthResponse",
    "HttpUrl",
    "JobResult",
    "JobState",
    "OrchestrateOptions",
    "RunSummary",
    "RunnerInfo",
    "RunnerJob",
    "RunnerResult",
    "RunnerSpec",
    "RunnerStatus",
    "SummaryCounts",
    "WireModel",
]

RunnerStatus = Literal["pass", "fail", "error"]
"""Outcome of one runner: the check passed, the check failed, or it could not be run."""

JobState = Literal["completed", "failed", "timed_out"]
"""Outcome of one job: it ran (whatever its checks said), or it was given up and why."""

AttemptOutcome = Literal[
    "ok",
    "refused",
    "connect_timeout",
    "timed_out",
    "busy",
    "server_error",
    "bad_answer",
    "job_error",
]
"""How one attempt of a job on one server ended.

``ok`` results came back; ``refused`` the server could not be connected to (connection
refused, reset, unreachable); ``connect_timeout`` no connection within ``connect_timeout``
(a silent host); ``timed_out`` connected but no answer within ``request_timeout``; ``busy`` a
429 (the server was full); ``server_error`` a 5xx or 408; ``bad_answer`` a 200 whose body was
not the results asked for; ``job_error`` the server said the job itself is wrong.
"""

FAILOVER_OUTCOMES = frozenset(
    {"refused", "connect_timeout", "timed_out", "server_error", "bad_answer"}
)
"""Outcomes after which moving to another server is a failover (a 429 is load spreading)."""

_ALLOWED_SCHEMES = frozenset({"http", "https"})


def _check_http_url(value: str) -> str:
    """Accept only absolute ``http``/``https`` URLs with a host.

    The string is kept as given (no normalisation), so what a client sent is what a
    runner fetches and what the results report.
    """
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a port outside 0-65535
    except ValueError as exc:
        raise ValueError(f"Invalid URL: {exc}") from None
    if parts.scheme.lower() not in _ALLOWED_SCHEMES:
        scheme = parts.scheme or "none"
        raise ValueError(f"Invalid URL: scheme {scheme!r} is not allowed, use http or https")
    if not parts.hostname:
        raise ValueError("Invalid URL: it has no host")
    del port
    return value


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
"""An absolute ``http`` or ``https`` URL, kept as the caller wrote it."""


class WireModel(BaseModel):
    """Base of every wire model: camelCase out, either spelling in."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Leave out fields that are ``None``, however the model is serialised."""
        data = handler(self)
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready camelCase form, without the fields that are unset."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class RunnerJob(WireModel):
    """One unit of orchestration work: run these runners against this URL.

    Fields beyond these (a ``name``, ``tags``, a ticket number) are kept as they were given
    and come back in the job's :class:`JobResult`, so a client can label its jobs.
    """

    model_config = ConfigDict(extra="allow")

    url: HttpUrl
    """The page the runners check."""
    runners: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    """Names of the runners to execute on one runner server, at least one."""
    region: str | None = None
    """Limit the job to servers of this region; any region when unset."""
    input: dict[str, Any] | None = None
    """Extra input passed to every runner (``url`` is always the job's URL)."""
    timeout: int | None = Field(default=None, gt=0)
    """Per-job timeout in milliseconds, as in the TypeScript contract."""


class OrchestrateOptions(WireModel):
    """Keyword options of an orchestration; unset fields take the operator's settings."""

    model_config = ConfigDict(extra="forbid")

    region: str | None = None
    """Run every job without a region of its own in this region."""
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    """Jobs in flight at once (a sliding window, not fixed batches)."""
    load_balancer: str | None = None
    """Balancer type for this run: least-load, round-robin, random, weighted, ..."""
    timeout: int | None = Field(default=None, gt=0)
    """Per-job timeout in milliseconds, retries and failover included."""
    registry: dict[str, Any] | None = None
    """A registry of the caller's own (refused unless the operator allows it)."""


class RunnerResult(WireModel):
    """The result of one runner on one page."""

    name: str
    status: RunnerStatus
    details: dict[str, Any] | None = None
    error_message: str | None = None
    duration_ms: int | None = None


class SummaryCounts(WireModel):
    """Counts of runner results across a run."""

    total: int = 0
    passed: int = 0
    failed: int = 0
    errored: int = 0
    failovers: int = 0
    """Times a job moved to another server because one failed (429s are not counted)."""


class Attempt(WireModel):
    """One attempt of a job on one server, as :attr:`JobResult.tries` lists them."""

    server: str
    outcome: AttemptOutcome
    duration_ms: int
    status: int | None = None
    """The HTTP status, when the server answered."""
    error: str | None = None
    """Why the attempt did not give results."""


class JobResult(WireModel):
    """What happened to one job: where it ran, how often it was tried, and its results.

    ``job`` is the job as it was given, so a result says which URL it is about without
    matching it to the request by position. ``tries`` lists every attempt in order (server,
    outcome, duration), so a failover shows where the job went and why; ``attempts`` is
    their number, kept for clients that read only the count.
    """

    job_id: str
    job: RunnerJob
    server: str | None = None
    region: str | None = None
    state: JobState
    results: list[RunnerResult] = Field(default_factory=list)
    error: str | None = None
    attempts: int = 0
    tries: list[Attempt] = Field(default_factory=list)
    started_at: datetime
    completed_at: datetime
    duration_ms: int

    @property
    def failovers(self) -> int:
        """Times this job moved to another server after one failed."""
        return sum(
            1
            for before, after in zip(self.tries, self.tries[1:], strict=False)
            if before.outcome in FAILOVER_OUTCOMES and after.server != before.server
        )


class RunSummary(WireModel):
    """What an orchestration returns: every job's result and the counts."""

    run_id: str
    state: JobState
    jobs: list[JobResult]
    summary: SummaryCounts
    created_at: datetime
    completed_at: datetime
    duration_ms: int


class RunnerSpec(WireModel):
    """A runner named in an execute request, with input of its own."""

    name: str = Field(min_length=1)
    input: dict[str, Any] | None = None


class ExecuteRequest(WireModel):
    """Body of ``POST /api/runner/execute``.

    Each runner's input is ``{**input, **runner.input, "url": url}``: the top-level ``url``
    wins, as in the TypeScript server.
    """

    url: HttpUrl | None = None
    runners: list[str | RunnerSpec] = Field(min_length=1)
    run_id: str | None = None
    region: str | None = None
    input: dict[str, Any] | None = None

    def runner_specs(self) -> list[RunnerSpec]:
        """Return every requested runner as a spec whose input is fully merged."""
        specs: list[RunnerSpec] = []
        for entry in self.runners:
            spec = RunnerSpec(name=entry) if isinstance(entry, str) else entry
            merged: dict[str, Any] = {**(self.input or {}), **(spec.input or {})}
            if self.url is not None:
                merged["url"] = self.url
            specs.append(RunnerSpec(name=spec.name, input=merged))
        return specs


class ExecuteResponse(WireModel):
    """Body of a successful ``POST /api/runner/execute``: results in request order."""

    region: str | None = None
    run_id: str | None = None
    results: list[RunnerResult]


class RunnerUsageExample(WireModel):
    """The example request in ``/api/runner/info``."""

    url: str
    runners: list[str]


class RunnerUsage(WireModel):
    """How to call a runner server, as ``/api/runner/info`` describes it."""

    method: str = "POST"
    endpoint: str = "/api/runner/execute"
    example: RunnerUsageExample


class RunnerInfo(WireModel):
    """Body of ``GET /api/runner/info``."""

    runners: list[str]
    count: int
    region: str | None = None
    engine: Literal["http", "browser"] | None = None
    """How this server evaluates its runners; absent from TypeScript servers."""
    usage: RunnerUsage | None = None


class HealthResponse(WireModel):
    """Body of ``GET /api/runner/health``: liveness and the server's load right now."""

    status: Literal["ok"] = "ok"
    region: str | None = None
    in_flight: int
    capacity: int
    peak_in_flight: int = 0
    """The most execute requests ever served at once since start: never above ``capacity``."""
    served: int = 0
    """Execute requests served since start (429s not counted)."""
    refused: int = 0
    """Execute requests answered 429 since start."""


class ErrorEnvelope(WireModel):
    """The oRPC error envelope every runner-server error uses (see TS-CONTRACT.md)."""

    defined: bool
    code: str
    status: int
    message: str
    data: Any = None
