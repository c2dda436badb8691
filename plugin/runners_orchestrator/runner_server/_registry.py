"""Runners by name: what a runner is, what it receives, and where runners are found."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeVar

from runners_orchestrator.exceptions import ConfigurationError, RunnerNotFoundError
from runners_orchestrator.models import RunnerResult

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx
    from playwright.async_api import Page
    from pydantic import BaseModel, ValidationError

__all__ = [
    "ENTRY_POINT_GROUP",
    "AnyRunner",
    "BrowserRunner",
    "BrowserRunnerFunction",
    "EngineName",
    "Runner",
    "RunnerContext",
    "RunnerFunction",
    "RunnerRegistry",
]

EngineName: TypeAlias = Literal["http", "browser"]
"""How a runner server evaluates its runners: fetch and parse (``http``) or a real browser."""

ENTRY_POINT_GROUP = "runners_orchestrator.runners"
"""Entry-point group through which installed packages contribute runners."""


@dataclass(frozen=True)
class RunnerContext:
    """Everything a runner receives for one check.

    Runners share one ``httpx.AsyncClient`` per server (pooled connections, the target
    policy enforced at every connect, redirects followed) and must finish by ``deadline``
    (an ``asyncio`` loop time); the server cancels them at the deadline either way.
    """

    name: str
    """The runner's name as requested; use it as the result's ``name``."""
    url: str | None
    """The page to check: the request's ``url`` or the runner's ``input.url``."""
    input: dict[str, Any]
    """The merged input (``url`` included), validated by the runner's input model if any."""
    client: httpx.AsyncClient
    """The server's shared HTTP client; use it for every request a runner makes."""
    deadline: float
    """Loop time (``asyncio.get_running_loop().time()``) by which the runner must end."""
    max_page_bytes: int = 5_000_000
    """Largest page body a runner should read, so a huge page cannot exhaust memory."""
    keep_screenshot: Callable[[bytes], str] | None = None
    """Stores a JPEG and returns the URL it is served at (set by the server; the browser
    engine uses it for failed checks)."""

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


RunnerFunction: TypeAlias = Callable[[RunnerContext], Awaitable[RunnerResult]]
"""The signature of a runner: ``async def check(ctx: RunnerContext) -> RunnerResult``."""

BrowserRunnerFunction: TypeAlias = Callable[["Page", RunnerContext], Awaitable[RunnerResult]]
"""A browser runner: ``async def check(page: Page, ctx: RunnerContext) -> RunnerResult``.

``page`` is a Playwright page in a browser context of its own, already loaded at
``ctx.url`` (its ``load`` event fired) when the input has a URL.
"""

_F = TypeVar("_F", bound=Callable[..., Awaitable[RunnerResult]])


def _validate(input_model: type[BaseModel] | None, data: dict[str, Any]) -> dict[str, Any]:
    if input_model is None:
        return data
    model = input_model.model_validate(data)
    return {**data, **model.model_dump()}


@dataclass(frozen=True)
class Runner:
    """A named check: an async function plus, optionally, a model its input must satisfy."""

    name: str
    fn: RunnerFunction
    input_model: type[BaseModel] | None = None
    description: str = ""
    engine: ClassVar[EngineName] = "http"
    """Needs nothing but the server's HTTP client: every engine runs it."""

    def validate_input(self, data: dict[str, Any]) -> dict[str, Any]:
        """Return the input as the runner will see it.

        Raises:
            pydantic.ValidationError: the input does not satisfy ``input_model``.
        """
        return _validate(self.input_model, data)


@dataclass(frozen=True)
class BrowserRunner:
    """A named check evaluated in a real page: only a browser-engine server runs it."""

    name: str
    fn: BrowserRunnerFunction
    input_model: type[BaseModel] | None = None
    description: str = ""
    engine: ClassVar[EngineName] = "browser"

    def validate_input(self, data: dict[str, Any]) -> dict[str, Any]:
        """Return the input as the runner will see it.

        Raises:
            pydantic.ValidationError: the input does not satisfy ``input_model``.
        """
        return _validate(self.input_model, data)


AnyRunner: TypeAlias = Runner | BrowserRunner


