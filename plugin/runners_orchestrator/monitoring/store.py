"""Where history and alerts are kept: tables of our own in Prefect's own database.

No database for users to run: the tables (prefixed ``runners_orchestrator_``) sit beside
Prefect's, in its SQLite file on the embedded default and in its PostgreSQL on the scaled
topology. The URL is Prefect's server database URL unless ``monitoring_database_url`` says
otherwise. Tables are created on first use (idempotent, safe with two processes).

SQLite is shared with the Prefect server, which writes all the time: every write here is one
short transaction opened with ``BEGIN IMMEDIATE`` (it takes the write lock at once, so it
waits ``busy_timeout`` instead of failing when it would have to upgrade a read lock), the
journal is WAL (readers never wait for a writer), and reads go through an engine of their
own with plain deferred transactions. On PostgreSQL the per-check state rows are read
``FOR UPDATE``, so two API replicas recording at once cannot lose an update.

A run is recorded once, whatever the number of recorders: its ``(flow run id, run count)``
goes into ``runners_orchestrator_recorded_runs`` in the same transaction as its results,
its checks' new state and the alerts they raise (the *outbox*), so either all of it is
written or none, and a second recorder's insert of the same run fails and is rolled back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Self

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "TABLE_PREFIX",
    "AlertRule",
    "CheckResult",
    "Destination",
    "HistoryStore",
    "OutboxAlert",
    "RunRecord",
    "Transition",
    "default_database_url",
    "naive_utc",
]

logger = logging.getLogger("runners_orchestrator.monitoring")

TABLE_PREFIX = "runners_orchestrator_"
SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a write waits for the Prefect server's own writes (Prefect waits as long)."""

Status = Literal["pass", "fail", "error"]
TransitionKind = Literal["failing", "recovered"]

metadata = MetaData()

# BigInteger ids on PostgreSQL, SQLite's rowid alias there (only INTEGER autoincrements).
_ID = BigInteger().with_variant(Integer(), "sqlite")

checks_table = Table(
    f"{TABLE_PREFIX}checks",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("url", Text, nullable=False),
    Column("runner", String(200), nullable=False),
    Column("region", String(200)),
    Column("suite", String(100)),
    Column("tags", Text, nullable=False),
    Column("first_at", DateTime, nullable=False),
    Column("last_at", DateTime, nullable=False),
    Column("last_status", String(8), nullable=False),
    Column("last_error", Text),
    Column("last_flow_run_id", String(36)),
    Column("last_failure_at", DateTime),
    Column("last_failure_error", Text),
    Column("last_failure_flow_run_id", String(36)),
    Column("failures_in_row", Integer, nullable=False),
    Column("alerting", Boolean, nullable=False),
    Column("failing_since", DateTime),
    Index(f"ix_{TABLE_PREFIX}checks_suite", "suite"),
)
"""One row per check: what it last did, and its alert state."""

