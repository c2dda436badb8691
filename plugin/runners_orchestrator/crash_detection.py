"""A flow run whose process died is marked ``CRASHED``, by Prefect, within a bounded time.

When the process serving a flow run is killed (``SIGKILL``, a machine lost), nothing is left
to report the run's end: Prefect would show it ``RUNNING`` for ever, and a client polling the
API would wait for ever. Prefect's answer ("How to detect and respond to zombie flows") is
used as it is:

- every flow run served by ``serve-flows`` sends a heartbeat event every
  :data:`HEARTBEAT_SECONDS` (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``; Prefect's default is 180 s,
  its minimum 30 s), set before the fork server starts so every run's process inherits it;
- an automation, :data:`AUTOMATION_NAME`, created once by ``serve-flows`` (it is visible and
  editable in the Prefect UI, under Automations), marks a flow run ``CRASHED`` when its
  heartbeats stop for ``within`` seconds (90 by default, Prefect's documented value; the
  ``ORCHESTRATOR_CRASH_AFTER`` environment variable changes it) without a terminal state.

So a killed run is ``crashed`` in Prefect and in our API at most ``within`` seconds after its
last heartbeat, plus the triggers service's evaluation period; then it can be retried, and a
retry resumes it (see :mod:`runners_orchestrator.checkpoints`). Automations need Prefect's
triggers service: it runs in ``prefect server services start`` on the scaled topology; the
embedded ``dev`` server turns it off (there, no process of a run dies alone: ``dev`` restarts
its Prefect server, and stops everything when another of its processes dies).

Prefect process workers (``prefect worker start``) are not ours, so they do neither: give
them ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`` and create the automation once with
``python -m runners_orchestrator.crash_detection`` (``docs/scaling.md``).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

__all__ = ["AUTOMATION_NAME", "HEARTBEAT_SECONDS", "enable_heartbeats", "ensure_crash_detection"]

AUTOMATION_NAME = "runners-orchestrator: crash flow runs that stopped sending heartbeats"
HEARTBEAT_SECONDS = 30
"""Seconds between a served flow run's heartbeats (Prefect's minimum)."""
DEFAULT_WITHIN_SECONDS = 90

logger = logging.getLogger("runners_orchestrator.crash_detection")


def enable_heartbeats() -> None:
    """Make served flow runs send heartbeats, unless the operator chose a frequency."""
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))


def _within() -> float:
    raw = os.environ.get("ORCHESTRATOR_CRASH_AFTER", str(DEFAULT_WITHIN_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if seconds < HEARTBEAT_SECONDS:
        from runners_orchestrator.exceptions import ConfigurationError  # noqa: PLC0415

        raise ConfigurationError(
            f"ORCHESTRATOR_CRASH_AFTER={raw!r}: expected a number of seconds of at least "
            f"{HEARTBEAT_SECONDS} (the heartbeat interval)"
        )
    return seconds


async def ensure_crash_detection() -> None:
    """Create (or bring up to date) the automation that crashes silent flow runs."""
    from prefect.automations import Automation  # noqa: PLC0415 - Prefect is heavy to import
    from prefect.client.schemas.objects import StateType  # noqa: PLC0415
    from prefect.events.actions import ChangeFlowRunState  # noqa: PLC0415
    from prefect.events.schemas.automations import EventTrigger, Posture  # noqa: PLC0415
    from prefect.events.schemas.events import ResourceSpecification  # noqa: PLC0415

    within = _within()
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={
            "prefect.flow-run.heartbeat",
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed",
        },
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=within),
    )
    action = ChangeFlowRunState(
        state=StateType.CRASHED,
        message=f"no heartbeat for {within:g}s: the process running this flow run died; "
        "retry it to resume (completed jobs are kept)",
    )
    try:
        existing = await Automation.aread(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is None:
        await Automation(name=AUTOMATION_NAME, trigger=trigger, actions=[action]).acreate()
        logger.info("created the automation %r (within %gs)", AUTOMATION_NAME, within)
        await _keep_one()
        return
    if existing.trigger != trigger or existing.actions != [action]:
        existing.trigger = trigger
        existing.actions = [action]
        await existing.aupdate()
        logger.info("updated the automation %r (within %gs)", AUTOMATION_NAME, within)


async def _keep_one() -> None:
    """Two serving processes starting together may both create it: keep one of them.

    Every process keeps the same one (the smallest id), so they never delete each other's.
    """
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    async with get_client() as client:
        found = await client.read_automations_by_name(AUTOMATION_NAME)
        for extra in sorted(found, key=lambda automation: str(automation.id))[1:]:
            await client.delete_automation(extra.id)


def main() -> None:
    """Create the automation against ``PREFECT_API_URL`` (for Prefect workers), and say so."""
    import asyncio  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from runners_orchestrator.exceptions import ConfigurationError  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    try:
        asyncio.run(ensure_crash_detection())
    except ConfigurationError as exc:
        sys.exit(f"runners-orchestrator: error: {exc}")
    logger.info("crash detection is on: %r (within %gs)", AUTOMATION_NAME, _within())


if __name__ == "__main__":
    main()
