"""The orchestrator HTTP API as a Litestar plugin: list, start, status, run, cancel."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit
from uuid import UUID

from litestar import Litestar, Request, Response, Router, get, post
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath  # noqa: TC002 - Litestar reads it at run time
from litestar.plugins import InitPlugin
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType

from runners_orchestrator.api._errors import ApiError, exception_handlers
from runners_orchestrator.api._gateway import PrefectGateway
from runners_orchestrator.api._openapi import add_workflow_operations
from runners_orchestrator.api._params import bind_parameters, jobs_and_options
from runners_orchestrator.balancing import load_balancer_from_config
from runners_orchestrator.discovery import discover
from runners_orchestrator.exceptions import (
    ConfigurationError,
    RunNotFoundError,
    TargetNotAllowedError,
    WorkflowNotFoundError,
)
from runners_orchestrator.results import is_missing
from runners_orchestrator.settings import LoadBalancerConfig, get_settings
from runners_orchestrator.target_policy import TargetPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from litestar.config.app import AppConfig
    from prefect.client.schemas.objects import FlowRun

    from runners_orchestrator.discovery import Discovery, Workflow
    from runners_orchestrator.models import OrchestrateOptions
    from runners_orchestrator.settings import OrchestratorSettings

__all__ = ["OrchestratorConfig", "OrchestratorPlugin", "create_app"]

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

STATUS_CODE = {"failed": 500, "crashed": 500, "cancelled": 409}
"""HTTP status of the status route for runs that ended without a result."""

MAX_HOSTS_CHECKED = 200
TARGET_CHECK_SECONDS = 3.0
"""Bounds of the API's early target-policy check (the runner servers check every connect)."""
"""HTTP status of the status route for runs that ended without a result."""


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


@dataclass
class _Api:
    config: OrchestratorConfig
    settings: OrchestratorSettings
    gateway: PrefectGateway | None = None
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    _discovery: Discovery | None = None
    _discovered_at: float = 0.0

    @property
    def prefix(self) -> str:
        return self.settings.route_prefix

    @property
    def prefect(self) -> PrefectGateway:
        if self.gateway is None:
            raise RuntimeError("the orchestrator API is not started: run the app's lifespan")
        return self.gateway

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

        api_url = self.config.prefect_api_url or PREFECT_API_URL.value()
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
                await self.gateway.aclose()
                self.gateway = None

    def discovery(self) -> Discovery:
        now = time.monotonic()
        if self._discovery is None or now - self._discovered_at >= self.config.rediscover_seconds:
            self._discovery = discover(self.config.project_root, self.settings.pattern)
            self._discovered_at = now
        return self._discovery

    def workflow(self, name: str) -> Workflow:
        discovery = self.discovery()
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

    def ui_url(self, run_id: UUID | str) -> str | None:
        from prefect.settings import PREFECT_UI_URL  # noqa: PLC0415

        base = self.config.ui_url or PREFECT_UI_URL.value()
        if not base and self.gateway is not None:
            base = self.gateway.api_url.removesuffix("/").removesuffix("/api")
        return f"{str(base).rstrip('/')}/runs/flow-run/{run_id}" if base else None

    def authorize(self, request: Request[Any, Any, Any]) -> None:
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

    def check_options(self, options: list[OrchestrateOptions]) -> None:
        for option in options:
            if option.load_balancer is not None:
                try:
                    load_balancer_from_config(LoadBalancerConfig(type=option.load_balancer))
                except ConfigurationError as exc:
                    raise ApiError(
                        400,
                        "invalid_parameters",
                        str(exc),
                        {"issues": [{"path": ["options", "loadBalancer"], "message": str(exc)}]},
                    ) from None

    async def check_targets(self, values: dict[str, Any]) -> None:
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

    def parse_run_id(self, raw: str | None) -> UUID:
        if not raw:
            raise ApiError(400, "missing_run_id", "add ?runId=<the runId that start returned>")
        try:
            return UUID(raw)
        except ValueError:
            raise ApiError(
                400, "invalid_run_id", f"runId {raw!r} is not a run id (a UUID)"
            ) from None

    async def read_run(self, run_id: UUID) -> FlowRun:
        try:
            return await self.prefect.read(run_id)
        except RunNotFoundError:
            raise ApiError(404, "run_not_found", f"no run {run_id}") from None

    async def orchestrator_of(self, flow_run: FlowRun) -> str:
        flow_name = await self.prefect.flow_name(flow_run.flow_id)
        for workflow in self.discovery().workflows.values():
            if workflow.flow.name == flow_name:
                return workflow.name
        return flow_name

    async def result_of(self, flow_run: FlowRun) -> Any:
        value = await self.prefect.result(flow_run.id)
        return None if is_missing(value) else value


def _status(flow_run: FlowRun) -> str:
    return STATUS_BY_STATE.get(flow_run.state.type, "pending") if flow_run.state else "pending"


