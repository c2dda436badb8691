"""What the API holds for the life of the process: settings, the Prefect gateway, discovery.

One :class:`ApiState` per mounted plugin. The controller's handlers receive it (and the
gateway and the current discovery) as Litestar dependencies; the Prefect client is opened
and closed in the app's lifespan, never cached in a module global.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType

from runners_orchestrator.api._errors import ApiError
from runners_orchestrator.api._gateway import PrefectGateway
from runners_orchestrator.api._params import balancer_names, jobs_and_options
from runners_orchestrator.api._readiness import ReadinessCheck
from runners_orchestrator.balancing import load_balancer_from_config
from runners_orchestrator.discovery import discover
from runners_orchestrator.exceptions import (
    ConfigurationError,
    RunNotFoundError,
    TargetNotAllowedError,
    WorkflowNotFoundError,
)
from runners_orchestrator.results import is_missing
from runners_orchestrator.settings import LoadBalancerConfig
from runners_orchestrator.target_policy import TargetPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from litestar import Litestar, Request
    from prefect.client.schemas.objects import FlowRun

    from runners_orchestrator.discovery import Discovery, Workflow
    from runners_orchestrator.models import OrchestrateOptions
    from runners_orchestrator.monitoring.suites import SuiteScan
    from runners_orchestrator.settings import OrchestratorSettings

__all__ = ["STATUS_BY_STATE", "ApiState", "find_workflow", "run_status"]

logger = logging.getLogger("runners_orchestrator.api")

STATUS_BY_STATE = {
    StateType.SCHEDULED: "pending",
    StateType.PENDING: "pending",
    StateType.PAUSED: "pending",
    StateType.RUNNING: "running",
    StateType.COMPLETED: "completed",
    StateType.FAILED: "failed",
    StateType.CRASHED: "crashed",
    StateType.CANCELLING: "cancelling",
    StateType.CANCELLED: "cancelled",
}
"""Prefect state → the API's ``status``."""

MAX_HOSTS_CHECKED = 200
TARGET_CHECK_SECONDS = 3.0
"""Bounds of the API's early target-policy check (the runner servers check every connect)."""


def run_status(flow_run: FlowRun) -> str:
    """The API's ``status`` of ``flow_run``."""
    return STATUS_BY_STATE.get(flow_run.state.type, "pending") if flow_run.state else "pending"


def find_workflow(discovery: Discovery, name: str) -> Workflow:
    """The workflow ``name`` (either spelling), or a 404 that lists the available ones."""
    try:
        return discovery.get(name)
    except WorkflowNotFoundError as exc:
        raise ApiError(
            404,
            "workflow_not_found",
            str(exc),
            {"availableOrchestrators": exc.available},
            extra={"availableOrchestrators": exc.available},
        ) from None


