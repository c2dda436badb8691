"""The orchestrator's routes: list, start, status, run envelope, cancel, suites, and the probes.

:class:`OrchestratorController` is mounted by :class:`OrchestratorPlugin` through
:meth:`OrchestratorController.mounted`, a subclass whose ``path`` is the ``route_prefix``
setting and whose dependencies hand every handler what it needs:

- ``orchestrator``: the plugin's :class:`ApiState` (settings, policies, helpers);
- ``prefect``: the :class:`PrefectGateway`, open while the app runs;
- ``discovery``: the workflows as they are now (re-scanned at most once a second).

The dependencies and the exception handlers live on the controller, not on the app, so they
apply to these routes only and can never clash with what the app's owner set.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post, route
from litestar.di import Provide
from litestar.enums import HttpMethod
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIType
from litestar.params import FromPath, HeaderParameter, PathParameter, QueryParameter, SkipValidation
from prefect.client.schemas.objects import StateType

from runners_orchestrator.api._errors import RETRY_AFTER_SECONDS, ApiError, exception_handlers
from runners_orchestrator.api._gateway import PrefectGateway
from runners_orchestrator.api._openapi import client_parameters
from runners_orchestrator.api._params import bind_parameters, suite_selection
from runners_orchestrator.api._schemas import ErrorBody, Health, Ready, RunEnded, SuiteList
from runners_orchestrator.api._state import ApiState, find_workflow, run_status
from runners_orchestrator.discovery import Discovery
from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from litestar.types import DataContainerType
    from prefect.client.schemas.objects import FlowRun

__all__ = ["OrchestratorController"]

STATUS_CODE = {"failed": 500, "crashed": 500, "cancelled": 409}
RETRYABLE = frozenset(STATUS_CODE)
"""Statuses of runs that ended without a result: what ``/runs/{runId}/retry`` accepts."""
"""HTTP status of the status route for runs that ended without a result."""

MAX_IDEMPOTENCY_KEY = 255

# The dependencies are our own objects, handed over as they are: Litestar is told not to
# validate (and so copy) them.
Orchestrator = SkipValidation[ApiState]
Gateway = SkipValidation[PrefectGateway]
Workflows = SkipValidation[Discovery]

# Parameters are read as plain strings, so that a missing or malformed one gets the API's
# own error code (missing_run_id, invalid_run_id, ...); the schema says what is expected.
# `str | None` would be documented as "string or null": `_STRING` states "string".
_STRING: dict[str, Any] = {"one_of": None, "type": OpenAPIType.STRING}
RunIdQuery = Annotated[
    str | None,
    QueryParameter(
        name="runId",
        required=True,
        description="The runId that start returned.",
        schema_extra={**_STRING, "format": "uuid"},
    ),
]
RunIdPath = Annotated[
    str,
    PathParameter(description="The runId that start returned.", schema_extra={"format": "uuid"}),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        description="The same key gives the same run, also under concurrent retries.",
        schema_extra={**_STRING, "min_length": 1, "max_length": MAX_IDEMPOTENCY_KEY},
    ),
]


def _answer(description: str, body: DataContainerType = ErrorBody) -> ResponseSpec:
    return ResponseSpec(data_container=body, description=description, generate_examples=False)


NOT_FOUND = _answer("No such workflow (`availableOrchestrators` lists them), or no such run.")
UNAUTHORIZED = _answer("An API token is set and `Authorization: Bearer <token>` is missing.")
MISCONFIGURED = _answer("The operator's configuration is wrong; the message says what to fix.")
UNAVAILABLE = _answer(
    "Prefect is unreachable or keeps failing, or no deployment serves the workflow yet; "
    "retry after `Retry-After` seconds."
)
BAD_RUN_ID = _answer("`runId` is missing or not a UUID.")


def _not_json(constant: str) -> Any:
    """Refuse ``NaN`` and ``Infinity``, which Python's parser accepts and JSON does not."""
    raise ValueError(f"{constant} is not a JSON value")


