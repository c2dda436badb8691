"""The long-running commands: ``runner-server``, ``serve``, ``serve-flows`` and ``dev``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners_orchestrator.cli._common import (
    PROG,
    CommandError,
    add_log_level,
    configure_logging,
    discover_project,
    ensure_port_free,
    port,
    positive_float,
    positive_int,
    report_broken,
)
from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from prefect.runner import Runner

    from runners_orchestrator.discovery import Discovery

__all__ = ["add_commands"]

START_METHODS = ("fork", "spawn", "in-process")
"""``serving.StartMethod``'s values, without importing Prefect to build the parser."""

KEEP_ALIVE_SECONDS = 75
"""How long ``serve`` and ``runner-server`` keep an idle connection open (nginx's default).

Above the idle timeout of the load balancers put in front (AWS ALB: 60 s): a proxy that
reuses an idle connection its server is closing at that moment gets no answer, and HAProxy
then closes the client's connection without one, leaving the retry to the client. uvicorn's
own default of 5 s is shorter than HAProxy's idle connection pool keeps them.
"""


def _uvicorn(app: Any, args: argparse.Namespace) -> None:
    import uvicorn  # noqa: PLC0415 - only the serving commands need it

    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=args.keep_alive,
    )


def _add_keep_alive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-alive",
        type=positive_int,
        default=KEEP_ALIVE_SECONDS,
        metavar="SECONDS",
        help="seconds an idle connection stays open; keep it above the idle timeout of a "
        "load balancer in front (default: %(default)s)",
    )


def _runner_server(args: argparse.Namespace) -> int:
    from runners_orchestrator.runner_server import (  # noqa: PLC0415
        RunnerServerConfig,
        RunnerServerPlugin,
        create_runner_app,
    )

    chromium = args.chromium or get_settings().chromium
    try:
        config = RunnerServerConfig(
            region=args.region,
            engine=args.engine,
            chromium=chromium,
            capacity=args.capacity,
            runner_timeout=args.runner_timeout,
            deny=args.deny,
            allow=args.allow,
        )
    except ConfigurationError as exc:
        raise CommandError(str(exc), usage=True) from None
    if args.engine == "browser":
        # Refuse to start, in one line, before the port is taken: not at the first check.
        try:
            from runners_orchestrator.runner_server.engines.browser import (  # noqa: PLC0415
                find_chromium,
            )
        except ImportError:
            from runners_orchestrator.runner_server.engines import (  # noqa: PLC0415
                BROWSER_EXTRA_MISSING,
            )

            raise CommandError(BROWSER_EXTRA_MISSING) from None
        try:
            chromium = find_chromium(chromium)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from None
    ensure_port_free(args.host, args.port, "--port")
    configure_logging(args.log_level)
    app = create_runner_app(config)
    logging.getLogger(__name__).info(
        "runner server (region %s, %s engine%s, capacity %d) on http://%s:%d/api/runner",
        args.region or "-",
        args.engine,
        f", Chromium {chromium}" if args.engine == "browser" else "",
        app.plugins.get(RunnerServerPlugin).capacity,
        args.host,
        args.port,
    )
    _uvicorn(app, args)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from runners_orchestrator.api import create_app  # noqa: PLC0415

    ensure_port_free(args.host, args.port, "--port")
    configure_logging(args.log_level)
    app = create_app()
    if args.wait_for_deployments:
        _wait_for_deployments(args.wait_for_deployments)
    _uvicorn(app, args)
    return 0


def _wait_for_deployments(timeout: float) -> None:
    """Hold the port closed until every workflow can start (what ``dev`` asks for).

    Everything is imported and the app built first, so the wait overlaps the start-up
    of ``serve-flows`` instead of adding to it.
    """
    from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

    from runners_orchestrator.embedded import StackError, wait_for_deployments  # noqa: PLC0415

    prefect_api = PREFECT_API_URL.value()
    if not prefect_api:
        raise CommandError("--wait-for-deployments needs PREFECT_API_URL", usage=True)
    discovery = discover_project()
    deployments = {name: discovery.workflows[name].deployment_name() for name in discovery.names()}
    log = logging.getLogger("runners_orchestrator.api")
    try:
        wait_for_deployments(prefect_api, deployments, timeout, out=log.info)
    except StackError as exc:
        raise CommandError(str(exc)) from None