@dataclass
class ApiState:
    """The orchestrator API of one app: its settings, Prefect gateway and discovery cache."""

    settings: OrchestratorSettings
    project_root: Path | None = None
    prefect_api_url: str | None = None
    ui_base_url: str | None = None
    rediscover_seconds: float = 1.0
    gateway: PrefectGateway | None = None
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    readiness: ReadinessCheck = field(default_factory=ReadinessCheck)
    _discovery: Discovery | None = None
    _discovered_at: float = 0.0
    _suites: SuiteScan | None = None
    _suites_at: float = 0.0

    @property
    def prefix(self) -> str:
        """Where the routes are mounted: the ``route_prefix`` setting."""
        return self.settings.route_prefix

    @property
    def prefect(self) -> PrefectGateway:
        """The gateway to Prefect, open while the app runs.

        Raises:
            RuntimeError: the app's lifespan has not run (the plugin was not started).
        """
        if self.gateway is None:
            raise RuntimeError("the orchestrator API is not started: run the app's lifespan")
        return self.gateway

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        """Open the Prefect client for the life of the app."""
        from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

        api_url = self.prefect_api_url or PREFECT_API_URL.value()
        if not api_url:
            raise ConfigurationError(
                "PREFECT_API_URL is not set: point it at a Prefect server "
                "(for example http://127.0.0.1:4200/api), or use `runners-orchestrator dev`"
            )
        async with PrefectClient(api_url) as client:
            self.gateway = PrefectGateway(
                client,
                write_concurrency=self.settings.prefect_write_concurrency,
                attempts=self.settings.prefect_write_attempts,
                retry_seconds=self.settings.prefect_retry_seconds,
            )
            logger.info("orchestrator API at %s, Prefect at %s", self.prefix, api_url)
            try:
                yield
            finally:
                await self.readiness.aclose()
                await self.gateway.aclose()
                self.gateway = None

    def discovery(self) -> Discovery:
        """The workflows, looked at again at most every ``rediscover_seconds``."""
        now = time.monotonic()
        if self._discovery is None or now - self._discovered_at >= self.rediscover_seconds:
            self._discovery = discover(self.project_root, self.settings.pattern)
            self._discovered_at = now
        return self._discovery

    def suites(self) -> SuiteScan:
        """The check suites, read again at most every ``rediscover_seconds``.

        An invalid suite file leaves the others available; its problems are in the scan.
        """
        from runners_orchestrator.monitoring.suites import scan_suites  # noqa: PLC0415

        now = time.monotonic()
        if self._suites is None or now - self._suites_at >= self.rediscover_seconds:
            self._suites = scan_suites(self.discovery().root, self.settings.suites)
            self._suites_at = now
        return self._suites

    def ui_url(self, run_id: UUID | str) -> str | None:
        """The run's page in the Prefect UI, when the UI's address is known."""
        from prefect.settings import PREFECT_UI_URL  # noqa: PLC0415

        base = self.ui_base_url or PREFECT_UI_URL.value()
        if not base and self.gateway is not None:
            base = self.gateway.api_url.removesuffix("/").removesuffix("/api")
        return f"{str(base).rstrip('/')}/runs/flow-run/{run_id}" if base else None

    def authorize(self, request: Request[Any, Any, Any]) -> None:
        """Refuse (401) a request without the API token, when one is set."""
        token = self.settings.api_token
        if token is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(
                401,
                "unauthorized",
                "this route needs `Authorization: Bearer <token>` with the API token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @staticmethod
    def check_options(options: list[OrchestrateOptions]) -> None:
        """Refuse (400) a load balancer that is not installed before a run starts.

        Only the installed balancers' names: an import path (``module:Class``) would make
        this process import what a client names and call it.
        """
        for option in options:
            name = option.load_balancer
            if name is None:
                continue
            message = None
            if name not in balancer_names():
                message = (
                    f"unknown load balancer {name!r}; expected one of "
                    f"{', '.join(balancer_names())} (import paths are for the operator's "
                    "settings only)"
                )
            else:
                try:
                    load_balancer_from_config(LoadBalancerConfig(type=name))
                except ConfigurationError as exc:
                    message = str(exc)
            if message is not None:
                raise ApiError(
                    400,
                    "invalid_parameters",
                    message,
                    {"issues": [{"path": ["options", "loadBalancer"], "message": message}]},
                )

    async def check_targets(self, values: dict[str, Any]) -> None:
        """Refuse (400) client registries and job URLs the target policy forbids."""
        jobs, options = jobs_and_options(values)
        self.check_options(options)
        if not self.settings.allow_client_registry:
            for index, option in enumerate(options):
                if option.registry is not None:
                    raise ApiError(
                        400,
                        "client_registry_not_allowed",
                        "options.registry is not allowed: runs use the operator's registry "
                        "(the operator can allow it with ORCHESTRATOR_ALLOW_CLIENT_REGISTRY)",
                        {"path": ["options", "registry"], "index": index},
                    )
        # One lookup per distinct host and port, all at once: a run of 1000 jobs on a few
        # sites costs a few lookups, not 1000 in a row.
        first_job: dict[tuple[str, int], int] = {}
        for index, job in enumerate(jobs):
            parts = urlsplit(job.url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            first_job.setdefault((parts.hostname or "", port), index)
        # Bounded: a body of thousands of unresolvable names must not hold the request (or
        # the resolver threads) for minutes. This is early feedback; the runner servers
        # enforce the policy at every connect, for every host, whatever happens here.
        checked = list(first_job.items())[:MAX_HOSTS_CHECKED]
        try:
            async with asyncio.timeout(TARGET_CHECK_SECONDS):
                outcomes = await asyncio.gather(
                    *(self.policy.resolve(host, port) for (host, port), _ in checked),
                    return_exceptions=True,
                )
        except TimeoutError:
            return
        for (_, index), outcome in zip(checked, outcomes, strict=True):
            if isinstance(outcome, TargetNotAllowedError):
                url = jobs[index].url
                raise ApiError(
                    400, "target_not_allowed", str(outcome), {"url": url, "jobIndex": index}
                )
            # Unresolvable here (OSError) is fine: the runner server in its region will say.

    @staticmethod
    def parse_run_id(raw: str | None) -> UUID:
        """``raw`` as a run id, or a 400 that says what is wrong with it."""
        if not raw:
            raise ApiError(400, "missing_run_id", "add ?runId=<the runId that start returned>")
        try:
            return UUID(raw)
        except ValueError:
            raise ApiError(
                400, "invalid_run_id", f"runId {raw!r} is not a run id (a UUID)"
            ) from None

    async def read_run(self, run_id: UUID) -> FlowRun:
        """The flow run ``run_id``, or a 404."""
        try:
            return await self.prefect.read(run_id)
        except RunNotFoundError:
            raise ApiError(404, "run_not_found", f"no run {run_id}") from None

    async def run_to_change(self, request: Request[Any, Any, Any], run_id: str) -> FlowRun:
        """The run a retry or a cancel acts on: the caller authorized, then the run read."""
        self.authorize(request)
        return await self.read_run(self.parse_run_id(run_id))

    async def orchestrator_of(self, flow_run: FlowRun) -> str:
        """The workflow name of ``flow_run`` (its flow's name if no workflow has it now)."""
        flow_name = await self.prefect.flow_name(flow_run.flow_id)
        for workflow in self.discovery().workflows.values():
            if workflow.flow.name == flow_name:
                return workflow.name
        return flow_name

    async def result_of(self, flow_run: FlowRun) -> Any:
        """The recorded return value of a completed run; ``None`` when there is none."""
        value = await self.prefect.result(flow_run.id)
        return None if is_missing(value) else value
