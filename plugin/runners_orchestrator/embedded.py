"""The embedded default: everything on one machine, in one command (``runners-orchestrator dev``).

Starts, each in its own process group, and in this order:

1. a Prefect server on SQLite under the project's ``.state/prefect`` (unless
   ``PREFECT_API_URL`` names one that answers), configured to hold up on SQLite;
2. two runner servers, ``us-east-1`` on ``--runner-port`` and ``eu-west-1`` on the next port,
   used as the registry when none is configured; with the browser engine when a Chromium is
   found (see :meth:`DevStack.runner_engine`), else the HTTP engine;
3. ``serve-flows --reload``: the discovered workflows, served with fast pickup;
4. the HTTP API on ``--port``, once every workflow's deployment exists.

The API starts last on purpose: a script that waits for the API to answer and then starts a
run must never meet "no deployment yet". Its process starts in parallel with the flows
and imports everything, but binds its port only after the deployments are registered (see
:func:`_wait_for_deployments`), so the order costs no start-up time.

It prints every URL once everything answers, prefixes each process's log lines with its
name, and on Ctrl-C or SIGTERM stops every process it started, children included (each
runs in its own process group, which is signalled as a whole).

The Prefect server it started is restarted when it dies (on the same port and SQLite
database), as a user of a dev server expects: runs in flight carry on through Prefect's
client retries, and the API answers 503 with ``Retry-After`` meanwhile. If it keeps dying
(:data:`PREFECT_RESTARTS` times within :data:`PREFECT_RESTART_WINDOW` seconds), ``dev`` gives
up and stops everything, as it does when any other of its processes dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import quote

import httpx

from runners_orchestrator.orphans import LEDGER_ENV

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from runners_orchestrator.settings import OrchestratorSettings

__all__ = [
    "EMBEDDED_PREFECT_ENV",
    "PREFECT_RESTARTS",
    "PREFECT_RESTART_WINDOW",
    "DevStack",
    "StackError",
    "missing_deployments",
    "url_host",
    "wait_for_deployments",
]

EMBEDDED_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The scheduler creates the check suites' scheduled runs; tuned for few writes.
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "20",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT10M",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "50",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
    # The server's CSRF protection is off (Prefect's default), so its clients need not ask
    # for a token first: one round trip less for each new Prefect client (four per run).
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
}
"""How the embedded Prefect server is configured to hold up on SQLite.

