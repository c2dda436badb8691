"""The ``runners-orchestrator`` command line.

Every command answers ``--help``. A bad flag or value exits 2 with one line that names it;
a runtime failure (a port in use, ...) exits 1 with one line that says what to change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import httpx

from runners_orchestrator.exceptions import (
    ConfigurationError,
    PrefectUnavailableError,
    RunNotFoundError,
)
from runners_orchestrator.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from runners_orchestrator.client import Backend, RunState
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
    for problem in discovery.problems():
        print(f"{PROG}: warning: {problem}", file=sys.stderr)  # noqa: T201


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
        command = reload_command(sys.argv[1:])
        return asyncio.run(serve_with_reload(command, discovery.root, get_settings().pattern))
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


def _cmd_dev(args: argparse.Namespace) -> int:
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
    for host, port, flag in checks:
        ensure_port_free(host, port, flag)
    discovery = _discover()  # a duplicate or reserved name stops us here, with its message
    _report_broken(discovery)
    stack = DevStack(
        workflows=len(discovery.workflows),
        settings=settings,
        project_root=find_project_root(),
        host=args.host,
        port=args.port,
        prefect_port=args.prefect_port,
        runner_port=args.runner_port,
        log_level=args.log_level,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    try:
        return stack.run()
    except StackError as exc:
        raise CommandError(str(exc)) from None


def _read_jobs(args: argparse.Namespace) -> list[Any]:
    if args.job is not None:
        try:
            job = json.loads(args.job)
        except ValueError as exc:
            raise CommandError(f"--job is not valid JSON: {exc}", usage=True) from None
        return [job]
    path = Path(args.jobs)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"cannot read jobs file {path}: {exc.strerror}", usage=True) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"jobs file {path} is not valid JSON: {exc}", usage=True) from None
    jobs = data.get("jobs") if isinstance(data, dict) else data
    if not isinstance(jobs, list) or not jobs:
        raise CommandError(
            f'jobs file {path} must hold a non-empty JSON list of jobs, or {{"jobs": [...]}}',
            usage=True,
        )
    return jobs


def _read_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--option {pair!r}: expected key=value", usage=True)
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def _run_body(
    name: str, schema: dict[str, Any], jobs: list[Any], options: dict[str, Any]
) -> dict[str, Any]:
    properties = schema.get("properties", {})
    if "jobs" in properties:
        body: dict[str, Any] = {"jobs": jobs}
    elif "job" in properties:
        if len(jobs) != 1:
            raise CommandError(f"{name} takes one job: pass --job, or a file of one", usage=True)
        body = {"job": jobs[0]}
    else:
        raise CommandError(f"{name} takes no jobs; its parameters: {list(properties)}", usage=True)
    if options:
        if "options" not in properties:
            raise CommandError(f"{name} takes no options", usage=True)
        body["options"] = options
    return body


def _checks(result: Any) -> list[dict[str, Any]]:
    """The runner results in a RunSummary or a JobResult, with their job."""
    if not isinstance(result, dict):
        return []
    jobs = result.get("jobs") if "jobs" in result else [result] if "results" in result else []
    return [
        {**check, "_job": job}
        for job in jobs or []
        if isinstance(job, dict)
        for check in job.get("results", [])
        if isinstance(check, dict)
    ]


def _print_results(result: Any, jobs: list[Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(show_lines=False)
    for column in ("job", "url", "runner", "status", "server", "region", "ms", "detail"):
        table.add_column(column, overflow="fold")
    urls = {
        f"job-{i}": job.get("url", "") for i, job in enumerate(jobs, 1) if isinstance(job, dict)
    }
    colours = {"pass": "green", "fail": "red", "error": "yellow"}
    for check in _checks(result):
        job = check["_job"]
        status = str(check.get("status", ""))
        table.add_row(
            str(job.get("jobId", "")),
            str(urls.get(job.get("jobId", ""), "")),
            str(check.get("name", "")),
            f"[{colours.get(status, 'white')}]{status}[/]",
            str(job.get("server") or ""),
            str(job.get("region") or ""),
            str(check.get("durationMs", "")),
            str(check.get("errorMessage") or job.get("error") or ""),
        )
    console = Console() if sys.stdout.isatty() else Console(width=200)  # CI logs: no folding
    console.print(table)
    counts = result.get("summary") if isinstance(result, dict) else None
    if isinstance(counts, dict):
        console.print(
            f"{counts.get('total')} checks: {counts.get('passed')} passed, "
            f"{counts.get('failed')} failed, {counts.get('errored')} errored"
        )


async def _follow(backend: Backend, name: str, run_id: str, *, quiet: bool) -> RunState:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: PLC0415

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"{name} {run_id[:8]}: pending", total=None)
        while True:
            state = await backend.state(name, run_id)
            if state.finished:
                return state
            bar.update(
                task,
                description=f"{name} {run_id[:8]}: {state.status}",
                completed=state.done or 0,
                total=state.total,
            )
            await asyncio.sleep(0.5)


async def _run(args: argparse.Namespace, jobs: list[Any], options: dict[str, Any]) -> int:
    from runners_orchestrator.client import (  # noqa: PLC0415
        ApiBackend,
        PrefectBackend,
        RunStartError,
    )
    from runners_orchestrator.discovery import to_snake  # noqa: PLC0415

    settings = get_settings()
    api_url = args.api_url or settings.api_url
    async with contextlib.AsyncExitStack() as stack:
        backend: Backend
        if api_url:
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=api_url, timeout=60))
            token = settings.api_token.get_secret_value() if settings.api_token else None
            backend = ApiBackend(http, settings.route_prefix, token)
        else:
            from prefect.client.orchestration import PrefectClient  # noqa: PLC0415
            from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

            from runners_orchestrator.api._gateway import PrefectGateway  # noqa: PLC0415

            prefect_url = PREFECT_API_URL.value()
            if not prefect_url:
                raise CommandError(
                    "set ORCHESTRATOR_API_URL (or --api-url) to run through the API, "
                    "or PREFECT_API_URL to run straight through Prefect",
                    usage=True,
                )
            prefect = await stack.enter_async_context(PrefectClient(prefect_url))
            gateway = PrefectGateway(prefect)
            stack.push_async_callback(gateway.aclose)
            backend = PrefectBackend(gateway, _discover())
        workflows = await backend.workflows()
        name = args.name if args.name in workflows else to_snake(args.name)
        if name not in workflows:
            available = ", ".join(sorted(workflows)) or "none"
            raise CommandError(
                f"unknown workflow {args.name!r}; available: {available}", usage=True
            )
        body = _run_body(name, workflows[name], jobs, options)
        try:
            run_id = await backend.start(name, body)
        except RunStartError as exc:
            raise CommandError(f"{name} was not started: {exc}", usage=True) from None
        if not args.wait:
            if args.json:
                print(json.dumps({"runId": run_id, "orchestrator": name}))  # noqa: T201
            else:
                print(f"started {name}: runId {run_id}")  # noqa: T201
            return 0
        state = await _follow(backend, name, run_id, quiet=args.json)
    if state.status != "completed":
        reason = f"{PROG}: run {run_id} {state.status}: {state.error or ''}".rstrip(": ")
        print(reason, file=sys.stderr)  # noqa: T201
        return 1
    if args.json:
        print(json.dumps(state.result, indent=2))  # noqa: T201
    else:
        _print_results(state.result, jobs)
    checks = _checks(state.result)
    all_passed = all(c.get("status") == "pass" for c in checks)
    run_ok = (
        not isinstance(state.result, dict) or state.result.get("state", "completed") == "completed"
    )
    return 0 if all_passed and run_ok else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from runners_orchestrator.client import RunStartError  # noqa: PLC0415

    jobs = _read_jobs(args)
    options = _read_options(args.option)
    try:
        return asyncio.run(_run(args, jobs, options))
    except (PrefectUnavailableError, RunStartError, RunNotFoundError) as exc:
        raise CommandError(str(exc)) from None


def _add_run_command(commands: Any) -> None:
    """``run``: the command a CI pipeline uses."""
    run = commands.add_parser(
        "run",
        help="start a workflow run (through the API, or straight through Prefect)",
        description="Start NAME with jobs; with --wait, follow it and exit 0 only when every "
        "check passed (1 when any failed or errored, 2 for a usage error).",
    )
    run.add_argument("name", metavar="NAME", help="workflow name (snake_case or camelCase)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--jobs", metavar="FILE", help="JSON file: a list of jobs, or {jobs: [...]}"
    )
    source.add_argument("--job", metavar="JSON", help="one job as JSON")
    run.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the run (maxConcurrency=5, region=eu-west-1); repeatable",
    )
    run.add_argument("--wait", action="store_true", help="follow the run and print its results")
    run.add_argument("--json", action="store_true", help="print JSON (the RunSummary) for scripts")
    run.add_argument(
        "--api-url", default=None, help="the orchestrator API (default: ORCHESTRATOR_API_URL)"
    )
    run.set_defaults(handler=_cmd_run)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Orchestrate runner checks as Prefect flows, served over HTTP.",
    )
    from runners_orchestrator import __version__  # noqa: PLC0415

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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

    dev = commands.add_parser(
        "dev",
        help="run everything on this machine: Prefect, runner servers, flows, API",
        description="The embedded default: a Prefect server on SQLite (or PREFECT_API_URL), "
        "two runner servers, the workflows served with reload, and the API.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="API address (default: %(default)s)")
    dev.add_argument("--port", type=_port, default=8000, help="API port (default: %(default)s)")
    dev.add_argument(
        "--prefect-port", type=_port, default=4200, help="Prefect port (default: %(default)s)"
    )
    dev.add_argument(
        "--runner-port",
        type=_port,
        default=3001,
        help="first runner server's port; the second uses the next (default: %(default)s)",
    )
    dev.add_argument(
        "--state-dir",
        default=None,
        help="where the embedded Prefect server keeps its database (default: .state/ "
        "in the project root)",
    )
    dev.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")
    dev.set_defaults(handler=_cmd_dev)

    serve = commands.add_parser(
        "serve",
        help="serve the orchestrator HTTP API against PREFECT_API_URL",
        description="Serve every workflow as an HTTP endpoint, proxied to the Prefect API.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity")
    serve.set_defaults(handler=_cmd_serve)

    _add_run_command(commands)

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
