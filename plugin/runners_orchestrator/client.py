"""Start a run and follow it, through the HTTP API or straight through Prefect.

What the CLI's ``run`` uses. Both ways answer the same questions — which workflows exist,
start this one with these parameters, how far is the run, what did it return — so the
command does not care which one it has.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

import httpx

from runners_orchestrator.exceptions import (
    OrchestratorError,
    PrefectUnavailableError,
    WorkflowNotFoundError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from prefect.client.orchestration import PrefectClient

    from runners_orchestrator.api._gateway import PrefectGateway
    from runners_orchestrator.discovery import Discovery

__all__ = ["ApiBackend", "Backend", "PrefectBackend", "RunStartError", "RunState"]

TRANSIENT = frozenset({502, 503, 504})
"""Answers that a poller, and a start, wait out."""

UNANSWERED = (httpx.RemoteProtocolError, httpx.ReadError)
"""A connection closed (or reset) after the request went out, before any answer."""

START_WAIT_SECONDS = 60.0
"""How long a start waits out an API that is not ready yet before giving up."""


class RunStartError(OrchestratorError):
    """The run could not be started: the message says why (a bad body, no deployment ...)."""


@dataclass(frozen=True)
class RunState:
    """Where a run is: ``status`` as the API names it, progress, and the result when done."""

    run_id: str
    status: str
    done: int | None = None
    total: int | None = None
    result: Any = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run ended (however it ended)."""
        return self.status in {"completed", "failed", "crashed", "cancelled"}


class Backend(Protocol):
    """A way to start and follow runs."""

    async def workflows(self) -> dict[str, dict[str, Any]]:
        """Workflow name → its parameter schema."""
        ...

    async def start(self, name: str, body: dict[str, Any]) -> str:
        """Start ``name`` with ``body`` as its parameters; return the run id."""
        ...

    async def state(self, name: str, run_id: str) -> RunState:
        """The run's state now."""
        ...

    async def start_suite(
        self, suite: str, tags: list[str], regions: list[str]
    ) -> tuple[str, str, int]:
        """Start a run of ``suite``'s deployment with its matching jobs.

        Returns:
            The suite's workflow, the run id, and how many jobs the run has.
        """
        ...


class ApiBackend:
    """Through the orchestrator HTTP API (``ORCHESTRATOR_API_URL``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        prefix: str,
        token: str | None = None,
        *,
        start_wait: float = START_WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.start_wait = start_wait
        self.on_wait = on_wait

    async def _request(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send once, and once more at once if the connection closed without an answer.

        A load balancer (HAProxy) that reused an idle connection its backend was closing at
        that moment closes the client's connection unanswered, on purpose, for the client to
        retry. Every request here may be sent twice: GETs read, and a start carries its
        ``Idempotency-Key``.
        """
        headers = {**self.headers, **(headers or {})}
        try:
            try:
                return await self.client.request(method, path, headers=headers, **kwargs)
            except UNANSWERED:
                return await self.client.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise PrefectUnavailableError(
                f"the orchestrator API at {self.client.base_url} does not answer: {exc}"
            ) from exc

    async def workflows(self) -> dict[str, dict[str, Any]]:
        """Workflow name → its parameter schema, from the API's list."""
        response = await self._request("GET", self.prefix)
        if response.status_code != httpx.codes.OK:
            raise RunStartError(
                f"the orchestrator API at {self.client.base_url} answered "
                f"HTTP {response.status_code} to the workflow list"
            )
        return {w["name"]: w["parameters"] for w in response.json()["workflows"]}

    async def start(self, name: str, body: dict[str, Any]) -> str:
        """POST the run; the API validates the body.

        An API that is not ready yet (503 with ``Retry-After``, or a proxy's 502/504) is
        waited out for up to ``start_wait`` seconds, saying so through ``on_wait``. Every
        attempt carries the same ``Idempotency-Key``, so a retry after an answer that was
        lost on the way can never start a second run.
        """
        run_id, _ = await self._post_start(name, body)
        return run_id

    async def _post_start(self, name: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        headers = {"Idempotency-Key": f"cli-{uuid.uuid4()}"}
        deadline = time.monotonic() + self.start_wait
        while True:
            response = await self._request(
                "POST", f"{self.prefix}/{name}", json=body, headers=headers
            )
            delay = _retry_delay(response)
            if delay is None or time.monotonic() + delay > deadline:
                break
            if self.on_wait is not None:
                reason = _message(response)
                self.on_wait(
                    f"the API is not ready to start {name} (HTTP {response.status_code}: "
                    f"{reason}); retrying in {delay:g}s"
                )
            await asyncio.sleep(delay)
        if response.status_code != httpx.codes.ACCEPTED:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise RunStartError(f"HTTP {response.status_code}: {message}")
        answer = response.json()
        return str(answer["runId"]), answer

    async def start_suite(
        self, suite: str, tags: list[str], regions: list[str]
    ) -> tuple[str, str, int]:
        """Find the suite's workflow in the API's suite list, then start it there."""
        response = await self._request("GET", f"{self.prefix}/suites")
        if response.status_code != httpx.codes.OK:
            raise RunStartError(
                f"the orchestrator API at {self.client.base_url} answered "
                f"HTTP {response.status_code} to the suite list: {_message(response)}"
            )
        listed = {item["name"]: item for item in response.json()["suites"]}
        if suite not in listed:
            available = ", ".join(sorted(listed)) or "none"
            raise RunStartError(f"no suite {suite!r}; available suites: {available}")
        workflow = str(listed[suite]["workflow"])
        body = {"suite": suite, "tags": tags, "regions": regions}
        run_id, answer = await self._post_start(workflow, body)
        return workflow, run_id, int(answer.get("jobs", 0))

    async def state(self, name: str, run_id: str) -> RunState:
        """Poll the status route; a passing outage (503, a proxy's 502) reads as "waiting"."""
        try:
            response = await self._request("GET", f"{self.prefix}/{name}", params={"runId": run_id})
        except PrefectUnavailableError:
            return RunState(run_id, "waiting")
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == httpx.codes.OK:
            return RunState(run_id, "completed", result=body)
        if response.status_code == httpx.codes.ACCEPTED and isinstance(body, dict):
            progress = body.get("progress") or {}
            return RunState(run_id, body["status"], progress.get("done"), progress.get("total"))
        if isinstance(body, dict) and "status" in body:
            return RunState(run_id, body["status"], error=body.get("error"))
        if response.status_code in TRANSIENT:
            return RunState(run_id, "waiting")
        message = body.get("message", body) if isinstance(body, dict) else response.text[:200]
        raise RunStartError(f"HTTP {response.status_code}: {message}")


def _retry_delay(response: httpx.Response) -> float | None:
    """Seconds to wait before starting again, or ``None`` when the answer is final."""
    if response.status_code not in TRANSIENT:
        return None
    try:
        seconds = float(response.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.2), 10.0)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message", body))
    return str(body)[:200]


