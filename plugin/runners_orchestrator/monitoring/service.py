"""Monitoring in the API process: the recorder, the alert sender and retention, as tasks.

The API (``serve``, and so ``dev``) runs one :class:`MonitoringService` in its lifespan. Each
replica runs its own; they share the store, which records a run once and hands an alert to
one sender. Nothing here is needed for runs to run: if the store cannot be opened the API
still serves runs, logs why, and its history routes answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx

from runners_orchestrator.monitoring.alerts import AlertSender
from runners_orchestrator.monitoring.recording import Recorder, SuiteRules, ui_base_url
from runners_orchestrator.monitoring.store import HistoryStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from runners_orchestrator.settings import OrchestratorSettings

__all__ = ["PRUNE_SECONDS", "MonitoringService"]

logger = logging.getLogger("runners_orchestrator.monitoring")

PRUNE_SECONDS = 3600.0
"""How often results older than the retention are deleted."""


@dataclass
class MonitoringService:
    """History and alerts for one API process; :meth:`running` is its lifespan."""

    settings: OrchestratorSettings
    project_root: Path | None = None
    prefect_api_url: str | None = None
    ui_url: str | None = None
    store: HistoryStore | None = None
    problem: str | None = None
    """Why the store is not open, when it is not."""
    recorder: Recorder | None = None
    sender: AlertSender | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def ui_base(self) -> str | None:
        """The Prefect UI's base URL, for run links."""
        return self.ui_url.rstrip("/") if self.ui_url else None

    def _database_url(self) -> str | None:
        url = self.settings.monitoring_database_url
        return url.get_secret_value() if url is not None else None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MonitoringService]:
        """Open the store and, with the ``monitoring`` setting, start the background tasks."""
        from prefect.client.orchestration import PrefectClient  # noqa: PLC0415
        from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

        api_url = self.prefect_api_url or PREFECT_API_URL.value()
        if api_url and not self.ui_url:
            self.ui_url = ui_base_url(api_url)
        store = HistoryStore(self._database_url())
        try:
            await store.open()
        except Exception as exc:  # noqa: BLE001 - history must never stop the API
            self.problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.error("history and alerts are off: the store cannot be opened: %s", self.problem)  # noqa: TRY400
            yield self
            return
        self.store = store
        logger.info("history and alerts in %s", store.dialect)
        try:
            if not (self.settings.monitoring and api_url):
                yield self
                return
            async with (
                PrefectClient(api_url) as client,
                httpx.AsyncClient(headers={"User-Agent": "runners-orchestrator-alerts"}) as http,
            ):
                self.sender = AlertSender(
                    store,
                    client,
                    http,
                    max_attempts=self.settings.alert_max_attempts,
                    backoff_first=self.settings.alert_backoff,
                    backoff_max=self.settings.alert_backoff_max,
                    poll_seconds=self.settings.monitoring_poll_seconds,
                )
                self.recorder = Recorder(
                    store,
                    client,
                    SuiteRules(self.project_root, self.settings.alert_after, self.settings.suites),
                    poll_seconds=self.settings.monitoring_poll_seconds,
                    ui_base=self.ui_base,
                    server_urls={s.id: s.url for s in self.settings.registry.servers},
                    on_transitions=self.sender.wake,
                )
                self._tasks = [
                    asyncio.create_task(self.recorder.run_forever(), name="history-recorder"),
                    asyncio.create_task(self.sender.run_forever(), name="alert-sender"),
                    asyncio.create_task(self._prune_forever(), name="history-retention"),
                ]
                try:
                    yield self
                finally:
                    for task in self._tasks:
                        task.cancel()
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                    self._tasks = []
        finally:
            self.store = None
            await store.aclose()

    async def _prune_forever(self) -> None:
        retention = timedelta(days=self.settings.history_retention_days)
        while True:
            if self.store is not None:
                try:
                    deleted = await self.store.prune(datetime.now(UTC) - retention)
                    if deleted:
                        logger.info("history: %d results older than %s pruned", deleted, retention)
                except Exception:
                    logger.exception("pruning old history failed; trying again later")
            await asyncio.sleep(PRUNE_SECONDS)
