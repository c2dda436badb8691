"""What every command shares: the one-line error, value parsers, logging and discovery."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from runners_orchestrator.discovery import Discovery

PROG = "runners-orchestrator"
LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class CommandError(Exception):
    """A failure the user can fix; printed as one line, exit code 1 (2 when ``usage``)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.exit_code = 2 if usage else 1


def positive_int(text: str) -> int:
    """A count of at least 1 (``--capacity``, ``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A positive number of seconds (``--poll``, ``--runner-timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 meaning "any free one"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:  # noqa: PLR2004 - the TCP port range
        raise argparse.ArgumentTypeError(f"port must be within 0-65535, got {value}")
    return value


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, the same on every long-running command."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")


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


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr; httpx's one line per request only at debug."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def discover_project() -> Discovery:
    """The project's workflows; a duplicate or reserved name is a one-line error."""
    from runners_orchestrator.discovery import discover  # noqa: PLC0415 - imports Prefect

    try:
        return discover()
    except ConfigurationError as exc:
        raise CommandError(str(exc)) from None


def report_broken(discovery: Discovery) -> None:
    """One warning line per problem: a broken workflow file, or a broken helper and its files."""
    for problem in discovery.problems():
        print(f"{PROG}: warning: {problem}", file=sys.stderr)  # noqa: T201
