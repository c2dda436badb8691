"""The recorder: reads finished runs of our workflows from Prefect into history.

It is a consumer of run results, nothing more: the flows do not know it exists. Every
``monitoring_poll_seconds`` it asks Prefect for flow runs tagged ``runners-orchestrator``
(every run of a generated deployment, suites included) that reached a final state since its
cursor, reads each run's recorded :class:`~runners_orchestrator.models.RunSummary` (the
result artifact the API reads too), and records one row per job x runner: a *check*.

What a run gives:

- completed, with a summary: each runner result as it is; a job that could not run (no
  server, timed out) gives each of its runners an ``error`` row with the job's error;
- failed or crashed with no result: an ``error`` row per check of its parameters, with the
  run's state message. Such rows are history only: a run that died says nothing about the
  pages, so they neither count towards nor reset an alert (Prefect's own flow-run
  automations report a crashed run);
- cancelled: nothing (someone stopped it on purpose).

The cursor trails the newest end time by :data:`OVERLAP` (a run may be committed a moment
after one that ended later); runs seen twice are skipped by their recorded key, and a run
is recorded once even with several recorders (see :mod:`.store`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from pydantic import ValidationError

from runners_orchestrator.models import JobResult, RunnerJob, RunSummary
from runners_orchestrator.monitoring.store import (
    AlertRule,
    CheckResult,
    Destination,
    RunRecord,
    Status,
    Transition,
)
from runners_orchestrator.monitoring.suites import (
    DEFAULT_SUITE_PATTERNS,
    SUITE_TAG_PREFIX,
    check_key,
    scan_suites,
)
from runners_orchestrator.results import is_missing, read_result

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

    from runners_orchestrator.monitoring.store import HistoryStore
    from runners_orchestrator.monitoring.suites import Suite

__all__ = [
    "OVERLAP",
    "RECORDED_TAG",
    "Recorder",
    "SuiteRules",
    "checks_of_run",
    "transition_payload",
    "ui_base_url",
]

logger = logging.getLogger("runners_orchestrator.monitoring")

RECORDED_TAG = "runners-orchestrator"
"""Runs with this tag are recorded: the tag of every generated deployment (and its runs)."""
CURSOR = "recorder"
OVERLAP = timedelta(seconds=60)
FIRST_LOOKBACK = timedelta(hours=1)
"""On its very first start the recorder reads runs that ended in the hour before."""
PAGE = 200
BATCH = 50
"""Runs recorded per write transaction (SQLite)."""


def ui_base_url(api_url: str) -> str:
    """The Prefect UI's base URL: ``PREFECT_UI_URL``, else the API's address without /api."""
    from prefect.settings import PREFECT_UI_URL  # noqa: PLC0415

    base = PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")
    return str(base).rstrip("/")


def _status(value: str) -> Status:
    if value == "pass":
        return "pass"
    return "fail" if value == "fail" else "error"


def _screenshot(details: dict[str, Any] | None, server_url: str | None) -> str | None:
    shot = (details or {}).get("screenshot")
    if not isinstance(shot, str) or not shot:
        return None
    # The browser engine gives absolute URLs; a relative one is the runner server's own.
    return urljoin(f"{server_url.rstrip('/')}/", shot) if server_url else shot


def _suite_of(job: RunnerJob, run_tags: list[str]) -> tuple[str | None, tuple[str, ...]]:
    extra = job.model_extra or {}
    suite = extra.get("suite")
    if not isinstance(suite, str):
        suite = next(
            (t.removeprefix(SUITE_TAG_PREFIX) for t in run_tags if t.startswith(SUITE_TAG_PREFIX)),
            None,
        )
    tags = extra.get("tags")
    job_tags = tuple(str(t) for t in tags) if isinstance(tags, list) else ()
    return suite, job_tags


def _jobs_of(value: Any) -> list[JobResult] | None:
    """The job results in a workflow's return value: a RunSummary, or one JobResult."""
    if not isinstance(value, dict):
        return None
    try:
        if "jobs" in value and "summary" in value:
            return RunSummary.model_validate(value).jobs
        if "jobId" in value and "job" in value:
            return [JobResult.model_validate(value)]
    except ValidationError:
        return None
    return None


def _parameter_jobs(flow_run: FlowRun) -> list[RunnerJob]:
    raw = flow_run.parameters.get("jobs")
    if raw is None and "job" in flow_run.parameters:
        raw = [flow_run.parameters["job"]]
    jobs: list[RunnerJob] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            jobs.append(RunnerJob.model_validate(item))
        except ValidationError:
            continue
    return jobs