Prefect's SQLite server meets "database is locked" from its own background services under
light load (PrefectHQ/prefect#10188, #16299, #19771): a read transaction that must upgrade
to a write fails at once instead of waiting. The services the embedded default does not use
(late-run marking, worker health, pause expiry, automations, vacuum, reconciler,
telemetry) are turned off, so that what writes is the runs themselves. Event persistence,
task-run recording and cancellation clean-up stay on: the UI and cancel need them.

The scheduler is on: it creates the runs of the check suites' schedules (``serve-flows``
only polls for runs that exist). Its two loops are tuned for few writes and a prompt
start: the recent-deployments loop (every 2 s, Prefect's default 5 s) schedules a suite
added or changed under ``dev --reload`` within seconds; the main loop (every 20 s,
Prefect's 60 s) tops up each schedule to 10 minutes ahead and at least 3 runs, at most 50
(Prefect's 1 hour and 100), so a reload, which replaces a changed deployment's future
runs, rewrites few rows, and a schedule of a few seconds never runs dry between loops.
See ``docs/monitoring.md``.
"""


PREFECT_RESTARTS = 5
"""Restarts of the embedded Prefect server that ``dev`` makes within the window below."""
PREFECT_RESTART_WINDOW = 120.0
"""Seconds: a Prefect server that died more than :data:`PREFECT_RESTARTS` times in this
window cannot start (port taken, database broken), and ``dev`` stops instead of looping."""


def url_host(host: str, *, connect: bool = False) -> str:
    """``host`` as it goes into a URL: IPv6 literals in brackets (``[::1]``).

    With ``connect``, a wildcard bind address (``0.0.0.0``, ``::``) becomes the loopback
    address of its family, which is where a local client reaches it.
    """
    if connect:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"[{host}]" if ":" in host else host


def missing_deployments(prefect_api: str, deployments: Mapping[str, str]) -> list[str]:
    """Which workflows have no deployment in Prefect yet.

    ``deployments`` maps each workflow's name to its deployment's full name
    (``Workflow.deployment_name``), looked up as the API's start looks it up.

    Raises:
        httpx.HTTPError: Prefect did not answer, or refused the query.
    """
    missing: list[str] = []
    with httpx.Client(base_url=f"{prefect_api.rstrip('/')}/", timeout=5) as http:
        for workflow, full_name in deployments.items():
            response = http.get(f"deployments/name/{quote(full_name)}")
            if response.status_code == httpx.codes.NOT_FOUND:
                missing.append(workflow)
            else:
                response.raise_for_status()
    return missing


def wait_for_deployments(
    prefect_api: str,
    deployments: Mapping[str, str],
    timeout: float,
    out: Callable[[str], None] = print,
) -> None:
    """Block until every workflow has its deployment (``serve`` in ``dev``).

    ``deployments``: as for :func:`missing_deployments`.

    Raises:
        StackError: they did not all appear within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    missing = list(deployments)
    said = False
    while missing:
        with contextlib.suppress(httpx.HTTPError):
            missing = missing_deployments(prefect_api, deployments)
        if not missing:
            return
        if not said:
            out(f"waiting for the deployments of {', '.join(missing)} before serving")
            said = True
        if time.monotonic() >= deadline:
            raise StackError(
                f"no deployment for {', '.join(missing)} after {timeout:.0f}s: is "
                "`runners-orchestrator serve-flows` running against the same Prefect?"
            )
        time.sleep(0.1)


class StackError(Exception):
    """The stack cannot start or a process of it died; the message says which and why."""


class _InterruptedError(Exception):
    """SIGTERM arrived while the stack was starting: stop what was started."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[str]
    args: list[str]
    env: dict[str, str]
    threads: list[threading.Thread] = field(default_factory=list)


def _pump(name: str, stream: IO[str], out: Callable[[str], None]) -> None:
    for line in stream:
        out(f"{name:<14}| {line.rstrip()}")


def _answers(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == httpx.codes.OK


def _wait_until(
    check: Callable[[], bool], what: str, timeout: float, alive: Callable[[], str | None]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = alive()
        if dead:
            raise StackError(f"{dead} exited while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise StackError(f"{what} did not answer within {timeout:.0f}s")


@dataclass
class DevStack:
    """Everything ``dev`` runs; :meth:`run` blocks until a signal or a crash."""

    settings: OrchestratorSettings
    project_root: Path
    host: str = "127.0.0.1"
    port: int = 8000
    prefect_port: int = 4200
    runner_port: int = 3001
    log_level: str = "info"
    workflows: Sequence[str] = ()
    """The discovered workflows, whose deployments the API waits for before it answers."""
    state_dir: Path | None = None
    """Where the embedded Prefect server keeps its SQLite database; ``.state`` by default."""
    runner_engine: str = "auto"
    """The runner servers' engine: ``browser``, ``http``, or ``auto`` (browser if possible)."""
    run_start: str = "in-process"
    """How ``serve-flows`` starts a run (``serving.StartMethod``). ``in-process`` by
    default: a run's time to its result is what a developer waits for, and the runs of a
    serving process that dies are marked ``Crashed`` by its ``--reload`` supervisor
    (``orphans``); ``fork`` gives each run a process that would outlive it and finish."""
    out: Callable[[str], None] = print
    children: list[_Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _prefect_restarts: list[float] = field(default_factory=list)

    # -- processes --------------------------------------------------------------------

    def _start(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        self.children.append(self._spawn(name, list(args), env))

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> _Child:
        process = subprocess.Popen(  # noqa: S603 - our own CLI and Prefect's
            list(args),
            cwd=self.project_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopped with its children
        )
        child = _Child(name, process, args, env)
        if process.stdout is not None:
            pump = threading.Thread(
                target=_pump, args=(name, process.stdout, self.out), daemon=True
            )
            pump.start()
            child.threads.append(pump)
        return child

    def _restart_prefect(self) -> None:
        """Start our Prefect server again if it died, unless it keeps dying.

        Same command, port and ``PREFECT_HOME`` (so the same SQLite database): every run,
        deployment and result is still there, and the processes that talk to it reconnect.
        """
        for index, child in enumerate(self.children):
            code = child.process.poll()
            if child.name != "prefect" or code is None:
                continue
            now = time.monotonic()
            recent = [t for t in self._prefect_restarts if now - t < PREFECT_RESTART_WINDOW]
            if len(recent) >= PREFECT_RESTARTS:
                return  # _dead() reports it and the stack stops
            self._prefect_restarts = [*recent, now]
            self.out(
                f"prefect exited (code {code}); restarting it on the same port and database "
                f"(restart {len(self._prefect_restarts)} within {PREFECT_RESTART_WINDOW:.0f}s)"
            )
            self.children[index] = self._spawn(child.name, child.args, child.env)

    def _dead(self) -> str | None:
        if self._stop.is_set():
            raise _InterruptedError
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                return f"{child.name} (exit code {code})"
        return None

    @property
    def state_root(self) -> Path:
        """What ``dev`` keeps between starts: ``--state-dir``, else ``.state`` in the project."""
        return self.state_dir or self.project_root / ".state"

    def stop(self) -> None:
        """Stop every process group, newest first; SIGKILL what is left after 10 s."""
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)  # grandchildren that lingered
            child.process.wait()
        self.children.clear()

    # -- the stack --------------------------------------------------------------------

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runners_orchestrator.cli", *args]

    def _prefect_url(self, env: dict[str, str]) -> tuple[str, bool]:
        """The Prefect API to use, and whether we start it."""
        external = os.environ.get("PREFECT_API_URL")
        if external:
            try:
                httpx.get(f"{external.rstrip('/')}/health", timeout=2).raise_for_status()
            except httpx.HTTPError:
                self.out(f"PREFECT_API_URL={external} does not answer; starting our own server")
            else:
                return external.rstrip("/"), False
        home = self.state_root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
        env.update(EMBEDDED_PREFECT_ENV)
        return f"http://127.0.0.1:{self.prefect_port}/api", True

    def runner_engine_and_chromium(self) -> tuple[str, str | None]:
        """The engine of the runner servers, and the Chromium the browser engine launches.

        ``auto`` picks the browser engine when Playwright is installed and a Chromium is
        found (``ORCHESTRATOR_CHROMIUM``, ``chromium`` on the PATH, or Playwright's own),
        and says in one line how to get it otherwise.

        Raises:
            StackError: ``browser`` was asked for and cannot run.
        """
        from runners_orchestrator.exceptions import ConfigurationError  # noqa: PLC0415

        if self.runner_engine == "http":
            return "http", None
        try:
            from runners_orchestrator.runner_server.engines.browser import (  # noqa: PLC0415
                find_chromium,
            )
        except ImportError:
            why = "Playwright is not installed: pip install 'runners-orchestrator[browser]'"
        else:
            try:
                return "browser", find_chromium(self.settings.chromium)
            except ConfigurationError as exc:
                why = str(exc)
        if self.runner_engine == "browser":
            raise StackError(why)
        self.out(f"runner servers use the HTTP engine (scripts are not run); {why}")
        return "http", None

    def _registry(self, engine: str) -> str | None:
        if self.settings.registry.servers or os.environ.get("ORCHESTRATOR_REGISTRY"):
            return None
        servers = [
            {
                "id": region,
                "url": f"http://127.0.0.1:{self.runner_port + offset}/api/runner",
                "region": region,
                "capacity": 4 if engine == "browser" else 32,
            }
            for offset, region in enumerate(("us-east-1", "eu-west-1"))
        ]
        return json.dumps({"type": "in-memory", "servers": servers})

    def start(self) -> dict[str, str]:
        """Start everything and wait until it answers; return the URLs to print."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        prefect_api, own_prefect = self._prefect_url(env)
        env["PREFECT_API_URL"] = prefect_api
        own_runners = not (
            self.settings.registry.servers or os.environ.get("ORCHESTRATOR_REGISTRY")
        )
        engine, chromium = self.runner_engine_and_chromium() if own_runners else ("http", None)
        registry = self._registry(engine)
        if registry is not None:
            env["ORCHESTRATOR_REGISTRY"] = registry
        level = self.log_level
        if own_prefect:
            prefect = [str(Path(sys.executable).parent / "prefect"), "server", "start"]
            self._start(
                "prefect",
                [*prefect, "--host", "127.0.0.1", "--port", str(self.prefect_port)],
                env,
            )
        regions = ("us-east-1", "eu-west-1") if registry is not None else ()
        for offset, region in enumerate(regions):
            port = str(self.runner_port + offset)
            args = ("runner-server", "--port", port, "--region", region, "--log-level", level)
            engine_args = ("--engine", engine, *(("--chromium", chromium) if chromium else ()))
            self._start(f"runner-{region}", self._cli(*args, *engine_args), env)
        timeout = 120
        # The flows and the API need Prefect: start them once it answers.
        _wait_until(
            lambda: _answers(f"{prefect_api}/health"),
            f"the Prefect server at {prefect_api}",
            timeout,
            self._dead,
        )
        flows_args = ("serve-flows", "--reload", "--start", self.run_start, "--log-level", level)
        # Runs on threads of a serving process that `dev` stopped with Prefect, and so could
        # not be marked crashed then, are at the next start (``orphans``).
        ledger = self.state_root / "in-process-runs"
        self._start("flows", self._cli(*flows_args), {**env, LEDGER_ENV: str(ledger)})
        serve_args = ("serve", "--host", self.host, "--port", str(self.port), "--log-level", level)
        self._start("api", self._cli(*serve_args, "--wait-for-deployments", str(timeout)), env)
        for offset, _region in enumerate(regions):
            url = f"http://127.0.0.1:{self.runner_port + offset}/api/runner/health"
            _wait_until(partial(_answers, url), url, timeout, self._dead)
        # The API binds its port only once every workflow's deployment exists: when it
        # answers, any run it is asked to start can start.
        api = f"http://{url_host(self.host)}:{self.port}"
        probe = f"http://{url_host(self.host, connect=True)}:{self.port}"
        _wait_until(
            lambda: _answers(f"{probe}{self.settings.route_prefix}"),
            f"the API at {api}",
            timeout,
            self._dead,
        )
        ui = prefect_api.removesuffix("/api")
        urls = {
            "API": f"{api}{self.settings.route_prefix}",
            "OpenAPI docs": f"{api}/schema",
            "Prefect UI": ui,
        }
        for offset, region in enumerate(regions):
            urls[f"runner {region}"] = f"http://127.0.0.1:{self.runner_port + offset}/api/runner"
        if regions:
            urls["runner engine"] = (
                f"browser (headless Chromium: {chromium})"
                if engine == "browser"
                else "http (HTML only, scripts not run)"
            )
        urls["check suites"] = self._suites_line()
        return urls

    def _suites_line(self) -> str:
        """The suites ``serve-flows`` schedules, for the banner (their files can change later)."""
        from runners_orchestrator.monitoring.suites import scan_suites  # noqa: PLC0415

        scan = scan_suites(self.project_root, self.settings.suites)
        if not scan.suites and not scan.problems:
            return f"none (add one in {self.settings.suites[0]}: docs/monitoring.md)"
        shown = [
            f"{suite.name} ({suite.schedule.describe() if suite.schedule else 'on demand'})"
            for suite in scan.suites.values()
        ]
        if scan.problems:
            shown.append(f"{len(scan.problems)} problem(s) in suite files, see the log above")
        return ", ".join(shown)

    def run(self) -> int:
        """Start, print the URLs, and block until Ctrl-C, SIGTERM or a crash."""
        started = time.monotonic()
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            try:
                urls = self.start()
            except (KeyboardInterrupt, _InterruptedError):
                return 130
            width = max(len(k) for k in urls)
            lines = [f"  {name:<{width}}  {url}" for name, url in urls.items()]
            elapsed = time.monotonic() - started
            banner = "\n".join(["", f"runners-orchestrator is ready ({elapsed:.1f}s):", *lines, ""])
            self.out(banner)
            while not self._stop.is_set():
                self._restart_prefect()
                dead = self._dead()
                if dead:
                    raise StackError(f"{dead} stopped; stopping the rest")
                self._stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()
        return 0