class PrefectBackend:
    """Straight through the Prefect API (``PREFECT_API_URL``), with local discovery."""

    def __init__(self, gateway: PrefectGateway, discovery: Discovery) -> None:
        self.gateway = gateway
        self.discovery = discovery

    @property
    def client(self) -> PrefectClient:
        """The Prefect client."""
        return self.gateway.client

    async def workflows(self) -> dict[str, dict[str, Any]]:
        """Workflow name → its parameter schema, from the project's files."""
        return {n: self.discovery.workflows[n].parameters for n in self.discovery.names()}

    async def start(self, name: str, body: dict[str, Any]) -> str:
        """Validate ``body`` as the API would, then create the flow run."""
        from runners_orchestrator.api._errors import ApiError  # noqa: PLC0415
        from runners_orchestrator.api._params import bind_parameters  # noqa: PLC0415

        try:
            workflow = self.discovery.get(name)
        except WorkflowNotFoundError as exc:
            raise RunStartError(str(exc)) from None
        try:
            _, parameters = bind_parameters(workflow, body)
        except ApiError as exc:
            raise RunStartError(exc.message) from None
        return str(await self.gateway.start(workflow, parameters, None))

    async def start_suite(
        self, suite: str, tags: list[str], regions: list[str]
    ) -> tuple[str, str, int]:
        """Select the suite's jobs from the local suite files, then run its deployment."""
        from runners_orchestrator.monitoring.scheduling import check_workflow  # noqa: PLC0415
        from runners_orchestrator.monitoring.selection import (  # noqa: PLC0415
            SuiteSelection,
            select_suite_run,
        )
        from runners_orchestrator.monitoring.suites import scan_suites  # noqa: PLC0415
        from runners_orchestrator.settings import get_settings  # noqa: PLC0415

        scan = scan_suites(self.discovery.root, get_settings().suites)
        try:
            selection = SuiteSelection(suite=suite, tags=tags, regions=regions)
            run = select_suite_run(scan.suites, selection, scan.broken)
            workflow = check_workflow(run.suite, self.discovery)
        except (OrchestratorError, ValueError) as exc:
            problems = [line for line in scan.problems if f"{suite}.toml" in line]
            raise RunStartError("; ".join([str(exc), *problems])) from None
        run_id = await self.gateway.start(workflow, run.parameters, None, run.suite.deployment_name)
        return workflow.name, str(run_id), run.job_count

    async def state(self, name: str, run_id: str) -> RunState:
        """Read the flow run, its progress and, once completed, its result."""
        from runners_orchestrator.api._plugin import STATUS_BY_STATE  # noqa: PLC0415

        del name
        flow_run = await self.gateway.read(UUID(run_id))
        state = flow_run.state
        status = STATUS_BY_STATE.get(state.type, "pending") if state else "pending"
        if status == "completed":
            return RunState(run_id, status, result=await self.gateway.result(UUID(run_id)))
        if status in {"failed", "crashed", "cancelled"}:
            return RunState(run_id, status, error=state.message if state else None)
        progress = await self.gateway.progress(UUID(run_id))
        done, total = progress or (None, None)
        return RunState(run_id, status, done, total)
