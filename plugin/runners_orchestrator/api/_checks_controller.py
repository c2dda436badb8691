"""The history routes: every check with its uptime and durations, one check, its results.

Mounted by :class:`~runners_orchestrator.api.OrchestratorPlugin` under the route prefix
(``/api/orchestrator/checks``) beside the run routes; it reads the monitoring store only
and never Prefect, so history answers while Prefect is busy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict

from litestar import Controller, get
from litestar.di import Provide
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Schema
from litestar.params import PathParameter, QueryParameter, SkipValidation

from runners_orchestrator.api._errors import RETRY_AFTER_SECONDS, ApiError, exception_handlers
from runners_orchestrator.api._schemas import ErrorBody
from runners_orchestrator.monitoring.history import (
    DURATION_PATTERN,
    CheckFilter,
    HistoryQueryError,
    check_exists,
    check_view,
    list_checks,
    parse_duration,
    parse_time,
    results_page,
)
from runners_orchestrator.monitoring.service import MonitoringService

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from runners_orchestrator.monitoring.store import HistoryStore

__all__ = ["ChecksController"]

KEY = re.compile(r"^[0-9a-f]{16}$")
DEFAULT_WINDOW = "24h"
Monitoring = SkipValidation[MonitoringService]
Status = Literal["pass", "fail", "error"]


class LastFailure(TypedDict):
    """The check's latest failure."""

    at: str
    error: str | None
    runId: str | None


class CheckSummary(TypedDict):
    """One check (URL x runner x region): what it last did and its stats over the window."""

    key: str
    url: str
    runner: str
    region: str | None
    """The region the check asks for; null: any."""
    suite: str | None
    tags: list[str]
    lastStatus: Status
    lastAt: str
    lastError: str | None
    lastRunId: str | None
    lastFailure: LastFailure | None
    failuresInRow: int
    alerting: bool
    failingSince: str | None
    windowSeconds: int
    runs: int
    """Results within the window."""
    passed: int
    uptime: float | None
    """Percent of the window's results that passed; null without results."""
    p50Ms: int | None
    p95Ms: int | None


class CheckList(TypedDict):
    """A page of checks."""

    checks: list[CheckSummary]
    total: int
    limit: int
    offset: int


class AlertDelivery(TypedDict):
    """One alert of the check to one destination, and how its delivery went."""

    id: str
    kind: Literal["failing", "recovered"]
    destination: Literal["webhook", "slack", "event"]
    delivery: Literal["pending", "delivered", "abandoned"]
    attempts: int
    lastError: str | None
    createdAt: str
    deliveredAt: str | None
    nextAttemptAt: str | None


class CheckDetail(CheckSummary):
    """One check, with its latest alerts."""

    alerts: list[AlertDelivery]


class CheckResultBody(TypedDict):
    """One result of a check in one run."""

    at: str
    status: Status
    durationMs: int | None
    server: str | None
    region: str | None
    """Where it ran."""
    runId: str
    runState: str
    runUrl: str | None
    error: str | None
    details: dict[str, Any] | None
    screenshotUrl: str | None


class ResultPage(TypedDict):
    """A page of a check's results, newest recorded first."""

    key: str
    results: list[CheckResultBody]
    nextCursor: int | None
    """Pass it as `cursor` for the next page; null on the last page."""


def _answer(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=description, generate_examples=False)


BAD_QUERY = _answer("A filter is malformed (`details.parameter` names it).")
NO_CHECK = _answer("No check has this key (yet).")
UNAVAILABLE = _answer("The history store cannot be reached; retry after `Retry-After` seconds.")

_TEXT: dict[str, Any] = {"min_length": 1, "max_length": 2000}
WindowQuery = Annotated[
    str,
    QueryParameter(
        description="Window of uptime and percentiles: 30m, 24h, 7d, 2w (at most ten years count).",
        pattern=DURATION_PATTERN,
    ),
]
_TIME_SCHEMA: dict[str, Any] = {
    "one_of": None,
    "type": None,
    "any_of": [
        Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME),
        Schema(type=OpenAPIType.STRING, pattern=DURATION_PATTERN),
    ],
}
KeyPath = Annotated[
    str,
    PathParameter(
        description="The check's key (16 hex digits).", schema_extra={"pattern": KEY.pattern}
    ),
]


def _query_error(exc: HistoryQueryError) -> ApiError:
    return ApiError(400, "invalid_query", str(exc), {"parameter": exc.parameter})


