"""How a runner server evaluates its runners: the engine protocol and the two engines.

- ``http`` (:mod:`.http`): fetch the page with httpx, parse its HTML. Fast; blind to what
  the page's scripts do.
- ``browser`` (:mod:`.browser`): load the page in headless Chromium through Playwright and
  evaluate the runners after its scripts ran. One browser per server, a fresh browser
  context per check. Needs Playwright (the ``browser`` extra) and a Chromium.

An engine owns the resources its checks need (a browser, say), opened and closed in the
server's lifespan, and runs one runner to a result. The server owns everything else:
capacity, deadlines, turning exceptions into ``error`` results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from runners_orchestrator.models import RunnerResult
    from runners_orchestrator.runner_server._registry import (
        AnyRunner,
        EngineName,
        RunnerContext,
        RunnerRegistry,
    )
    from runners_orchestrator.target_policy import TargetPolicy

__all__ = ["ENGINES", "Engine", "create_engine"]

ENGINES: tuple[EngineName, ...] = ("http", "browser")

BROWSER_EXTRA_MISSING = (
    "the browser engine needs Playwright, which is not installed: "
    "pip install 'runners-orchestrator[browser]'"
)


class Engine(Protocol):
    """What a runner server needs from an engine."""

    name: EngineName
    """``http`` or ``browser``; reported by ``/info``."""
    default_capacity: int
    """Execute requests served at once when the server's capacity is not set."""

    def register_builtins(self, registry: RunnerRegistry) -> None:
        """Add this engine's built-in runners (``cookieBannerVisibleTest``, ...)."""

    def lifespan(self) -> AbstractAsyncContextManager[None]:
        """Open what the checks need for the server's lifetime, and close it."""

    async def run(self, runner: AnyRunner, ctx: RunnerContext) -> RunnerResult:
        """Run ``runner`` once; raise on failure (the server makes it an ``error``)."""


def create_engine(
    name: EngineName, *, chromium: str | None = None, policy: TargetPolicy | None = None
) -> Engine:
    """Return the engine called ``name``.

    Args:
        name: ``http`` or ``browser``.
        chromium: for ``browser``, the Chromium executable; found when unset (see
            :func:`runners_orchestrator.runner_server.engines.browser.find_chromium`).
        policy: for ``browser``, the target policy every request of a page must pass.

    Raises:
        ConfigurationError: an unknown engine, or ``browser`` without Playwright.
    """
    if name == "http":
        from runners_orchestrator.runner_server.engines.http import HttpEngine  # noqa: PLC0415

        return HttpEngine()
    if name == "browser":
        try:
            from runners_orchestrator.runner_server.engines.browser import (  # noqa: PLC0415
                BrowserEngine,
            )
        except ImportError as exc:
            raise ConfigurationError(BROWSER_EXTRA_MISSING) from exc
        return BrowserEngine(executable=chromium, policy=policy)
    raise ConfigurationError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES)}")
