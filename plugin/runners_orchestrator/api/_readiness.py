"""Can each workflow start now? Prefect answers and the workflow's deployment exists.

The readiness route and the list route both ask; the answer is looked up at most once per
``ttl`` seconds (one Prefect request, bounded by ``timeout``, shared by every caller that
asks meanwhile) so that neither route costs Prefect a request per call. The list route
takes a stale answer at once and lets the lookup run behind it; the readiness route waits
for a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runners_orchestrator.exceptions import PrefectUnavailableError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from runners_orchestrator.api._gateway import PrefectGateway
    from runners_orchestrator.discovery import Workflow

__all__ = ["Readiness", "ReadinessCheck"]

logger = logging.getLogger("runners_orchestrator.api")


@dataclass(frozen=True)
class Readiness:
    """What one lookup found."""

    workflows: tuple[str, ...]
    """The workflows asked about, sorted."""
    startable: frozenset[str]
    """Those whose deployment exists: a start is accepted."""
    prefect_reachable: bool
    problem: str | None = None
    """Why Prefect could not be asked, when it could not."""
    checked_at: float = field(default_factory=time.monotonic)

    @property
    def not_startable(self) -> list[str]:
        """The workflows a start would answer 503 for."""
        return [name for name in self.workflows if name not in self.startable]

    @property
    def ready(self) -> bool:
        """Prefect answers and every workflow can start."""
        return self.prefect_reachable and not self.not_startable


@dataclass
class ReadinessCheck:
    """The cached answer, and the one lookup in flight."""

    ttl: float = 2.0
    """Seconds an answer is reused."""
    timeout: float = 5.0
    """Seconds a lookup may take before Prefect counts as unreachable (a few ms when well)."""
    _last: Readiness | None = None
    _lookup: asyncio.Task[Readiness] | None = None

    async def check(
        self, prefect: PrefectGateway, workflows: Sequence[Workflow], *, fresh: bool = True
    ) -> Readiness:
        """Whether each of ``workflows`` can start.

        With ``fresh=False`` an expired answer is returned at once while a new lookup runs
        behind it; only the first call ever waits.
        """
        names = tuple(sorted(w.name for w in workflows))
        last = self._last
        if last is not None and last.workflows == names:
            if time.monotonic() - last.checked_at < self.ttl:
                return last
            if not fresh:
                self._start_lookup(prefect, workflows, names)
                return last
        # Shielded: a client that goes away does not cancel the lookup others wait for.
        return await asyncio.shield(self._start_lookup(prefect, workflows, names))

    def _start_lookup(
        self, prefect: PrefectGateway, workflows: Sequence[Workflow], names: tuple[str, ...]
    ) -> asyncio.Task[Readiness]:
        if self._lookup is None or self._lookup.done():
            self._lookup = asyncio.create_task(self._look_up(prefect, list(workflows), names))
        return self._lookup

    async def _look_up(
        self, prefect: PrefectGateway, workflows: list[Workflow], names: tuple[str, ...]
    ) -> Readiness:
        try:
            async with asyncio.timeout(self.timeout):
                startable = await prefect.deployed(workflows)
        except TimeoutError:
            problem = f"the Prefect API at {prefect.api_url} did not answer within {self.timeout}s"
            result = Readiness(names, frozenset(), prefect_reachable=False, problem=problem)
        except PrefectUnavailableError as exc:
            result = Readiness(names, frozenset(), prefect_reachable=False, problem=str(exc))
        else:
            result = Readiness(names, frozenset(startable), prefect_reachable=True)
        if not result.ready:
            logger.info("not ready: %s", result.problem or f"no deployment: {result.not_startable}")
        self._last = result
        return result

    async def aclose(self) -> None:
        """Stop a lookup in flight (the app is shutting down)."""
        if self._lookup is not None and not self._lookup.done():
            self._lookup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lookup
        self._lookup = None
        self._last = None
