"""Check a request body against a workflow's own parameters, before any run starts.

The body's keys are the workflow's parameter names, in snake_case or camelCase
(``{"jobs": [...], "options": {...}}`` for ``orchestrate_runners(jobs, options)``). Each
value is validated with pydantic against the parameter's type hint, in strict JSON mode,
so that what is accepted is what the OpenAPI schema declares: ``true`` is not an integer
and ``"5"`` is not a number, while ``5.0`` is an integer, as in JSON Schema. A job without
a ``url`` is a 400 naming ``jobs.0.url``, not a run that fails later.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from pydantic import BaseModel, TypeAdapter, ValidationError

from runners_orchestrator.api._errors import ApiError
from runners_orchestrator.balancing import BALANCER_ENTRY_POINTS, BUILTIN_BALANCERS
from runners_orchestrator.discovery import to_snake
from runners_orchestrator.models import OrchestrateOptions, RunnerJob
from runners_orchestrator.results import to_json

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from runners_orchestrator.api._state import ApiState
    from runners_orchestrator.discovery import Workflow
    from runners_orchestrator.monitoring.selection import SuiteRun

__all__ = [
    "balancer_names",
    "bind_parameters",
    "find_instances",
    "jobs_and_options",
    "suite_selection",
]

_adapters: WeakKeyDictionary[Callable[..., Any], dict[str, TypeAdapter[Any]]] = WeakKeyDictionary()


@functools.cache
def balancer_names() -> tuple[str, ...]:
    """The load balancers a client may name: the built-in ones and installed entry points.

    An import path (``package.module:Class``) is not among them: it would let a client make
    the API import a module and call whatever it names, so only the operator's settings
    may use one.
    """
    installed = {entry.name for entry in entry_points(group=BALANCER_ENTRY_POINTS)}
    return tuple(sorted({*BUILTIN_BALANCERS, *installed}))


def _signature(workflow: Workflow) -> tuple[inspect.Signature, dict[str, TypeAdapter[Any]]]:
    fn = inspect.unwrap(workflow.flow.fn)
    signature = inspect.signature(fn)
    adapters = _adapters.get(fn)
    if adapters is None:
        hints = typing.get_type_hints(fn)
        adapters = {
            name: TypeAdapter(hints.get(name, Any))
            for name, p in signature.parameters.items()
            if p.kind not in {p.VAR_POSITIONAL, p.VAR_KEYWORD}
        }
        _adapters[fn] = adapters
    return signature, adapters


def _integral_floats_as_ints(value: object) -> object:
    """``5.0`` as ``5``: JSON Schema counts a number without a fractional part as an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value


def _path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in parts)


