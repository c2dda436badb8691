"""The ``runners-orchestrator`` command line.

Every command answers ``--help``. A bad flag or value exits 2 with one line that names it;
a runtime failure (a port in use, ...) exits 1 with one line that says what to change.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
