"""Served flow runs on a thread of the serving process instead of a process each.

Prefect's runner starts every run of a served deployment in a process of its own; even
forked warm (``run_process``), that process then builds its settings, its Prefect client,
its events and logs connections before the flow's first step. ``serve-flows --start
in-process`` (and ``dev --start in-process``) runs each run of an ``async`` workflow on a
thread of its own in the serving process instead, through Prefect's own flow engine: a run
skips its process's start-up, a tenth of a second of a small run (``docs/benchmarks.md``).

What a process gave and what stands in for it here:

- **cancellation**: the runner stops a run by signalling its process; here it cancels the
  run's task (:meth:`InProcessRun.graceful_kill`), which the flow engine sees as the
  runner's cancel intent, as it sees an acknowledged SIGTERM: the runner then records the
  run ``Cancelled`` and runs its ``on_cancellation`` hooks, as for a process.
- **a run that blocks**: each run has its own thread and event loop, so a flow that blocks
  its loop delays only itself. A *sync* flow cannot be interrupted on a thread, so its
  runs still get a process (forked warm, as with ``--start fork``).
- **a run that brings the process down** (a native crash, ``os._exit``, the OOM killer)
  takes the other runs of this process with it, where runs in processes of their own
  would outlive it and finish. They are marked ``Crashed``: at once by the supervisor of
  ``serve-flows --reload`` (``orphans``; what ``dev`` runs), or once their heartbeats stop
  by the crash-detection automation (``crash_detection``) of a Prefect server that runs
  automations. This is the containment traded for speed, and why ``fork`` stays the
  default of ``serve-flows``.
- **module state**: runs share the serving process's imported modules; a workflow that
  keeps state in module globals sees other runs' state (each process started clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import prefect.flow_engine
import prefect.runner.runner
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import Abort, Pause
from prefect.runner._process_manager import ProcessHandle
from prefect.runner._starter_direct import DirectSubprocessStarter
from prefect.settings import Settings

from runners_orchestrator.execution import close_runner_client
from runners_orchestrator.orphans import RunLedger

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["InProcessRun", "use_in_process_runs"]

logger = logging.getLogger("runners_orchestrator.in_process")

_current_run: contextvars.ContextVar[InProcessRun | None] = contextvars.ContextVar(
    "runners_orchestrator_in_process_run", default=None
)
_prefect_termination_intent = getattr(prefect.flow_engine, "_termination_intent", None)


def _termination_intent() -> Any:
    """The runner's intent for the current run: ``cancel`` once it was asked to stop.

    Prefect's engine reads the intent its process's control listener received; a run on
    a thread has no listener of its own, and its stop request is always a cancellation
    (Prefect's runner stops a run only to cancel it, itself included when it shuts down).
    """
    run = _current_run.get()
    if run is not None and run.cancelled:
        return "cancel"
    return _prefect_termination_intent() if _prefect_termination_intent else None


class InProcessRun:
    """One flow run on a thread of this process, as Prefect's runner tracks a run's process.

    It is both the "process" of Prefect's ``ProcessHandle`` (``pid``, ``returncode``) and
    its termination scope (``is_alive``, ``graceful_kill``, ``hard_kill``), so Prefect's
    process manager and cancellation code drive it unchanged.
    """

    wait_after_graceful_kill = False  # the cancellation is delivered at once

    def __init__(self, starter: DirectSubprocessStarter, flow_run: FlowRun) -> None:
        self.pid = os.getpid()
        self.returncode: int | None = None
        self.cancelled = False
        self._flow = starter._flow  # noqa: SLF001 - the starter's own flow
        self._flow_run = flow_run
        self._ledger = _config().ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"flow-run-{flow_run.id}", daemon=True
        )
        self._exited = asyncio.Event()
        self._runner_loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Start the run's thread (its own event loop, Prefect's flow engine on it)."""
        if self._ledger is not None:
            self._ledger.add(self._flow_run.id)  # until it ends: see ``orphans``
        self._thread.start()

    async def wait(self) -> None:
        """Return once the run's thread has finished."""
        await self._exited.wait()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:  # asyncio.run's own failure: counted as a crash
            logger.exception("flow run %s: its thread failed", self._flow_run.id)
        finally:
            if self.returncode is None:
                self.returncode = 1
            if self._ledger is not None and not self.cancelled:
                # Its end is recorded (the engine's last write, or the runner's for an exit
                # code of 1). A cancelled run's state is the runner's to write after this
                # point, so it stays listed; Prefect refuses Crashed once it is Cancelled.
                self._ledger.remove(self._flow_run.id)
            self._runner_loop.call_soon_threadsafe(self._exited.set)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        _current_run.set(self)
        if self.cancelled:  # asked to stop before it began: nothing ran
            self.returncode = 0
            return
        try:
            settings = _config().settings
            with SettingsContext(profile=settings.profile, settings=settings.settings):
                # Prefect's engine reports every outcome (Completed, Failed, Crashed) itself;
                # `run_flow` reads the parameters from the flow run, as in a run's process.
                running = prefect.flow_engine.run_flow(
                    self._flow, flow_run=self._flow_run, return_type="state"
                )
                if inspect.isawaitable(running):
                    await running
        except (Abort, Pause) as exc:  # suspended or aborted by Prefect: its state is set
            logger.info("flow run %s stopped: %s", self._flow_run.id, type(exc).__name__)
        except BaseException:
            if not self.cancelled:  # as a process that exited with an error: a crash
                logger.exception("flow run %s ended outside its flow", self._flow_run.id)
                self.returncode = 1
                return
            # A cancelled run's state is the runner's to record, as for a process it stopped.
        finally:
            with contextlib.suppress(Exception):
                await close_runner_client()  # its connections end with the run's loop
        self.returncode = 0

    # Prefect's ProcessTerminationScope: how the runner stops this "process".
    def is_alive(self, _pid: int) -> bool:
        """Whether the run's thread is still running (its run, or its engine's last writes)."""
        return self._thread.is_alive()

    def graceful_kill(self, _pid: int) -> None:
        """Cancel the run's task: the engine stops it at its next ``await``."""
        self.cancelled = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    hard_kill = graceful_kill

    def close(self) -> None:
        """Nothing to release: the thread ends with its run."""


class InProcessStarter(DirectSubprocessStarter):
    """Prefect's starter for a served flow, starting ``async`` flows' runs on a thread."""

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        if not self._flow.isasync or self._flow.isgenerator:
            await super().start(flow_run, task_status=task_status)  # a process, as Prefect does
            return
        run = InProcessRun(self, flow_run)
        run.start()
        task_status.started(ProcessHandle(run, termination_scope=run))  # type: ignore[arg-type]
        try:
            await run.wait()
        except BaseException:  # the runner itself is stopping: stop the run with it
            run.graceful_kill(run.pid)
            raise


@dataclass(frozen=True)
class _Config:
    settings: SettingsContext
    """What a run's process would have read from the environment at its start."""
    ledger: RunLedger | None
    """Where a supervisor (``serve-flows --reload``) follows the runs, if one does."""


_CONFIG: list[_Config] = []
"""Set once, by :func:`use_in_process_runs`."""


def _config() -> _Config:
    return _CONFIG[0]


def use_in_process_runs() -> None:
    """Start served ``async`` flows' runs on threads of this process (see the module's doc).

    Call it after the serving process's environment is final (``enable_heartbeats``): the
    runs' settings are read from it here, once, as a run's process would read them.
    """
    from runners_orchestrator.run_process import warm_up  # noqa: PLC0415

    warm_up()  # shared TLS contexts and the background suspension observer, here too
    # The runner, not the engine, owns a cancelled run's state and hooks (as for a process).
    os.environ["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
    current = get_settings_context()
    settings = SettingsContext(profile=current.profile, settings=Settings())
    _CONFIG[:] = [_Config(settings, RunLedger.from_environment())]
    prefect.flow_engine._termination_intent = _termination_intent  # noqa: SLF001
    prefect.runner.runner.DirectSubprocessStarter = InProcessStarter  # type: ignore[attr-defined]