def checks_of_run(
    flow_run: FlowRun, value: Any, server_urls: dict[str, str] | None = None
) -> list[CheckResult]:
    """The check results of one finished run (see the module docstring for what counts).

    Args:
        flow_run: the run, in its final state.
        value: its recorded return value (``read_result``), missing or not.
        server_urls: runner server id -> base URL, to make relative screenshot URLs absolute.
    """
    state = flow_run.state.type.value.lower() if flow_run.state else "crashed"
    ended = flow_run.end_time or datetime.now(UTC)
    run_id = str(flow_run.id)
    tags = list(flow_run.tags or [])
    jobs = None if is_missing(value) else _jobs_of(value)
    out: list[CheckResult] = []
    if jobs is None:
        if state in {"completed", "cancelled"}:
            return []  # a workflow of another shape, or stopped on purpose
        message = (flow_run.state.message if flow_run.state else None) or state
        for job in _parameter_jobs(flow_run):
            of_job = partial(_check, job, tags, run_id, state)
            out.extend(
                of_job(
                    runner,
                    at=ended,
                    status="error",
                    duration_ms=None,
                    server=None,
                    served_region=None,
                    error=f"the run {state} without a result: {message}",
                    counts_for_alerts=False,
                )
                for runner in job.runners
            )
        return out
    for job_result in jobs:
        job = job_result.job
        of_job = partial(_check, job, tags, run_id, state)
        by_name = {r.name: r for r in job_result.results}
        server_url = (server_urls or {}).get(job_result.server or "")
        for runner in job.runners:
            result = by_name.get(runner)
            status = _status(result.status) if result else "error"
            error = None
            if result is None:
                error = job_result.error or f"the job {job_result.state} without this runner"
            elif result.status != "pass":
                error = result.error_message or _failing_detail(result.details)
            out.append(
                of_job(
                    runner,
                    at=job_result.completed_at,
                    status=status,
                    duration_ms=result.duration_ms if result else None,
                    server=job_result.server,
                    served_region=job_result.region,
                    error=error,
                    details=result.details if result else None,
                    screenshot=_screenshot(result.details if result else None, server_url),
                )
            )
    return out


def _check(
    job: RunnerJob, run_tags: list[str], run_id: str, run_state: str, runner: str, **outcome: Any
) -> CheckResult:
    """One check's result: what identifies it (job, runner, suite, run) and its ``outcome``."""
    suite, tags = _suite_of(job, run_tags)
    return CheckResult(
        key=check_key(job.url, runner, job.region),
        url=job.url,
        runner=runner,
        region=job.region,
        suite=suite,
        tags=tags,
        flow_run_id=run_id,
        run_state=run_state,
        **outcome,
    )


def _failing_detail(details: dict[str, Any] | None) -> str | None:
    if not details:
        return "the check did not pass"
    shown = {k: v for k, v in details.items() if k != "screenshot"}
    return f"the check did not pass: {shown}" if shown else "the check did not pass"


def transition_payload(transition: Transition, ui_base: str | None) -> dict[str, Any]:
    """What an alert says, stored with it in the outbox (camelCase, JSON)."""
    result = transition.result
    since = transition.since.replace(tzinfo=UTC).isoformat() if transition.since else None
    at = result.at if result.at.tzinfo else result.at.replace(tzinfo=UTC)
    return {
        "alertId": transition.id,
        "event": f"check.{transition.kind}",
        "check": {
            "key": result.key,
            "url": result.url,
            "runner": result.runner,
            "region": result.region,
            "suite": result.suite,
            "tags": list(result.tags),
        },
        "status": result.status,
        "error": result.error,
        "failures": transition.failures,
        "failingSince": since,
        "occurredAt": at.isoformat(),
        "server": result.server,
        "servedRegion": result.served_region,
        "runId": result.flow_run_id,
        "runUrl": f"{ui_base}/runs/flow-run/{result.flow_run_id}" if ui_base else None,
        "screenshotUrl": result.screenshot,
    }