def _store(monitoring: MonitoringService) -> HistoryStore:
    if monitoring.store is None:
        raise ApiError(
            503,
            "history_unavailable",
            f"history is unavailable: {monitoring.problem or 'the store is not open'}; "
            "check ORCHESTRATOR_MONITORING_DATABASE_URL (or Prefect's database URL)",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return monitoring.store


def _window(text: str) -> timedelta:
    try:
        return parse_duration("window", text)
    except HistoryQueryError as exc:
        raise _query_error(exc) from None


def _key(key: str) -> str:
    if not KEY.match(key):
        raise ApiError(
            400,
            "invalid_query",
            f"key: {key!r} is not a check key (16 hex digits, as /checks lists them)",
            {"parameter": "key"},
        )
    return key


class ChecksController(Controller):
    """History per check; mounted at the route prefix by the plugin."""

    path = "/api/orchestrator/checks"
    tags = ("History",)

    @classmethod
    def mounted(cls, prefix: str, monitoring: MonitoringService) -> type[ChecksController]:
        """This controller at ``{prefix}/checks``, reading ``monitoring``'s store."""

        def provide() -> MonitoringService:
            return monitoring

        attributes: dict[str, Any] = {
            "path": f"{prefix.rstrip('/')}/checks",
            "dependencies": {"monitoring": Provide(provide, sync_to_thread=False)},
            "exception_handlers": exception_handlers(),
        }
        return type(cls.__name__, (cls,), attributes)

    @get(
        "/",
        summary="List checks with their uptime",
        description="Every check (URL x runner x region) seen in a run, with its last status, "
        "last failure, and uptime and p50/p95 duration over `window`.",
        cache_control=None,
        responses={400: BAD_QUERY, 503: UNAVAILABLE},
    )
    async def list_checks(
        self,
        *,
        monitoring: Monitoring,
        suite: Annotated[
            str | None, QueryParameter(description="Only this suite.", **_TEXT)
        ] = None,
        tag: Annotated[
            str | None, QueryParameter(description="Only checks with this tag.", **_TEXT)
        ] = None,
        region: Annotated[
            str | None, QueryParameter(description="Only this region.", **_TEXT)
        ] = None,
        url: Annotated[str | None, QueryParameter(description="Only this URL.", **_TEXT)] = None,
        runner: Annotated[
            str | None, QueryParameter(description="Only this runner.", **_TEXT)
        ] = None,
        status: Annotated[
            Status | None, QueryParameter(description="Only checks whose last status is this.")
        ] = None,
        window: WindowQuery = DEFAULT_WINDOW,
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="Checks per page.")] = 100,
        offset: Annotated[
            int, QueryParameter(ge=0, le=10_000_000, description="Checks skipped.")
        ] = 0,
    ) -> CheckList:
        """A page of checks, ordered by suite, URL, runner and region."""
        span = _window(window)
        store = _store(monitoring)
        try:
            check_filter = CheckFilter(suite, tag, region, url, runner, status)
        except HistoryQueryError as exc:
            raise _query_error(exc) from None
        checks, total = await list_checks(
            store, check_filter, window=span, limit=limit, offset=offset
        )
        return {"checks": checks, "total": total, "limit": limit, "offset": offset}  # type: ignore[typeddict-item]

    @get(
        "/{key:str}",
        summary="One check",
        description="The check's summary over `window`, and its latest alerts with their "
        "delivery (pending, delivered, abandoned; attempts and the last error).",
        cache_control=None,
        responses={400: BAD_QUERY, 404: NO_CHECK, 503: UNAVAILABLE},
    )
    async def check(
        self, key: KeyPath, monitoring: Monitoring, window: WindowQuery = DEFAULT_WINDOW
    ) -> CheckDetail:
        """One check, or 404."""
        span = _window(window)
        view = await check_view(_store(monitoring), _key(key), window=span)
        if view is None:
            raise ApiError(404, "check_not_found", f"no check {key}: see GET .../checks")
        return view  # type: ignore[return-value]

    @get(
        "/{key:str}/results",
        summary="A check's results",
        description="The check's results, newest first, filtered by time and status, one "
        "page at a time (`nextCursor`).",
        cache_control=None,
        responses={400: BAD_QUERY, 404: NO_CHECK, 503: UNAVAILABLE},
    )
    async def results(
        self,
        *,
        key: KeyPath,
        monitoring: Monitoring,
        since: Annotated[
            str | None,
            QueryParameter(
                description="From this time (RFC 3339) or this long ago (24h).",
                schema_extra=_TIME_SCHEMA,
            ),
        ] = None,
        until: Annotated[
            str | None,
            QueryParameter(
                description="Before this time (RFC 3339) or this long ago.",
                schema_extra=_TIME_SCHEMA,
            ),
        ] = None,
        status: Annotated[Status | None, QueryParameter(description="Only this status.")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Results per page.")] = 100,
        cursor: Annotated[
            int | None,
            QueryParameter(
                ge=1,
                le=2**63 - 1,
                description="The previous page's nextCursor: results recorded before it.",
            ),
        ] = None,
    ) -> ResultPage:
        """A page of one check's results, or 404 for a check never seen."""
        store = _store(monitoring)
        _key(key)
        try:
            start: datetime | None = parse_time("since", since) if since else None
            end: datetime | None = parse_time("until", until) if until else None
            if not await check_exists(store, key):
                raise ApiError(404, "check_not_found", f"no check {key}: see GET .../checks")
            page, next_cursor = await results_page(
                store,
                key,
                since=start,
                until=end,
                status=status,
                limit=limit,
                cursor=cursor,
                ui_base=monitoring.ui_base,
            )
        except HistoryQueryError as exc:
            raise _query_error(exc) from None
        return {"key": key, "results": page, "nextCursor": next_cursor}  # type: ignore[typeddict-item]