def bind_parameters(workflow: Workflow, body: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate ``body`` as ``workflow``'s parameters.

    Returns:
        The validated values (models and all) and their JSON form for Prefect.

    Raises:
        ApiError: 400 naming every field that is missing, unknown or invalid.
    """
    signature, adapters = _signature(workflow)
    names = list(adapters)
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "invalid_body",
            f"the body must be a JSON object of {workflow.name}'s parameters: {', '.join(names)}",
            {"parameters": names},
        )
    mapped: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in body.items():
        name = key if key in adapters else to_snake(str(key))
        if name in adapters:
            mapped[name] = value
        else:
            unknown.append(str(key))
    issues: list[dict[str, Any]] = [
        {"path": [key], "message": f"unknown parameter; {workflow.name} takes {names}"}
        for key in unknown
    ]
    values: dict[str, Any] = {}
    for name, adapter in adapters.items():
        if name not in mapped:
            if signature.parameters[name].default is inspect.Parameter.empty:
                issues.append({"path": [name], "message": "Field required"})
            continue
        try:
            # Strictly, as JSON: what the schema declares and nothing it does not (no
            # `true` for an integer, no "5" for a number). Trusted internal callers keep
            # the models' lax parsing.
            raw = json.dumps(_integral_floats_as_ints(mapped[name]))
            values[name] = adapter.validate_json(raw, strict=True)
        except ValidationError as exc:
            issues.extend(
                {"path": [name, *err["loc"]], "message": err["msg"]}
                for err in exc.errors(include_url=False, include_context=False, include_input=False)
            )
    if issues:
        summary = "; ".join(f"{_path(tuple(i['path']))}: {i['message']}" for i in issues[:3])
        more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""  # noqa: PLR2004
        raise ApiError(
            400,
            "invalid_parameters",
            f"the body does not match {workflow.name}'s parameters: {summary}{more}",
            {"issues": issues},
        )
    return values, {name: to_json(value) for name, value in values.items()}


def find_instances(value: object, kind: type[Any]) -> Iterator[Any]:
    """Every instance of ``kind`` inside ``value`` (lists, dicts and models included)."""
    if isinstance(value, kind):
        yield value
    if isinstance(value, BaseModel):
        for item in dict(value).values():
            yield from find_instances(item, kind)
    elif isinstance(value, dict):
        for item in value.values():
            yield from find_instances(item, kind)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from find_instances(item, kind)


def jobs_and_options(values: dict[str, Any]) -> tuple[list[RunnerJob], list[OrchestrateOptions]]:
    """The jobs and options anywhere in a run's parameters, for the security checks."""
    return list(find_instances(values, RunnerJob)), list(find_instances(values, OrchestrateOptions))


def suite_selection(state: ApiState, workflow: Workflow, body: dict[str, Any]) -> SuiteRun:
    """A body ``{"suite", "tags"?, "regions"?}`` as the run of the suite's matching jobs.

    Raises:
        ApiError: 400 for a malformed selection, ``suite`` with ``jobs``, a suite of another
            workflow or a filter that matches no job; 404 for an unknown suite (listing
            the suites); 500 when the suite's file is invalid (the operator's to fix).
    """
    from runners_orchestrator.monitoring.selection import (  # noqa: PLC0415
        EmptySelectionError,
        SuiteNotFoundError,
        SuiteSelection,
        select_suite_run,
    )

    if "jobs" not in _signature(workflow)[1]:
        raise ApiError(
            400,
            "invalid_parameters",
            f"{workflow.name} takes no jobs, so it cannot run a suite",
            {"issues": [{"path": ["suite"], "message": "this workflow runs no suites"}]},
        )
    if "jobs" in body or "options" in body:
        given = [key for key in ("jobs", "options") if key in body]
        raise ApiError(
            400,
            "invalid_parameters",
            f"give either suite (its jobs and options come from its file) or jobs, "
            f"not suite with {' and '.join(given)}",
            {"issues": [{"path": [key], "message": "not allowed with suite"} for key in given]},
        )
    try:
        selection = SuiteSelection.model_validate_json(json.dumps(body), strict=True)
    except ValidationError as exc:
        issues = [
            {"path": list(err["loc"]), "message": err["msg"]}
            for err in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        summary = "; ".join(f"{_path(tuple(i['path']))}: {i['message']}" for i in issues[:3])
        raise ApiError(
            400,
            "invalid_parameters",
            f"the suite selection is invalid: {summary}",
            {"issues": issues},
        ) from None
    scan = state.suites()
    try:
        run = select_suite_run(scan.suites, selection, scan.broken)
    except SuiteNotFoundError as exc:
        if selection.suite in scan.broken:
            problems = [line for line in scan.problems if f"{selection.suite}.toml" in line]
            raise ApiError(500, "configuration_error", f"{exc}: {'; '.join(problems)}") from None
        raise ApiError(
            404, "suite_not_found", str(exc), {"availableSuites": exc.available}
        ) from None
    except EmptySelectionError as exc:
        raise ApiError(400, "no_matching_jobs", str(exc)) from None
    if to_snake(run.suite.workflow) != workflow.name:
        raise ApiError(
            400,
            "suite_of_another_workflow",
            f"suite {run.suite.name!r} runs {run.suite.workflow}; start it at "
            f"{state.prefix}/{run.suite.workflow}",
        )
    return run
