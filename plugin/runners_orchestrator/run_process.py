"""A served flow run's own process: forked warm, and started without avoidable waits.

Prefect starts every run of a served deployment in a new process. On two cores that process
spent about 0.9 s between PENDING and RUNNING before its first check (py-spy over the
forked processes of 15 one-job runs, ``docs/benchmarks.md``):

- **imports**: a ``spawn`` process imports Prefect again. A fork server imports it once and
  forks each run's process from that warm, single-threaded process (:func:`use_forkserver`);
  the modules Prefect imports lazily during a run are preloaded too.
- **TLS contexts**: every Prefect client builds an ``ssl`` context from certifi's CA bundle
  (27 ms of CPU each here), whatever the URL's scheme, and a run makes eight of them, for
  its events, its logs, its result storage and its suspension observer. In a run's process
  Prefect's clients share one context per CA file (``_tls.shared_tls_context``), built once
  in the fork server, as httpx recommends for clients that share a trust store.
- **the suspension observer**: a deployment's run waits, before its flow starts, until a
  thread has opened a Prefect client, subscribed to the events websocket and read the run's
  state (a fifth of the run process's wall time). The observer now starts beside the flow
  instead (:func:`observe_suspension_in_background`): it reads the run's state first thing,
  so a suspension requested meanwhile is still honoured, at the next task boundary.

- **settings, three times**: to start a run, Prefect's runner turned its settings into
  environment variables (39 ms of CPU per run here) and serialized them once more into the
  run's context (48 ms); the run's process then built its settings from that environment
  (26 ms) and validated the serialized copy again (64 ms), to the same values. The runner
  now computes the environment once per settings object (:class:`_SettingsEnvironmentOnce`)
  and hands the run a context without its settings (:func:`_context_without_settings`), so
  the run's process keeps the settings it built from the environment.

These are the only Prefect behaviours changed, and only in the fork server and the runs'
processes it forks, and in how the serving process starts them; never in the API.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import ssl
import threading
import types
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any, ClassVar

import certifi
import prefect.flow_engine
import prefect.runner._starter_direct
from prefect.client import orchestration
from prefect.context import SettingsContext, serialize_context
from prefect.settings import PREFECT_API_SSL_CERT_FILE
from prefect.settings.context import get_current_settings

from runners_orchestrator._tls import certifi_tls_context, shared_tls_context

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from uuid import UUID

__all__ = [
    "FORKSERVER_PRELOAD",
    "observe_suspension_in_background",
    "use_forkserver",
    "warm_up",
]

logger = logging.getLogger("runners_orchestrator.run_process")

FORKSERVER_PRELOAD = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    # Imported by Prefect on a run's first use, in every run's process otherwise.
    "pydantic.v1",
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "runners_orchestrator.steps",
    # Last: installs what this module changes, in the fork server only.
    "runners_orchestrator._forkserver_init",
)
"""Modules imported once in the fork server, so a flow run's process starts warm."""


class _SSLWithSharedContexts(types.ModuleType):
    """The ``ssl`` module as Prefect's client module sees it, with shared default contexts."""

    def __init__(self) -> None:
        super().__init__("ssl")

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    create_default_context = staticmethod(shared_tls_context)


_observe_suspension = getattr(prefect.flow_engine, "observe_flow_run_suspension", None)
"""Prefect's own observer (``None`` in a Prefect without one: then nothing is replaced)."""


@contextlib.contextmanager
def observe_suspension_in_background(
    flow_run_id: UUID, suspension_request: Any, polling_interval: float = 10
) -> Iterator[None]:
    """Prefect's suspension observer, started beside the flow instead of before it.

    Prefect's own context manager returns once its observer thread has subscribed to the
    events websocket and read the run's current state; here that wait happens in a thread
    of its own, so the flow starts at once. On exit the observer is stopped as Prefect
    stops it, once it has finished starting.
    """
    if _observe_suspension is None:  # never installed so: Prefect has no observer to start
        yield
        return
    observing = _observe_suspension(flow_run_id, suspension_request, polling_interval)
    starting = threading.Thread(
        target=contextvars.copy_context().run,  # the run's settings, as in Prefect's thread
        args=(observing.__enter__,),
        name="suspension-observer-start",
        daemon=True,
    )
    starting.start()
    try:
        yield
    finally:
        starting.join()
        observing.__exit__(None, None, None)


