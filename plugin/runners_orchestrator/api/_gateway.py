"""Everything the API asks of Prefect, with retries where Prefect's SQLite server needs them.

Prefect's server on SQLite answers 503 ("database is locked") when writes contend, and may
be briefly unreachable while it restarts. The gateway retries transient failures with
exponential backoff and full jitter, bounded in attempts, and sends at most
``prefect_write_concurrency`` run creations at once per process, so that a burst of clients
queues here instead of piling onto the database. Errors leave this module translated:
:class:`PrefectUnavailableError` (the caller answers 503) or :class:`RunNotFoundError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import httpx
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, Settings, get_current_settings
from prefect.states import Cancelled, Cancelling

from runners_orchestrator.exceptions import PrefectUnavailableError, RunNotFoundError
from runners_orchestrator.reporting import read_progress
from runners_orchestrator.results import read_result

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import State

    from runners_orchestrator.discovery import Workflow

__all__ = ["DeploymentMissingError", "PrefectGateway", "PrefectRefusedError"]

T = TypeVar("T")
logger = logging.getLogger("runners_orchestrator.api")

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
PAGE = 200
"""Deployments read per request (Prefect's default limit)."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_STATUSES
    return False


class PrefectRefusedError(Exception):
    """Prefect refused to create the run (a 4xx other than 404/408/425/429)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Prefect refused the run (HTTP {status}): {detail}")
        self.status = status
        self.detail = detail


class DeploymentMissingError(PrefectUnavailableError):
    """No deployment serves the workflow yet: it cannot start until one is registered."""

    def __init__(self, message: str, workflow: str) -> None:
        super().__init__(message)
        self.workflow = workflow


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail", body) if isinstance(body, dict) else body)[:300]


@dataclass
class PrefectGateway:
    """The API's one Prefect client, and the policies around it."""

    client: PrefectClient
    write_concurrency: int = 4
    attempts: int = 100
    retry_seconds: float = 30.0
    backoff: float = 0.1
    backoff_max: float = 1.0
    _writes: asyncio.Semaphore = field(init=False)
    _settings: Settings = field(init=False)
    _http: httpx.AsyncClient = field(init=False)
    _deployments: dict[str, UUID] = field(default_factory=dict)
    _flow_names: dict[UUID, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._writes = asyncio.Semaphore(self.write_concurrency)
        # Our retries replace the Prefect client's: its backoff (2, 4, 8, ... s) would hold
        # a client's request for a minute while Prefect is down, where we answer 503.
        self._settings = get_current_settings().copy_with_update(
            updates={PREFECT_CLIENT_MAX_RETRIES: 0}
        )
        # Run creation, the hot write, goes through a plain httpx client: Prefect's client
        # sleeps about 2 s after a 503 before returning it even with retries off, which our
        # own retry makes pointless. Same base URL and headers (auth) as Prefect's client.
        settings = get_current_settings().api
        verify: bool | ssl.SSLContext = True
        if settings.tls_insecure_skip_verify:
            verify = False
        elif settings.ssl_cert_file:
            verify = ssl.create_default_context(cafile=settings.ssl_cert_file)
        self._http = httpx.AsyncClient(
            base_url=f"{str(self.client.api_url).rstrip('/')}/",
            headers=dict(self.client._client.headers),  # noqa: SLF001 - its auth headers
            timeout=httpx.Timeout(30.0, connect=5.0),
            verify=verify,  # as Prefect's own client: PREFECT_API_SSL_CERT_FILE, ...
        )

    async def aclose(self) -> None:
        """Close the plain HTTP client (the Prefect client is closed by its owner)."""
        await self._http.aclose()

    @property
    def api_url(self) -> str:
        """The Prefect API this gateway talks to."""
        return str(self.client.api_url)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                with SettingsContext(
                    profile=get_settings_context().profile, settings=self._settings
                ):
                    return await call()
            except ObjectNotFound:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if attempt == self.attempts or time.monotonic() >= deadline:
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    raise PrefectUnavailableError(
                        f"the Prefect API at {self.api_url} did not answer ({what}): {reason}; "
                        "retry later"
                    ) from exc
                delay = random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt))  # noqa: S311
                logger.debug("%s failed (%s); retry %d in %.2fs", what, exc, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def deployment_id(self, workflow: Workflow, deployment: str | None = None) -> UUID:
        """The id of the deployment that runs ``workflow`` (cached per process).

        ``deployment`` names another deployment of the workflow's flow than its own (a
        check suite's, ``suite-shop``).

        Raises:
            PrefectUnavailableError: no deployment serves the workflow.
        """
        name = workflow.deployment_name(deployment)
        cached = self._deployments.get(name)
        if cached is not None:
            return cached
        try:
            found = await self._call(
                "read deployment", lambda: self.client.read_deployment_by_name(name)
            )
        except ObjectNotFound:
            raise DeploymentMissingError(
                f"no deployment {name!r} in Prefect yet: start `runners-orchestrator "
                "serve-flows` (or `dev`), or deploy with `runners-orchestrator deploy && "
                "prefect deploy --all`; retry later",
                workflow.name,
            ) from None
        self._deployments[name] = found.id
        return found.id

    async def start(
        self,
        workflow: Workflow,
        parameters: dict[str, Any],
        idempotency_key: str | None,
        deployment: str | None = None,
    ) -> UUID:
        """Create a flow run of ``workflow``'s deployment (or of its ``deployment``); its id.

        The body is built as JSON directly (``parameters`` are JSON already; without a
        state Prefect schedules the run now) and only the id is read from the answer:
        Prefect's own models for both cost a tenth of the API's CPU per start (py-spy).
        """
        full_name = workflow.deployment_name(deployment)
        deployment_id = await self.deployment_id(workflow, deployment)
        body: dict[str, Any] = {"parameters": parameters}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key

        async def create() -> UUID:
            response = await self._http.post(
                f"deployments/{deployment_id}/create_flow_run", json=body
            )
            if response.status_code == httpx.codes.NOT_FOUND:
                raise ObjectNotFound(
                    http_exc=httpx.HTTPStatusError(
                        "deployment not found", request=response.request, response=response
                    )
                )
            if response.status_code >= httpx.codes.BAD_REQUEST and not _is_transient(
                httpx.HTTPStatusError("", request=response.request, response=response)
            ):
                raise PrefectRefusedError(response.status_code, _detail(response))
            response.raise_for_status()
            return UUID(response.json()["id"])

        # A start keeps its write slot through its retries: requests are served in the
        # order they got a slot, so none starves behind newcomers while SQLite is busy.
        try:
            async with self._writes:
                return await self._call("create flow run", create)
        except ObjectNotFound:
            # The deployment was deleted since we cached it (a reload, a redeploy): once more.
            self._deployments.pop(full_name, None)
            deployment_id = await self.deployment_id(workflow, deployment)
            try:
                async with self._writes:
                    return await self._call("create flow run", create)
            except ObjectNotFound:
                # Deleted again in between: not startable right now, never a 500.
                self._deployments.pop(full_name, None)
                raise DeploymentMissingError(
                    f"the deployment of {workflow.name!r} disappeared while the run was "
                    "created (serve-flows restarting?); retry later",
                    workflow.name,
                ) from None

    async def deployed(self, workflows: Iterable[Workflow]) -> set[str]:
        """Names of ``workflows`` whose deployment exists in Prefect now.

        One attempt per request, no retries: the caller bounds the time (a readiness
        probe answers within seconds, whatever Prefect does). Keeps the start path's
        deployment cache in step with what it found.

        Raises:
            PrefectUnavailableError: Prefect did not answer.
        """
        wanted = {w.deployment_name(): w.name for w in workflows}
        if not wanted:
            return set()
        flows = FlowFilter(name=FlowFilterName(any_=sorted({k.split("/")[0] for k in wanted})))
        names = DeploymentFilter(name=DeploymentFilterName(any_=sorted(set(wanted.values()))))
        found: dict[str, UUID] = {}
        offset = 0
        try:
            with SettingsContext(profile=get_settings_context().profile, settings=self._settings):
                while True:
                    page = await self.client.read_deployments(
                        flow_filter=flows, deployment_filter=names, limit=PAGE, offset=offset
                    )
                    for deployment in page:
                        full = f"{await self.flow_name(deployment.flow_id)}/{deployment.name}"
                        found[full] = deployment.id
                    if len(page) < PAGE:
                        break
                    offset += PAGE
        except (httpx.HTTPError, ObjectNotFound) as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise PrefectUnavailableError(
                f"the Prefect API at {self.api_url} did not answer (read deployments): {reason}"
            ) from exc
        for full in wanted:
            if full in found:
                self._deployments[full] = found[full]
            else:
                self._deployments.pop(full, None)
        return {wanted[full] for full in found if full in wanted}

    async def suite_deployments(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Deployment name → ``{"id", "paused", "nextRunAt"}`` for those of ``names`` that exist.

        ``nextRunAt`` is the earliest scheduled run's expected start (ISO 8601), or None.
        """
        from prefect.client.schemas.filters import (  # noqa: PLC0415
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.sorting import FlowRunSort  # noqa: PLC0415

        wanted = sorted(set(names))
        if not wanted:
            return {}
        by_name = DeploymentFilter(name=DeploymentFilterName(any_=wanted))
        found = await self._call(
            "read deployments",
            lambda: self.client.read_deployments(deployment_filter=by_name, limit=PAGE),
        )
        out = {d.name: {"id": str(d.id), "paused": d.paused, "nextRunAt": None} for d in found}
        ids = {d.id: d.name for d in found}
        if ids:
            scheduled = FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=list(ids)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            )
            runs = await self._call(
                "read scheduled runs",
                lambda: self.client.read_flow_runs(
                    flow_run_filter=scheduled,
                    sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
                    limit=PAGE,
                ),
            )
            for run in runs:
                entry = out[ids[run.deployment_id]] if run.deployment_id in ids else None
                when = run.next_scheduled_start_time or run.expected_start_time
                if entry is not None and entry["nextRunAt"] is None and when is not None:
                    entry["nextRunAt"] = when.isoformat()
        return out

    async def read(self, run_id: UUID) -> FlowRun:
        """The flow run ``run_id``.

        Raises:
            RunNotFoundError: Prefect has no such run.
        """
        try:
            return await self._call("read flow run", lambda: self.client.read_flow_run(run_id))
        except ObjectNotFound:
            raise RunNotFoundError(f"no run {run_id}") from None

    async def flow_name(self, flow_id: UUID) -> str:
        """The name of the flow ``flow_id`` (cached: flows are never renamed)."""
        if flow_id not in self._flow_names:
            flow = await self._call("read flow", lambda: self.client.read_flow(flow_id))
            self._flow_names[flow_id] = flow.name
        return self._flow_names[flow_id]

    async def result(self, run_id: UUID) -> Any:
        """The recorded return value of a completed run (see ``results``)."""
        return await self._call("read result", lambda: read_result(self.client, run_id))

    async def progress(self, run_id: UUID) -> tuple[int, int] | None:
        """``(done, total)`` jobs of a running orchestration, when it reports them."""
        return await self._call("read progress", lambda: read_progress(self.client, run_id))

    async def retry(self, flow_run: FlowRun) -> None:
        """Schedule ``flow_run`` to run again, as the Prefect UI's Retry button does.

        The same flow run runs again on whichever process serves its deployment; its
        completed jobs are kept (see ``runners_orchestrator.checkpoints``).
        """
        from prefect.states import AwaitingRetry  # noqa: PLC0415

        state: State[Any] = AwaitingRetry(message="retried through the orchestrator API")
        await self._call(
            "retry flow run",
            lambda: self.client.set_flow_run_state(flow_run.id, state, force=True),
        )

    async def cancel(self, flow_run: FlowRun) -> str:
        """Ask Prefect to cancel ``flow_run``; return the state name it is now in.

        A run that has not started yet is cancelled at once; a running one is marked
        CANCELLING, and the process serving it stops it.
        """
        state_type = flow_run.state.type if flow_run.state else None
        not_started = state_type in {StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}
        state: State[Any] = Cancelled() if not_started else Cancelling()
        await self._call(
            "cancel flow run",
            lambda: self.client.set_flow_run_state(flow_run.id, state, force=True),
        )
        return "cancelled" if not_started else "cancelling"
