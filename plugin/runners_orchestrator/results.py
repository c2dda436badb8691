"""A run's return value, kept in Prefect's database so that any process can read it.

Prefect persists results to *result storage*: by default a folder on the disk of the
process that ran the flow, which an API replica on another machine cannot read. Rather than
require shared storage, every workflow records its return value, as JSON, in an artifact of
its flow run (type :data:`RESULT_ARTIFACT_TYPE`) before it returns. The artifact lives in
Prefect's database, so any process that reaches the Prefect API reads it, with the embedded
SQLite server as with PostgreSQL, and it shows on the run's page in the Prefect UI.

The value is written in its JSON form, camelCase for our models (``to_jsonable_python``
with aliases), exactly as the HTTP API returns it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from pydantic_core import to_jsonable_python

from runners_orchestrator.last_writes import collect_last_writes

if TYPE_CHECKING:
    from collections.abc import Callable
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Artifact

__all__ = [
    "RESULT_ARTIFACT_TYPE",
    "read_artifact",
    "read_result",
    "recording_result",
    "to_json",
]

RESULT_ARTIFACT_TYPE = "runners-orchestrator-result"

P = ParamSpec("P")
R = TypeVar("R")

_MISSING = object()


def to_json(value: object) -> Any:
    """The JSON form of a return value: camelCase for wire models, ISO dates, ..."""
    return to_jsonable_python(value, by_alias=True, fallback=repr)


def _artifact(value: object, name: str) -> Any:
    from prefect.artifacts import Artifact  # noqa: PLC0415 - Prefect is heavy to import

    return Artifact(
        type=RESULT_ARTIFACT_TYPE,
        data=to_json(value),
        description=f"Return value of {name}, as the HTTP API serves it.",
    )


def recording_result(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a workflow function so that its return value is recorded before it returns.

    The wrapper keeps the function's signature, name and docstring (``functools.wraps``),
    so Prefect computes the same parameters. Recording happens inside the flow run: the
    run is only ``COMPLETED`` once its result can be read.
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def record_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            # The result is written together with the run's other last writes, and a
            # result that could not be written fails the run.
            async with collect_last_writes():
                value = await fn(*args, **kwargs)
                recorded = asyncio.ensure_future(_artifact(value, fn.__name__).acreate())
            await recorded
            return value

        return _resolved(record_async, fn)

    @functools.wraps(fn)
    def record_sync(*args: P.args, **kwargs: P.kwargs) -> R:
        value = fn(*args, **kwargs)
        _artifact(value, fn.__name__).create()
        return value

    return _resolved(record_sync, fn)


def _resolved(wrapper: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``wrapper`` the signature of ``fn`` with its annotations evaluated.

    With ``from __future__ import annotations`` the hints are strings, which Prefect would
    resolve in the wrapper's module (this one) instead of the workflow's; resolve them now,
    where they were written.
    """
    try:
        signature = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):  # unresolvable hints: let Prefect report them
        return wrapper
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{
            name: p.annotation
            for name, p in signature.parameters.items()
            if p.annotation is not p.empty
        },
        **(
            {"return": signature.return_annotation}
            if signature.return_annotation is not signature.empty
            else {}
        ),
    }
    return wrapper


async def read_artifact(client: PrefectClient, flow_run_id: UUID, kind: str) -> Artifact | None:
    """The newest artifact of type ``kind`` attached to a flow run, if any."""
    from prefect.client.schemas.filters import (  # noqa: PLC0415
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )
    from prefect.client.schemas.sorting import ArtifactSort  # noqa: PLC0415

    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            type=ArtifactFilterType(any_=[kind]),
        ),
        sort=ArtifactSort.CREATED_DESC,
        limit=1,
    )
    return artifacts[0] if artifacts else None


async def read_result(client: PrefectClient, flow_run_id: UUID) -> Any:
    """The recorded return value of a flow run, or ``_MISSING`` when there is none."""
    artifact = await read_artifact(client, flow_run_id, RESULT_ARTIFACT_TYPE)
    if artifact is None:
        return _MISSING
    # Prefect stores an artifact's data as the JSON text of what was given.
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def is_missing(value: object) -> bool:
    """Whether :func:`read_result` found nothing."""
    return value is _MISSING
