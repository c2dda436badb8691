"""A suite on its schedule, served by serve-flows, alerting through the recorder: end to end.

The suite's deployment runs every 2 s on a Prefect server that schedules; its one check's
page is down, then up. The webhook receives one ``failing`` alert once the check failed
``alert_after`` times in a row, nothing more while it keeps failing, and one ``recovered``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from suite_helpers import wait_deployment

from runners_orchestrator.monitoring import check_key
from runners_orchestrator.monitoring.history import check_view
from runners_orchestrator.monitoring.service import MonitoringService
from runners_orchestrator.settings import load_settings

if TYPE_CHECKING:
    from conftest import Project

pytestmark = pytest.mark.timeout(420)

RUNNER = "cookieBannerVisibleTest"


async def _runs(monitoring: MonitoringService, key: str, window: timedelta) -> int:
    assert monitoring.store is not None
    view = await check_view(monitoring.store, key, window=window)
    return 0 if view is None else int(view["runs"])


async def test_a_scheduled_suite_alerts_once_when_failing_and_once_when_it_recovers(
    project: Project, toggle_page, webhook, tmp_path
):
    day = timedelta(days=1)
    webhook.start()
    project.clear_suites()
    project.suite(
        "watched",
        f"""
schedule = {{ interval = "2s" }}
alert_after = 2

[[alerts]]
type = "webhook"
url = "{webhook.url}"

[[jobs]]
url = "{toggle_page.url}"
runners = ["{RUNNER}"]
regions = ["us-east-1"]
""",
    )
    key = check_key(toggle_page.url, RUNNER, "us-east-1")
    api = project.env["PREFECT_API_URL"]
    settings = load_settings(
        project.root,
        monitoring_poll_seconds=0.3,
        monitoring_database_url=f"sqlite+aiosqlite:///{tmp_path}/history.db",
    )
    toggle_page.down()
    monitoring = MonitoringService(settings, project_root=project.root, prefect_api_url=api)
    with project.serving() as served:
        await wait_deployment(api, "suite-watched", served)
        async with monitoring.running():
            bodies = await webhook.wait_for(1, timeout=240)
            failing_runs = await _runs(monitoring, key, day)
            # It keeps failing on schedule: no second alert.
            deadline = time.monotonic() + 120
            while await _runs(monitoring, key, day) < failing_runs + 2:
                assert time.monotonic() < deadline, served.output()[-3000:]
                await asyncio.sleep(0.5)
            assert len(webhook.bodies()) == 1
            toggle_page.up()
            bodies = await webhook.wait_for(2, timeout=240)
            recovered_runs = await _runs(monitoring, key, day)
            deadline = time.monotonic() + 120
            while await _runs(monitoring, key, day) < recovered_runs + 2:
                assert time.monotonic() < deadline, served.output()[-3000:]
                await asyncio.sleep(0.5)
    assert [b["event"] for b in webhook.bodies()] == ["check.failing", "check.recovered"]
    failing = bodies[0]
    assert failing["check"]["suite"] == "watched"
    assert failing["failures"] == 2
    assert failing["runUrl"].endswith(f"/runs/flow-run/{failing['runId']}")
