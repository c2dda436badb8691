"""History per check: recorded once per run, served by the API with filters and paging.

Real parts: the Prefect test server (whose SQLite database holds the history tables), a
runner server, the page server, the API app on a real socket, and the command line in a
process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from monitoring_helpers import TogglePage, run_suite, write_suite
from prefect.client.orchestration import get_client

from helpers import CLI, PAGES, serve_app
from runners_orchestrator.api import OrchestratorConfig, create_app
from runners_orchestrator.monitoring import check_key, load_suites
from runners_orchestrator.monitoring.history import check_view
from runners_orchestrator.monitoring.recording import Recorder, SuiteRules
from runners_orchestrator.monitoring.store import HistoryStore, default_database_url
from runners_orchestrator.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.timeout(300)

_DAY = timedelta(days=1)

BANNER = "cookieBannerVisibleTest"
TITLE = "exampleTitleVisibleTest"
PREFIX = "/api/orchestrator"


def suite_text(url: str) -> str:
    return f"""
tags = ["web"]

[[jobs]]
url = "{url}"
runners = ["{BANNER}", "{TITLE}"]
regions = ["us-east-1"]
tags = ["checkout"]
"""


async def test_two_recorders_record_a_run_once(orchestrate, use_runner, toggle_page, tmp_path):
    write_suite(tmp_path, "twice", suite_text(toggle_page.url))
    jobs = load_suites(tmp_path)["twice"].parameters()["jobs"]
    run_id = await run_suite(orchestrate, "twice", jobs)
    keys = [check_key(toggle_page.url, runner, "us-east-1") for runner in (BANNER, TITLE)]
    async with HistoryStore() as one, HistoryStore() as two, get_client() as client:
        flow_run = await client.read_flow_run(run_id)
        rules = SuiteRules(tmp_path, default_alert_after=2)
        recorders = [Recorder(store, client, rules) for store in (one, two)]
        outcomes = await asyncio.gather(*(r.record(flow_run) for r in recorders))
        assert sorted(outcomes) == [0, 1]
        # The pollers see the run again later: still recorded once.
        await asyncio.gather(*(r.poll() for r in recorders))
        for key in keys:
            view = await check_view(one, key, window=_DAY)
            assert view is not None
            assert view["runs"] == 1
            assert view["suite"] == "twice"
            assert view["tags"] == ["checkout", "web"]
            assert view["lastRunId"] == run_id


@pytest.fixture(scope="module")
async def history_api(
    orchestrate, runner_url, pages, tmp_path_factory
) -> AsyncIterator[dict[str, Any]]:
    """An API with a suite's history: three runs of two checks, the banner failing once.

    One for the module: the tests that use it only read it (three orchestration runs and
    their recording cost about 3.5 CPU-seconds, paid once instead of for each of 14 tests).
    """
    root = tmp_path_factory.mktemp("history-api")
    suite = f"api-{uuid.uuid4().hex[:8]}"  # the test server's database outlives the module
    page = TogglePage(pages)
    registry = {
        "servers": [{"id": "us-1", "url": f"{runner_url}/api/runner", "region": "us-east-1"}]
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ORCHESTRATOR_REGISTRY", json.dumps(registry))
            write_suite(root, suite, suite_text(page.url))
            jobs = load_suites(root)[suite].parameters()["jobs"]
            settings = load_settings(root, registry=registry, monitoring_poll_seconds=0.2)
            app = create_app(OrchestratorConfig(settings=settings, project_root=root))
            runs = []
            with serve_app(app) as base:
                for up in (True, False, True):
                    page.up() if up else page.down()
                    runs.append(await run_suite(orchestrate, suite, jobs))
                banner = check_key(page.url, BANNER, "us-east-1")
                async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                    deadline = time.monotonic() + 60
                    while True:
                        response = await http.get(f"{PREFIX}/checks/{banner}")
                        if response.status_code == 200 and response.json()["runs"] == 3:
                            break
                        assert time.monotonic() < deadline, response.text
                        await asyncio.sleep(0.2)
                    yield {
                        "http": http,
                        "base": base,
                        "banner": banner,
                        "title": check_key(page.url, TITLE, "us-east-1"),
                        "runs": runs,
                        "url": page.url,
                        "suite": suite,
                    }
    finally:
        PAGES.pop(page.path, None)


async def test_checks_listing_filters_and_pages(history_api):
    http, banner, title = history_api["http"], history_api["banner"], history_api["title"]
    listing = (await http.get(f"{PREFIX}/checks", params={"suite": history_api["suite"]})).json()
    assert listing["total"] == 2
    assert {c["key"] for c in listing["checks"]} == {banner, title}
    by_key = {c["key"]: c for c in listing["checks"]}
    assert by_key[banner]["runs"] == 3
    assert by_key[banner]["passed"] == 2
    assert by_key[banner]["uptime"] == pytest.approx(66.667)
    assert by_key[banner]["lastStatus"] == "pass"
    assert by_key[banner]["lastFailure"]["runId"] == history_api["runs"][1]
    assert by_key[banner]["p50Ms"] is not None
    assert by_key[banner]["p95Ms"] >= by_key[banner]["p50Ms"]
    assert by_key[title]["uptime"] == 100.0
    assert by_key[title]["lastFailure"] is None
    assert not by_key[banner]["alerting"]  # ad-hoc threshold 2 never reached

    page1 = (
        await http.get(f"{PREFIX}/checks", params={"suite": history_api["suite"], "limit": 1})
    ).json()
    page2 = (
        await http.get(
            f"{PREFIX}/checks", params={"suite": history_api["suite"], "limit": 1, "offset": 1}
        )
    ).json()
    assert page1["total"] == page2["total"] == 2
    assert {page1["checks"][0]["key"], page2["checks"][0]["key"]} == {banner, title}

    async def keys(**params: Any) -> list[str]:
        response = await http.get(
            f"{PREFIX}/checks", params={"suite": history_api["suite"], **params}
        )
        assert response.status_code == 200, response.text
        return [c["key"] for c in response.json()["checks"]]

    assert await keys(runner=BANNER) == [banner]
    assert (
        await keys(tag="checkout")
        == await keys(tag="web")
        == sorted([banner, title], key=lambda k: [BANNER, TITLE][[banner, title].index(k)])
    )
    assert await keys(tag="nope") == []
    assert await keys(region="eu-west-1") == []
    assert sorted(await keys(region="us-east-1", url=history_api["url"])) == sorted([banner, title])
    assert sorted(await keys(status="pass")) == sorted([banner, title])
    assert await keys(status="fail") == []


async def test_results_of_a_check_page_by_cursor_and_filter(history_api):
    http, banner = history_api["http"], history_api["banner"]
    results = (await http.get(f"{PREFIX}/checks/{banner}/results", params={"limit": 2})).json()
    assert [r["status"] for r in results["results"]] == ["pass", "fail"]
    assert results["results"][0]["runId"] == history_api["runs"][2]
    assert results["results"][0]["runUrl"].endswith(f"/runs/flow-run/{history_api['runs'][2]}")
    assert results["results"][0]["server"] == "us-1"
    assert results["nextCursor"]
    rest = (
        await http.get(
            f"{PREFIX}/checks/{banner}/results",
            params={"limit": 2, "cursor": results["nextCursor"]},
        )
    ).json()
    assert [r["runId"] for r in rest["results"]] == [history_api["runs"][0]]
    assert rest["nextCursor"] is None
    failed = (await http.get(f"{PREFIX}/checks/{banner}/results", params={"status": "fail"})).json()
    assert [r["runId"] for r in failed["results"]] == [history_api["runs"][1]]
    assert failed["results"][0]["error"]
    recent = (await http.get(f"{PREFIX}/checks/{banner}/results", params={"since": "1h"})).json()
    assert len(recent["results"]) == 3
    oldest_at = rest["results"][0]["at"]
    until = (
        await http.get(f"{PREFIX}/checks/{banner}/results", params={"until": oldest_at})
    ).json()
    assert until["results"] == []
    since = (
        await http.get(f"{PREFIX}/checks/{banner}/results", params={"since": oldest_at})
    ).json()
    assert len(since["results"]) == 3

    view = (await http.get(f"{PREFIX}/checks/{banner}")).json()
    assert view["key"] == banner
    assert view["alerts"] == []  # not a suite's alert: the threshold was never reached


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/checks", {"status": "broken"}, None),
        ("/checks", {"window": "yesterday"}, None),
        ("/checks", {"limit": "0"}, None),
        ("/checks", {"offset": "-1"}, None),
        ("/checks/{banner}", {"window": "1 day"}, None),
        ("/checks/not-a-key", {}, "key"),
        ("/checks/{banner}/results", {"since": "yesterday"}, "since"),
        ("/checks/{banner}/results", {"until": "2026-13-01"}, "until"),
        ("/checks/{banner}/results", {"cursor": "not-a-cursor"}, None),
        ("/checks/{banner}/results", {"cursor": "0"}, None),
        ("/checks/{banner}/results", {"limit": "1001"}, None),
    ],
)
async def test_bad_filters_are_400_with_the_parameter(history_api, path, params, parameter):
    response = await history_api["http"].get(
        PREFIX + path.format(banner=history_api["banner"]), params=params
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] in {"invalid_query", "bad_request"}
    if parameter is not None:
        assert body["details"]["parameter"] == parameter
        assert parameter in body["message"]


async def test_unknown_check_is_404(history_api):
    http = history_api["http"]
    for path in ("/checks/0123456789abcdef", "/checks/0123456789abcdef/results"):
        response = await http.get(PREFIX + path)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "check_not_found"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    return subprocess.run(
        [*CLI, "history", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


async def test_cli_history_json_through_the_api_and_the_store(history_api, tmp_path):
    api = ["--api-url", history_api["base"]]
    listing = await asyncio.to_thread(_cli, *api, "--suite", history_api["suite"], "--json")
    assert listing.returncode == 0, listing.stderr
    body = json.loads(listing.stdout)
    assert body["total"] == 2
    one = await asyncio.to_thread(
        _cli, *api, "--suite", history_api["suite"], "--runner", BANNER, "--json"
    )
    assert one.returncode == 0, one.stderr
    detail = json.loads(one.stdout)
    assert detail["check"]["key"] == history_api["banner"]
    assert [r["status"] for r in detail["results"]] == ["pass", "fail", "pass"]
    table = await asyncio.to_thread(_cli, *api, "--suite", history_api["suite"])
    assert history_api["banner"] in table.stdout
    assert "66.7%" in table.stdout
    # Without an API: the store itself (here the Prefect test server's database).
    env = {"ORCHESTRATOR_MONITORING_DATABASE_URL": default_database_url()}
    direct = await asyncio.to_thread(_cli, history_api["banner"], "--json", env=env)
    assert direct.returncode == 0, direct.stderr

    def without_links(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "runUrl"} for r in results]

    # The same results (run links only where the Prefect UI's address is known).
    assert without_links(json.loads(direct.stdout)["results"]) == without_links(detail["results"])
    bad = await asyncio.to_thread(_cli, *api, "--since", "yesterday")
    assert bad.returncode == 2
    assert "--since" in bad.stderr
    unknown = await asyncio.to_thread(_cli, *api, "0123456789abcdef")
    assert unknown.returncode == 1
    assert "no check 0123456789abcdef" in unknown.stderr


def test_history_answers_503_when_its_store_cannot_be_opened(prefect_server, tmp_path):
    broken = "sqlite+aiosqlite:////nonexistent/dir/history.db"
    settings = load_settings(tmp_path, monitoring_database_url=broken)
    app = create_app(OrchestratorConfig(settings=settings, project_root=tmp_path))
    with serve_app(app) as base:
        response = httpx.get(f"{base}{PREFIX}/checks", timeout=30)
        runs = httpx.get(f"{base}{PREFIX}", timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "history_unavailable"
    assert response.headers["Retry-After"]
    assert runs.status_code == 200  # the run routes do not depend on history