@dataclass
class RunnerRegistry:
    """The runners one server offers, by name.

    Register with the :meth:`register` decorator, or let an installed package contribute
    through the ``runners_orchestrator.runners`` entry-point group (each entry point names
    a :class:`Runner` or a registry-taking function; see ``docs/runner-server.md``).
    """

    _runners: dict[str, AnyRunner] = field(default_factory=dict)

    def add(self, runner: AnyRunner) -> AnyRunner:
        """Register ``runner``.

        Raises:
            ConfigurationError: another runner already has that name.
        """
        existing = self._runners.get(runner.name)
        if existing is not None and existing.fn is not runner.fn:
            raise ConfigurationError(
                f"runner {runner.name!r} is registered twice "
                f"({existing.fn.__module__}.{existing.fn.__qualname__} and "
                f"{runner.fn.__module__}.{runner.fn.__qualname__}); rename one of them"
            )
        self._runners[runner.name] = runner
        return runner

    def register(
        self,
        name: str | None = None,
        *,
        input_model: type[BaseModel] | None = None,
    ) -> Callable[[RunnerFunction], RunnerFunction]:
        """Register the decorated async function as a runner (named after it by default)."""
        return self._registering(Runner, "runner", name, input_model)

    def register_browser(
        self,
        name: str | None = None,
        *,
        input_model: type[BaseModel] | None = None,
    ) -> Callable[[BrowserRunnerFunction], BrowserRunnerFunction]:
        """Register the decorated ``async def check(page, ctx)`` as a browser runner.

        It receives a Playwright page, already loaded at the job's URL in a browser
        context of its own, and the :class:`RunnerContext` (``ctx.input`` is the job's
        input). Only a server started with the browser engine offers it.
        """
        return self._registering(BrowserRunner, "browser runner", name, input_model)

    def _registering(
        self,
        kind: Callable[..., Runner | BrowserRunner],
        what: str,
        name: str | None,
        input_model: type[BaseModel] | None,
    ) -> Callable[[_F], _F]:
        """The decorator of ``register`` and ``register_browser``: check, wrap, add."""

        def decorator(fn: _F) -> _F:
            if not _is_async(fn):
                raise ConfigurationError(
                    f"{what} {fn.__qualname__} must be an async function (async def)"
                )
            summary = (fn.__doc__ or "").strip().split("\n", 1)[0]
            self.add(
                kind(name=name or fn.__name__, fn=fn, input_model=input_model, description=summary)
            )
            return fn

        return decorator

    def select(self, engine: EngineName) -> RunnerRegistry:
        """The runners an ``engine`` server can run: all for ``browser``, HTTP ones for ``http``."""
        if engine == "browser":
            return RunnerRegistry(dict(self._runners))
        return RunnerRegistry({n: r for n, r in self._runners.items() if r.engine == "http"})

    def load_entry_points(self) -> None:
        """Add the runners that installed packages declare as entry points.

        Raises:
            ConfigurationError: an entry point fails to load or is not a runner.
        """
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = entry.load()
            except Exception as exc:
                raise ConfigurationError(
                    f"runner entry point {entry.name!r} ({entry.value}) failed to load: {exc}"
                ) from exc
            if isinstance(obj, Runner | BrowserRunner):
                self.add(obj)
            elif callable(obj):
                obj(self)
            else:
                raise ConfigurationError(
                    f"runner entry point {entry.name!r} ({entry.value}) is not a Runner, "
                    "a BrowserRunner or a function taking a RunnerRegistry"
                )

    def get(self, name: str) -> AnyRunner:
        """Return the runner called ``name``.

        Raises:
            RunnerNotFoundError: no runner has that name.
        """
        try:
            return self._runners[name]
        except KeyError:
            raise RunnerNotFoundError(
                f"no runner named {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Runner names in registration order."""
        return list(self._runners)

    def __contains__(self, name: object) -> bool:
        return name in self._runners

    def __iter__(self) -> Iterator[AnyRunner]:
        return iter(self._runners.values())

    def __len__(self) -> int:
        return len(self._runners)


def validation_issues(error: ValidationError) -> list[dict[str, Any]]:
    """Translate pydantic errors into the zod-style issues of the TypeScript contract.

    Each issue has ``code``, ``path`` and ``message`` as zod gives them, so TypeScript
    clients can read our errors as they read theirs.
    """
    issues: list[dict[str, Any]] = []
    for err in error.errors(include_url=False, include_context=False):
        kind = err["type"]
        path = [part for part in err["loc"] if not _is_union_branch(part)]
        issue: dict[str, Any]
        if kind == "missing":
            issue = {"code": "invalid_type", "expected": "present", "message": "Required"}
        elif kind in {"too_short", "list_too_short"}:
            message = "At least one runner is required" if path == ["runners"] else err["msg"]
            issue = {
                "code": "too_small",
                "origin": "array",
                "minimum": 1,
                "inclusive": True,
                "message": message,
            }
        elif kind == "value_error" and "URL" in err["msg"]:
            issue = {"code": "invalid_format", "format": "url", "message": _plain(err["msg"])}
        elif kind.endswith("_type") or kind == "is_instance_of":
            issue = {
                "code": "invalid_type",
                "expected": kind.removesuffix("_type"),
                "message": err["msg"],
            }
        else:
            issue = {"code": kind, "message": _plain(err["msg"])}
        issue["path"] = path
        issues.append(issue)
    return issues


def _plain(message: str) -> str:
    return message.removeprefix("Value error, ")


def _is_union_branch(part: str | int) -> bool:
    """Pydantic names union branches in the location (``str``, ``RunnerSpec``); zod does not."""
    return isinstance(part, str) and (part in {"str", "RunnerSpec"} or part.startswith("function-"))


def _is_async(fn: object) -> bool:
    """Whether ``fn`` is an ``async def`` (a plain bool: no narrowing of the caller's type)."""
    return asyncio.iscoroutinefunction(fn)
