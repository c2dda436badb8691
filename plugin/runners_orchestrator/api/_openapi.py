"""Each workflow's own operations in the OpenAPI document, with its parameters as the body.

Workflows are discovered when the app starts, so their routes are served by one generic
``/{name}`` handler; this adds, for every workflow known at start-up, explicit
``POST`` and ``GET`` operations whose request body is the parameter schema Prefect computes
from the type hints. Pydantic ``definitions`` move to ``components/schemas`` so that every
``$ref`` resolves inside the document.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

from litestar.enums import ParamType
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Parameter,
    PathItem,
    RequestBody,
    Schema,
)

if TYPE_CHECKING:
    from litestar import Litestar

    from runners_orchestrator.discovery import Discovery

__all__ = ["add_workflow_operations"]

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message", "details"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "details": {"type": "object"},
    },
}


def _rewrite_refs(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                name = value.rsplit("/", 1)[-1]
                out[key] = f"#/components/schemas/{names.get(name, name)}"
            else:
                out[key] = _rewrite_refs(value, names)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, names) for item in node]
    return node


def _raw(schema: dict[str, Any]) -> Schema:
    """A JSON schema as it is: Litestar serialises dicts unchanged, so no conversion."""
    return cast("Schema", schema)


def _json(schema: dict[str, Any], description: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={"application/json": OpenAPIMediaType(schema=_raw(schema))},
    )


def add_workflow_operations(app: Litestar, discovery: Discovery, prefix: str) -> None:
    """Add every workflow's start and status operations to ``app``'s OpenAPI document."""
    document = app.openapi_schema
    if document.components is None:
        document.components = Components()
    if document.components.schemas is None:
        document.components.schemas = {}
    components: dict[str, Any] = document.components.schemas
    components.setdefault("OrchestratorError", ERROR_SCHEMA)
    error_ref = {"$ref": "#/components/schemas/OrchestratorError"}
    if document.paths is None:
        document.paths = {}
    for name in discovery.names():
        workflow = discovery.workflows[name]
        parameters = copy.deepcopy(workflow.parameters)
        definitions = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
        names: dict[str, str] = {}
        for def_name, definition in definitions.items():
            target = def_name
            if target in components and components[target] != definition:
                target = f"{name}_{def_name}"
            names[def_name] = target
        for def_name, definition in definitions.items():
            components[names[def_name]] = _rewrite_refs(definition, names)
        body = _rewrite_refs(parameters, names)
        body["title"] = f"{name} parameters"
        body["additionalProperties"] = False
        errors = {
            code: _json(error_ref, text)
            for code, text in {
                "400": "The body does not match the workflow's parameters.",
                "401": "An API token is set and the request did not carry it.",
                "404": "No such workflow, or no such run of it.",
                "503": "Prefect is unreachable or the workflow is not served.",
            }.items()
        }
        start = Operation(
            operation_id=f"start_{name}",
            summary=f"Start {name}",
            description=workflow.description or None,
            tags=["Workflows"],
            request_body=RequestBody(
                content={"application/json": OpenAPIMediaType(schema=_raw(body))}, required=True
            ),
            responses={"202": _json({"type": "object"}, "The run was started."), **errors},
        )
        status = Operation(
            operation_id=f"status_{name}",
            summary=f"Status or result of a {name} run",
            tags=["Workflows"],
            parameters=[
                Parameter(
                    name="runId",
                    param_in=ParamType.QUERY,
                    required=True,
                    schema=_raw({"type": "string", "format": "uuid"}),
                )
            ],
            responses={
                "200": _json({}, "The run completed: the workflow's return value."),
                "202": _json({"type": "object"}, "The run is pending or running."),
                "409": _json({"type": "object"}, "The run was cancelled."),
                **errors,
            },
        )
        document.paths[f"{prefix}/{name}"] = PathItem(post=start, get=status)
