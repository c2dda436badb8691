"""One error shape for every answer of the API: ``{"error", "message", "details"}``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from runners_orchestrator.api._gateway import DeploymentMissingError, PrefectRefusedError
from runners_orchestrator.exceptions import ConfigurationError, PrefectUnavailableError

if TYPE_CHECKING:
    from litestar.types import ExceptionHandlersMap

__all__ = ["RETRY_AFTER_SECONDS", "ApiError", "error_response", "exception_handlers"]

logger = logging.getLogger("runners_orchestrator.api")

RETRY_AFTER_SECONDS = 2
"""What ``Retry-After`` says on every 503: Prefect back, or the deployment registered."""


class ApiError(Exception):
    """An answer other than success, with its status, a stable code and what to do."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details or {}
        self.extra = extra or {}
        self.headers = headers or {}


def error_response(exc: ApiError) -> Response[dict[str, Any]]:
    """The JSON answer of ``exc``."""
    body = {"error": exc.error, "message": exc.message, "details": exc.details, **exc.extra}
    return Response(body, status_code=exc.status, headers=exc.headers)


def _api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[dict[str, Any]]:
    return error_response(exc)


def _prefect_unavailable(
    _: Request[Any, Any, Any], exc: PrefectUnavailableError
) -> Response[dict[str, Any]]:
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, DeploymentMissingError):
        details = {"workflow": exc.workflow}
        return error_response(ApiError(503, "workflow_not_ready", str(exc), details, headers=retry))
    return error_response(ApiError(503, "prefect_unavailable", str(exc), headers=retry))


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    details: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and exc.extra:
        details["issues"] = exc.extra
    error = _CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")  # noqa: PLR2004
    # Litestar's own headers stay: `Allow` on a 405 (RFC 9110), `Retry-After` on a 429 ...
    headers = dict(exc.headers or {})
    return error_response(ApiError(exc.status_code, error, exc.detail, details, headers=headers))


def _prefect_refused(
    _: Request[Any, Any, Any], exc: PrefectRefusedError
) -> Response[dict[str, Any]]:
    return error_response(ApiError(409, "prefect_refused", str(exc), {"status": exc.status}))


def _misconfigured(_: Request[Any, Any, Any], exc: ConfigurationError) -> Response[dict[str, Any]]:
    # The operator's mistake (two workflows with one name, a bad registry ...), not the
    # client's: a 500 that says what to fix.
    return error_response(ApiError(500, "configuration_error", str(exc)))


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    message = f"the orchestrator failed to answer: {type(exc).__name__}; see its logs"
    return error_response(ApiError(500, "internal", message))


def exception_handlers() -> ExceptionHandlersMap:
    """The handlers that give every error of our routes the one shape."""
    return {
        ApiError: _api_error,
        PrefectUnavailableError: _prefect_unavailable,
        ConfigurationError: _misconfigured,
        PrefectRefusedError: _prefect_refused,
        HTTPException: _http_exception,
        Exception: _unexpected,
    }
