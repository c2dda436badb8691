"""The JSON bodies the API answers with, as types: what the OpenAPI document shows.

The handlers build plain dicts; these ``TypedDict`` classes only describe them, so that
Litestar puts one schema per shape in ``components/schemas`` and every response refers to
it. Keys are camelCase, as on the wire.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

__all__ = ["ErrorBody", "Health", "Ready", "RunEnded", "SuiteInfo", "SuiteList"]


class _ErrorFields(TypedDict):
    error: str
    """A stable code: ``workflow_not_found``, ``invalid_parameters``, ..."""
    message: str
    """What happened, with the value, and what to do."""
    details: dict[str, Any]
    """Machine-readable details: ``issues`` with field paths for a 400, ..."""


# ``total=False`` rather than ``NotRequired``: under ``from __future__ import annotations``
# Python 3.11 does not see ``NotRequired`` in a string annotation.
class ErrorBody(_ErrorFields, total=False):
    """Every error of the orchestrator API: a stable code, what to do, and details."""

    availableOrchestrators: list[str]
    """With ``workflow_not_found``: the workflows that exist."""


class RunEnded(TypedDict):
    """A run that ended without a result: failed, crashed or cancelled."""

    runId: str
    status: Literal["failed", "crashed", "cancelled"]
    error: str | None
    """Prefect's state message."""


class Health(TypedDict):
    """Liveness: the process serves requests."""

    status: Literal["ok"]


class Ready(TypedDict):
    """Readiness: Prefect answers and every workflow's deployment exists."""

    status: Literal["ready"]
    workflows: list[str]
    """Every discovered workflow; each can start."""


class SuiteInfo(TypedDict):
    """A check suite: from its file, and from Prefect its deployment's state."""

    name: str
    workflow: str
    description: str | None
    schedule: str | None
    """``every 5m (UTC)``, ``cron */5 * * * * (Europe/Berlin)``; null: run on demand only."""
    jobs: int
    """Jobs of one run (one per job and region)."""
    deployment: str
    deploymentId: str | None
    """Null until ``serve-flows`` (or ``prefect deploy``) registered it."""
    paused: bool | None
    """Prefect's pause of the deployment; null when it is not registered."""
    nextRunAt: str | None
    """The next scheduled run's start (ISO 8601); null when none is scheduled."""


class SuiteList(TypedDict):
    """Every check suite, and one line per problem of the invalid suite files."""

    suites: list[SuiteInfo]
    problems: list[str]
