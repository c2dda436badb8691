"""The orchestrator HTTP API: every workflow as an endpoint, proxied to Prefect."""

from __future__ import annotations

from runners_orchestrator.api._errors import ApiError
from runners_orchestrator.api._gateway import PrefectGateway
from runners_orchestrator.api._plugin import OrchestratorConfig, OrchestratorPlugin, create_app

__all__ = ["ApiError", "OrchestratorConfig", "OrchestratorPlugin", "PrefectGateway", "create_app"]
