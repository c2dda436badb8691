"""Serve the discovered workflows' deployments from one Prefect runner process.

``serve_flows`` registers one deployment per workflow (named like the workflow, tagged
``runners-orchestrator``) and starts their runs as Prefect announces them on its events
websocket (``wake``), polling the Prefect API every ``query_seconds`` besides (Prefect's
default poll is 10 s, ours 1 s): a run submitted through the API is picked up about 0.1 s
after it was created, and an idle server costs Prefect one query a second (see
``docs/workflows.md`` for the measurements).

``serve_with_reload`` runs that in a child process and restarts it when a workflow file, or
a project module a workflow file imports, changes, so the served deployments follow the
files without a manual restart.

The project root is importable here and in every run's process, as in discovery: a run's
process (forked or spawned) gets the runner's ``sys.path`` from ``multiprocessing``, and
imports the project modules the flow needs from disk when it unpickles the flow. The fork
server (``run_process``) preloads Prefect and this plugin only, never project modules, so
it holds nothing that an edit could make stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect.runner import Runner

from runners_orchestrator._imports import make_importable
from runners_orchestrator.crash_detection import enable_heartbeats, ensure_crash_detection
from runners_orchestrator.deployments import GENERATED_TAG
from runners_orchestrator.discovery import discover
from runners_orchestrator.exceptions import ConfigurationError, OrchestratorError
from runners_orchestrator.in_process import use_in_process_runs
from runners_orchestrator.orphans import LEDGER_ENV, RunLedger, crash_orphans
from runners_orchestrator.run_process import use_forkserver
from runners_orchestrator.wake import wake_on_new_runs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from watchfiles import Change

    from runners_orchestrator.discovery import Discovery

__all__ = [
    "DEFAULT_QUERY_SECONDS",
    "StartMethod",
    "serve_flows",
    "serve_with_reload",
    "watched_paths",
]

StartMethod = Literal["fork", "spawn", "in-process"]
"""How a served run starts (``serve-flows --start``); see :func:`serve_flows`."""

DEFAULT_QUERY_SECONDS = 1.0
logger = logging.getLogger("runners_orchestrator.serving")

ORPHANS_TIMEOUT = 5.0
"""Seconds the supervisor gives Prefect to record the runs a serving process left."""

RESTART_SECONDS = (2, 30)
"""``--reload``: after the server exits on its own, restart it at the next change, or after
this delay, doubled at each exit in a row up to the second value."""


async def serve_flows(
    discovery: Discovery,
    *,
    query_seconds: float = DEFAULT_QUERY_SECONDS,
    limit: int | None = None,
    start: StartMethod = "fork",
    register: Callable[[Runner], Awaitable[object]] | None = None,
    wake: bool = True,
) -> None:
    """Register every workflow's deployment and run their flow runs until cancelled.

    ``start`` is how a run starts: ``fork`` (the default), its process forked from a warm
    fork server (``run_process``); ``spawn``, Prefect's own cold process; ``in-process``,
    an ``async`` flow's run on a thread of this process (``in_process``).
    ``register`` adds more deployments to the runner before it starts (the check
    suites' scheduled deployments, from ``monitoring``). With ``wake`` (the default), a
    new run is picked up when Prefect announces it, not at the next poll (``wake``).
    """
    # Before the fork server starts, so that every run's process inherits them: heartbeats,
    # and the project importable (runs' processes unpickle flows that import the project).
    enable_heartbeats()
    make_importable(discovery.root)
    sync_flows = any(not w.flow.isasync for w in discovery.workflows.values())
    if start == "fork" or (start == "in-process" and sync_flows):
        use_forkserver()  # every run's process, or a sync flow's beside in-process runs
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
    # Every run's process is this same install talking to the server this process has just
    # checked: as Prefect suggests for such subprocesses, their clients skip the version
    # handshake (one request before each run starts). An operator's own choice stands.
    os.environ.setdefault("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", "false")
    if start == "in-process":
        use_in_process_runs()  # its runs' settings are read from the environment, now final
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
    if register is not None:
        await register(runner)
    waking = asyncio.create_task(wake_on_new_runs(runner)) if wake else None
    try:
        await runner.start()
    finally:
        if waking is not None:
            waking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waking


def watched_paths(root: Path, patterns: Sequence[str]) -> list[Path]:
    """What ``--reload`` watches recursively: workflow folders and imported project packages.

    The folders are the patterns' fixed prefixes (``flows/`` of ``flows/**/*.py``); the
    project's own packages and modules are the top-level entries of those the workflow files
    import (``helpers/`` for ``helpers.shared``), found by discovering.
    """
    paths = {root / pattern.split("*", 1)[0] for pattern in patterns}
    try:
        discovery = discover(root, patterns)
    except OrchestratorError as exc:
        # A duplicate name: the server reports it, and the fix touches a workflow file.
        logger.debug("watching the workflow folders only: %s", exc)
    else:
        paths.update(root / path.relative_to(root).parts[0] for path in discovery.project_imports)
    return sorted(path for path in paths if path.exists())


async def serve_with_reload(
    command: Sequence[str],
    root: Path,
    patterns: Sequence[str],
    data_patterns: Sequence[str] = (),
) -> int:
    """Run ``command`` and restart it whenever a workflow file or a project module changes.

    Watched: :func:`watched_paths`, recursively, computed again before each start (a
    workflow file may have started importing another package); the project root, not
    recursively, for a module or package created there, which a workflow file may be
    waiting for; and the files matching ``data_patterns`` (the check suites'
    ``checks/**/*.toml``): a file of their extension added, changed or removed under their
    folder. Whenever the command exits, the runs it left on its threads (``--start
    in-process``) are marked ``Crashed`` (``orphans``).
    """
    kept = os.environ.get(LEDGER_ENV)  # ``dev`` keeps it in its state folder, across starts
    with (
        contextlib.nullcontext(kept)
        if kept
        else tempfile.TemporaryDirectory(prefix="runners-orchestrator-runs-")
    ) as folder:
        ledger = RunLedger(Path(folder))
        ledger.folder.mkdir(parents=True, exist_ok=True)
        if ledger.runs():  # left by the last supervisor, which could not reach Prefect
            await _crash_orphans(ledger, "it stopped before the run ended")
        env = {**os.environ, LEDGER_ENV: folder}
        return await _supervise(command, root, patterns, data_patterns, ledger=ledger, env=env)


async def _supervise(
    command: Sequence[str],
    root: Path,
    patterns: Sequence[str],
    data_patterns: Sequence[str],
    *,
    ledger: RunLedger,
    env: dict[str, str],
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    delay = RESTART_SECONDS[0]
    while True:
        watched = watched_paths(root, patterns)
        logger.debug("watching %s", ", ".join(str(p) for p in watched))
        started = loop.time()
        child = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL, env=env)
        changed = asyncio.ensure_future(_next_change(watched, root, stop, data_patterns))
        exited = asyncio.ensure_future(child.wait())
        await asyncio.wait({changed, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and not changed.done():
            await _crash_orphans(ledger, f"its serving process exited ({child.returncode})")
            # It stopped on its own: a broken file (wait for its fix) or Prefect unreachable
            # (try again). Each start imports Prefect anew: do not spin on a broken project.
            if loop.time() - started > RESTART_SECONDS[1]:
                delay = RESTART_SECONDS[0]
            logger.warning(
                "serving stopped (exit code %s); restarting at the next change or in %ss",
                child.returncode,
                delay,
            )
            await asyncio.wait({changed}, timeout=delay)
            delay = RESTART_SECONDS[0] if changed.done() else min(delay * 2, RESTART_SECONDS[1])
            changed.cancel()
            await asyncio.gather(changed, return_exceptions=True)
            if stop.is_set():
                return 0
            continue
        delay = RESTART_SECONDS[0]
        exited.cancel()
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 15)
        except TimeoutError:
            child.kill()
            await child.wait()
        await _crash_orphans(ledger, f"its serving process was stopped ({child.returncode})")
        if stop.is_set():
            return 0


async def _crash_orphans(ledger: RunLedger, why: str) -> None:
    """Mark the runs a serving process left on its threads ``Crashed`` (``orphans``).

    Bounded: a Prefect server that is down (``dev`` stops it beside this process) must not
    hold up a restart or a shutdown; what is left stays listed for the next exit.
    """
    message = f"The flow run was running on a thread of a serving process, and {why}."
    try:
        await asyncio.wait_for(crash_orphans(ledger, message), ORPHANS_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - Prefect unreachable or slow: said, not raised
        logger.warning(
            "could not mark the runs of the serving process crashed (%s): %s; they stay "
            "listed in %s, for the next exit or start",
            f"{type(exc).__name__}: {exc}".splitlines()[0],
            ", ".join(str(r) for r in ledger.runs()),
            ledger.folder,
        )


def _top_level_filter(root: Path) -> Callable[[Change, str], bool]:
    """Accept a ``.py`` file, or a new folder that could be a package, right in ``root``."""
    from watchfiles import Change  # noqa: PLC0415 - development only

    def accept(change: Change, path: str) -> bool:
        name = Path(path).name
        if name.endswith(".py"):
            return True
        return (
            change == Change.added
            and name.isidentifier()
            and name != "__pycache__"
            and (root / name).is_dir()
        )

    return accept


def _data_filter(patterns: Sequence[str]) -> Callable[[Change, str], bool]:
    """Accept a file whose extension is one of the patterns' (``.toml`` of ``**/*.toml``)."""
    suffixes = {Path(pattern).suffix for pattern in patterns if Path(pattern).suffix}

    def accept(_: Change, path: str) -> bool:
        name = Path(path).name
        return not name.startswith(".") and Path(name).suffix in suffixes

    return accept


def data_folders(root: Path, patterns: Sequence[str]) -> list[Path]:
    """The folders to watch for ``patterns``: their fixed prefixes, when they exist.

    Never the project root itself (it holds ``.venv`` and ``.state``): a pattern without a
    folder of its own is not watched, and a missing folder is noticed when it is created
    at the root (see :func:`_top_level_filter`).
    """
    folders = {root / pattern.split("*", 1)[0] for pattern in patterns}
    return sorted(folder for folder in folders if folder != root and folder.is_dir())


async def _next_change(
    watched: Sequence[Path],
    root: Path,
    stop: asyncio.Event,
    data_patterns: Sequence[str] = (),
) -> None:
    """Return at the first change that matters, or once ``stop`` is set."""
    from watchfiles import PythonFilter, awatch  # noqa: PLC0415 - development only

    # The watchers' own stop event: awatch sets it when cancelled, and `stop` means "exit".
    halt = asyncio.Event()

    async def first(paths: Sequence[Path], **options: Any) -> set[tuple[Change, str]]:
        async with contextlib.aclosing(awatch(*paths, stop_event=halt, **options)) as batches:
            async for batch in batches:
                return batch
        return set()

    stopped = asyncio.ensure_future(stop.wait())
    watchers = [
        asyncio.ensure_future(first([root], watch_filter=_top_level_filter(root), recursive=False))
    ]
    if watched:
        watchers.append(asyncio.ensure_future(first(watched, watch_filter=PythonFilter())))
    data = data_folders(root, data_patterns)
    if data:
        watchers.append(
            asyncio.ensure_future(first(data, watch_filter=_data_filter(data_patterns)))
        )
    try:
        await asyncio.wait([stopped, *watchers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.set()
        stopped.cancel()
        results = await asyncio.gather(stopped, *watchers, return_exceptions=True)
    files = sorted({path for batch in results[1:] if isinstance(batch, set) for _, path in batch})
    if files:
        logger.info("files changed (%s); reloading", ", ".join(files))


def reload_command(argv: Sequence[str]) -> list[str]:
    """The command that re-runs this CLI without ``--reload``."""
    args = [a for a in argv if a != "--reload"]
    return [sys.executable, "-m", "runners_orchestrator.cli", *args]
