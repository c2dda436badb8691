"""Alert delivery: the outbox's alerts sent to webhooks, Slack and Prefect's event feed.

Why a notifier of our own over an outbox, and Prefect events beside it: an alert must
survive a restart between the run that raised it and its delivery, and a webhook that is
down must be retried without holding anything up. The outbox row is written in the same
transaction as the results that raised it (see :mod:`.store`), so nothing is lost or sent
twice by a crash in between; this loop sends what is due, with exponential backoff up to
``alert_backoff_max`` and at most ``alert_max_attempts`` tries, and records every failure on
the row, which the API's check view shows. Runs never wait for it.

Every transition is also posted to Prefect as an event (``runners-orchestrator.check.failing``
or ``.recovered``, resource ``runners-orchestrator.check.<key>``), from the same outbox: it
shows in the Prefect UI's event feed, and a user can build Prefect automations on it
(e-mail, PagerDuty, ...), edited in the UI. The event's id is the outbox row's id, so a
retried post is one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from runners_orchestrator.monitoring.store import HistoryStore, OutboxAlert

__all__ = [
    "EVENT_PREFIX",
    "AlertDeliveryError",
    "AlertSender",
    "prefect_event",
    "slack_message",
    "webhook_body",
]

logger = logging.getLogger("runners_orchestrator.monitoring")

EVENT_PREFIX = "runners-orchestrator.check"
"""Prefect event names: ``runners-orchestrator.check.failing`` / ``.recovered``."""
SEND_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class AlertDeliveryError(Exception):
    """One delivery attempt failed; the message says how (refused, HTTP 500, ...)."""


def webhook_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The generic webhook's JSON: the stored payload as it is (documented in docs)."""
    return payload


def _where(check: dict[str, Any]) -> str:
    region = check.get("region") or "any region"
    suite = f", suite `{check['suite']}`" if check.get("suite") else ""
    return f"runner `{check['runner']}` in `{region}`{suite}"


