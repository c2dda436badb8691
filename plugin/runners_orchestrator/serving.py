"""Serve the discovered workflows' deployments from one Prefect runner process.

``serve_flows`` registers one deployment per workflow (named like the workflow, tagged
``runners-orchestrator``) and polls the Prefect API for their runs every
``query_seconds``. Prefect's default poll is 10 s; we default to 0.2 s, which is what makes
a run submitted through the API start within a second (see ``docs/workflows.md`` for the
measurements and what the polling costs the Prefect server).

``serve_with_reload`` runs that in a child process and restarts it when a workflow file
changes, so the served deployments and ``list`` follow the files without a manual restart.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import types
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any

import prefect.flow_engine
import prefect.runner._starter_direct
from prefect.runner import Runner

from runners_orchestrator.crash_detection import enable_heartbeats, ensure_crash_detection
from runners_orchestrator.deployments import GENERATED_TAG
from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from runners_orchestrator.discovery import Discovery

__all__ = ["DEFAULT_QUERY_SECONDS", "serve_flows", "serve_with_reload"]

DEFAULT_QUERY_SECONDS = 0.2
logger = logging.getLogger("runners_orchestrator.serving")

FORKSERVER_PRELOAD = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    "runners_orchestrator.steps",
)
"""Modules imported once in the fork server, so a flow run's process starts warm."""


def _run_flow_in_forkserver(*args: Any, **kwargs: Any) -> Any:
    """Prefect's ``run_flow_in_subprocess``, with a fork server instead of ``spawn``.

    Prefect starts every flow run of a served deployment in a fresh ``spawn`` process,
    which imports Prefect again: about 0.9 s of the time from "created" to "running" on
    the reference machine. A fork server imports it once; each run's process is then a
    fork of that warm, single-threaded process (safe to fork, unlike the runner itself).
    Everything else (environment, settings, signals, control channel) is Prefect's own
    code, called as it is.
    """
    context = multiprocessing.get_context("forkserver")
    shim = types.SimpleNamespace(
        get_context=lambda _method=None: context, context=multiprocessing.context
    )
    original = prefect.flow_engine.multiprocessing  # type: ignore[attr-defined]
    prefect.flow_engine.multiprocessing = shim  # type: ignore[attr-defined,assignment]
    try:
        return prefect.flow_engine.run_flow_in_subprocess(*args, **kwargs)
    finally:
        prefect.flow_engine.multiprocessing = original  # type: ignore[attr-defined]


def use_forkserver(preload: Sequence[str] = FORKSERVER_PRELOAD) -> None:
    """Start served flow runs from a warm fork server (see :func:`_run_flow_in_forkserver`).

    ``prefect.runner._starter_direct`` documents its module-level ``run_flow_in_subprocess``
    as the place to patch; this is the only Prefect behaviour we change.
    """
    multiprocessing.set_forkserver_preload(list(preload))
    starter = prefect.runner._starter_direct  # noqa: SLF001
    starter.run_flow_in_subprocess = _run_flow_in_forkserver  # type: ignore[attr-defined]
    # Start it now, so the first run does not wait for the preload imports.
    forkserver.ensure_running()


async def serve_flows(
    discovery: Discovery,
    *,
    query_seconds: float = DEFAULT_QUERY_SECONDS,
    limit: int | None = None,
    forkserver: bool = True,
) -> None:
    """Register every workflow's deployment and run their flow runs until cancelled.

    With ``forkserver`` (the default), each run's process is forked from a warm fork
    server instead of spawned cold; ``False`` keeps Prefect's own ``spawn``.
    """
    enable_heartbeats()  # before the fork server starts: every run's process inherits it
    if forkserver:
        use_forkserver()
    try:
        await ensure_crash_detection()
    except ConfigurationError:
        raise
    except Exception:  # an old or locked-down Prefect server: serve anyway, say what is lost
        logger.warning(
            "could not create the crash-detection automation: a run whose process dies "
            "stays RUNNING until someone marks it",
            exc_info=True,
        )
    runner = Runner(
        name=f"runners-orchestrator-{os.getpid()}",
        query_seconds=query_seconds,
        limit=limit,
        pause_on_shutdown=False,
    )
    for name in discovery.names():
        workflow = discovery.workflows[name]
        await runner.aadd_flow(
            workflow.flow,
            name=workflow.name,
            description=workflow.description or None,
            tags=[GENERATED_TAG],
        )
        logger.info("serving %s (%s)", workflow.name, workflow.entrypoint)
    await runner.start()


async def serve_with_reload(command: Sequence[str], watch: Sequence[Path]) -> int:
    """Run ``command`` and restart it whenever a ``.py`` file under ``watch`` changes."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    existing = [str(p) for p in watch if p.exists()]
    while True:
        child = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL)
        changed = asyncio.ensure_future(_next_change(existing, stop))
        exited = asyncio.ensure_future(child.wait())
        await asyncio.wait({changed, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not stop.is_set():
            # It stopped on its own (Prefect restarting, a broken file): try again shortly.
            changed.cancel()
            logger.warning("serving stopped (exit code %s); restarting in 2s", child.returncode)
            await asyncio.sleep(2)
            continue
        exited.cancel()
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 15)
        except TimeoutError:
            child.kill()
            await child.wait()
        if stop.is_set():
            return 0


async def _next_change(folders: Sequence[str], stop: asyncio.Event) -> None:
    from watchfiles import PythonFilter, awatch  # noqa: PLC0415 - development only

    async for changed in awatch(*folders, watch_filter=PythonFilter(), stop_event=stop):
        files = sorted({path for _, path in changed})
        logger.info("workflow files changed (%s); reloading", ", ".join(files))
        return


def reload_command(argv: Sequence[str]) -> list[str]:
    """The command that re-runs this CLI without ``--reload``."""
    args = [a for a in argv if a != "--reload"]
    return [sys.executable, "-m", "runners_orchestrator.cli", *args]
