"""The orchestrator HTTP API as a Litestar plugin: list, start, status, run, cancel, history.

The plugin also runs monitoring in the app's lifespan (``monitoring.service``): the
recorder of finished runs, the alert sender and retention, so that ``serve`` and ``dev``
keep history and send alerts with no process of their own.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPlugin

from runners_orchestrator.api._checks_controller import ChecksController
from runners_orchestrator.api._controller import OrchestratorController
from runners_orchestrator.api._errors import exception_handlers
from runners_orchestrator.api._openapi import add_workflow_operations
from runners_orchestrator.api._state import STATUS_BY_STATE as STATUS_BY_STATE  # noqa: PLC0414 - re-exported for the CLI's client
from runners_orchestrator.api._state import ApiState
from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.monitoring.service import MonitoringService
from runners_orchestrator.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from litestar.config.app import AppConfig

    from runners_orchestrator.settings import OrchestratorSettings

__all__ = ["OrchestratorConfig", "OrchestratorPlugin", "create_app"]

logger = logging.getLogger("runners_orchestrator.api")


@dataclass
class OrchestratorConfig:
    """How the API is mounted and where it finds Prefect and the workflows."""

    settings: OrchestratorSettings | None = None
    """The orchestrator's settings; ``get_settings()`` when unset."""
    project_root: Path | None = None
    """Where the workflows are discovered; found from the working directory when unset."""
    prefect_api_url: str | None = None
    """The Prefect API; Prefect's own ``PREFECT_API_URL`` when unset."""
    ui_url: str | None = None
    """The Prefect UI, for ``uiUrl``; Prefect's ``PREFECT_UI_URL`` when unset."""
    rediscover_seconds: float = 1.0
    """How often the workflow files are looked at again, so that edits show up."""


class OrchestratorPlugin(InitPlugin):
    """Mount the orchestrator API on any Litestar app.

    ``Litestar(plugins=[OrchestratorPlugin()])`` serves every discovered workflow under the
    ``route_prefix`` setting. The plugin holds no run state: it reads and writes runs
    through one Prefect client per process, opened in the app's lifespan.
    """

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config or OrchestratorConfig()
        self._api = ApiState(
            settings=self.config.settings or get_settings(),
            project_root=self.config.project_root,
            prefect_api_url=self.config.prefect_api_url,
            ui_base_url=self.config.ui_url,
            rediscover_seconds=self.config.rediscover_seconds,
        )
        self._monitoring = MonitoringService(
            settings=self._api.settings,
            project_root=self.config.project_root,
            prefect_api_url=self.config.prefect_api_url,
            ui_url=self.config.ui_url,
        )

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the controller, the Prefect client's lifespan and the OpenAPI operations.

        Only adds: the controller carries its own dependencies and exception handlers, so
        nothing the app's owner configured is replaced.
        """
        app_config.route_handlers.append(OrchestratorController.mounted(self._api))
        app_config.route_handlers.append(
            ChecksController.mounted(self._api.prefix, self._monitoring)
        )
        app_config.lifespan = [*app_config.lifespan, self._api.lifespan, self._monitor]
        app_config.on_startup = [*app_config.on_startup, self._document_workflows]
        return app_config

    @contextlib.asynccontextmanager
    async def _monitor(self, _: Litestar) -> AsyncIterator[None]:
        """History and alerts for the life of the app (see ``monitoring.service``)."""
        async with self._monitoring.running():
            yield

    def _document_workflows(self, app: Litestar) -> None:
        if app.openapi_config is None:
            return
        try:
            discovery = self._api.discovery()
        except ConfigurationError:
            logger.exception("workflows could not be discovered for the OpenAPI document")
            return
        add_workflow_operations(
            app,
            discovery,
            self._api.prefix,
            allow_client_registry=self._api.settings.allow_client_registry,
        )


def create_app(config: OrchestratorConfig | None = None, *, debug: bool = False) -> Litestar:
    """A ready app: the orchestrator API, with its OpenAPI document at ``/schema``."""
    from runners_orchestrator import __version__  # noqa: PLC0415

    return Litestar(
        plugins=[OrchestratorPlugin(config)],
        openapi_config=OpenAPIConfig(title="runners-orchestrator", version=__version__),
        exception_handlers=exception_handlers(),
        debug=debug,
    )
