"""``run``: start a workflow through the API or straight through Prefect, and follow it.

The command a CI pipeline uses: with ``--wait`` its exit code says whether every check
passed (0), any did not (1), or the command was wrong (2). ``--suite shop [--tag checkout]
[--region eu-west-1]`` runs a check suite's matching jobs as a run of the suite's own
deployment (see ``monitoring.selection``) instead of jobs given here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from runners_orchestrator.cli._common import PROG, CommandError, discover_project
from runners_orchestrator.exceptions import PrefectUnavailableError, RunNotFoundError
from runners_orchestrator.settings import get_settings

if TYPE_CHECKING:
    import argparse

    from runners_orchestrator.client import Backend, RunState

__all__ = ["add_commands", "checks"]


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


def checks(result: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(job result, runner result)`` pairs of a RunSummary or a JobResult."""
    if not isinstance(result, dict):
        return []
    jobs = result.get("jobs") if "jobs" in result else [result] if "results" in result else []
    return [
        (job, check)
        for job in jobs or []
        if isinstance(job, dict)
        for check in job.get("results", [])
        if isinstance(check, dict)
    ]


def _detail(job: dict[str, Any], check: dict[str, Any]) -> str:
    """The error, then the screenshot URL of a failed browser check."""
    detail = str(check.get("errorMessage") or job.get("error") or "")
    details = check.get("details")
    shot = details.get("screenshot") if isinstance(details, dict) else None
    return f"{detail} {shot}".strip() if isinstance(shot, str) else detail


def _print_results(result: Any) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(show_lines=False)
    columns = ("job", "url", "runner", "status", "server", "region", "ms", "detail", "tries")
    for column in columns:
        table.add_column(column, overflow="fold")
    colours = {"pass": "green", "fail": "red", "error": "yellow"}
    for job, check in checks(result):
        given = job.get("job")
        url = given.get("url", "") if isinstance(given, dict) else ""
        status = str(check.get("status", ""))
        table.add_row(
            str(job.get("jobId", "")),
            str(url),
            str(check.get("name", "")),
            f"[{colours.get(status, 'white')}]{status}[/]",
            str(job.get("server") or ""),
            str(job.get("region") or ""),
            str(check.get("durationMs", "")),
            _detail(job, check),
            _tries(job),
        )
    console = Console() if sys.stdout.isatty() else Console(width=200)  # CI logs: no folding
    console.print(table)
    counts = result.get("summary") if isinstance(result, dict) else None
    if isinstance(counts, dict):
        console.print(
            f"{counts.get('total')} checks: {counts.get('passed')} passed, "
            f"{counts.get('failed')} failed, {counts.get('errored')} errored"
        )


def _tries(job: dict[str, Any]) -> str:
    """``us-0 refused → us-1 ok`` when the job went through more than one server."""
    tries = [t for t in job.get("tries") or [] if isinstance(t, dict)]
    if len({t.get("server") for t in tries}) < 2:  # noqa: PLR2004 - one server: nothing to show
        return ""
    return " → ".join(f"{t.get('server')} {t.get('outcome')}" for t in tries)


def _waiting(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)  # noqa: T201


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


async def _backend(stack: contextlib.AsyncExitStack, api_url: str | None) -> Backend:
    from runners_orchestrator.client import ApiBackend, PrefectBackend  # noqa: PLC0415

    settings = get_settings()
    if api_url:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=api_url, timeout=60))
        token = settings.api_token.get_secret_value() if settings.api_token else None
        return ApiBackend(http, settings.route_prefix, token, on_wait=_waiting)
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
    return PrefectBackend(gateway, discover_project())


