"""The orchestrator's routes: list, start, status, run envelope and cancel.

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
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, SkipValidation
from prefect.client.schemas.objects import StateType

from runners_orchestrator.api._errors import ApiError, exception_handlers
from runners_orchestrator.api._gateway import PrefectGateway
from runners_orchestrator.api._params import bind_parameters
from runners_orchestrator.api._state import ApiState, find_workflow, run_status
from runners_orchestrator.discovery import Discovery

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["OrchestratorController"]

STATUS_CODE = {"failed": 500, "crashed": 500, "cancelled": 409}
"""HTTP status of the status route for runs that ended without a result."""

MAX_IDEMPOTENCY_KEY = 255

# The dependencies are our own objects, handed over as they are: Litestar is told not to
# validate (and so copy) them.
Orchestrator = SkipValidation[ApiState]
Gateway = SkipValidation[PrefectGateway]
Workflows = SkipValidation[Discovery]


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

    Mount it through :class:`OrchestratorPlugin`, which provides its dependencies; a
    subclass may override ``path`` as with any Litestar controller.
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

    @get("/", summary="List the workflows", description="Every workflow, with its parameters.")
    async def list_workflows(
        self, orchestrator: Orchestrator, discovery: Workflows
    ) -> dict[str, Any]:
        """Every workflow, with its description and parameter schema."""
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
            "usage": {"method": "POST", "endpoint": f"{orchestrator.prefix}/{{orchestratorName}}"},
        }

    @post(
        "/{name:str}",
        status_code=202,
        summary="Start a run",
        description="Validate the body against the workflow's parameters and start a run.",
    )
    async def start(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
        discovery: Workflows,
    ) -> Response[dict[str, Any]]:
        """Validate the body against the workflow's parameters, then create a flow run."""
        workflow = find_workflow(discovery, name)
        orchestrator.authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
        values, parameters = bind_parameters(workflow, body)
        await orchestrator.check_targets(values)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key: 1 to 255 characters")
        flow_run = await prefect.start(workflow, parameters, key)
        run_id = str(flow_run.id)
        started = {
            "runId": run_id,
            "orchestrator": workflow.name,
            "status": "started",
            "statusUrl": f"{orchestrator.prefix}/{quote(workflow.name)}?runId={run_id}",
            "uiUrl": orchestrator.ui_url(run_id),
        }
        return Response(started, status_code=202)

    @get("/{name:str}", summary="Status or result of a run", cache_control=None)
    async def status(
        self,
        name: FromPath[str],
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
        discovery: Workflows,
    ) -> Response[Any]:
        """202 while the run is on its way, its result once completed, else why it ended."""
        workflow = find_workflow(discovery, name)
        run_id = orchestrator.parse_run_id(request.query_params.get("runId"))
        flow_run = await orchestrator.read_run(run_id)
        if await prefect.flow_name(flow_run.flow_id) != workflow.flow.name:
            raise ApiError(404, "run_not_found", f"run {run_id} is not a run of {workflow.name}")
        state = run_status(flow_run)
        if state == "completed":
            return Response(await orchestrator.result_of(flow_run), status_code=200)
        if state in STATUS_CODE:
            ended = {"runId": str(run_id), "status": state, "error": _error_text(flow_run)}
            return Response(ended, status_code=STATUS_CODE[state])
        body: dict[str, object] = {"runId": str(run_id), "status": state}
        if state == "running":
            progress = await prefect.progress(run_id)
            if progress is not None:
                body["progress"] = {"done": progress[0], "total": progress[1]}
        return Response(body, status_code=202)

    @get("/runs/{run_id:str}", summary="A run's envelope", cache_control=None)
    async def run_envelope(
        self, run_id: FromPath[str], orchestrator: Orchestrator
    ) -> dict[str, Any]:
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

    @post("/runs/{run_id:str}/cancel", status_code=202, summary="Cancel a run")
    async def cancel(
        self,
        run_id: FromPath[str],
        request: Request[Any, Any, Any],
        orchestrator: Orchestrator,
        prefect: Gateway,
    ) -> Response[dict[str, Any]]:
        """Ask Prefect to cancel the run; a run that already ended is a 409."""
        orchestrator.authorize(request)
        flow_run = await orchestrator.read_run(orchestrator.parse_run_id(run_id))
        if flow_run.state is not None and flow_run.state.is_final():
            raise ApiError(
                409,
                "run_finished",
                f"run {flow_run.id} has already ended ({run_status(flow_run)}); nothing to cancel",
                {"status": run_status(flow_run)},
            )
        new_status = await prefect.cancel(flow_run)
        return Response({"runId": str(flow_run.id), "status": new_status}, status_code=202)
