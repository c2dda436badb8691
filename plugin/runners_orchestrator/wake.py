"""Pick up a new run when Prefect announces it, not at the runner's next poll.

Prefect's runner polls for scheduled runs every ``query_seconds`` (with 30 % jitter): at a
0.2 s poll a run created through the API waited 0.08-0.25 s before its process started,
and the idle Prefect server spent a tenth of a core answering the polls. Prefect announces
every new run on its events websocket (``prefect.flow-run.Scheduled``), measured 40-100 ms
after the start request on the embedded default. :func:`wake_on_new_runs` listens for
those of the runner's own deployments and polls right then; and when one of their runs
ends, since a runner at its ``--limit`` has a slot free for the next one waiting.

The periodic poll stays, every second by default (``serving.DEFAULT_QUERY_SECONDS``): it
starts every run while the websocket is down, and a wake-up only moves a poll earlier. Two
polls that see the same run start it once: the runner skips a run it is already
submitting, and Prefect refuses a second PENDING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter

if TYPE_CHECKING:
    from prefect.events import Event
    from prefect.runner import Runner

__all__ = ["RECONNECT_SECONDS", "wake_on_new_runs"]

logger = logging.getLogger("runners_orchestrator.wake")

RECONNECT_SECONDS = (1.0, 30.0)
"""After the events websocket fails: wait the first value, doubled each time up to the second."""

_WAKING = EventFilter(
    event=EventNameFilter(
        name=[
            "prefect.flow-run.Scheduled",
            # A run of ours that ended freed a slot: a runner at its --limit takes the next.
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Crashed",
            "prefect.flow-run.Cancelled",
        ]
    )
)


def deployment_of(event: Event) -> UUID | None:
    """The deployment a flow-run event is about, from its related resources."""
    for resource in event.related:
        if resource.role == "deployment":
            with contextlib.suppress(ValueError):
                return UUID(resource.id.rsplit(".", 1)[-1])
    return None


def _serves(runner: Runner, deployment_id: UUID | None) -> bool:
    registry = getattr(runner, "_deployment_registry", None)
    if deployment_id is None or registry is None:
        return True  # unknown: a poll too many costs one query
    return deployment_id in registry.get_deployment_ids()


async def wake_on_new_runs(runner: Runner) -> None:
    """Poll ``runner`` when one of its deployments gets a new run or one ends; until cancelled."""
    wake = asyncio.Event()
    poller = asyncio.create_task(_poll_when_woken(runner, wake), name="wake-poller")
    delay = RECONNECT_SECONDS[0]
    try:
        while True:
            try:
                async with get_events_subscriber(filter=_WAKING) as events:
                    delay = RECONNECT_SECONDS[0]
                    async for event in events:
                        if _serves(runner, deployment_of(event)):
                            wake.set()
            except Exception as exc:  # noqa: BLE001 - the periodic poll carries on meanwhile
                logger.debug("events websocket unavailable (%s); retrying in %.0f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_SECONDS[1])
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def _poll_when_woken(runner: Runner, wake: asyncio.Event) -> None:
    """One poll per wake-up; wake-ups during a poll make one more poll after it."""
    while True:
        await wake.wait()
        wake.clear()
        if not runner.started:
            continue
        try:
            await runner._get_and_submit_flow_runs()  # type: ignore[no-untyped-call]  # noqa: SLF001
        except Exception:  # the periodic poll will find the run
            logger.debug("an early poll failed", exc_info=True)
