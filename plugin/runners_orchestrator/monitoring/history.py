"""Reading history: each check with its uptime and durations over a window, and its results.

What the API's ``/checks`` routes and ``runners-orchestrator history`` show. The listing
pages over the checks table (one row per check), then computes uptime and nearest-rank
p50/p95 for that page's checks only, from an index-only scan of their results in the window.
One check's results come newest recorded first and page by a cursor, the id of the page's
last row, so a page is an index range scan however deep it is.

Every answer is JSON-ready and camelCase, as on the wire.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from runners_orchestrator.monitoring.store import alerts_table as outbox_table
from runners_orchestrator.monitoring.store import (
    aware,
    checks_table,
    naive_utc,
    results_table,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy import Row
    from sqlalchemy.ext.asyncio import AsyncConnection

    from runners_orchestrator.monitoring.store import HistoryStore

__all__ = [
    "DURATION_PATTERN",
    "STATUSES",
    "CheckFilter",
    "HistoryQueryError",
    "check_exists",
    "check_view",
    "list_checks",
    "parse_duration",
    "parse_time",
    "results_page",
]

STATUSES = ("pass", "fail", "error")
ALERTS_SHOWN = 20
MAX_DURATION = timedelta(days=3660)
"""The longest window or look-back: ten years."""
DURATION_PATTERN = r"^\d+(\.\d+)?[smhdw]$"
"""A duration, as the API documents it: ``30m``, ``24h``, ``7d``, ``2w``."""
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class HistoryQueryError(ValueError):
    """A filter of a history query is wrong; the message names it and what is expected."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