def slack_message(payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (notifications) and ``blocks``."""
    check = payload["check"]
    failing = payload["event"] == "check.failing"
    headline = f"{'FAILING' if failing else 'RECOVERED'}: {check['url']} ({_where(check)})"
    if failing:
        detail = (
            f"Failed {payload['failures']} times in a row: {payload.get('error') or 'no detail'}"
        )
    else:
        detail = f"Passes again after {payload['failures']} failures in a row."
    links = []
    if payload.get("runUrl"):
        links.append(f"<{payload['runUrl']}|Prefect run>")
    if payload.get("screenshotUrl"):
        links.append(f"<{payload['screenshotUrl']}|Screenshot>")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*\n{detail}"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*URL*\n{check['url']}"},
                {"type": "mrkdwn", "text": f"*Runner*\n{check['runner']}"},
                {"type": "mrkdwn", "text": f"*Region*\n{check.get('region') or 'any'}"},
                {"type": "mrkdwn", "text": f"*Suite*\n{check.get('suite') or '-'}"},
            ],
        },
    ]
    if links:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " | ".join(links)}]}
        )
    return {"text": f"{headline}. {detail}", "blocks": blocks}


def prefect_event(alert_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The Prefect event of a transition, as ``POST /api/events`` takes it."""
    check = payload["check"]
    related = [
        {
            "prefect.resource.id": f"prefect.flow-run.{payload['runId']}",
            "prefect.resource.role": "flow-run",
        }
    ]
    if check.get("suite"):
        related.append(
            {
                "prefect.resource.id": f"runners-orchestrator.suite.{check['suite']}",
                "prefect.resource.role": "suite",
            }
        )
    return {
        "id": alert_id,
        "occurred": payload["occurredAt"],
        "event": f"{EVENT_PREFIX}.{payload['event'].removeprefix('check.')}",
        "resource": {
            "prefect.resource.id": f"{EVENT_PREFIX}.{check['key']}",
            "prefect.resource.name": " ".join(
                (check["url"], check["runner"], check.get("region") or "any")
            ),
        },
        "related": related,
        "payload": payload,
    }


@dataclass
class AlertSender:
    """Sends due alerts from the outbox until cancelled; one per API process.

    Two processes may run one each: an alert is *claimed* (its next attempt moved past the
    attempt's duration) before it is sent, and only the process whose claim succeeded
    sends it.
    """

    store: HistoryStore
    client: PrefectClient
    http: httpx.AsyncClient
    max_attempts: int = 12
    backoff_first: float = 1.0
    backoff_max: float = 300.0
    poll_seconds: float = 1.0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Look at the outbox now (a run just raised alerts)."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Deliver until cancelled; an error is logged and the next round tries again."""
        while True:
            try:
                await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("delivering alerts failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    async def deliver_due(self) -> int:
        """Try every due alert once, concurrently; return how many were delivered."""
        due = await self.store.due_alerts()
        outcomes = await asyncio.gather(*(self._deliver(alert) for alert in due))
        return sum(outcomes)

    def retry_delay(self, attempts: int) -> timedelta | None:
        """The wait before attempt ``attempts + 1``; ``None`` once the attempts are spent."""
        if attempts >= self.max_attempts:
            return None
        return timedelta(seconds=min(self.backoff_max, self.backoff_first * 2 ** (attempts - 1)))

    async def _deliver(self, alert: OutboxAlert) -> bool:
        lease = timedelta(seconds=SEND_TIMEOUT.read or 10.0) * 3
        if not await self.store.claim(alert, lease):
            return False
        try:
            await self.send(alert)
        except AlertDeliveryError as exc:
            retry_in = self.retry_delay(alert.attempts + 1)
            where = alert.destination.type
            if retry_in is None:
                logger.error(  # noqa: TRY400 - the reason is in the message, no traceback
                    "alert %s (%s of check %s) to %s given up after %d attempts: %s",
                    alert.id,
                    alert.kind,
                    alert.check_key,
                    where,
                    alert.attempts + 1,
                    exc,
                )
            else:
                logger.warning(
                    "alert %s (%s of check %s) to %s not delivered (attempt %d), retry in %.0fs: "
                    "%s",
                    alert.id,
                    alert.kind,
                    alert.check_key,
                    where,
                    alert.attempts + 1,
                    retry_in.total_seconds(),
                    exc,
                )
            await self.store.failed(alert, str(exc), retry_in)
            return False
        await self.store.delivered(alert)
        return True

    async def send(self, alert: OutboxAlert) -> None:
        """One attempt to deliver ``alert`` to its destination.

        Raises:
            AlertDeliveryError: the destination refused or did not answer.
        """
        destination = alert.destination
        if destination.type == "event":
            body: Any = [prefect_event(alert.id, alert.payload)]
            try:
                response = await self.client._client.post("/events", json=body)  # noqa: SLF001 - Prefect's client has no call for it
            except httpx.HTTPError as exc:
                raise AlertDeliveryError(f"Prefect did not take the event: {exc}") from exc
            if response.status_code >= httpx.codes.BAD_REQUEST:
                raise AlertDeliveryError(f"Prefect answered HTTP {response.status_code}")
            return
        if destination.url is None:  # pragma: no cover - a suite destination always has one
            raise AlertDeliveryError("the destination has no URL")
        body = (
            slack_message(alert.payload)
            if destination.type == "slack"
            else webhook_body(alert.payload)
        )
        try:
            response = await self.http.post(
                destination.url, json=body, headers=destination.headers, timeout=SEND_TIMEOUT
            )
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise AlertDeliveryError(f"{destination.type} did not answer: {reason}") from exc
        if response.status_code >= httpx.codes.MULTIPLE_CHOICES:
            raise AlertDeliveryError(
                f"{destination.type} answered HTTP {response.status_code}: {response.text[:200]}"
            )
