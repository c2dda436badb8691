"""The ``runners-orchestrator`` command line.

Every command answers ``--help``. A bad flag or value exits 2 with one line that names it;
a runtime failure (a port in use, ...) exits 1 with one line that says what to change.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from runners_orchestrator.discovery import Discovery

__all__ = ["main"]

PROG = "runners-orchestrator"
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class CommandError(Exception):
    """A failure the user can fix; printed as one line, exit code 1 (2 when ``usage``)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.exit_code = 2 if usage else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:  # noqa: PLR2004 - the TCP port range
        raise argparse.ArgumentTypeError(f"port must be within 0-65535, got {value}")
    return value


def ensure_port_free(host: str, port: int, flag: str) -> None:
    """Fail with one line naming the port and the flag when something already listens there."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is already in use; choose another with {flag}"
                ) from None
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # One line per page fetched would drown everything else.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _cmd_runner_server(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 - only this command needs the server

    from runners_orchestrator.runner_server import (  # noqa: PLC0415
        RunnerServerConfig,
        create_runner_app,
    )

    try:
        config = RunnerServerConfig(
            region=args.region,
            capacity=args.capacity,
            runner_timeout=args.runner_timeout,
            deny=args.deny,
            allow=args.allow,
        )
    except ConfigurationError as exc:
        raise CommandError(str(exc), usage=True) from None
    ensure_port_free(args.host, args.port, "--port")
    _configure_logging(args.log_level)
    logging.getLogger(__name__).info(
        "runner server (region %s, capacity %d) on http://%s:%d/api/runner",
        args.region or "-",
        args.capacity,
        args.host,
        args.port,
    )
    uvicorn.run(
        create_runner_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    return 0


def _discover() -> Discovery:
    from runners_orchestrator.discovery import discover  # noqa: PLC0415 - imports Prefect

    try:
        return discover()
    except ConfigurationError as exc:
        raise CommandError(str(exc)) from None


def _report_broken(discovery: Discovery) -> None:
    for broken in discovery.broken:
        relative = broken.path.relative_to(discovery.root)
        print(f"{PROG}: warning: skipped {relative}: {broken.error}", file=sys.stderr)  # noqa: T201


def _cmd_list(args: argparse.Namespace) -> int:
    discovery = _discover()
    _report_broken(discovery)
    workflows = [discovery.workflows[name] for name in discovery.names()]
    if args.json:
        payload = [
            {
                "name": w.name,
                "camelName": w.camel_name,
                "description": w.description,
                "entrypoint": w.entrypoint,
                "parameters": w.parameters,
            }
            for w in workflows
        ]
        print(json.dumps(payload, indent=2))  # noqa: T201
        return 0
    if not workflows:
        print(f"no workflows found under {discovery.root} (patterns: see ORCHESTRATOR_PATTERN)")  # noqa: T201
    for workflow in workflows:
        properties = workflow.parameters.get("properties", {})
        required = set(workflow.parameters.get("required", []))
        params = ", ".join(f"{p}{'' if p in required else '?'}" for p in properties)
        summary = workflow.description.split("\n", 1)[0]
        print(f"{workflow.name}({params})  [{workflow.entrypoint}]")  # noqa: T201
        if summary:
            print(f"    {summary}")  # noqa: T201
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from runners_orchestrator.deployments import (  # noqa: PLC0415
        plan_deployments,
        write_deployments,
    )

    discovery = _discover()
    _report_broken(discovery)
    plan = plan_deployments(discovery)
    if args.check:
        stale = plan.stale()
        for line in stale:
            print(f"stale: {line}", file=sys.stderr)  # noqa: T201
        if stale:
            print(f"{PROG}: deployments are stale; run `{PROG} deploy`", file=sys.stderr)  # noqa: T201
            return 1
        print(f"deployments are up to date ({len(plan.modules)} workflows)")  # noqa: T201
        return 0
    changed = write_deployments(plan)
    for line in changed:
        print(f"updated: {line}")  # noqa: T201
    print(  # noqa: T201
        f"{len(plan.modules)} deployments in deployments/ and prefect.yaml"
        f"{'' if changed else ' (already up to date)'}; `prefect deploy --all` deploys them"
    )
    return 0


def _cmd_serve_flows(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from runners_orchestrator.serving import (  # noqa: PLC0415
        reload_command,
        serve_flows,
        serve_with_reload,
    )

    _configure_logging(args.log_level)
    if args.reload:
        discovery = _discover()
        folders = {discovery.root / p.split("*", 1)[0] for p in get_settings().pattern}
        return asyncio.run(serve_with_reload(reload_command(sys.argv[1:]), sorted(folders)))
    discovery = _discover()
    _report_broken(discovery)
    if not discovery.workflows:
        raise CommandError(f"no workflows to serve under {discovery.root}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_flows(
                discovery,
                query_seconds=args.poll,
                limit=args.limit,
                forkserver=args.start == "fork",
            )
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415

    from runners_orchestrator.api import create_app  # noqa: PLC0415

    ensure_port_free(args.host, args.port, "--port")
    _configure_logging(args.log_level)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    return 0


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Orchestrate runner checks as Prefect flows, served over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    runner = commands.add_parser(
        "runner-server",
        help="serve the built-in runners over the runners HTTP contract",
        description="Serve /api/runner/execute, /info and /health with the built-in runners.",
    )
    runner.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    runner.add_argument("--port", type=_port, default=3001, help="port (default: %(default)s)")
    runner.add_argument("--region", default="local", help="region reported (default: %(default)s)")
    runner.add_argument(
        "--capacity",
        type=_positive_int,
        default=32,
        help="execute requests served at once; more get 429 (default: %(default)s)",
    )
    runner.add_argument(
        "--runner-timeout",
        type=_positive_float,
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
    runner.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")
    runner.set_defaults(handler=_cmd_runner_server)

    serve = commands.add_parser(
        "serve",
        help="serve the orchestrator HTTP API against PREFECT_API_URL",
        description="Serve every workflow as an HTTP endpoint, proxied to the Prefect API.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")
    serve.set_defaults(handler=_cmd_serve)

    listing = commands.add_parser(
        "list",
        help="list the discovered workflows with their parameters",
        description="List the workflows discovered in the project's workflow files.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    listing.set_defaults(handler=_cmd_list)

    deploy = commands.add_parser(
        "deploy",
        help="write deployments/ and the deployments of prefect.yaml",
        description="Generate one deployment per workflow so `prefect deploy --all` works.",
    )
    deploy.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the files are stale"
    )
    deploy.set_defaults(handler=_cmd_deploy)

    serve_flows = commands.add_parser(
        "serve-flows",
        help="serve every workflow's deployment in one Prefect runner process",
        description="Serve the discovered workflows' deployments against PREFECT_API_URL.",
    )
    serve_flows.add_argument(
        "--poll",
        type=_positive_float,
        default=0.2,
        metavar="SECONDS",
        help="how often to ask Prefect for new runs (default: %(default)s)",
    )
    serve_flows.add_argument(
        "--limit", type=_positive_int, default=None, help="flow runs at once (default: no limit)"
    )
    serve_flows.add_argument(
        "--start",
        choices=("fork", "spawn"),
        default="fork",
        help="how a run's process starts: forked from a warm server (fast) or spawned "
        "cold as Prefect does (default: %(default)s)",
    )
    serve_flows.add_argument(
        "--reload", action="store_true", help="restart when a workflow file changes"
    )
    serve_flows.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity"
    )
    serve_flows.set_defaults(handler=_cmd_serve_flows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigurationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