def warm_up() -> None:
    """Install the shared TLS contexts and the background observer; build the contexts.

    Called once in the fork server (``_forkserver_init``), so every run's process inherits
    them already built. Never raises: a Prefect whose internals moved keeps its own ways.
    """
    try:
        orchestration.ssl = _SSLWithSharedContexts()  # type: ignore[attr-defined]
        certifi_tls_context()  # httpx's default, for the runner servers
        # Prefect's clients trust PREFECT_API_SSL_CERT_FILE (SSL_CERT_FILE) when it is set.
        shared_tls_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
        if _observe_suspension is not None:
            prefect.flow_engine.observe_flow_run_suspension = observe_suspension_in_background  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - a Prefect without these names
        logger.warning("run processes start without the warm-up", exc_info=True)


class _SettingsEnvironmentOnce:
    """The current settings, whose environment-variable form is computed once per settings.

    Prefect's ``run_flow_in_subprocess`` asks for it at every run start; the settings of a
    serving process change only when its settings context does (a new object), and then
    the environment is computed again.
    """

    _cached: ClassVar[tuple[object, tuple[Any, ...], dict[str, str]] | None] = None

    def __init__(self) -> None:
        self._settings = get_current_settings()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._settings, name)

    def to_environment_variables(self, **options: Any) -> dict[str, str]:
        key = tuple(sorted(options.items()))
        cached = _SettingsEnvironmentOnce._cached
        if cached is None or cached[0] is not self._settings or cached[1] != key:
            environment = self._settings.to_environment_variables(**options)
            cached = _SettingsEnvironmentOnce._cached = (self._settings, key, environment)
        return dict(cached[2])


def _context_without_settings() -> dict[str, Any]:
    """Prefect's serialized context for a run's process, without the settings context.

    The run's process builds its settings from the environment Prefect gives it, which
    holds the runner's settings; a settings context in the serialized context would be
    validated once more, to the same values. Prefect's own ``serialize_context`` runs in a
    copy of the current context whose settings context serializes to nothing (Prefect
    falls back to its global settings context when none is set, so one must stand in).
    """

    def serialize() -> dict[str, Any]:
        SettingsContext.__var__.set(_NO_SETTINGS)
        return serialize_context()

    return contextvars.copy_context().run(serialize)


class _NoSettingsContext:
    """Stands in for the settings context while Prefect serializes a run's context."""

    def serialize(self, **_options: Any) -> dict[str, Any]:
        return {}


_NO_SETTINGS: Any = _NoSettingsContext()


def _run_flow_in_forkserver(*args: Any, **kwargs: Any) -> Any:
    """Prefect's ``run_flow_in_subprocess``, with a fork server instead of ``spawn``.

    Prefect starts every flow run of a served deployment in a fresh ``spawn`` process,
    which imports Prefect again: about 0.9 s of the time from "created" to "running" on
    the reference machine. A fork server imports it once; each run's process is then a
    fork of that warm, single-threaded process (safe to fork, unlike the runner itself).
    The settings reach the run's process once, as environment (see the module's doc);
    everything else (signals, control channel) is Prefect's own code, called as it is.
    """
    context = multiprocessing.get_context("forkserver")
    shims = {
        "multiprocessing": types.SimpleNamespace(
            get_context=lambda _method=None: context, context=multiprocessing.context
        ),
        "get_current_settings": _SettingsEnvironmentOnce,
    }
    originals = {name: getattr(prefect.flow_engine, name) for name in shims}
    if kwargs.get("context") is None:
        kwargs["context"] = _context_without_settings()
    for name, shim in shims.items():
        setattr(prefect.flow_engine, name, shim)
    try:
        return prefect.flow_engine.run_flow_in_subprocess(*args, **kwargs)
    finally:
        for name, original in originals.items():
            setattr(prefect.flow_engine, name, original)


def use_forkserver(preload: Sequence[str] = FORKSERVER_PRELOAD) -> None:
    """Start served flow runs from a warm fork server (see :func:`_run_flow_in_forkserver`).

    ``prefect.runner._starter_direct`` documents its module-level ``run_flow_in_subprocess``
    as the place to patch.
    """
    multiprocessing.set_forkserver_preload(list(preload))
    starter = prefect.runner._starter_direct  # noqa: SLF001
    starter.run_flow_in_subprocess = _run_flow_in_forkserver  # type: ignore[attr-defined]
    # Start it now, so the first run does not wait for the preload imports.
    forkserver.ensure_running()