def _serve_flows(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from runners_orchestrator.serving import (  # noqa: PLC0415
        reload_command,
        serve_flows,
        serve_with_reload,
    )

    configure_logging(args.log_level)
    settings = get_settings()
    if args.reload:
        discovery = discover_project()
        command = reload_command(sys.argv[1:])
        return asyncio.run(
            serve_with_reload(command, discovery.root, settings.pattern, settings.suites)
        )
    discovery = discover_project()
    report_broken(discovery)
    if not discovery.workflows:
        raise CommandError(f"no workflows to serve under {discovery.root}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_flows(
                discovery,
                query_seconds=args.poll,
                limit=args.limit,
                start=args.start,
                register=_suite_registrar(discovery),
                wake=args.wake,
            )
        )
    return 0


def _suite_registrar(discovery: Discovery) -> Callable[[Runner], Awaitable[object]]:
    """What serve-flows adds after the workflows: the check suites' scheduled deployments.

    A broken suite file is one warning line per problem; the rest is served regardless.
    """
    from runners_orchestrator.monitoring.scheduling import register_suites  # noqa: PLC0415
    from runners_orchestrator.monitoring.suites import scan_suites  # noqa: PLC0415

    settings = get_settings()

    async def register(runner: Runner) -> None:
        scan = scan_suites(discovery.root, settings.suites)
        problems = await register_suites(
            runner, discovery, scan, deployment_tags=settings.deployment_tags
        )
        for problem in problems:
            print(f"{PROG}: warning: {problem}", file=sys.stderr, flush=True)  # noqa: T201

    return register


def _dev(args: argparse.Namespace) -> int:
    from runners_orchestrator.embedded import DevStack, StackError  # noqa: PLC0415
    from runners_orchestrator.settings import find_project_root  # noqa: PLC0415

    settings = get_settings()
    checks = [(args.host, args.port, "--port")]
    if not os.environ.get("PREFECT_API_URL"):
        checks.append(("127.0.0.1", args.prefect_port, "--prefect-port"))
    if not settings.registry.servers and not os.environ.get("ORCHESTRATOR_REGISTRY"):
        checks += [
            ("127.0.0.1", args.runner_port, "--runner-port"),
            ("127.0.0.1", args.runner_port + 1, "--runner-port (it uses the next port too)"),
        ]
    for host, number, flag in checks:
        ensure_port_free(host, number, flag)
    discovery = discover_project()  # a duplicate or reserved name stops us here
    report_broken(discovery)
    stack = DevStack(
        workflows=discovery.names(),
        settings=settings,
        project_root=find_project_root(),
        host=args.host,
        port=args.port,
        prefect_port=args.prefect_port,
        runner_port=args.runner_port,
        log_level=args.log_level,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        runner_engine=args.runner_engine,
        run_start=args.start,
    )
    try:
        return stack.run()
    except StackError as exc:
        raise CommandError(str(exc)) from None