def parse_duration(parameter: str, text: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w``; longer than ten years counts as ten years.

    Raises:
        HistoryQueryError: it is not one.
    """
    match = _DURATION.match(text)
    if not match:
        raise HistoryQueryError(parameter, f"{text!r} is not a duration; write 30m, 24h, 7d or 2w")
    seconds = float(match[1]) * _UNIT[match[2]]
    return timedelta(seconds=min(seconds, MAX_DURATION.total_seconds()))


def parse_time(parameter: str, text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it has no zone), or a duration back from now (``24h``).

    Raises:
        HistoryQueryError: it is neither.
    """
    if _DURATION.match(text):
        return (now or datetime.now(UTC)) - parse_duration(parameter, text)
    # RFC 3339 spellings Python's parser does not take: a lower-case t or z, more than six
    # digits of fraction, a leap second.
    normal = text.strip()
    if len(normal) > 10:  # noqa: PLR2004 - longer than a date: a date and a time
        normal = normal[:10] + normal[10:].upper()
    normal = re.sub(r"(\.\d{6})\d+", r"\1", normal)
    normal = re.sub(r"(T\d\d:\d\d):60", r"\1:59", normal)
    try:
        value = datetime.fromisoformat(normal)
    except ValueError:
        raise HistoryQueryError(
            parameter,
            f"{text!r} is not a time; write an ISO 8601 time (2026-01-31T12:00:00Z) "
            "or a duration back from now (24h)",
        ) from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # beyond the calendar once in UTC: the calendar's edge
        return (
            datetime.min.replace(tzinfo=UTC)
            if value.year < 2000  # noqa: PLR2004
            else datetime.max.replace(tzinfo=UTC)
        )


@dataclass(frozen=True)
class CheckFilter:
    """Which checks a listing shows; unset fields do not filter."""

    suite: str | None = None
    tag: str | None = None
    region: str | None = None
    url: str | None = None
    runner: str | None = None
    status: str | None = None
    """The check's last status."""

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise HistoryQueryError(
                "status", f"{self.status!r} is not a status; expected one of {', '.join(STATUSES)}"
            )


def _iso(value: datetime | None) -> str | None:
    stamped = aware(value)
    return stamped.isoformat() if stamped is not None else None


def _run_url(ui_base: str | None, run_id: str | None) -> str | None:
    return f"{ui_base}/runs/flow-run/{run_id}" if ui_base and run_id else None


def _summary(row: Row[Any], stats: dict[str, Any], window: timedelta) -> dict[str, Any]:
    runs = stats.get("runs", 0)
    passed = stats.get("passed", 0)
    last_failure = None
    if row.last_failure_at is not None:
        last_failure = {
            "at": _iso(row.last_failure_at),
            "error": row.last_failure_error,
            "runId": row.last_failure_flow_run_id,
        }
    return {
        "key": row.key,
        "url": row.url,
        "runner": row.runner,
        "region": row.region,
        "suite": row.suite,
        "tags": json.loads(row.tags),
        "lastStatus": row.last_status,
        "lastAt": _iso(row.last_at),
        "lastError": row.last_error,
        "lastRunId": row.last_flow_run_id,
        "lastFailure": last_failure,
        "failuresInRow": row.failures_in_row,
        "alerting": bool(row.alerting),
        "failingSince": _iso(row.failing_since),
        "windowSeconds": int(window.total_seconds()),
        "runs": runs,
        "passed": passed,
        "uptime": round(100.0 * passed / runs, 3) if runs else None,
        "p50Ms": stats.get("p50"),
        "p95Ms": stats.get("p95"),
    }


def _nearest_rank(ordered: list[int], share: float) -> int:
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@asynccontextmanager
async def _snapshot(store: HistoryStore) -> AsyncIterator[AsyncConnection]:
    """A read connection whose queries all see one state of the store.

    A check's view joins its state (failures in a row, alerting) with its results' counts:
    read apart, a recording committed between the two showed four runs but two failures
    in a row where the store held three. On SQLite the reader's ``BEGIN`` holds one snapshot from
    its first read; PostgreSQL gives one only from REPEATABLE READ.
    """
    async with store.reader.connect() as opened:
        if store.dialect == "postgresql":
            yield await opened.execution_options(isolation_level="REPEATABLE READ")
        else:
            yield opened


async def _stats(
    connection: AsyncConnection, keys: list[str], since: datetime
) -> dict[str, dict[str, Any]]:
    """Runs, passes and nearest-rank p50/p95 duration per check, since ``since``.

    The window's (status, duration) pairs come from a covering index (check, time, status,
    duration) and are summed up here: measured twice as fast as ranking them with window
    functions in SQLite, and the same on PostgreSQL.
    """
    if not keys:
        return {}
    r = results_table.c
    query = select(r.check_key, r.status, r.duration_ms).where(
        r.check_key.in_(keys), r.at >= naive_utc(since)
    )
    runs: dict[str, int] = dict.fromkeys(keys, 0)
    passed: dict[str, int] = dict.fromkeys(keys, 0)
    durations: dict[str, list[int]] = {key: [] for key in keys}
    for key, status, duration in await connection.execute(query):
        runs[key] += 1
        if status == "pass":
            passed[key] += 1
        if duration is not None:
            durations[key].append(duration)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        ordered = sorted(durations[key])
        out[key] = {
            "runs": runs[key],
            "passed": passed[key],
            "p50": _nearest_rank(ordered, 0.5) if ordered else None,
            "p95": _nearest_rank(ordered, 0.95) if ordered else None,
        }
    return out


async def list_checks(
    store: HistoryStore,
    check_filter: CheckFilter,
    *,
    window: timedelta,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """A page of checks (by suite, URL, runner, region) with their stats, and the total."""
    c = checks_table.c
    conditions = []
    if check_filter.suite is not None:
        conditions.append(c.suite == check_filter.suite)
    if check_filter.region is not None:
        conditions.append(c.region == check_filter.region)
    if check_filter.url is not None:
        conditions.append(c.url == check_filter.url)
    if check_filter.runner is not None:
        conditions.append(c.runner == check_filter.runner)
    if check_filter.status is not None:
        conditions.append(c.last_status == check_filter.status)
    if check_filter.tag is not None:
        # Tags are a JSON list of strings: match the quoted element.
        conditions.append(c.tags.contains(json.dumps(check_filter.tag)))
    query = (
        select(checks_table)
        .where(*conditions)
        .order_by(c.suite, c.url, c.runner, c.region, c.key)
        .limit(limit)
        .offset(offset)
    )
    async with _snapshot(store) as connection:
        rows = (await connection.execute(query)).all()
        total = await connection.scalar(
            select(func.count()).select_from(checks_table).where(*conditions)
        )
        stats = await _stats(connection, [row.key for row in rows], datetime.now(UTC) - window)
    return [_summary(row, stats[row.key], window) for row in rows], int(total or 0)


async def check_exists(store: HistoryStore, key: str) -> bool:
    """Whether a check with this key was ever recorded."""
    async with store.reader.connect() as connection:
        found = await connection.scalar(select(checks_table.c.key).where(checks_table.c.key == key))
    return found is not None


async def check_view(store: HistoryStore, key: str, *, window: timedelta) -> dict[str, Any] | None:
    """One check's summary with its recent alerts and their delivery; ``None`` if unknown."""
    async with _snapshot(store) as connection:
        row = (
            await connection.execute(select(checks_table).where(checks_table.c.key == key))
        ).first()
        if row is None:
            return None
        alerts = (
            await connection.execute(
                select(outbox_table)
                .where(outbox_table.c.check_key == key)
                .order_by(outbox_table.c.created_at.desc())
                .limit(ALERTS_SHOWN)
            )
        ).all()
        stats = await _stats(connection, [key], datetime.now(UTC) - window)
    view = _summary(row, stats[key], window)
    view["alerts"] = [
        {
            "id": alert.id,
            "kind": alert.kind,
            "destination": alert.destination_type,
            "delivery": "delivered"
            if alert.delivered_at is not None
            else ("abandoned" if alert.abandoned_at is not None else "pending"),
            "attempts": alert.attempts,
            "lastError": alert.last_error,
            "createdAt": _iso(alert.created_at),
            "deliveredAt": _iso(alert.delivered_at),
            "nextAttemptAt": _iso(alert.next_attempt_at),
        }
        for alert in alerts
    ]
    return view


async def results_page(
    store: HistoryStore,
    key: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
    limit: int = 100,
    cursor: int | None = None,
    ui_base: str | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """One check's results, newest recorded first, and the next page's cursor (``None``: last).

    ``cursor`` is a result id: the page holds the results recorded before it.
    """
    if status is not None and status not in STATUSES:
        raise HistoryQueryError(
            "status", f"{status!r} is not a status; expected one of {', '.join(STATUSES)}"
        )
    r = results_table.c
    conditions = [r.check_key == key]
    if since is not None:
        conditions.append(r.at >= naive_utc(since))
    if until is not None:
        conditions.append(r.at < naive_utc(until))
    if status is not None:
        conditions.append(r.status == status)
    if cursor is not None:
        conditions.append(r.id < cursor)
    query = select(results_table).where(*conditions).order_by(r.id.desc())
    async with store.reader.connect() as connection:
        rows = (await connection.execute(query.limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    page = [
        {
            "at": _iso(row.at),
            "status": row.status,
            "durationMs": row.duration_ms,
            "server": row.server,
            "region": row.region,
            "runId": row.flow_run_id,
            "runState": row.run_state,
            "runUrl": _run_url(ui_base, row.flow_run_id),
            "error": row.error,
            "details": json.loads(row.details) if row.details else None,
            "screenshotUrl": row.screenshot,
        }
        for row in rows
    ]
    next_cursor = int(rows[-1].id) if more and rows else None
    return page, next_cursor
