"""The runner server as a Litestar plugin: ``/execute``, ``/info`` and ``/health``.

``/execute`` answers in the form it was asked: a request wrapped as ``{"json": ...}`` (the
TypeScript orchestrator's oRPC client) gets its results and its errors wrapped the same way,
a plain request a plain answer. An answer given before the body could be read as JSON
(malformed JSON, a body over the size limit) is plain: nothing says the client wants the
wrapper.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from litestar import Litestar, Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath  # noqa: TC002 - Litestar reads it at run time
from litestar.plugins import InitPlugin
from pydantic import ValidationError

from runners_orchestrator._orpc import unwrap, wrap
from runners_orchestrator.exceptions import (
    ConfigurationError,
    RunnerError,
    TargetNotAllowedError,
)
from runners_orchestrator.models import (
    ErrorEnvelope,
    ExecuteRequest,
    ExecuteResponse,
    HealthResponse,
    RunnerInfo,
    RunnerResult,
    RunnerUsage,
    RunnerUsageExample,
)
from runners_orchestrator.runner_server._fetch import create_fetch_client
from runners_orchestrator.runner_server._registry import (
    RunnerContext,
    RunnerRegistry,
    validation_issues,
)
from runners_orchestrator.runner_server._screenshots import ScreenshotStore
from runners_orchestrator.runner_server.engines import ENGINES, create_engine
from runners_orchestrator.target_policy import TargetPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    import httpx
    from litestar.config.app import AppConfig

    from runners_orchestrator.models import RunnerSpec
    from runners_orchestrator.runner_server._registry import AnyRunner, EngineName
    from runners_orchestrator.runner_server.engines import Engine

__all__ = ["RunnerServerConfig", "RunnerServerPlugin", "create_runner_app", "default_registry"]

logger = logging.getLogger("runners_orchestrator.runner_server")

MALFORMED_MESSAGE = (
    "Malformed request. Ensure the request body is properly formatted and the "
    "'Content-Type' header is set correctly."
)


def default_registry(engine: EngineName = "http") -> RunnerRegistry:
    """Return the built-in runners of ``engine`` and every installed entry point it can run.

    Both engines have a ``cookieBannerVisibleTest`` and an ``exampleTitleVisibleTest``: the
    HTTP engine's read the HTML, the browser engine's the rendered page. Browser runners from
    entry points are left out of an ``http`` registry.
    """
    registry = RunnerRegistry()
    create_engine(engine).register_builtins(registry)
    registry.load_entry_points()
    return registry.select(engine)


@dataclass
class RunnerServerConfig:
    """How a runner server behaves. Every field has a safe default."""

    region: str | None = None
    """Region this server reports in every answer (``us-east-1``, ...)."""
    engine: EngineName = "http"
    """How runners are evaluated: ``http`` (fetch and parse) or ``browser`` (Chromium)."""
    chromium: str | None = None
    """The browser engine's Chromium executable; looked for on the PATH and among
    Playwright's browsers when unset (``ORCHESTRATOR_CHROMIUM`` for the command line)."""
    capacity: int | None = None
    """Execute requests served at once; more are answered 429 with ``Retry-After``.
    Unset: the engine's default (32 for ``http``, see ``docs/runner-server.md`` for
    ``browser``)."""
    runner_timeout: float = 30.0
    """Seconds a runner may take before its result becomes an ``error``."""
    deny: Sequence[str] = ()
    """Address ranges (CIDR or names such as ``private``) refused on top of link-local."""
    allow: Sequence[str] = ()
    """Address ranges allowed even inside a denied range."""
    registry: RunnerRegistry | None = None
    """The runners offered; the engine's built-ins plus entry points when unset."""
    path: str = "/api/runner"
    """Where the routes are mounted."""
    max_body_size: int = 1_000_000
    """Largest execute request body in bytes."""
    max_page_bytes: int = 5_000_000
    """Largest page body a runner reads."""
    retry_after: int = 1
    """Seconds a client is told to wait when the server is at capacity."""
    screenshots: int = 200
    """Screenshots of failed browser checks kept in memory and served (the most recent)."""
    policy: TargetPolicy = field(init=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigurationError(
                f"unknown engine {self.engine!r}: expected one of {', '.join(ENGINES)}"
            )
        if self.capacity is not None and self.capacity < 1:
            raise ConfigurationError(f"capacity must be at least 1, got {self.capacity}")
        if self.runner_timeout <= 0:
            raise ConfigurationError(
                f"runner_timeout must be a positive number of seconds, got {self.runner_timeout}"
            )
        self.policy = TargetPolicy.from_strings(self.deny, self.allow)


def _answer(content: dict[str, Any], status: int, *, wrapped: bool) -> Response[dict[str, Any]]:
    """An answer in the form of the request: ``{"json": content}`` when it came wrapped."""
    return Response(wrap(content) if wrapped else content, status_code=status)


def _error(
    status: int,
    code: str,
    message: str,
    data: object = None,
    *,
    defined: bool = True,
    wrapped: bool = False,
) -> Response[dict[str, Any]]:
    envelope = ErrorEnvelope(defined=defined, code=code, status=status, message=message, data=data)
    return _answer(envelope.to_wire(), status, wrapped=wrapped)


async def _read_json(request: Request[Any, Any, Any]) -> tuple[object, bool] | None:
    """The request body as JSON, unwrapped, and whether it was wrapped; ``None`` if malformed."""
    try:
        return unwrap(json.loads(await request.body()))
    except (ValueError, UnicodeDecodeError):
        return None


class _RunnerServer:
    """The state behind the routes: runners, policy, the shared client and the load."""

    def __init__(self, config: RunnerServerConfig) -> None:
        self.config = config
        self.engine: Engine = create_engine(
            config.engine, chromium=config.chromium, policy=config.policy
        )
        self.capacity: int = config.capacity or self.engine.default_capacity
        if config.registry is None:
            self.registry = default_registry(config.engine)
        else:
            self.registry = config.registry
            browser_only = [r.name for r in self.registry if r.engine != "http"]
            if config.engine == "http" and browser_only:
                raise ConfigurationError(
                    f"runners {', '.join(browser_only)} need a browser: "
                    "serve them with the browser engine (--engine browser)"
                )
        self.in_flight = 0
        self.screenshots = ScreenshotStore(config.screenshots)
        self.peak_in_flight = 0
        self.served = 0
        self.refused = 0
        self._client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self._client = create_fetch_client(
            self.config.policy,
            timeout=self.config.runner_timeout,
            max_connections=max(self.capacity * 4, 20),
        )
        try:
            async with self.engine.lifespan():
                yield
        finally:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the runner server is not started: run the app's lifespan")
        return self._client

    def info(self) -> RunnerInfo:
        names = self.registry.names()
        example = RunnerUsageExample(url="https://example.com", runners=names[:2])
        return RunnerInfo(
            runners=names,
            count=len(names),
            region=self.config.region,
            engine=self.engine.name,
            usage=RunnerUsage(endpoint=f"{self.config.path}/execute", example=example),
        )

    def health(self) -> HealthResponse:
        return HealthResponse(
            region=self.config.region,
            in_flight=self.in_flight,
            capacity=self.capacity,
            peak_in_flight=self.peak_in_flight,
            served=self.served,
            refused=self.refused,
        )

    async def execute(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        # Check and take a slot before the first await, so no burst can slip past capacity.
        if self.in_flight >= self.capacity:
            self.refused += 1
            return await self._over_capacity(request)
        self.in_flight += 1
        self.served += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._execute(request)
        finally:
            self.in_flight -= 1

    async def _over_capacity(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Answer 429 in the form of the request, which is refused already.

        The body is read only to learn that form: it takes no slot and runs nothing, and its
        bytes are on their way anyway. A body that cannot be read or parsed gets the plain form.
        """
        data = {"inFlight": self.in_flight, "capacity": self.capacity}
        try:
            read = await _read_json(request)
        except HTTPException:  # over the size limit, or the client went away
            read = None
        response = _error(
            429,
            "TOO_MANY_REQUESTS",
            f"Runner server is at capacity ({self.capacity} requests in flight); "
            f"retry after {self.config.retry_after}s",
            data,
            wrapped=read is not None and read[1],
        )
        response.headers["Retry-After"] = str(self.config.retry_after)
        return response

    async def _execute(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        read = await _read_json(request)
        if read is None:
            return _error(400, "BAD_REQUEST", MALFORMED_MESSAGE, defined=False)
        payload, wrapped = read
        try:
            body = ExecuteRequest.model_validate(payload)
        except ValidationError as exc:
            issues = {"issues": validation_issues(exc)}
            message = "Input validation failed"
            return _error(400, "BAD_REQUEST", message, issues, defined=False, wrapped=wrapped)

        specs = body.runner_specs()
        missing = list(dict.fromkeys(s.name for s in specs if s.name not in self.registry))
        if missing:
            available = self.registry.names()
            data = {"missingRunners": missing, "availableRunners": available}
            message = "One or more runners not found"
            return _error(404, "RUNNER_NOT_FOUND", message, data, wrapped=wrapped)

        planned: list[tuple[AnyRunner, RunnerSpec, dict[str, Any]]] = []
        for spec in specs:
            runner = self.registry.get(spec.name)
            try:
                checked = runner.validate_input(spec.input or {})
            except ValidationError as exc:
                invalid = {"runnerName": spec.name, "issues": validation_issues(exc)}
                message = "Runner input validation failed"
                return _error(400, "INPUT_VALIDATION_FAILED", message, invalid, wrapped=wrapped)
            planned.append((runner, spec, checked))

        shots = f"{str(request.base_url).rstrip('/')}{self.config.path}/screenshots/"

        def keep_screenshot(data: bytes) -> str:
            return f"{shots}{self.screenshots.add(data)}.jpg"

        results = await asyncio.gather(
            *(self._run(r, s, i, keep_screenshot) for r, s, i in planned)
        )
        response = ExecuteResponse(region=self.config.region, run_id=body.run_id, results=results)
        return _answer(response.to_wire(), 200, wrapped=wrapped)

    async def _run(
        self,
        runner: AnyRunner,
        spec: RunnerSpec,
        data: dict[str, Any],
        keep_screenshot: Callable[[bytes], str] | None = None,
    ) -> RunnerResult:
        """Run one runner to a result; every failure becomes an ``error`` result."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.config.runner_timeout
        url = data.get("url")
        ctx = RunnerContext(
            name=spec.name,
            url=url if isinstance(url, str) else None,
            input=data,
            client=self.client,
            deadline=started + timeout,
            max_page_bytes=self.config.max_page_bytes,
            keep_screenshot=keep_screenshot,
        )
        try:
            async with asyncio.timeout_at(ctx.deadline):
                result = await self.engine.run(runner, ctx)
            if not isinstance(result, RunnerResult):
                message = f"runner returned {type(result).__name__}, expected a RunnerResult"
                result = RunnerResult(name=spec.name, status="error", error_message=message)
        except TimeoutError:
            message = f"runner {spec.name} timed out after {timeout:g}s"
            result = RunnerResult(name=spec.name, status="error", error_message=message)
        except (RunnerError, TargetNotAllowedError) as exc:
            result = RunnerResult(name=spec.name, status="error", error_message=str(exc))
        except Exception as exc:
            logger.exception("runner %s failed on %s", spec.name, url)
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            result = RunnerResult(name=spec.name, status="error", error_message=message)
        duration_ms = round((loop.time() - started) * 1000)
        return result.model_copy(update={"name": spec.name, "duration_ms": duration_ms})


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    """Answer framework errors (413, 405, ...) in the same envelope as ours."""
    codes = {405: "METHOD_NOT_SUPPORTED", 413: "PAYLOAD_TOO_LARGE", 404: "NOT_FOUND"}
    server_side = exc.status_code >= HTTPStatus.INTERNAL_SERVER_ERROR
    code = codes.get(exc.status_code, "INTERNAL_SERVER_ERROR" if server_side else "BAD_REQUEST")
    return _error(exc.status_code, code, exc.detail, defined=False)


def _build_router(server: _RunnerServer) -> Router:
    @post(
        "/execute",
        status_code=200,
        request_max_body_size=server.config.max_body_size,
        summary="Execute runners",
        description="Run the named runners against a URL and return their results in order.",
    )
    async def execute(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        return await server.execute(request)

    @get("/info", summary="Get runner information")
    async def info() -> dict[str, Any]:
        return server.info().to_wire()

    @get("/health", summary="Liveness and load", cache_control=None)
    async def health() -> dict[str, Any]:
        return server.health().to_wire()

    @get(
        "/screenshots/{name:str}",
        summary="A failed browser check's screenshot",
        description="The JPEG that a failed or errored browser check's `details.screenshot` "
        "names; the server keeps the most recent ones in memory.",
    )
    async def screenshot(name: FromPath[str]) -> Response[Any]:
        data = server.screenshots.get(name.removesuffix(".jpg"))
        if data is None:
            message = f"no screenshot {name}: it was never taken or is no longer kept"
            return _error(404, "NOT_FOUND", message, defined=False)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return Router(
        path=server.config.path,
        route_handlers=[execute, info, health, screenshot],
        exception_handlers={HTTPException: _http_exception},
        tags=["Runner"],
    )


class RunnerServerPlugin(InitPlugin):
    """Mount the runner-server routes on any Litestar app.

    ``Litestar(plugins=[RunnerServerPlugin(RunnerServerConfig(region="eu-west-1"))])``
    serves ``/api/runner/execute``, ``/info`` and ``/health``, wire-compatible with the
    TypeScript ``runners`` servers. The plugin adds its routes and a lifespan hook for its
    HTTP client; it changes nothing else of the app.
    """

    def __init__(self, config: RunnerServerConfig | None = None) -> None:
        self.config = config or RunnerServerConfig()
        self._server = _RunnerServer(self.config)

    @property
    def in_flight(self) -> int:
        """Execute requests being served right now."""
        return self._server.in_flight

    @property
    def capacity(self) -> int:
        """Execute requests served at once: the configured capacity or the engine's default."""
        return self._server.capacity

    @property
    def engine(self) -> Engine:
        """The engine evaluating the runners (``engine.name`` is ``http`` or ``browser``)."""
        return self._server.engine

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the routes and the client's lifespan."""
        app_config.route_handlers.append(_build_router(self._server))
        app_config.lifespan = [*app_config.lifespan, self._server.lifespan]
        return app_config


def create_runner_app(config: RunnerServerConfig | None = None, *, debug: bool = False) -> Litestar:
    """Return a ready Litestar app that is a runner server and nothing else."""
    return Litestar(plugins=[RunnerServerPlugin(config)], debug=debug)