results_table = Table(
    f"{TABLE_PREFIX}results",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("check_key", String(32), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("status", String(8), nullable=False),
    Column("duration_ms", Integer),
    Column("server", String(200)),
    Column("region", String(200)),
    Column("flow_run_id", String(36), nullable=False),
    Column("run_state", String(16), nullable=False),
    Column("error", Text),
    Column("details", Text),
    Column("screenshot", Text),
    Index(f"ix_{TABLE_PREFIX}results_check_id", "check_key", "id"),
    # Covering the stats of a window: an index-only scan.
    Index(f"ix_{TABLE_PREFIX}results_check_at", "check_key", "at", "status", "duration_ms"),
    Index(f"ix_{TABLE_PREFIX}results_at", "at"),
)
"""One row per check per run: the history."""

recorded_runs_table = Table(
    f"{TABLE_PREFIX}recorded_runs",
    metadata,
    Column("flow_run_id", String(36), nullable=False),
    Column("run_count", Integer, nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    PrimaryKeyConstraint("flow_run_id", "run_count"),
    Index(f"ix_{TABLE_PREFIX}recorded_runs_at", "recorded_at"),
)
"""The runs already recorded: the key that makes recording idempotent."""

alerts_table = Table(
    f"{TABLE_PREFIX}alerts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("transition_id", String(36), nullable=False),
    Column("check_key", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("destination_type", String(16), nullable=False),
    Column("destination_url", Text),
    Column("headers", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime),
    Column("delivered_at", DateTime),
    Column("abandoned_at", DateTime),
    Column("last_error", Text),
    Index(f"ix_{TABLE_PREFIX}alerts_due", "next_attempt_at"),
    Index(f"ix_{TABLE_PREFIX}alerts_check", "check_key", "created_at"),
)
"""The outbox: one row per alert and destination, until it is delivered or given up."""

cursors_table = Table(
    f"{TABLE_PREFIX}cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("at", DateTime, nullable=False),
)
"""How far the recorder has read Prefect's finished runs."""


def naive_utc(value: datetime) -> datetime:
    """``value`` in UTC without its zone: how every time is stored (SQLite has no zones)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    # A plain datetime, also from Prefect's pendulum ones (whose replace() is deprecated).
    return datetime(  # noqa: DTZ001 - stored naive, in UTC
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def aware(value: datetime | None) -> datetime | None:
    """A stored time, in UTC with its zone again."""
    return value.replace(tzinfo=UTC) if value is not None else None


def now_utc() -> datetime:
    """Now, as stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def default_database_url() -> str:
    """Prefect's own server database URL, as this process's Prefect settings give it."""
    from prefect.settings import get_current_settings  # noqa: PLC0415 - heavy import

    url = get_current_settings().server.database.connection_url
    if url is None:  # pragma: no cover - Prefect always fills it in
        raise ConfigurationError(
            "Prefect has no database URL: set PREFECT_SERVER_DATABASE_CONNECTION_URL or "
            "ORCHESTRATOR_MONITORING_DATABASE_URL"
        )
    return url.get_secret_value()


@dataclass(frozen=True)
class Destination:
    """Where one alert goes: a webhook, a Slack incoming webhook, or Prefect's event feed."""

    type: Literal["webhook", "slack", "event"]
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AlertRule:
    """How a check of a suite alerts: after how many failures in a row, and to where."""

    alert_after: int
    destinations: tuple[Destination, ...]


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome in one run: a row of history."""

    key: str
    url: str
    runner: str
    region: str | None
    """The region the check asked for (``None``: any); part of the check's identity."""
    suite: str | None
    tags: tuple[str, ...]
    at: datetime
    status: Status
    duration_ms: int | None
    server: str | None
    served_region: str | None
    """Where it ran."""
    flow_run_id: str
    run_state: str
    """The run's end state: ``completed``, ``failed``, ``crashed``."""
    error: str | None = None
    details: dict[str, Any] | None = None
    screenshot: str | None = None
    counts_for_alerts: bool = True
    """False for rows of a run that ended without a result: no evidence about the page."""


@dataclass(frozen=True)
class RunRecord:
    """One finished run to record: its key and its checks' results."""

    flow_run_id: str
    run_count: int
    results: tuple[CheckResult, ...]


@dataclass(frozen=True)
class Transition:
    """A check changed: it started failing (past its threshold), or it recovered."""

    id: str
    kind: TransitionKind
    result: CheckResult
    failures: int
    """Failures in a row when it alerted; the failures it recovered from."""
    since: datetime | None
    """When the check started failing (its first failure in a row)."""


@dataclass(frozen=True)
class OutboxAlert:
    """An alert waiting for delivery to one destination."""

    id: str
    transition_id: str
    check_key: str
    kind: str
    destination: Destination
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: datetime


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (pysqlite's implicit transactions would start deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class HistoryStore:
    """The monitoring tables, through SQLAlchemy's async engine; an async context manager.

    ``HistoryStore(url)`` opens nothing until :meth:`open` (or ``async with``), which also
    creates the tables when they are missing.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_database_url()
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if _is_sqlite(self.url) else "postgresql"

    @property
    def writer(self) -> AsyncEngine:
        """The engine for writes (``BEGIN IMMEDIATE`` on SQLite)."""
        if self._writer is None:
            raise RuntimeError("the history store is not open: use `async with HistoryStore()`")
        return self._writer

    @property
    def reader(self) -> AsyncEngine:
        """The engine for reads (never takes SQLite's write lock)."""
        if self._reader is None:
            raise RuntimeError("the history store is not open: use `async with HistoryStore()`")
        return self._reader

    async def open(self) -> None:
        """Connect and create the tables that are missing.

        Raises:
            ConfigurationError: the URL is not an async SQLAlchemy URL we can use.
        """
        if self._writer is not None:
            return
        try:
            if _is_sqlite(self.url):
                self._writer = _sqlite_engine(self.url, immediate=True)
                self._reader = _sqlite_engine(self.url, immediate=False)
            else:
                self._writer = self._reader = create_async_engine(self.url, pool_pre_ping=True)
        except Exception as exc:  # ArgumentError, a missing driver: one message
            raise ConfigurationError(
                f"monitoring database URL {self.url.split('@')[-1]!r} cannot be used: {exc}; "
                "give an async SQLAlchemy URL (sqlite+aiosqlite:///..., postgresql+asyncpg://...)"
            ) from exc
        await self._create_tables()

    async def _create_tables(self) -> None:
        for attempt in range(3):
            try:
                async with self.writer.begin() as connection:
                    await connection.run_sync(metadata.create_all, checkfirst=True)
            except (OperationalError, ProgrammingError, IntegrityError):
                # Another process created them between our check and our CREATE.
                if attempt == 2:  # noqa: PLR2004
                    raise
                await asyncio.sleep(0.2)
            else:
                return

    async def aclose(self) -> None:
        """Close the engines."""
        engines = {id(e): e for e in (self._writer, self._reader) if e is not None}
        self._writer = self._reader = None
        for engine in engines.values():
            await engine.dispose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # -- the recorder's cursor ---------------------------------------------------------

    async def cursor(self, name: str) -> datetime | None:
        """Where the reader ``name`` stopped, if it ever ran."""
        async with self.reader.connect() as connection:
            value = await connection.scalar(
                select(cursors_table.c.at).where(cursors_table.c.name == name)
            )
        return aware(value)

    async def set_cursor(self, name: str, at: datetime) -> None:
        """Move the reader ``name`` to ``at`` (never backwards)."""
        at = naive_utc(at)
        async with self.writer.begin() as connection:
            current = await connection.scalar(
                select(cursors_table.c.at).where(cursors_table.c.name == name)
            )
            if current is None:
                await connection.execute(insert(cursors_table).values(name=name, at=at))
            elif at > current:
                await connection.execute(
                    update(cursors_table).where(cursors_table.c.name == name).values(at=at)
                )

    # -- recording ---------------------------------------------------------------------

    async def recorded(self, runs: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of ``runs`` (flow run id, run count) are recorded already."""
        wanted = list(runs)
        if not wanted:
            return set()
        ids = sorted({run_id for run_id, _ in wanted})
        async with self.reader.connect() as connection:
            rows = await connection.execute(
                select(recorded_runs_table.c.flow_run_id, recorded_runs_table.c.run_count).where(
                    recorded_runs_table.c.flow_run_id.in_(ids)
                )
            )
            found = {(str(r[0]), int(r[1])) for r in rows}
        return found & set(wanted)

    async def record_run(
        self,
        flow_run_id: str,
        run_count: int,
        results: Sequence[CheckResult],
        rule_of: Callable[[str | None], AlertRule | None],
        payload_of: Callable[[Transition], dict[str, Any]],
    ) -> list[Transition] | None:
        """Record one run's results, move its checks' alert state, queue the alerts.

        All in one transaction. ``rule_of(suite)`` says how a suite's checks alert
        (``None``: they do not: ad-hoc runs only feed history); ``payload_of`` gives what
        is stored for each transition's delivery.

        Returns:
            The transitions, or ``None`` when another recorder recorded this run first.
        """
        run = RunRecord(flow_run_id, run_count, tuple(results))
        return (await self.record_runs([run], rule_of, payload_of))[0]

    async def record_runs(
        self,
        runs: Sequence[RunRecord],
        rule_of: Callable[[str | None], AlertRule | None],
        payload_of: Callable[[Transition], dict[str, Any]],
    ) -> list[list[Transition] | None]:
        """Record several runs, each as :meth:`record_run` does; one outcome per run.

        On SQLite they share one write transaction, each run in a savepoint of its own (a
        run recorded elsewhere rolls back alone): a burst of finished runs costs the Prefect
        server one wait for the write lock, not one per run. On PostgreSQL each run is its
        own transaction, so two replicas never lock check rows in crossing orders.
        """
        if self.dialect != "sqlite":
            outcomes: list[list[Transition] | None] = []
            for run in runs:
                try:
                    async with self.writer.begin() as connection:
                        outcomes.append(await self._record(connection, run, rule_of, payload_of))
                except IntegrityError:
                    outcomes.append(None)
            return outcomes
        outcomes = []
        async with self.writer.begin() as connection:
            for run in runs:
                try:
                    async with connection.begin_nested():
                        outcomes.append(await self._record(connection, run, rule_of, payload_of))
                except IntegrityError:
                    outcomes.append(None)
        return outcomes

    async def _record(
        self,
        connection: AsyncConnection,
        run: RunRecord,
        rule_of: Callable[[str | None], AlertRule | None],
        payload_of: Callable[[Transition], dict[str, Any]],
    ) -> list[Transition]:
        now = now_utc()
        results = run.results
        transitions: list[Transition] = []
        await connection.execute(
            insert(recorded_runs_table).values(
                flow_run_id=run.flow_run_id, run_count=run.run_count, recorded_at=now
            )
        )
        if results:
            await connection.execute(insert(results_table), [_result_row(r) for r in results])
        states = await self._lock_checks(connection, {r.key for r in results})
        for result in sorted(results, key=lambda r: r.at):
            transition = _advance(states, result, rule_of(result.suite))
            if transition is not None:
                transitions.append(transition)
        await self._write_checks(connection, states)
        rows = [
            _outbox_row(t, d, payload_of(t), now)
            for t in transitions
            for d in _destinations(rule_of(t.result.suite))
        ]
        if rows:
            await connection.execute(insert(alerts_table), rows)
        return transitions

    async def _lock_checks(
        self, connection: AsyncConnection, keys: set[str]
    ) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        query = select(checks_table).where(checks_table.c.key.in_(sorted(keys)))
        if self.dialect == "postgresql":
            query = query.with_for_update()
        rows = await connection.execute(query)
        return {row.key: {**row._asdict(), "_exists": True} for row in rows}

    @staticmethod
    async def _write_checks(connection: AsyncConnection, states: dict[str, dict[str, Any]]) -> None:
        for key, state in states.items():
            values = {k: v for k, v in state.items() if not k.startswith("_")}
            if state.get("_exists"):
                await connection.execute(
                    update(checks_table).where(checks_table.c.key == key).values(values)
                )
            else:
                await connection.execute(insert(checks_table).values(values))

    # -- the outbox --------------------------------------------------------------------

    async def due_alerts(self, limit: int = 20) -> list[OutboxAlert]:
        """Alerts whose next delivery attempt is due, oldest first."""
        query = (
            select(alerts_table)
            .where(alerts_table.c.next_attempt_at <= now_utc())
            .order_by(alerts_table.c.next_attempt_at, alerts_table.c.created_at)
            .limit(limit)
        )
        async with self.reader.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [
            OutboxAlert(
                id=row.id,
                transition_id=row.transition_id,
                check_key=row.check_key,
                kind=row.kind,
                destination=Destination(
                    type=row.destination_type,
                    url=row.destination_url,
                    headers=json.loads(row.headers),
                ),
                payload=json.loads(row.payload),
                attempts=row.attempts,
                next_attempt_at=row.next_attempt_at,
            )
            for row in rows
        ]

    async def claim(self, alert: OutboxAlert, lease: timedelta) -> bool:
        """Take ``alert`` for one attempt; ``False`` when another process took it first."""
        async with self.writer.begin() as connection:
            claimed = await connection.execute(
                update(alerts_table)
                .where(
                    alerts_table.c.id == alert.id,
                    alerts_table.c.next_attempt_at == alert.next_attempt_at,
                )
                .values(next_attempt_at=now_utc() + lease)
            )
        return claimed.rowcount == 1

    async def delivered(self, alert: OutboxAlert) -> None:
        """``alert`` reached its destination: it leaves the queue."""
        async with self.writer.begin() as connection:
            await connection.execute(
                update(alerts_table)
                .where(alerts_table.c.id == alert.id)
                .values(
                    delivered_at=now_utc(),
                    next_attempt_at=None,
                    attempts=alert.attempts + 1,
                    last_error=None,
                )
            )

    async def failed(self, alert: OutboxAlert, error: str, retry_in: timedelta | None) -> None:
        """An attempt failed: try again in ``retry_in``, or give up (``None``)."""
        now = now_utc()
        values: dict[str, Any] = {"attempts": alert.attempts + 1, "last_error": error[:2000]}
        if retry_in is None:
            values |= {"next_attempt_at": None, "abandoned_at": now}
        else:
            values["next_attempt_at"] = now + retry_in
        async with self.writer.begin() as connection:
            await connection.execute(
                update(alerts_table).where(alerts_table.c.id == alert.id).values(values)
            )

    # -- retention ---------------------------------------------------------------------

    async def prune(self, before: datetime, batch: int = 5000) -> int:
        """Delete results, recorded runs and settled alerts older than ``before``.

        In batches, each its own short transaction, so a large backlog never holds
        SQLite's write lock for long. Check rows stay: they are the checks' current state.
        """
        cutoff = naive_utc(before)
        deleted = 0
        while True:
            async with self.writer.begin() as connection:
                ids = select(results_table.c.id).where(results_table.c.at < cutoff).limit(batch)
                result = await connection.execute(
                    delete(results_table).where(results_table.c.id.in_(ids.scalar_subquery()))
                )
            deleted += result.rowcount or 0
            if (result.rowcount or 0) < batch:
                break
        async with self.writer.begin() as connection:
            await connection.execute(
                delete(recorded_runs_table).where(recorded_runs_table.c.recorded_at < cutoff)
            )
            await connection.execute(
                delete(alerts_table).where(
                    alerts_table.c.created_at < cutoff, alerts_table.c.next_attempt_at.is_(None)
                )
            )
        return deleted


def _result_row(result: CheckResult) -> dict[str, Any]:
    return {
        "check_key": result.key,
        "at": naive_utc(result.at),
        "status": result.status,
        "duration_ms": result.duration_ms,
        "server": result.server,
        "region": result.served_region,
        "flow_run_id": result.flow_run_id,
        "run_state": result.run_state,
        "error": result.error,
        "details": json.dumps(result.details) if result.details is not None else None,
        "screenshot": result.screenshot,
    }


def _advance(
    states: dict[str, dict[str, Any]], result: CheckResult, rule: AlertRule | None
) -> Transition | None:
    """Move one check's state by one result; the transition it makes, if any.

    A failure (``fail`` or ``error``) adds one to the failures in a row; the check alerts
    when that count reaches the rule's ``alert_after``, once. A pass ends the streak and,
    if the check was alerting, is its recovery. Rows without evidence (the run ended with
    no result) change only what the check last did.
    """
    at = naive_utc(result.at)
    state = states.get(result.key)
    if state is None:
        state = states[result.key] = {
            "key": result.key,
            "first_at": at,
            "failures_in_row": 0,
            "alerting": False,
            "failing_since": None,
            "last_failure_at": None,
            "last_failure_error": None,
            "last_failure_flow_run_id": None,
        }
    if state.get("last_at") is not None and at < state["last_at"]:
        return None  # an older run recorded late: history only, not the state
    state |= {
        "url": result.url,
        "runner": result.runner,
        "region": result.region,
        "suite": result.suite,
        "tags": json.dumps(list(result.tags)),
        "last_at": at,
        "last_status": result.status,
        "last_error": result.error,
        "last_flow_run_id": result.flow_run_id,
    }
    if not result.counts_for_alerts:
        return None
    if result.status != "pass":
        state["failures_in_row"] += 1
        state |= {
            "last_failure_at": at,
            "last_failure_error": result.error,
            "last_failure_flow_run_id": result.flow_run_id,
        }
        if state["failures_in_row"] == 1:
            state["failing_since"] = at
        if (
            rule is not None
            and not state["alerting"]
            and state["failures_in_row"] >= rule.alert_after
        ):
            state["alerting"] = True
            return Transition(
                str(uuid.uuid4()),
                "failing",
                result,
                state["failures_in_row"],
                state["failing_since"],
            )
        return None
    failures = state["failures_in_row"]
    was_alerting = state["alerting"]
    since = state["failing_since"]
    state |= {"failures_in_row": 0, "alerting": False, "failing_since": None}
    if was_alerting:
        return Transition(str(uuid.uuid4()), "recovered", result, failures, since)
    return None


def _destinations(rule: AlertRule | None) -> tuple[Destination, ...]:
    if rule is None:
        return ()
    return (Destination(type="event"), *rule.destinations)


def _outbox_row(
    transition: Transition, destination: Destination, payload: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "transition_id": transition.id,
        "check_key": transition.result.key,
        "kind": transition.kind,
        "destination_type": destination.type,
        "destination_url": destination.url,
        "headers": json.dumps(destination.headers),
        "payload": json.dumps(payload),
        "created_at": now,
        "attempts": 0,
        "next_attempt_at": now,
    }