async def _start(backend: Backend, args: argparse.Namespace, jobs: list[Any]) -> tuple[str, str]:
    """Start the run the arguments ask for; return the workflow's name and the run id."""
    from runners_orchestrator.client import RunStartError  # noqa: PLC0415
    from runners_orchestrator.discovery import to_snake  # noqa: PLC0415

    if args.suite is not None:
        try:
            name, run_id, count = await backend.start_suite(args.suite, args.tag, args.region)
        except RunStartError as exc:
            raise CommandError(f"suite {args.suite} was not started: {exc}", usage=True) from None
        if args.name is not None and to_snake(args.name) != name:
            _waiting(f"suite {args.suite} runs {name}, not {args.name}")
        if not args.json:
            _waiting(f"suite {args.suite}: {count} jobs, run {run_id} of {name}")
        return name, run_id
    workflows = await backend.workflows()
    name = args.name if args.name in workflows else to_snake(args.name)
    if name not in workflows:
        available = ", ".join(sorted(workflows)) or "none"
        raise CommandError(f"unknown workflow {args.name!r}; available: {available}", usage=True)
    body = _run_body(name, workflows[name], jobs, _read_options(args.option))
    try:
        return name, await backend.start(name, body)
    except RunStartError as exc:
        raise CommandError(f"{name} was not started: {exc}", usage=True) from None


async def _run(args: argparse.Namespace, jobs: list[Any]) -> int:
    async with contextlib.AsyncExitStack() as stack:
        backend = await _backend(stack, args.api_url or get_settings().api_url)
        name, run_id = await _start(backend, args, jobs)
        if not args.wait:
            if args.json:
                started = {"runId": run_id, "orchestrator": name}
                if args.suite is not None:
                    started["suite"] = args.suite
                print(json.dumps(started))  # noqa: T201
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
        _print_results(state.result)
    all_passed = all(check.get("status") == "pass" for _, check in checks(state.result))
    run_ok = (
        not isinstance(state.result, dict) or state.result.get("state", "completed") == "completed"
    )
    return 0 if all_passed and run_ok else 1


def _check_arguments(args: argparse.Namespace) -> None:
    """NAME with --jobs or --job, or --suite (with --tag and --region): nothing else."""
    if args.suite is not None:
        extra = [
            flag
            for flag, given in (
                ("--jobs", args.jobs),
                ("--job", args.job),
                ("--option", args.option),
            )
            if given
        ]
        if extra:
            raise CommandError(
                f"--suite takes its jobs and options from the suite file; drop {', '.join(extra)}",
                usage=True,
            )
        return
    if args.tag or args.region:
        raise CommandError("--tag and --region select jobs of a --suite; add --suite", usage=True)
    if args.name is None or (args.jobs is None and args.job is None):
        raise CommandError("give NAME with --jobs FILE or --job JSON, or --suite NAME", usage=True)


def _command(args: argparse.Namespace) -> int:
    from runners_orchestrator.client import RunStartError  # noqa: PLC0415

    _check_arguments(args)
    jobs = _read_jobs(args) if args.suite is None else []
    try:
        return asyncio.run(_run(args, jobs))
    except (PrefectUnavailableError, RunStartError, RunNotFoundError) as exc:
        raise CommandError(str(exc)) from None


def add_commands(commands: Any) -> None:
    """Register ``run`` on the top-level parser's subcommands."""
    run = commands.add_parser(
        "run",
        help="start a workflow run (through the API, or straight through Prefect)",
        description="Start NAME with jobs, or a check suite's jobs (--suite, narrowed by --tag "
        "and --region); with --wait, follow it and exit 0 only when every check passed (1 "
        "when any failed or errored, 2 for a usage error).",
    )
    run.add_argument(
        "name", metavar="NAME", nargs="?", help="workflow name (snake_case or camelCase)"
    )
    run.add_argument(
        "--suite", metavar="SUITE", help="run this check suite (checks/SUITE.toml) instead of jobs"
    )
    run.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="with --suite: only the jobs that have this tag; repeatable (every tag must match)",
    )
    run.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="with --suite: only the jobs in this region; repeatable (any region matches)",
    )
    source = run.add_mutually_exclusive_group()
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
    run.set_defaults(handler=_command)
