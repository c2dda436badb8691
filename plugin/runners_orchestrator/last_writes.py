"""A run's last writes to Prefect, made together as its workflow returns.

As a run ends it writes, one after another, its last checkpoint, its final progress
count, its results table, its summary and its result: five round trips to Prefect, each
34-73 ms on the embedded SQLite server while the run's own process waits (a trace of one
instant run: 0.29 s from its last check to COMPLETED). None depends on another, so the
workflow wrapper (``results.recording_result``) collects them and waits for all of them
at once, together with the result, before the run completes. A run is still COMPLETED
only once everything it writes can be read, and a write that fails is still logged by
its writer, as before.

Outside a wrapped workflow (a flow built from a seed function by hand, a plain call)
there is nobody to wait at the end, and each write is made where it is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

__all__ = ["collect_last_writes", "write_last"]

_collected: ContextVar[_Collector | None] = ContextVar(
    "runners_orchestrator_last_writes", default=None
)


class _Collector:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.writes: list[asyncio.Future[object]] = []


async def write_last(write: Coroutine[Any, Any, object]) -> None:
    """Start ``write`` now; the run waits for it as it ends (or now, outside a workflow).

    A write from another event loop than the workflow's (a task run in a thread of its
    own) is made at once: only the workflow's loop can wait for it at the end.
    """
    collector = _collected.get()
    if collector is None or collector.loop is not asyncio.get_running_loop():
        await write
        return
    collector.writes.append(asyncio.ensure_future(write))


@contextlib.asynccontextmanager
async def collect_last_writes() -> AsyncIterator[None]:
    """Collect the writes of the code inside; on the way out, wait for all of them at once.

    They are awaited whether that code returned or raised: a failing run keeps its
    checkpoint. Each writer logs its own failure; none is raised here.
    """
    collector = _Collector()
    token = _collected.set(collector)
    try:
        yield
    finally:
        _collected.reset(token)
        await asyncio.gather(*collector.writes, return_exceptions=True)
