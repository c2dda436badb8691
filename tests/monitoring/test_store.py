"""The history store on a real SQLite file: alert state per check, runs without a result,
retention, and the payloads alerts are sent with.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun, State, StateType

from runners_orchestrator.monitoring import check_key
from runners_orchestrator.monitoring.alerts import AlertSender, prefect_event, slack_message
from runners_orchestrator.monitoring.history import CheckFilter, HistoryQueryError, check_view
from runners_orchestrator.monitoring.recording import checks_of_run, transition_payload
from runners_orchestrator.monitoring.store import (
    AlertRule,
    CheckResult,
    Destination,
    HistoryStore,
    RunRecord,
    Transition,
)
from topology import POSTGRES, _admin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

URL = "https://shop.example.com/checkout"
RUNNER = "cookieBannerVisibleTest"
KEY = check_key(URL, RUNNER, "eu-west-1")
DAY = timedelta(days=1)
START = datetime(2026, 1, 1, tzinfo=UTC)
RULE = AlertRule(3, (Destination("webhook", "http://127.0.0.1:9/hook"),))


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaled)],
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    """The store on a SQLite file, and on a throwaway database of the test PostgreSQL."""
    if request.param == "sqlite":
        async with HistoryStore(f"sqlite+aiosqlite:///{tmp_path}/history.db") as opened:
            yield opened
        return
    name = f"history_{uuid4().hex[:12]}"
    await _admin(f"CREATE DATABASE {name}")
    try:
        url = f"{POSTGRES.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
        async with HistoryStore(url) as opened:
            assert opened.dialect == "postgresql"
            yield opened
    finally:
        await _admin(f"DROP DATABASE {name} WITH (FORCE)")


def result(
    status: str, minute: int, *, suite: str | None = "shop", counts: bool = True
) -> CheckResult:
    return CheckResult(
        key=KEY,
        url=URL,
        runner=RUNNER,
        region="eu-west-1",
        suite=suite,
        tags=("checkout",),
        at=START + timedelta(minutes=minute),
        status=status,  # type: ignore[arg-type]
        duration_ms=100 + minute,
        server="eu-1",
        served_region="eu-west-1",
        flow_run_id=str(uuid4()),
        run_state="completed",
        error=None if status == "pass" else "no banner",
        counts_for_alerts=counts,
    )


async def record(store: HistoryStore, *results: CheckResult) -> list[str]:
    kinds: list[str] = []
    for item in results:
        transitions = await store.record_run(
            item.flow_run_id, 1, [item], lambda suite: RULE if suite else None, lambda _: {}
        )
        assert transitions is not None
        kinds += [t.kind for t in transitions]
    return kinds


async def test_flapping_below_the_threshold_stays_quiet(store):
    statuses = ["fail", "fail", "pass", "fail", "error", "pass", "fail", "fail"]
    kinds = await record(store, *(result(s, i) for i, s in enumerate(statuses)))
    assert kinds == []
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["failuresInRow"] == 2
    assert not view["alerting"]


async def test_threshold_then_quiet_then_one_recovery(store):
    statuses = ["pass", "fail", "error", "fail", "fail", "fail", "pass", "pass", "fail"]
    kinds = await record(store, *(result(s, i) for i, s in enumerate(statuses)))
    assert kinds == ["failing", "recovered"]
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert [a["kind"] for a in view["alerts"]].count("failing") == 2  # the event and the webhook
    assert {a["destination"] for a in view["alerts"]} == {"event", "webhook"}


async def test_checks_of_no_suite_never_alert(store):
    kinds = await record(store, *(result("fail", i, suite=None) for i in range(5)))
    assert kinds == []


async def test_rows_without_evidence_neither_alert_nor_recover(store):
    kinds = await record(
        store,
        result("fail", 0),
        result("fail", 1),
        result("error", 2, counts=False),
        result("fail", 3),
        result("error", 4, counts=False),
    )
    assert kinds == ["failing"]
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["lastStatus"] == "error"
    assert view["alerting"]
    assert view["runs"] == 5


async def test_a_late_older_result_is_history_only(store):
    assert await record(store, result("pass", 10)) == []
    assert await record(store, result("fail", 1), result("fail", 2), result("fail", 3)) == []
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["lastStatus"] == "pass"
    assert view["runs"] == 4


async def test_retention_prunes_old_results_and_keeps_the_check(store):
    await record(store, *(result("pass", i) for i in range(5)))
    deleted = await store.prune(START + timedelta(minutes=3))
    assert deleted == 3
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["runs"] == 2


def flow_run(state: StateType, parameters: dict[str, Any], message: str = "boom") -> FlowRun:
    return FlowRun(
        flow_id=uuid4(),
        state=State(type=state, message=message),
        parameters=parameters,
        tags=["runners-orchestrator", "suite:shop"],
        end_time=START,
    )


def test_a_crashed_run_without_a_result_gives_error_rows_that_do_not_alert():
    jobs = [{"url": URL, "runners": [RUNNER, "exampleTitleVisibleTest"], "region": "eu-west-1"}]
    rows = checks_of_run(flow_run(StateType.CRASHED, {"jobs": jobs}, "process died"), None)
    assert [(r.runner, r.status, r.counts_for_alerts) for r in rows] == [
        (RUNNER, "error", False),
        ("exampleTitleVisibleTest", "error", False),
    ]
    assert rows[0].suite == "shop"  # from the run's suite:shop tag
    assert "process died" in (rows[0].error or "")
    assert rows[0].key == KEY


def test_a_cancelled_run_gives_nothing():
    jobs = [{"url": URL, "runners": [RUNNER]}]
    assert checks_of_run(flow_run(StateType.CANCELLED, {"jobs": jobs}), None) == []


def test_slack_message_and_prefect_event_carry_the_check_and_the_links():
    transition_result = result("fail", 0)

    payload = transition_payload(
        Transition("t-1", "failing", transition_result, 3, START), "http://127.0.0.1:4200"
    )
    payload["screenshotUrl"] = "http://127.0.0.1:3001/api/runner/screenshots/x.jpg"
    message = slack_message(payload)
    assert message["text"].startswith(f"FAILING: {URL}")
    text = str(message["blocks"])
    assert (
        f"<http://127.0.0.1:4200/runs/flow-run/{transition_result.flow_run_id}|Prefect run>" in text
    )
    assert "<http://127.0.0.1:3001/api/runner/screenshots/x.jpg|Screenshot>" in text
    assert RUNNER in text
    assert "eu-west-1" in text
    event = prefect_event(str(uuid4()), payload)
    assert event["event"] == "runners-orchestrator.check.failing"
    assert event["resource"]["prefect.resource.id"] == f"runners-orchestrator.check.{KEY}"
    assert event["related"][0]["prefect.resource.id"] == (
        f"prefect.flow-run.{transition_result.flow_run_id}"
    )


def test_delivery_backoff_doubles_up_to_its_bound_then_gives_up():
    sender = AlertSender(None, None, None, max_attempts=5, backoff_first=1, backoff_max=4)  # type: ignore[arg-type]
    delays = [sender.retry_delay(n) for n in range(1, 7)]
    assert delays == [
        timedelta(seconds=1),
        timedelta(seconds=2),
        timedelta(seconds=4),
        timedelta(seconds=4),
        None,
        None,
    ]


def test_a_bad_status_filter_names_itself():
    with pytest.raises(HistoryQueryError, match="status: 'broken'"):
        CheckFilter(status="broken")


async def test_a_batch_skips_a_run_recorded_elsewhere_and_keeps_the_others(store):
    first, second = result("fail", 0), result("fail", 1)
    assert await record(store, first) == []
    outcomes = await store.record_runs(
        [
            RunRecord(first.flow_run_id, 1, (first,)),  # recorded already: rolled back alone
            RunRecord(second.flow_run_id, 1, (second,)),
        ],
        lambda suite: RULE if suite else None,
        lambda _: {},
    )
    assert outcomes[0] is None
    assert outcomes[1] == []
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["runs"] == 2
    assert view["failuresInRow"] == 2


async def test_two_stores_recording_one_run_at_once_record_it_once(store):
    async with HistoryStore(store.url) as other:
        failures = [result("fail", i) for i in range(3)]
        run = RunRecord(failures[0].flow_run_id, 1, tuple(failures))

        def rule(suite: str | None) -> AlertRule | None:
            return RULE if suite else None

        outcomes = await asyncio.gather(
            store.record_runs([run], rule, lambda _: {}),
            other.record_runs([run], rule, lambda _: {}),
        )
    recorded = [o[0] for o in outcomes]
    assert sum(o is None for o in recorded) == 1
    assert [t.kind for t in next(o for o in recorded if o is not None)] == ["failing"]
    view = await check_view(store, KEY, window=timedelta(days=3660))
    assert view is not None
    assert view["runs"] == 3
    assert len([a for a in view["alerts"] if a["kind"] == "failing"]) == 2  # event + webhook


async def test_a_view_read_while_results_are_recorded_is_one_state_of_the_store(store):
    # Every result fails and none alerts (no suite): in any one state of the store the
    # check's failures in a row equal its runs. A view read in two parts, with a recording
    # committed in between, showed more runs than failures in a row.
    recorded = 40
    views: list[tuple[int, int]] = []

    async def write() -> None:
        await record(store, *(result("fail", i, suite=None) for i in range(recorded)))

    async def read() -> None:
        while len(views) < 2000:
            view = await check_view(store, KEY, window=timedelta(days=3660))
            if view is not None:
                views.append((view["runs"], view["failuresInRow"]))
                if view["runs"] == recorded:
                    return
            await asyncio.sleep(0)

    await asyncio.gather(write(), read())
    assert views, "no view was read while recording"
    assert [(runs, fails) for runs, fails in views if runs != fails] == []
