"""The HTTP engine: runners fetch the page with the server's httpx client and parse it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.runner_server._builtins import register_builtins
from runners_orchestrator.runner_server._registry import Runner

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from runners_orchestrator.models import RunnerResult
    from runners_orchestrator.runner_server._registry import (
        AnyRunner,
        EngineName,
        RunnerContext,
        RunnerRegistry,
    )

__all__ = ["HttpEngine"]


class HttpEngine:
    """Runs plain runners; needs nothing beyond the server's HTTP client."""

    name: EngineName = "http"
    default_capacity = 32
    """CPU-bound on one core at about 900 checks/s from ~16 requests at once
    (``docs/benchmarks.md``); 32 leaves room for slow pages without queueing."""

    def register_builtins(self, registry: RunnerRegistry) -> None:
        """Add the fetch-and-parse ``cookieBannerVisibleTest`` and ``exampleTitleVisibleTest``."""
        register_builtins(registry)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Nothing to open: the server owns the HTTP client."""
        yield

    async def run(self, runner: AnyRunner, ctx: RunnerContext) -> RunnerResult:
        """Call the runner with its context."""
        if not isinstance(runner, Runner):
            raise ConfigurationError(
                f"runner {runner.name!r} needs a browser: serve it with the browser engine"
            )
        return await runner.fn(ctx)
