"""The ``runners-orchestrator`` command line: one module per command group.

Every command answers ``--help``. A bad flag or value exits 2 with one line that names it;
a runtime failure (a port in use, ...) exits 1 with one line that says what to change.

Why argparse and not typer (which Prefect brings): typer's import costs about 0.1 s on
every invocation, and click prints a usage error as a multi-line box where this command
line promises one line; see ``docs/cli.md`` for the measurement.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from runners_orchestrator.cli import history, project, run, servers
from runners_orchestrator.cli._common import PROG, CommandError, Parser
from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

__all__ = ["main"]


def build_parser() -> Parser:
    """The top-level parser with every command group's subcommands."""
    from runners_orchestrator import __version__  # noqa: PLC0415

    parser = Parser(
        prog=PROG, description="Orchestrate runner checks as Prefect flows, served over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    servers.add_commands(commands)
    run.add_commands(commands)
    project.add_commands(commands)
    history.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
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
