"""The OpenAPI document as the API behaves: each workflow's operations, what clients may send.

Workflows are discovered when the app starts, so their routes are served by one generic
``/{name}`` handler; this adds, for every workflow known at start-up, explicit ``POST``
and ``GET`` operations whose request body is the parameter schema Prefect computes from
the type hints, with the generic operations' parameters and answers (one ``ErrorBody``
schema for every error). Pydantic ``definitions`` move to ``components/schemas`` so that
every ``$ref`` resolves inside the document.

A workflow that takes ``jobs`` also accepts a check suite instead of its parameters
(``{"suite", "tags", "regions"}``, see ``monitoring.selection``): its body is either. The
suite's name is a plain string, not an enum of today's suites: suites come and go while the
API runs, and an unknown one is a documented 404.

What the API refuses whatever the type hints say is taken out of the schema too: an
``options.registry`` unless the operator allows client registries, and a ``loadBalancer``
that is not one of the installed balancers (import paths are for the operator only).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

from litestar.enums import ParamType
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    PathItem,
    RequestBody,
    Schema,
)

from runners_orchestrator.api._params import balancer_names

if TYPE_CHECKING:
    from litestar import Litestar

    from runners_orchestrator.discovery import Discovery

__all__ = ["add_workflow_operations", "client_parameters"]

_HEADERS = {
    "401": {"WWW-Authenticate": "`Bearer`: the API token goes in `Authorization`."},
    "503": {"Retry-After": "Seconds to wait before trying again."},
}


def _is_options(definition: Any) -> bool:
    properties = definition.get("properties") if isinstance(definition, dict) else None
    return (
        isinstance(properties, dict)
        and definition.get("title") == "OrchestrateOptions"
        and {"loadBalancer", "registry"} <= set(properties)
    )


def client_parameters(parameters: dict[str, Any], *, allow_client_registry: bool) -> dict[str, Any]:
    """A workflow's parameter schema narrowed to what the API accepts from a client."""
    schema = copy.deepcopy(parameters)
    for key in ("definitions", "$defs"):
        for definition in (schema.get(key) or {}).values():
            if not _is_options(definition):
                continue
            properties = definition["properties"]
            if not allow_client_registry:
                properties.pop("registry", None)
            balancer = properties["loadBalancer"]
            balancer["anyOf"] = [
                {"type": "string", "enum": list(balancer_names())},
                {"type": "null"},
            ]
            balancer.setdefault(
                "description", "One of the installed load balancers; the operator's when unset."
            )
    return schema


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


def _operations(item: PathItem) -> list[Operation]:
    methods = (item.get, item.put, item.post, item.delete, item.options, item.head, item.patch)
    return [operation for operation in methods if operation is not None]


def _document_headers(operation: Operation) -> None:
    for status, headers in _HEADERS.items():
        response = (operation.responses or {}).get(status)
        if isinstance(response, OpenAPIResponse):
            response.headers = {
                **(response.headers or {}),
                **{
                    name: OpenAPIHeader(
                        description=text,
                        required=True,
                        schema=Schema(
                            type=OpenAPIType.INTEGER
                            if name == "Retry-After"
                            else OpenAPIType.STRING
                        ),
                    )
                    for name, text in headers.items()
                },
            }


def _without_path(parameters: list[Parameter | Any] | None) -> list[Parameter | Any]:
    return [p for p in parameters or [] if getattr(p, "param_in", None) != ParamType.PATH]


def _body_schema(
    name: str, parameters: dict[str, Any], components: dict[str, Any]
) -> dict[str, Any]:
    """``parameters`` with its definitions moved to ``components`` (renamed on a clash)."""
    parameters = copy.deepcopy(parameters)
    definitions = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
    names: dict[str, str] = {}
    for def_name, definition in definitions.items():
        target = def_name
        if target in components and components[target] != definition:
            target = f"{name}_{def_name}"
        names[def_name] = target
    for def_name, definition in definitions.items():
        components[names[def_name]] = _rewrite_refs(definition, names)
    body: dict[str, Any] = _rewrite_refs(parameters, names)
    body["title"] = f"{name} parameters"
    body["additionalProperties"] = False
    return body


def _suite_body() -> dict[str, Any]:
    """The body that runs a check suite, narrowed by tag and region."""
    names = {"type": "array", "items": {"type": "string"}}
    return {
        "title": "A check suite",
        "type": "object",
        "properties": {
            "suite": {
                "type": "string",
                "minLength": 1,
                "description": "The suite's name (its file name in checks/).",
            },
            "tags": {**names, "description": "Keep only the jobs that have every one of these."},
            "regions": {**names, "description": "Keep only the jobs in one of these regions."},
        },
        "required": ["suite"],
        "additionalProperties": False,
    }


def _workflow_path(
    generic: PathItem, name: str, description: str, body: dict[str, Any]
) -> PathItem:
    """``POST`` and ``GET`` of one workflow: the generic operations, with its own body."""
    assert generic.post is not None  # noqa: S101 - checked by the caller
    assert generic.get is not None  # noqa: S101
    start = copy.deepcopy(generic.post)
    start.operation_id = f"start_{name}"
    start.summary = f"Start {name}"
    start.description = description or None
    start.tags = ["Workflows"]
    start.parameters = _without_path(start.parameters)
    start.request_body = RequestBody(
        content={"application/json": OpenAPIMediaType(schema=_raw(body))}, required=True
    )
    status = copy.deepcopy(generic.get)
    status.operation_id = f"status_{name}"
    status.summary = f"Status or result of a {name} run"
    status.description = None
    status.tags = ["Workflows"]
    status.parameters = _without_path(status.parameters)
    status.responses = {
        **(status.responses or {}),
        "200": OpenAPIResponse(
            description="The run completed: the workflow's return value.",
            content={"application/json": OpenAPIMediaType(schema=_raw({}))},
        ),
    }
    return PathItem(post=start, get=status)


def add_workflow_operations(
    app: Litestar, discovery: Discovery, prefix: str, *, allow_client_registry: bool = False
) -> None:
    """Complete ``app``'s OpenAPI document: headers, generic body, each workflow's operations."""
    document = app.openapi_schema
    if document.components is None:
        document.components = Components()
    if document.components.schemas is None:
        document.components.schemas = {}
    components: dict[str, Any] = document.components.schemas
    if document.paths is None:
        document.paths = {}
    for path, item in document.paths.items():
        if path == prefix or path.startswith(f"{prefix}/"):
            for operation in _operations(item):
                _document_headers(operation)
    generic = document.paths.get(f"{prefix}/{{name}}")
    if generic is None or generic.post is None or generic.get is None:
        return
    generic.post.request_body = RequestBody(
        description="The workflow's parameters by name (snake_case or camelCase).",
        content={"application/json": OpenAPIMediaType(schema=_raw({"type": "object"}))},
    )
    for name in discovery.names():
        workflow = discovery.workflows[name]
        parameters = client_parameters(
            workflow.parameters, allow_client_registry=allow_client_registry
        )
        body = _body_schema(name, parameters, components)
        if "jobs" in (parameters.get("properties") or {}):
            body = {"title": f"{name}: parameters or a suite", "anyOf": [body, _suite_body()]}
        document.paths[f"{prefix}/{name}"] = _workflow_path(
            generic, name, workflow.description, body
        )
