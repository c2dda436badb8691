"""Routing by capability: a job goes only to servers of its region that have its runners.

A real HTTP-engine server and a real browser-engine server (headless Chromium) in one
region, each with a runner of a user's own that the other lacks; the orchestrator learns
what each has from its ``/info``, with the health probe.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from litestar import Litestar

from helpers import ScriptedRunnerServer, free_port, serve_app, ts_results
from runners_orchestrator import RunnerJob, RunnerResult
from runners_orchestrator.balancing import LeastLoadBalancer, RoundRobinBalancer
from runners_orchestrator.execution import JobExecutor, RetryPolicy
from runners_orchestrator.registry import HealthChecker, ServerPool
from runners_orchestrator.runner_server import (
    RunnerContext,
    RunnerServerConfig,
    RunnerServerPlugin,
    default_registry,
)
from runners_orchestrator.settings import ServerConfig
from runners_orchestrator.steps import select_best_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.async_api import Page

    from helpers import PageServer
    from runners_orchestrator.balancing import LoadBalancer

BUILTINS = ["cookieBannerVisibleTest", "exampleTitleVisibleTest"]
REGION = "us-east-1"


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, str]]:
    """Two servers of us-east-1, each with a user runner the other lacks.

    ``us-http``: the HTTP engine plus ``pageSizeTest``; ``us-browser``: Chromium plus
    ``linkCountTest``.
    """
    http = default_registry("http")

    @http.register("pageSizeTest")
    async def page_size(ctx: RunnerContext) -> RunnerResult:
        """Pass when the page has a body (a user's runner on the HTTP server only)."""
        response = await ctx.client.get(ctx.url or "")
        return RunnerResult(name=ctx.name, status="pass", details={"bytes": len(response.content)})

    browser = default_registry("browser")

    @browser.register_browser("linkCountTest")
    async def link_count(page: Page, ctx: RunnerContext) -> RunnerResult:
        """Count the rendered page's links (a user's runner on the browser server only)."""
        count = await page.locator("a").count()
        return RunnerResult(name=ctx.name, status="pass", details={"links": count})

    http_app = Litestar(
        plugins=[RunnerServerPlugin(RunnerServerConfig(region=REGION, registry=http))]
    )
    browser_config = RunnerServerConfig(region=REGION, engine="browser", registry=browser)
    browser_app = Litestar(plugins=[RunnerServerPlugin(browser_config)])
    with serve_app(http_app) as http_base, serve_app(browser_app) as browser_base:
        yield {"us-http": http_base, "us-browser": browser_base}


def config(sid: str, base: str, region: str = REGION) -> ServerConfig:
    return ServerConfig(id=sid, url=f"{base}/api/runner", region=region, capacity=8)


async def lookup(health: HealthChecker, *servers: ServerConfig) -> ServerPool:
    async with httpx.AsyncClient() as client:
        return await health.check(client, list(servers), region=REGION)


def executor(
    pool: ServerPool, health: HealthChecker, balancer: LoadBalancer | None = None
) -> JobExecutor:
    return JobExecutor(
        pool=pool,
        balancer=balancer or LeastLoadBalancer(),
        health=health,
        policy=RetryPolicy(backoff=0.01, request_timeout=30),
    )


def job(pages: PageServer, *runners: str) -> RunnerJob:
    return RunnerJob(url=pages.url("/banner-visible"), runners=list(runners), region=REGION)


@pytest.mark.browser
async def test_the_probe_learns_each_servers_runners_from_its_info(engines):
    health = HealthChecker()
    servers = [config(sid, base) for sid, base in engines.items()]
    pool = await lookup(health, *servers)
    runners = {s.id: s.runners for s in pool.available}
    assert runners == {
        "us-http": [*BUILTINS, "pageSizeTest"],
        "us-browser": [*BUILTINS, "linkCountTest"],
    }


@pytest.mark.browser
async def test_browser_only_runners_always_go_to_the_browser_server_and_the_rest_spread(
    engines, pages
):
    health = HealthChecker()
    servers = [config(sid, base) for sid, base in engines.items()]
    run = executor(await lookup(health, *servers), health)
    browser_only = [
        await run.run(job(pages, "linkCountTest"), f"b-{n}", timeout=60) for n in range(6)
    ]
    shared = [
        await run.run(job(pages, "exampleTitleVisibleTest"), f"s-{n}", timeout=60)
        for n in range(16)
    ]
    assert {(r.state, r.server) for r in browser_only} == {("completed", "us-browser")}
    assert all(t.server == "us-browser" for r in browser_only for t in r.tries)
    assert {r.state for r in shared} == {"completed"}
    # Least-load with both idle is a coin toss per job: 16 jobs all on one side is 1 in 2^15.
    assert set(Counter(r.server for r in shared)) == {"us-http", "us-browser"}


@pytest.mark.browser
async def test_round_robin_alternates_among_the_capable_servers_only(engines, pages):
    health = HealthChecker()
    servers = [config(sid, base) for sid, base in engines.items()]
    run = executor(await lookup(health, *servers), health, RoundRobinBalancer())
    order = [
        (await run.run(job(pages, *names), f"j-{n}", timeout=60)).server
        for n, names in enumerate(
            [BUILTINS, ["linkCountTest"], BUILTINS, ["linkCountTest"], BUILTINS, BUILTINS]
        )
    ]
    assert order == ["us-browser", "us-browser", "us-http", "us-browser", "us-browser", "us-http"]


@pytest.mark.browser
async def test_a_user_runner_registered_on_one_server_goes_only_there(engines, pages):
    health = HealthChecker()
    servers = [config(sid, base) for sid, base in engines.items()]
    pool = await lookup(health, *servers)
    chosen = {
        (await select_best_server.fn(pool, "round-robin", REGION, ["pageSizeTest"])).id
        for _ in range(6)
    }
    assert chosen == {"us-http"}
    result = await executor(pool, health).run(job(pages, "pageSizeTest"), "j", timeout=30)
    assert (result.state, result.server, result.attempts) == ("completed", "us-http", 1)
    assert (result.results[0].details or {})["bytes"] > 0


@pytest.mark.browser
async def test_a_runner_no_server_has_fails_at_once_listing_who_has_what(engines, pages):
    health = HealthChecker()
    servers = [config(sid, base) for sid, base in engines.items()]
    result = await executor(await lookup(health, *servers), health).run(
        job(pages, "exampleTitleVisibleTest", "noSuchTest"), "j", timeout=30
    )
    assert result.state == "failed"
    assert result.attempts == 0  # nothing was sent: the probe knew
    assert result.error == (
        "RUNNER_NOT_FOUND: no healthy runner server in region 'us-east-1' has every runner "
        "the job names (exampleTitleVisibleTest, noSuchTest): "
        "us-http has cookieBannerVisibleTest, exampleTitleVisibleTest, pageSizeTest; "
        "us-browser has cookieBannerVisibleTest, exampleTitleVisibleTest, linkCountTest"
    )
    assert {r.status for r in result.results} == {"error"}
    assert result.results[0].error_message == result.error


@pytest.mark.browser
async def test_the_capable_server_dead_is_a_clear_error_not_a_hang(engines, pages):
    health = HealthChecker(timeout=1)
    dead = config("us-browser-2", f"http://127.0.0.1:{free_port()}")
    pool = await lookup(health, config("us-http", engines["us-http"]), dead)
    result = await executor(pool, health).run(job(pages, "linkCountTest"), "j", timeout=30)
    assert result.state == "failed"
    assert result.attempts == 0
    assert result.error is not None
    assert result.error.startswith(
        "RUNNER_NOT_FOUND: no healthy runner server in region 'us-east-1' has every runner "
        "the job names (linkCountTest): "
        "us-http has cookieBannerVisibleTest, exampleTitleVisibleTest, pageSizeTest; "
        "us-browser-2 runners unknown (not healthy: unreachable"
    )


@pytest.mark.browser
async def test_the_capable_server_dying_during_a_run_fails_its_jobs_clearly(pages):
    """The browser server goes away after the lookup: the job tries it and fails naming it.

    No other server of the region has ``linkCountTest``; jobs the HTTP server can run go on.
    """
    registry = default_registry("browser")

    @registry.register_browser("linkCountTest")
    async def link_count(page: Page, ctx: RunnerContext) -> RunnerResult:
        """Count links."""
        links = await page.locator("a").count()
        return RunnerResult(name=ctx.name, status="pass", details={"links": links})

    health = HealthChecker(timeout=1)
    http = RunnerServerConfig(region=REGION)
    browser = RunnerServerConfig(region=REGION, engine="browser", registry=registry)
    with serve_app(Litestar(plugins=[RunnerServerPlugin(http)])) as http_base:
        with serve_app(Litestar(plugins=[RunnerServerPlugin(browser)])) as browser_base:
            pool = await lookup(
                health, config("us-http", http_base), config("us-browser", browser_base)
            )
        # The browser server is stopped now; the lookup still lists it.
        run = executor(pool, health)
        result = await run.run(job(pages, "linkCountTest"), "j", timeout=30)
        shared = await run.run(job(pages, *BUILTINS), "k", timeout=30)
    assert result.state == "failed"
    assert [t.server for t in result.tries] == ["us-browser"] * len(result.tries)
    assert result.error is not None
    assert "us-browser: cannot connect" in result.error
    assert (shared.state, shared.server) == ("completed", "us-http")


async def test_an_unknown_server_that_lacks_a_runner_teaches_it_and_the_job_fails_over(pages):
    """A server whose /info lists nothing may be sent anything: its answer teaches.

    Its RUNNER_NOT_FOUND tells what it has, the job moves to a peer, and later jobs go
    straight to the peer.
    """
    not_found = {
        "defined": True,
        "code": "RUNNER_NOT_FOUND",
        "status": 404,
        "message": "One or more runners not found",
        "data": {"missingRunners": ["linkCountTest"], "availableRunners": BUILTINS},
    }
    lacking = ScriptedRunnerServer().always(404, not_found)
    having = ScriptedRunnerServer(runners=["linkCountTest"]).always(
        200, ts_results(("linkCountTest", "pass"))
    )
    health = HealthChecker()
    with serve_app(lacking) as lacking_base, serve_app(having) as having_base:
        pool = await lookup(health, config("a-unknown", lacking_base), config("b", having_base))
        assert {s.id: s.runners for s in pool.available} == {
            "a-unknown": None,
            "b": ["linkCountTest"],
        }
        run = executor(pool, health, RoundRobinBalancer())
        first = await run.run(job(pages, "linkCountTest"), "j-1", timeout=10)
        later = [await run.run(job(pages, "linkCountTest"), f"j-{n}", timeout=10) for n in (2, 3)]
    assert first.state == "completed"
    assert [(t.server, t.outcome) for t in first.tries] == [
        ("a-unknown", "job_error"),
        ("b", "ok"),
    ]
    assert health.runners_of("a-unknown") == frozenset(BUILTINS)
    assert [[t.server for t in r.tries] for r in later] == [["b"], ["b"]]
    assert lacking.execute_calls == 1


async def test_a_runner_not_found_with_no_peer_left_fails_listing_who_has_what(pages):
    not_found: dict[str, Any] = {
        "code": "RUNNER_NOT_FOUND",
        "message": "One or more runners not found",
        "data": {"missingRunners": ["x"], "availableRunners": ["y"]},
    }
    health = HealthChecker()
    with serve_app(ScriptedRunnerServer().always(404, not_found)) as base:
        pool = await lookup(health, config("only", base))
        result = await executor(pool, health).run(job(pages, "x"), "j", timeout=10)
    assert result.state == "failed"
    assert result.attempts == 1
    assert result.error == (
        "RUNNER_NOT_FOUND: no healthy runner server in region 'us-east-1' has every runner "
        "the job names (x): only has y"
    )


async def test_info_is_read_once_per_server_not_once_per_job(pages):
    """The capability lookup is cached with the health probe.

    Many lookups and jobs, one /info per server (until ``capability_seconds`` pass).
    """
    calls: Counter[str] = Counter()
    scripted = ScriptedRunnerServer(runners=["a"]).always(200, ts_results(("a", "pass")))

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls[scope["path"].rsplit("/", 1)[-1]] += 1
        await scripted(scope, receive, send)

    health = HealthChecker()
    with serve_app(counting) as base:
        for _ in range(5):
            pool = await lookup(health, config("s", base))
            run = executor(pool, health)
            for n in range(10):
                assert (await run.run(job(pages, "a"), f"j-{n}", timeout=10)).state == "completed"
        assert (calls["health"], calls["info"], calls["execute"]) == (5, 1, 50)
        health.capability_seconds = 0  # stale at once: the next probe reads /info again
        await lookup(health, config("s", base))
        assert calls["info"] == 2