def _error_text(flow_run: FlowRun) -> str | None:
    state = flow_run.state
    if state is None or state.type in {StateType.COMPLETED, StateType.RUNNING}:
        return None
    if state.type in {StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}:
        return None
    return state.message or state.name


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _build_router(api: _Api) -> Router:  # noqa: C901 - one closure per route
    @get("/", summary="List the workflows", description="Every workflow, with its parameters.")
    async def list_workflows() -> dict[str, Any]:
        discovery = api.discovery()
        workflows = [discovery.workflows[n] for n in discovery.names()]
        return {
            "orchestrators": [w.name for w in workflows],
            "workflows": [
                {
                    "name": w.name,
                    "camelName": w.camel_name,
                    "description": w.description,
                    "parameters": w.parameters,
                }
                for w in workflows
            ],
            "usage": {"method": "POST", "endpoint": f"{api.prefix}/{{orchestratorName}}"},
        }

    @post(
        "/{name:str}",
        status_code=202,
        summary="Start a run",
        description="Validate the body against the workflow's parameters and start a run.",
        request_max_body_size=api.settings.max_body_size,
    )
    async def start(
        name: FromPath[str], request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]]:
        workflow = api.workflow(name)
        api.authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
        values, parameters = bind_parameters(workflow, body)
        await api.check_targets(values)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 255:  # noqa: PLR2004
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key: 1 to 255 characters")
        flow_run = await api.prefect.start(workflow, parameters, key)
        run_id = str(flow_run.id)
        body_out = {
            "runId": run_id,
            "orchestrator": workflow.name,
            "status": "started",
            "statusUrl": f"{api.prefix}/{quote(workflow.name)}?runId={run_id}",
            "uiUrl": api.ui_url(run_id),
        }
        return Response(body_out, status_code=202)

    @get("/{name:str}", summary="Status or result of a run", cache_control=None)
    async def status(name: FromPath[str], request: Request[Any, Any, Any]) -> Response[Any]:
        workflow = api.workflow(name)
        run_id = api.parse_run_id(request.query_params.get("runId"))
        flow_run = await api.read_run(run_id)
        if await api.prefect.flow_name(flow_run.flow_id) != workflow.flow.name:
            raise ApiError(404, "run_not_found", f"run {run_id} is not a run of {workflow.name}")
        state = _status(flow_run)
        if state == "completed":
            return Response(await api.result_of(flow_run), status_code=200)
        if state in STATUS_CODE:
            ended = {"runId": str(run_id), "status": state, "error": _error_text(flow_run)}
            return Response(ended, status_code=STATUS_CODE[state])
        body: dict[str, object] = {"runId": str(run_id), "status": state}
        if state == "running":
            progress = await api.prefect.progress(run_id)
            if progress is not None:
                body["progress"] = {"done": progress[0], "total": progress[1]}
        return Response(body, status_code=202)

    @get("/runs/{run_id:str}", summary="A run's envelope", cache_control=None)
    async def run_envelope(run_id: FromPath[str]) -> dict[str, Any]:
        flow_run = await api.read_run(api.parse_run_id(run_id))
        state = _status(flow_run)
        return {
            "runId": str(flow_run.id),
            "orchestrator": await api.orchestrator_of(flow_run),
            "status": state,
            "result": await api.result_of(flow_run) if state == "completed" else None,
            "error": _error_text(flow_run),
            "createdAt": _iso(flow_run.created),
            "startedAt": _iso(flow_run.start_time),
            "endedAt": _iso(flow_run.end_time),
            "uiUrl": api.ui_url(flow_run.id),
        }

    @post("/runs/{run_id:str}/cancel", status_code=202, summary="Cancel a run")
    async def cancel(
        run_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]]:
        api.authorize(request)
        flow_run = await api.read_run(api.parse_run_id(run_id))
        if flow_run.state is not None and flow_run.state.is_final():
            raise ApiError(
                409,
                "run_finished",
                f"run {flow_run.id} has already ended ({_status(flow_run)}); nothing to cancel",
                {"status": _status(flow_run)},
            )
        new_status = await api.prefect.cancel(flow_run)
        return Response({"runId": str(flow_run.id), "status": new_status}, status_code=202)

    return Router(
        path=api.prefix,
        route_handlers=[list_workflows, start, status, run_envelope, cancel],
        exception_handlers=exception_handlers(),
        tags=["Orchestrator"],
    )


class OrchestratorPlugin(InitPlugin):
    """Mount the orchestrator API on any Litestar app.

    ``Litestar(plugins=[OrchestratorPlugin()])`` serves every discovered workflow under the
    ``route_prefix`` setting. The plugin holds no run state: it reads and writes runs
    through one Prefect client per process, opened in the app's lifespan.
    """

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config or OrchestratorConfig()
        settings = self.config.settings or get_settings()
        self._api = _Api(self.config, settings)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the routes and the Prefect client's lifespan."""
        app_config.route_handlers.append(_build_router(self._api))
        app_config.lifespan = [*app_config.lifespan, self._api.lifespan]
        app_config.on_startup = [*app_config.on_startup, self._document_workflows]
        return app_config

    def _document_workflows(self, app: Litestar) -> None:
        if app.openapi_config is None:
            return
        try:
            discovery = self._api.discovery()
        except ConfigurationError:
            logger.exception("workflows could not be discovered for the OpenAPI document")
            return
        add_workflow_operations(app, discovery, self._api.prefix)


def create_app(config: OrchestratorConfig | None = None, *, debug: bool = False) -> Litestar:
    """A ready app: the orchestrator API, with its OpenAPI document at ``/schema``."""
    from runners_orchestrator import __version__  # noqa: PLC0415

    return Litestar(
        plugins=[OrchestratorPlugin(config)],
        openapi_config=OpenAPIConfig(title="runners-orchestrator", version=__version__),
        exception_handlers=exception_handlers(),
        debug=debug,
    )
