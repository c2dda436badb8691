"""The JSON bodies the API answers with, as types: what the OpenAPI document shows.

The handlers build plain dicts; these ``TypedDict`` classes only describe them, so that
Litestar puts one schema per shape in ``components/schemas`` and every response refers to
it. Keys are camelCase, as on the wire.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

__all__ = ["ErrorBody", "Health", "Ready", "RunEnded"]


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
