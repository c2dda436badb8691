"""Check a request body against a workflow's own parameters, before any run starts.

The body's keys are the workflow's parameter names, in snake_case or camelCase
(``{"jobs": [...], "options": {...}}`` for ``orchestrate_runners(jobs, options)``). Each
value is validated with pydantic against the parameter's type hint, so a job without a
``url`` is a 400 naming ``jobs.0.url``, not a run that fails later.
"""

from __future__ import annotations

import inspect
import typing
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from pydantic import BaseModel, TypeAdapter, ValidationError

from runners_orchestrator.api._errors import ApiError
from runners_orchestrator.discovery import to_snake
from runners_orchestrator.models import OrchestrateOptions, RunnerJob
from runners_orchestrator.results import to_json

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from runners_orchestrator.discovery import Workflow

__all__ = ["bind_parameters", "find_instances"]

_adapters: WeakKeyDictionary[Callable[..., Any], dict[str, TypeAdapter[Any]]] = WeakKeyDictionary()


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
            values[name] = adapter.validate_python(mapped[name])
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
