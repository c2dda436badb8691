"""Alerts on change, end to end: real suite runs, the recorder, a real webhook receiver.

A check of a suite alerts once when it has failed ``alert_after`` times in a row, stays
quiet while it keeps failing, and sends one recovery on its first pass. Deliveries that
fail are retried from the outbox, also by a recorder started after a restart.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from monitoring_helpers import (
    TogglePage,
    WebhookReceiver,
    run_suite,
    write_suite,
)
from prefect.client.orchestration import get_client

from runners_orchestrator.monitoring import check_key, load_suites
from runners_orchestrator.monitoring.history import check_view
from runners_orchestrator.monitoring.service import MonitoringService
from runners_orchestrator.settings import load_settings

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(300)

_DAY = timedelta(days=1)

RUNNER = "cookieBannerVisibleTest"


def suite_file(page: TogglePage, webhook: WebhookReceiver, alert_after: int = 2) -> str:
    return f"""
alert_after = {alert_after}
tags = ["shop"]

[[alerts]]
type = "webhook"
url = "{webhook.url}"
headers = {{ Authorization = "Bearer hook-token" }}

[[alerts]]
type = "slack"
url = "{webhook.url}?slack=1"

[[jobs]]
url = "{page.url}"
runners = ["{RUNNER}"]
regions = ["us-east-1"]
tags = ["checkout"]
"""


def service(root: Path, **overrides: Any) -> MonitoringService:
    settings = load_settings(root, monitoring_poll_seconds=0.2, **overrides)
    return MonitoringService(settings, project_root=root)


async def until(condition: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def recorded_runs(monitoring: MonitoringService, key: str, count: int) -> dict[str, Any]:
    """Wait until the check has ``count`` results; its view."""

    async def seen() -> dict[str, Any] | None:
        assert monitoring.store is not None
        view = await check_view(monitoring.store, key, window=_DAY)
        return view if view is not None and view["runs"] >= count else None

    return await until(seen, f"{count} results of check {key}")


async def settled(monitoring: MonitoringService, key: str) -> dict[str, Any]:
    """Wait until no alert of the check is pending delivery; its view."""

    async def done() -> dict[str, Any] | None:
        assert monitoring.store is not None
        view = await check_view(monitoring.store, key, window=_DAY)
        pending = [a for a in (view or {}).get("alerts", []) if a["delivery"] == "pending"]
        return view if view is not None and not pending else None

    return await until(done, f"the alerts of {key} delivered")


async def test_one_alert_per_change_fail_fail_again_then_recover(
    orchestrate, use_runner, toggle_page, webhook, tmp_path
):
    webhook.start()
    write_suite(tmp_path, "shop", suite_file(toggle_page, webhook, alert_after=2))
    jobs = load_suites(tmp_path)["shop"].parameters()["jobs"]
    key = check_key(toggle_page.url, RUNNER, "us-east-1")
    async with service(tmp_path).running() as monitoring:
        await run_suite(orchestrate, "shop", jobs)
        await recorded_runs(monitoring, key, 1)
        toggle_page.down()
        first_fail = await run_suite(orchestrate, "shop", jobs)
        view = await recorded_runs(monitoring, key, 2)
        assert view["lastStatus"] == "fail"
        assert view["failuresInRow"] == 1
        assert not view["alerting"]  # one failure is below the threshold of 2
        second_fail = await run_suite(orchestrate, "shop", jobs)
        await recorded_runs(monitoring, key, 3)
        bodies = await webhook.wait_for(2)  # the webhook and the Slack message
        await run_suite(orchestrate, "shop", jobs)  # fails again: no alert
        view = await recorded_runs(monitoring, key, 4)
        await settled(monitoring, key)
        assert view["failuresInRow"] == 3
        assert view["alerting"]
        assert len(webhook.bodies()) == 2
        toggle_page.up()
        await run_suite(orchestrate, "shop", jobs)
        await recorded_runs(monitoring, key, 5)
        bodies = await webhook.wait_for(4)
        view = await settled(monitoring, key)
    assert len(webhook.bodies()) == 4
    assert not view["alerting"]
    webhooks = [b for b in bodies if "event" in b]
    slack = [b for b in bodies if "blocks" in b]
    assert [b["event"] for b in webhooks] == ["check.failing", "check.recovered"]
    failing = webhooks[0]
    assert failing["check"] == {
        "key": key,
        "url": toggle_page.url,
        "runner": RUNNER,
        "region": "us-east-1",
        "suite": "shop",
        "tags": ["checkout", "shop"],
    }
    assert failing["failures"] == 2
    assert failing["runId"] == second_fail
    assert failing["runUrl"].endswith(f"/runs/flow-run/{second_fail}")
    assert failing["error"]
    assert failing["failingSince"] is not None
    assert first_fail != second_fail
    headers = [r["headers"] for r in webhook.received if "event" in r["body"]]
    assert all(h.get("Authorization") == "Bearer hook-token" for h in headers)
    # Slack: text for the notification, blocks with the URL, runner, region and run link.
    assert [("FAILING" in s["text"], "RECOVERED" in s["text"]) for s in slack] == [
        (True, False),
        (False, True),
    ]
    text = str(slack[0]["blocks"])
    assert toggle_page.url in text
    assert RUNNER in text
    assert "us-east-1" in text
    assert f"/runs/flow-run/{second_fail}|Prefect run>" in text
    # Every transition is a Prefect event too, on the check's resource.
    events = await _events(f"runners-orchestrator.check.{key}")
    assert sorted(e.event for e in events) == [
        "runners-orchestrator.check.failing",
        "runners-orchestrator.check.recovered",
    ]


async def _events(resource_id: str, count: int = 2) -> list[Any]:
    from prefect.events.filters import EventFilter, EventResourceFilter  # noqa: PLC0415

    async def found() -> list[Any] | None:
        async with get_client() as client:
            response = await client._client.post(
                "/events/filter",
                json={
                    "filter": EventFilter(
                        resource=EventResourceFilter(id=[resource_id])
                    ).model_dump(mode="json"),
                    "limit": 50,
                },
            )
            response.raise_for_status()
        from prefect.events.schemas.events import ReceivedEvent  # noqa: PLC0415

        events = [ReceivedEvent.model_validate(e) for e in response.json()["events"]]
        return events if len(events) >= count else None

    return await until(found, f"{count} events of {resource_id}")


async def test_a_down_webhook_is_retried_and_the_run_is_not_held(
    orchestrate, use_runner, toggle_page, webhook, tmp_path
):
    write_suite(tmp_path, "down", suite_file(toggle_page, webhook, alert_after=1))
    jobs = load_suites(tmp_path)["down"].parameters()["jobs"]
    key = check_key(toggle_page.url, RUNNER, "us-east-1")
    toggle_page.down()
    overrides = {"alert_backoff": 0.2, "alert_backoff_max": 1.0}
    async with service(tmp_path, **overrides).running() as monitoring:
        run_id = await run_suite(orchestrate, "down", jobs)  # completes: nothing waits
        await recorded_runs(monitoring, key, 1)

        async def refused_twice() -> dict[str, Any] | None:
            assert monitoring.store is not None
            view = await check_view(monitoring.store, key, window=_DAY)
            hooks = [a for a in view["alerts"] if a["destination"] == "webhook"] if view else []
            return view if hooks and hooks[0]["attempts"] >= 2 else None

        view = await until(refused_twice, "two refused deliveries")
        webhook_alert = next(a for a in view["alerts"] if a["destination"] == "webhook")
        assert webhook_alert["delivery"] == "pending"
        assert "did not answer" in webhook_alert["lastError"]
        webhook.answer_500(2)
        webhook.start()
        bodies = await webhook.wait_for(2)
        view = await settled(monitoring, key)
    assert webhook.failed_answers >= 2
    assert {a["delivery"] for a in view["alerts"]} == {"delivered"}
    assert [b["runId"] for b in bodies if "event" in b] == [run_id]


async def test_undelivered_alerts_survive_a_restart_of_the_recorder(
    orchestrate, use_runner, toggle_page, webhook, tmp_path
):
    write_suite(tmp_path, "restart", suite_file(toggle_page, webhook, alert_after=1))
    jobs = load_suites(tmp_path)["restart"].parameters()["jobs"]
    key = check_key(toggle_page.url, RUNNER, "us-east-1")
    toggle_page.down()
    async with service(tmp_path).running() as monitoring:
        await run_suite(orchestrate, "restart", jobs)
        await recorded_runs(monitoring, key, 1)
        assert monitoring.store is not None
        view = await check_view(monitoring.store, key, window=_DAY)
        assert view is not None
        assert {a["delivery"] for a in view["alerts"] if a["destination"] != "event"} == {"pending"}
    webhook.start()  # the webhook comes up while no recorder runs
    async with service(tmp_path, alert_backoff=0.2).running() as monitoring:
        await webhook.wait_for(2)
        await settled(monitoring, key)
    await asyncio.sleep(0.5)
    assert len(webhook.bodies()) == 2  # once each, not again