def add_commands(commands: Any) -> None:
    """Register the serving commands on the top-level parser's subcommands."""
    runner = commands.add_parser(
        "runner-server",
        help="serve the built-in runners over the runners HTTP contract",
        description="Serve /api/runner/execute, /info and /health with the built-in runners.",
    )
    runner.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    runner.add_argument("--port", type=port, default=3001, help="port (default: %(default)s)")
    runner.add_argument("--region", default="local", help="region reported (default: %(default)s)")
    runner.add_argument(
        "--engine",
        choices=("http", "browser"),
        default="http",
        help="how runners are evaluated: fetch and parse the HTML (http) or load the page "
        "in headless Chromium (browser) (default: %(default)s)",
    )
    runner.add_argument(
        "--chromium",
        default=None,
        metavar="PATH",
        help="the browser engine's Chromium (default: ORCHESTRATOR_CHROMIUM, else chromium "
        "on the PATH, else one installed by `playwright install chromium`)",
    )
    runner.add_argument(
        "--capacity",
        type=positive_int,
        default=None,
        help="execute requests served at once; more get 429 (default: 32 for http, 4 for browser)",
    )
    runner.add_argument(
        "--runner-timeout",
        type=positive_float,
        default=30.0,
        help="seconds before a runner's result is an error (default: %(default)s)",
    )
    runner.add_argument(
        "--deny",
        action="append",
        default=[],
        metavar="RANGE",
        help="refuse targets in this CIDR range or named range (private, loopback, ...); "
        "repeatable; link-local is always refused unless allowed",
    )
    runner.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="RANGE",
        help="allow targets in this range even when a denied range contains them; repeatable",
    )
    _add_keep_alive(runner)
    add_log_level(runner)
    runner.set_defaults(handler=_runner_server)

    dev = commands.add_parser(
        "dev",
        help="run everything on this machine: Prefect, runner servers, flows, API",
        description="The embedded default: a Prefect server on SQLite (or PREFECT_API_URL), "
        "two runner servers, the workflows served with reload, and the API.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="API address (default: %(default)s)")
    dev.add_argument("--port", type=port, default=8000, help="API port (default: %(default)s)")
    dev.add_argument(
        "--prefect-port", type=port, default=4200, help="Prefect port (default: %(default)s)"
    )
    dev.add_argument(
        "--runner-port",
        type=port,
        default=3001,
        help="first runner server's port; the second uses the next (default: %(default)s)",
    )
    dev.add_argument(
        "--state-dir",
        default=None,
        help="where the embedded Prefect server keeps its database (default: .state/ "
        "in the project root)",
    )
    dev.add_argument(
        "--runner-engine",
        choices=("auto", "browser", "http"),
        default="auto",
        help="the runner servers' engine; auto: browser when a Chromium is found, else http "
        "(default: %(default)s)",
    )
    dev.add_argument(
        "--start",
        choices=START_METHODS,
        default="in-process",
        help="how serve-flows starts a run: see `serve-flows --help`; fork to give each run "
        "a process that outlives a crash of the serving process (default: %(default)s)",
    )
    add_log_level(dev)
    dev.set_defaults(handler=_dev)

    serve = commands.add_parser(
        "serve",
        help="serve the orchestrator HTTP API against PREFECT_API_URL",
        description="Serve every workflow as an HTTP endpoint, proxied to the Prefect API.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=port, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--wait-for-deployments",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="listen only once every workflow's deployment exists, waiting at most this long "
        "(what `dev` uses, so that the API answering means every run can start)",
    )
    _add_keep_alive(serve)
    add_log_level(serve)
    serve.set_defaults(handler=_serve)

    serve_flows = commands.add_parser(
        "serve-flows",
        help="serve every workflow's deployment in one Prefect runner process",
        description="Serve the discovered workflows' deployments against PREFECT_API_URL.",
    )
    serve_flows.add_argument(
        "--poll",
        type=positive_float,
        default=1.0,  # serving.DEFAULT_QUERY_SECONDS, without importing Prefect here
        metavar="SECONDS",
        help="how often to ask Prefect for new runs besides being woken (default: %(default)s)",
    )
    serve_flows.add_argument(
        "--wake",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start a run as soon as Prefect announces it on its events websocket (default: "
        "on); --no-wake relies on the poll alone",
    )
    serve_flows.add_argument(
        "--limit", type=positive_int, default=None, help="flow runs at once (default: no limit)"
    )
    serve_flows.add_argument(
        "--start",
        choices=START_METHODS,
        default="fork",
        help="how a run starts: its process forked from a warm server (fast), spawned "
        "cold as Prefect does, or an async flow's run on a thread of this process "
        "(fastest; its crash takes the runs along: with --reload they are marked crashed "
        "at once) (default: %(default)s)",
    )
    serve_flows.add_argument(
        "--reload", action="store_true", help="restart when a workflow file changes"
    )
    add_log_level(serve_flows)
    serve_flows.set_defaults(handler=_serve_flows)