def _error_text(flow_run: FlowRun) -> str | None:
    state = flow_run.state
    if state is None or state.type in {StateType.COMPLETED, StateType.RUNNING}:
        return None
    if state.type in {StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}:
        return None
    return state.message or state.name


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class OrchestratorController(Controller):
    """Every discovered workflow as an HTTP endpoint, proxied to Prefect.

    :class:`OrchestratorPlugin` mounts a subclass of it (:meth:`mounted`) at the
    ``route_prefix`` setting, with the dependencies its handlers take.
    """

    path = "/api/orchestrator"
    """Where the routes live; the plugin sets it to the ``route_prefix`` setting."""
    tags = ("Orchestrator",)

    @classmethod
    def mounted(cls, state: ApiState) -> type[OrchestratorController]:
        """This controller at ``state``'s prefix, with ``state`` as its dependencies."""

        def orchestrator() -> ApiState:
            return state

        def prefect() -> PrefectGateway:
            return state.prefect

        def discovery() -> Discovery:
            return state.discovery()

        attributes: dict[str, Any] = {
            "path": state.prefix,
            "dependencies": {
                "orchestrator": Provide(orchestrator, sync_to_thread=False),
                "prefect": Provide(prefect, sync_to_thread=False),
                "discovery": Provide(discovery, sync_to_thread=False),
            },
            "exception_handlers": exception_handlers(),
            "request_max_body_size": state.settings.max_body_size,
        }
        return type(cls.__name__, (cls,), attributes)

    @get(
        "/",
        summary="List the workflows",
        description="Every workflow, with its parameters and whether it can start now.",
        responses={500: MISCONFIGURED},
    )
    async def list_workflows(
        self, orchestrator: Orchestrator, prefect: Gateway, discovery: Workflows
    ) -> dict[str, Any]:
        """Every workflow, with its description, parameter schema and ``ready``.

        ``ready`` comes from the shared readiness lookup: at most one Prefect request per
        couple of seconds, and an expired answer is served at once while it is renewed.
        """
        workflows = [discovery.workflows[n] for n in discovery.names()]
        readiness = await orchestrator.readiness.check(prefect, workflows, fresh=False)
        allow_registry = orchestrator.settings.allow_client_registry
        return {
            "orchestrators": [w.name for w in workflows],
            "workflows": [
                {
                    "name": w.name,
                    "camelName": w.camel_name,
                    "description": w.description,
                    "parameters": client_parameters(
                        w.parameters, allow_client_registry=allow_registry
                    ),
                    "ready": w.name in readiness.startable,
                }
                for w in workflows
            ],
            "usage": {"method": "POST", "endpoint": f"{orchestrator.prefix}/{{orchestratorName}}"},
        }

    @get("/health", summary="Liveness", cache_control=None)
    async def health(self) -> Health:
        """200 whenever the process serves requests; asks nothing of Prefect."""
        return {"status": "ok"}

    @get(
        "/ready",
        summary="Readiness",
        description=(
            "200 when Prefect answers and every workflow's deployment exists; else 503 with "
            "`Retry-After`, naming the workflows that cannot start yet."
        ),
        cache_control=None,
        responses={
            503: _answer(
                "Prefect is unreachable, a workflow has no deployment yet "
                "(`details.notStartable`), or the workflows cannot be discovered; retry after "
                "`Retry-After` seconds."
            )
        },
    )
    async def ready(self, orchestrator: Orchestrator, prefect: Gateway) -> Ready:
        """Whether this replica can start every workflow now."""
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        try:
            discovery = orchestrator.discovery()
        except ConfigurationError as exc:
            raise ApiError(503, "not_ready", f"not ready: {exc}", headers=retry) from None
        workflows = [discovery.workflows[n] for n in discovery.names()]
        readiness = await orchestrator.readiness.check(prefect, workflows)
        if readiness.ready:
            return {"status": "ready", "workflows": list(readiness.workflows)}
        if not readiness.prefect_reachable:
            message = f"not ready: {readiness.problem}"
        else:
            message = (
                f"not ready: no deployment yet for {', '.join(readiness.not_startable)}; "
                "start `runners-orchestrator serve-flows` (or deploy them)"
            )
        details = {
            "prefect": "reachable" if readiness.prefect_reachable else "unreachable",
            "notStartable": readiness.not_startable,
            "startable": sorted(readiness.startable),
        }
        raise ApiError(503, "not_ready", message, details, headers=retry)

    @post(
        "/{name:str}",
        status_code=202,
        summary="Start a run",
        description="Validate the body against the workflow's parameters and start a run.",
        responses={
            400: _answer(
                "The body is not JSON, does not match the workflow's parameters "
                "(`details.issues` names every field), names a refused target, or the "
                "Idempotency-Key is empty or too long; for a suite: `suite` with `jobs`, "
                "a suite of another workflow, or tags and regions that match no job."
            ),
            401: UNAUTHORIZED,
            404: _answer(
                "No such workflow (`availableOrchestrators` lists them), or no such suite "
                "(`details.availableSuites` lists them)."
            ),
            409: _answer("Prefect refused to create the run; the message carries its reason."),
            413: _answer("The body is larger than the `max_body_size` setting."),
            500: MISCONFIGURED,
            503: UNAVAILABLE,
        },
    )
    async def start(
        self,
        *,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
        discovery: Workflows,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[dict[str, Any]]:
        """Validate the body against the workflow's parameters, then create a flow run."""
        workflow = find_workflow(discovery, name)
        orchestrator.authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw, parse_constant=_not_json) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
        key = idempotency_key
        suite_run = None
        if isinstance(body, dict) and "suite" in body:
            # The suite's jobs are the operator's (its file), not the client's: no target check.
            suite_run = suite_selection(orchestrator, workflow, body)
            parameters = suite_run.parameters
        else:
            values, parameters = bind_parameters(workflow, body)
            await orchestrator.check_targets(values)
        deployment = suite_run.suite.deployment_name if suite_run is not None else None
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key: 1 to 255 characters")
        run_id = str(await prefect.start(workflow, parameters, key, deployment))
        started: dict[str, Any] = {
            "runId": run_id,
            "orchestrator": workflow.name,
            "status": "started",
            "statusUrl": f"{orchestrator.prefix}/{quote(workflow.name)}?runId={run_id}",
            "uiUrl": orchestrator.ui_url(run_id),
        }
        if suite_run is not None:
            started["suite"] = suite_run.suite.name
            started["jobs"] = suite_run.job_count
        return Response(started, status_code=202)

    @get(
        "/suites",
        summary="List the check suites",
        description="Every check suite: its workflow, schedule, job count, and from Prefect "
        "whether it is paused, its deployment and its next scheduled run. Invalid suite "
        "files are listed in `problems`, one line each.",
        cache_control=None,
        responses={500: MISCONFIGURED, 503: UNAVAILABLE},
    )
    async def list_suites(self, orchestrator: Orchestrator, prefect: Gateway) -> SuiteList:
        """The suites from the files, with what Prefect knows of their deployments."""
        scan = orchestrator.suites()
        suites = [scan.suites[name] for name in sorted(scan.suites)]
        deployed = await prefect.suite_deployments(s.deployment_name for s in suites)
        return {
            "suites": [
                {
                    "name": suite.name,
                    "workflow": suite.workflow,
                    "description": suite.description,
                    "schedule": suite.schedule.describe() if suite.schedule else None,
                    "jobs": len(suite.runner_jobs()),
                    "deployment": suite.deployment_name,
                    "deploymentId": deployed.get(suite.deployment_name, {}).get("id"),
                    "paused": deployed.get(suite.deployment_name, {}).get("paused"),
                    "nextRunAt": deployed.get(suite.deployment_name, {}).get("nextRunAt"),
                }
                for suite in suites
            ],
            "problems": list(scan.problems),
        }

    @get(
        "/{name:str}",
        summary="Status or result of a run",
        cache_control=None,
        responses={
            202: _answer("The run is pending, running or cancelling.", dict[str, Any]),
            400: BAD_RUN_ID,
            404: NOT_FOUND,
            409: _answer("The run was cancelled.", RunEnded),
            500: _answer(
                "The run failed or crashed (`status`, `error`), or the operator's "
                "configuration is wrong.",
                RunEnded | ErrorBody,  # type: ignore[arg-type]
            ),
            503: UNAVAILABLE,
        },
    )
    async def status(
        self,
        *,
        name: FromPath[str],
        orchestrator: Orchestrator,
        prefect: Gateway,
        discovery: Workflows,
        run_id: RunIdQuery = None,
    ) -> Response[Any]:
        """202 while the run is on its way, its result once completed, else why it ended."""
        workflow = find_workflow(discovery, name)
        uuid = orchestrator.parse_run_id(run_id)
        flow_run = await orchestrator.read_run(uuid)
        if await prefect.flow_name(flow_run.flow_id) != workflow.flow.name:
            raise ApiError(404, "run_not_found", f"run {uuid} is not a run of {workflow.name}")
        state = run_status(flow_run)
        if state == "completed":
            return Response(await orchestrator.result_of(flow_run), status_code=200)
        if state in STATUS_CODE:
            ended = {"runId": str(uuid), "status": state, "error": _error_text(flow_run)}
            return Response(ended, status_code=STATUS_CODE[state])
        body: dict[str, object] = {"runId": str(uuid), "status": state}
        if state == "running":
            progress = await prefect.progress(uuid)
            if progress is not None:
                body["progress"] = {"done": progress[0], "total": progress[1]}
        return Response(body, status_code=202)

    @route("/{name:str}", http_method=HttpMethod.OPTIONS, include_in_schema=False)
    async def options(self) -> Response[None]:
        """The methods of ``/{name}``: Litestar 2 lists only the first one (litestar#4169)."""
        return Response(None, status_code=204, headers={"Allow": "GET, OPTIONS, POST"})

    @get(
        "/runs/{run_id:str}",
        summary="A run's envelope",
        cache_control=None,
        responses={400: BAD_RUN_ID, 404: NOT_FOUND, 500: MISCONFIGURED, 503: UNAVAILABLE},
    )
    async def run_envelope(self, run_id: RunIdPath, orchestrator: Orchestrator) -> dict[str, Any]:
        """The run's status, result, error and times, whichever workflow it belongs to."""
        flow_run = await orchestrator.read_run(orchestrator.parse_run_id(run_id))
        state = run_status(flow_run)
        return {
            "runId": str(flow_run.id),
            "orchestrator": await orchestrator.orchestrator_of(flow_run),
            "status": state,
            "result": await orchestrator.result_of(flow_run) if state == "completed" else None,
            "error": _error_text(flow_run),
            "createdAt": _iso(flow_run.created),
            "startedAt": _iso(flow_run.start_time),
            "endedAt": _iso(flow_run.end_time),
            "uiUrl": orchestrator.ui_url(flow_run.id),
        }

    @post(
        "/runs/{run_id:str}/retry",
        status_code=202,
        summary="Retry a run that ended without completing",
        description="Runs the same flow run again; the jobs it had completed are kept, not "
        "run again. Only a failed, crashed or cancelled run can be retried.",
        responses={
            400: BAD_RUN_ID,
            401: UNAUTHORIZED,
            404: NOT_FOUND,
            409: _answer("The run has not ended, or it completed: nothing to retry."),
            503: UNAVAILABLE,
        },
    )
    async def retry(
        self,
        *,
        run_id: RunIdPath,
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
    ) -> Response[dict[str, Any]]:
        """Schedule a failed, crashed or cancelled run again; anything else is a 409."""
        flow_run = await orchestrator.run_to_change(request, run_id)
        status = run_status(flow_run)
        if status not in RETRYABLE:
            raise ApiError(
                409,
                "run_not_retryable",
                f"run {flow_run.id} is {status}: only a failed, crashed or cancelled run can be "
                "retried",
                {"status": status},
            )
        await prefect.retry(flow_run)
        return Response({"runId": str(flow_run.id), "status": "pending"}, status_code=202)

    @post(
        "/runs/{run_id:str}/cancel",
        status_code=202,
        summary="Cancel a run",
        responses={
            400: BAD_RUN_ID,
            401: UNAUTHORIZED,
            404: NOT_FOUND,
            409: _answer("The run has already ended: nothing to cancel."),
            503: UNAVAILABLE,
        },
    )
    async def cancel(
        self,
        *,
        run_id: RunIdPath,
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
    ) -> Response[dict[str, Any]]:
        """Ask Prefect to cancel the run; a run that already ended is a 409."""
        flow_run = await orchestrator.run_to_change(request, run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            raise ApiError(
                409,
                "run_finished",
                f"run {flow_run.id} has already ended ({run_status(flow_run)}); nothing to cancel",
                {"status": run_status(flow_run)},
            )
        new_status = await prefect.cancel(flow_run)
        return Response({"runId": str(flow_run.id), "status": new_status}, status_code=202)