@dataclass
class SuiteRules:
    """How each suite's checks alert, from the project's suite files (re-read as they change).

    A suite file that turns invalid keeps its last valid rules (and is logged); a suite that
    is gone alerts with the default threshold to Prefect's event feed only.
    """

    project_root: Path | None
    default_alert_after: int
    patterns: Sequence[str] = DEFAULT_SUITE_PATTERNS
    """The ``suites`` setting: where the suite files are."""
    reload_seconds: float = 2.0
    _suites: dict[str, Suite] = field(default_factory=dict)
    _loaded_at: float = -1e9
    _problems: list[str] = field(default_factory=list)

    def _reload(self) -> None:
        from runners_orchestrator.settings import find_project_root  # noqa: PLC0415

        now = time.monotonic()
        if now - self._loaded_at < self.reload_seconds:
            return
        self._loaded_at = now
        scan = scan_suites(find_project_root(self.project_root), self.patterns)
        kept = {name: self._suites[name] for name in scan.broken if name in self._suites}
        self._suites = {**kept, **scan.suites}
        if scan.problems and scan.problems != self._problems:
            logger.warning(
                "suite files with problems (their last valid version alerts): %s",
                "; ".join(scan.problems),
            )
        self._problems = scan.problems

    def rule_of(self, suite: str | None) -> AlertRule | None:
        """The alert rule of ``suite``'s checks; ``None`` for checks of no suite."""
        if suite is None:
            return None
        self._reload()
        known = self._suites.get(suite)
        if known is None:
            return AlertRule(self.default_alert_after, ())
        destinations = tuple(
            Destination(type=d.type, url=d.url, headers=dict(d.headers)) for d in known.alerts
        )
        return AlertRule(known.alert_after or self.default_alert_after, destinations)


@dataclass
class Recorder:
    """Polls Prefect for finished runs and records them; one per API process."""

    store: HistoryStore
    client: PrefectClient
    rules: SuiteRules
    poll_seconds: float = 1.0
    ui_base: str | None = None
    server_urls: dict[str, str] = field(default_factory=dict)
    on_transitions: Callable[[], None] | None = None
    """Called after a run raised alerts (wakes the delivery loop)."""

    async def run_forever(self) -> None:
        """Record until cancelled; an error is logged and the next poll tries again."""
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("recording finished runs failed; trying again")
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> int:
        """Record every run that finished since the cursor; return how many were new."""
        from prefect.client.schemas.filters import (  # noqa: PLC0415
            FlowRunFilter,
            FlowRunFilterEndTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType  # noqa: PLC0415
        from prefect.client.schemas.sorting import FlowRunSort  # noqa: PLC0415

        cursor = await self.store.cursor(CURSOR)
        since = (cursor or datetime.now(UTC) - FIRST_LOOKBACK + OVERLAP) - OVERLAP
        final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
        flow_filter = FlowRunFilter(
            tags=FlowRunFilterTags(all_=[RECORDED_TAG]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=final)),
            end_time=FlowRunFilterEndTime(after_=since),
        )
        runs: list[FlowRun] = []
        offset = 0
        while True:
            page = await self.client.read_flow_runs(
                flow_run_filter=flow_filter,
                sort=FlowRunSort.END_TIME_DESC,
                limit=PAGE,
                offset=offset,
            )
            runs.extend(page)
            if len(page) < PAGE:
                break
            offset += PAGE
        runs.sort(key=lambda r: r.end_time or since)
        done = await self.store.recorded((str(r.id), r.run_count) for r in runs)
        fresh = [r for r in runs if (str(r.id), r.run_count) not in done]
        new = 0
        for start in range(0, len(fresh), BATCH):
            new += await self.record(*fresh[start : start + BATCH])
        newest = max((r.end_time for r in runs if r.end_time), default=None)
        # Written only when it moves: an idle recorder never takes SQLite's write lock.
        if newest is not None and (cursor is None or newest > cursor):
            await self.store.set_cursor(CURSOR, newest)
        elif newest is None and cursor is None:
            await self.store.set_cursor(CURSOR, since + OVERLAP)
        return new

    async def record(self, *flow_runs: FlowRun) -> int:
        """Record finished runs (one write transaction on SQLite); how many were new."""
        records = []
        for flow_run in flow_runs:
            value = await read_result(self.client, flow_run.id)
            checks = checks_of_run(flow_run, value, self.server_urls)
            records.append(RunRecord(str(flow_run.id), flow_run.run_count, tuple(checks)))
        outcomes = await self.store.record_runs(
            records, self.rules.rule_of, lambda t: transition_payload(t, self.ui_base)
        )
        transitions = [t for outcome in outcomes if outcome for t in outcome]
        for transition in transitions:
            result = transition.result
            logger.info(
                "check %s (%s %s %s) is %s",
                result.key,
                result.url,
                result.runner,
                result.region or "any region",
                transition.kind,
            )
        if transitions and self.on_transitions is not None:
            self.on_transitions()
        return sum(outcome is not None for outcome in outcomes)
