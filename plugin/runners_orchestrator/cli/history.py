"""``history``: each check's uptime and durations, or one check's recent results.

Reads through the API (``ORCHESTRATOR_API_URL`` or ``--api-url``) or, without one, the
history store itself: ``monitoring_database_url``, else the ``dev`` stack's database under
``.state/prefect`` when it is there, else Prefect's own database.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING, Any

import httpx

from runners_orchestrator.cli._common import CommandError, positive_int
from runners_orchestrator.settings import find_project_root, get_settings

if TYPE_CHECKING:
    import argparse

__all__ = ["add_commands", "local_database_url"]

FILTERS = ("suite", "tag", "region", "url", "runner", "status")


def local_database_url() -> str | None:
    """The history database when there is no API to ask (``None``: Prefect's default)."""
    settings = get_settings()
    if settings.monitoring_database_url is not None:
        return settings.monitoring_database_url.get_secret_value()
    prefect_chosen = any(
        key in os.environ
        for key in (
            "PREFECT_HOME",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
        )
    )
    dev_database = find_project_root() / ".state" / "prefect" / "prefect.db"
    if not prefect_chosen and dev_database.is_file():
        return f"sqlite+aiosqlite:///{dev_database}"
    return None


class _Source:
    """Where history is read from: the API or the store; both answer the same JSON."""

    async def checks(self, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def check(self, key: str, window: str) -> dict[str, Any] | None:
        raise NotImplementedError

    async def results(self, key: str, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class _ApiSource(_Source):
    def __init__(self, http: httpx.AsyncClient, prefix: str) -> None:
        self.http = http
        self.base = f"{prefix.rstrip('/')}/checks"

    async def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any] | None:
        try:
            response = await self.http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise CommandError(
                f"the orchestrator API at {self.http.base_url} does not answer: {exc}"
            ) from None
        if response.status_code == httpx.codes.NOT_FOUND:
            return None
        if response.status_code >= httpx.codes.BAD_REQUEST:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text[:300]
            usage = response.status_code == httpx.codes.BAD_REQUEST
            raise CommandError(f"the API answered {response.status_code}: {message}", usage=usage)
        body: dict[str, Any] = response.json()
        return body

    async def checks(self, params: dict[str, Any]) -> dict[str, Any]:
        body = await self._get(self.base, params)
        if body is None:
            raise CommandError(
                f"the API at {self.http.base_url} has no {self.base}: is it this version?"
            )
        return body

    async def check(self, key: str, window: str) -> dict[str, Any] | None:
        return await self._get(f"{self.base}/{key}", {"window": window})

    async def results(self, key: str, params: dict[str, Any]) -> dict[str, Any]:
        return await self._get(f"{self.base}/{key}/results", params) or {"results": []}


class _StoreSource(_Source):
    def __init__(self, store: Any) -> None:
        self.store = store

    async def checks(self, params: dict[str, Any]) -> dict[str, Any]:
        from runners_orchestrator.monitoring.history import (  # noqa: PLC0415
            CheckFilter,
            list_checks,
            parse_duration,
        )

        window = parse_duration("--since", params["window"])
        check_filter = CheckFilter(**{k: params.get(k) for k in FILTERS})
        limit, offset = params["limit"], 0
        checks, total = await list_checks(
            self.store, check_filter, window=window, limit=limit, offset=offset
        )
        return {"checks": checks, "total": total, "limit": limit, "offset": offset}

    async def check(self, key: str, window: str) -> dict[str, Any] | None:
        from runners_orchestrator.monitoring.history import (  # noqa: PLC0415
            check_view,
            parse_duration,
        )

        return await check_view(self.store, key, window=parse_duration("--since", window))

    async def results(self, key: str, params: dict[str, Any]) -> dict[str, Any]:
        from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

        from runners_orchestrator.monitoring.history import (  # noqa: PLC0415
            parse_time,
            results_page,
        )
        from runners_orchestrator.monitoring.recording import ui_base_url  # noqa: PLC0415

        api_url = PREFECT_API_URL.value()
        page, cursor = await results_page(
            self.store,
            key,
            since=parse_time("--since", params["since"]),
            limit=params["limit"],
            ui_base=ui_base_url(api_url) if api_url else None,
        )
        return {"key": key, "results": page, "nextCursor": cursor}


def _cell(value: Any, empty: str = "-") -> str:
    return empty if value is None else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _print_checks(body: dict[str, Any], since: str) -> None:
    checks = body["checks"]
    if not checks:
        print(f"no checks recorded (filters: {since} window)")  # noqa: T201
        return
    rows = [["STATUS", f"UPTIME {since}", "P50", "P95", "RUNS", "REGION", "RUNNER", "URL", "KEY"]]
    for check in checks:
        uptime = check.get("uptime")
        rows.append(
            [
                check["lastStatus"] + (" ALERTING" if check.get("alerting") else ""),
                "-" if uptime is None else f"{uptime:.1f}%",
                _cell(check.get("p50Ms") and f"{check['p50Ms']}ms"),
                _cell(check.get("p95Ms") and f"{check['p95Ms']}ms"),
                str(check["runs"]),
                _cell(check.get("region"), "any"),
                check["runner"],
                check["url"],
                check["key"],
            ]
        )
    print(_table(rows))  # noqa: T201
    if body["total"] > len(checks):
        print(f"({len(checks)} of {body['total']} checks; narrow with filters or --limit)")  # noqa: T201


def _print_check(check: dict[str, Any], results: list[dict[str, Any]]) -> None:
    region = check.get("region") or "any region"
    print(f"{check['url']}  {check['runner']}  {region}  (key {check['key']})")  # noqa: T201
    uptime = check.get("uptime")
    shown = "-" if uptime is None else f"{uptime:.1f}%"
    print(  # noqa: T201
        f"last {check['lastStatus']} at {check['lastAt']}; uptime {shown} over "
        f"{check['runs']} results; p50 {_cell(check.get('p50Ms'))} ms, "
        f"p95 {_cell(check.get('p95Ms'))} ms"
    )
    if check.get("alerting"):
        print(f"ALERTING since {check.get('failingSince')}")  # noqa: T201
    if not results:
        return
    rows = [["AT", "STATUS", "DURATION", "SERVER", "ERROR"]]
    rows.extend(
        [
            result["at"],
            result["status"],
            _cell(result.get("durationMs") and f"{result['durationMs']}ms"),
            _cell(result.get("server")),
            _cell(result.get("error"), "")[:80],
        ]
        for result in results
    )
    print(_table(rows))  # noqa: T201


async def _history(args: argparse.Namespace, source: _Source) -> int:
    params: dict[str, Any] = {k: getattr(args, k) for k in FILTERS if getattr(args, k)}
    params |= {"window": args.since, "limit": args.limit}
    key = args.key
    if key is None:
        listing = await source.checks(params)
        narrowed = any(getattr(args, k) for k in FILTERS)
        if not (narrowed and listing["total"] == 1):
            if args.json:
                print(json.dumps(listing, indent=2))  # noqa: T201
            else:
                _print_checks(listing, args.since)
            return 0
        key = listing["checks"][0]["key"]
    check = await source.check(key, args.since)
    if check is None:
        raise CommandError(f"no check {key}; `runners-orchestrator history` lists them")
    page = await source.results(key, {"since": args.since, "limit": args.limit})
    if args.json:
        print(json.dumps({"check": check, "results": page["results"]}, indent=2))  # noqa: T201
    else:
        _print_check(check, page["results"])
    return 0


async def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    api_url = args.api_url or settings.api_url
    if api_url:
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
            return await _history(args, _ApiSource(http, settings.route_prefix))
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from runners_orchestrator.monitoring.history import HistoryQueryError  # noqa: PLC0415
    from runners_orchestrator.monitoring.store import HistoryStore  # noqa: PLC0415

    try:
        async with HistoryStore(local_database_url()) as store:
            return await _history(args, _StoreSource(store))
    except HistoryQueryError as exc:
        raise CommandError(str(exc), usage=True) from None
    except (SQLAlchemyError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CommandError(
            f"cannot read history from the database ({reason}); set ORCHESTRATOR_API_URL to "
            "read it through the API"
        ) from None


def _command(args: argparse.Namespace) -> int:
    from runners_orchestrator.monitoring.history import (  # noqa: PLC0415
        HistoryQueryError,
        parse_duration,
    )

    try:
        parse_duration("--since", args.since)
    except HistoryQueryError as exc:
        raise CommandError(str(exc), usage=True) from None
    return asyncio.run(_run(args))


def add_commands(commands: Any) -> None:
    """Register ``history`` on the top-level parser's subcommands."""
    history = commands.add_parser(
        "history",
        help="each check's uptime and durations, or one check's results",
        description="A table of checks (URL x runner x region) with their last status, uptime "
        "and p50/p95 over --since; with a check KEY, or filters that narrow to one check, its "
        "summary and recent results.",
    )
    history.add_argument("key", metavar="KEY", nargs="?", help="one check's key (see the table)")
    history.add_argument("--suite", help="only this suite's checks")
    history.add_argument("--tag", help="only checks with this tag")
    history.add_argument("--region", help="only this region")
    history.add_argument("--url", help="only this URL")
    history.add_argument("--runner", help="only this runner")
    history.add_argument("--status", choices=("pass", "fail", "error"), help="last status")
    history.add_argument(
        "--since", default="24h", metavar="DURATION", help="window: 30m, 24h, 7d (default 24h)"
    )
    history.add_argument(
        "--limit", type=positive_int, default=50, help="checks or results shown (default 50)"
    )
    history.add_argument("--json", action="store_true", help="print JSON for scripts")
    history.add_argument(
        "--api-url", default=None, help="the orchestrator API (default: ORCHESTRATOR_API_URL)"
    )
    history.set_defaults(handler=_command)
