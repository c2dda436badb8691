"""One job through real runner servers: retries, failover, timeouts, and the TS contract."""

from __future__ import annotations

import asyncio

import pytest

from helpers import ScriptedRunnerServer, free_port, serve_app, ts_results
from runners_orchestrator import RunnerJob
from runners_orchestrator.balancing import RoundRobinBalancer
from runners_orchestrator.execution import JobExecutor, RetryPolicy
from runners_orchestrator.registry import AvailableServer, HealthChecker, ServerPool
from runners_orchestrator.settings import ServerConfig

FAST_RETRIES = RetryPolicy(max_attempts=3, backoff=0.01, backoff_max=0.05, request_timeout=5)


def avail(sid: str, base: str, region: str = "us-east-1") -> AvailableServer:
    config = ServerConfig(id=sid, url=f"{base}/api/runner", region=region)
    return AvailableServer(server=config, capacity=10)


def executor(*servers: AvailableServer, policy: RetryPolicy = FAST_RETRIES) -> JobExecutor:
    return JobExecutor(
        pool=ServerPool(available=list(servers)),
        balancer=RoundRobinBalancer(),
        health=HealthChecker(ejection_seconds=30),
        policy=policy,
    )


def job(pages, path="/banner-visible", region="us-east-1", **kw) -> RunnerJob:
    runners = kw.pop("runners", ["cookieBannerVisibleTest", "exampleTitleVisibleTest"])
    return RunnerJob(url=pages.url(path), runners=runners, region=region, **kw)


async def test_job_completes_on_a_real_runner_server(runner_url, pages):
    result = await executor(avail("us-1", runner_url)).run(job(pages), "job-1", timeout=10)
    assert result.state == "completed"
    assert (result.server, result.region, result.attempts) == ("us-1", "us-east-1", 1)
    assert [(r.name, r.status) for r in result.results] == [
        ("cookieBannerVisibleTest", "pass"),
        ("exampleTitleVisibleTest", "pass"),
    ]
    assert result.error is None
    assert result.duration_ms >= 0


async def test_typescript_result_names_are_matched_by_position(pages):
    ts = ScriptedRunnerServer().always(
        200, ts_results(("cookie_banner_visible", "fail"), ("unknown", "error"))
    )
    with serve_app(ts) as base:
        result = await executor(avail("ts", base)).run(job(pages), "job-1", timeout=10)
    assert [(r.name, r.status) for r in result.results] == [
        ("cookieBannerVisibleTest", "fail"),
        ("exampleTitleVisibleTest", "error"),
    ]


async def test_reply_wrapped_by_an_orpc_server_is_read(pages):
    # A server built on oRPC's RPC handler answers {"json": ...}, even to a plain request.
    wrapped = {"json": ts_results(("cookie_banner_visible", "pass"), ("unknown", "error"))}
    orpc = ScriptedRunnerServer().always(200, wrapped)
    with serve_app(orpc) as base:
        result = await executor(avail("orpc", base)).run(job(pages), "job-1", timeout=10)
    assert (result.state, result.attempts) == ("completed", 1)
    assert [(r.name, r.status) for r in result.results] == [
        ("cookieBannerVisibleTest", "pass"),
        ("exampleTitleVisibleTest", "error"),
    ]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "orpc-wrapped"])
@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "RUNNER_NOT_FOUND"), (500, "INPUT_VALIDATION_FAILED"), (404, "RUNNER_NOT_FOUND")],
)
async def test_job_faults_are_never_retried_nor_failed_over(pages, status, code, wrapped):
    body = {"defined": True, "code": code, "status": status, "message": "nope", "data": {}}
    first = ScriptedRunnerServer().always(status, {"json": body} if wrapped else body)
    peer = ScriptedRunnerServer().always(200, ts_results(("a", "pass"), ("b", "pass")))
    with serve_app(first) as one, serve_app(peer) as two:
        run = executor(avail("one", one), avail("two", two))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.startswith(f"{code}: nope")
    assert (first.execute_calls, peer.execute_calls) == (1, 0)
    assert all(r.status == "error" for r in result.results)


async def test_5xx_is_retried_on_the_same_server(pages):
    flaky = (
        ScriptedRunnerServer()
        .then(503, "upstream busy")
        .then(502, {"code": "BAD_GATEWAY"})
        .always(200, ts_results(("a", "pass"), ("b", "fail")))
    )
    with serve_app(flaky) as base:
        result = await executor(avail("flaky", base)).run(job(pages), "job-1", timeout=10)
    assert result.state == "completed"
    assert result.attempts == 3
    assert flaky.execute_calls == 3


async def test_failing_server_fails_over_to_a_peer_of_the_same_region(pages, runner_url):
    broken = ScriptedRunnerServer().always(500, {"code": "INTERNAL", "message": "boom"})
    other_region = ScriptedRunnerServer("eu-west-1").always(200, ts_results(("a", "pass")))
    with serve_app(broken) as bad, serve_app(other_region) as eu:
        run = executor(avail("bad", bad), avail("eu", eu, "eu-west-1"), avail("good", runner_url))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert result.state == "completed"
    assert result.server == "good"
    assert result.attempts == 4  # three on the broken server, one on its peer
    assert broken.execute_calls == 3
    assert other_region.execute_calls == 0
    assert run.health.ejected_reason("bad") is not None


async def test_dead_server_fails_over_without_retrying(pages, runner_url):
    dead = avail("dead", f"http://127.0.0.1:{free_port()}")
    run = executor(dead, avail("alive", runner_url))
    result = await run.run(job(pages), "job-1", timeout=10, first=dead)
    assert (result.state, result.server, result.attempts) == ("completed", "alive", 2)


async def test_every_server_failing_gives_a_failed_job_with_each_reason(pages):
    dead_a = avail("a", f"http://127.0.0.1:{free_port()}")
    dead_b = avail("b", f"http://127.0.0.1:{free_port()}")
    result = await executor(dead_a, dead_b).run(job(pages), "job-1", timeout=10)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.startswith("every runner server failed: ")
    assert "a: cannot connect" in result.error
    assert "b: cannot connect" in result.error


async def test_hung_server_times_out_within_the_job_timeout(pages):
    hung = ScriptedRunnerServer().always(200, "hang")
    with serve_app(hung) as base:
        started = asyncio.get_running_loop().time()
        result = await executor(avail("hung", base)).run(job(pages), "job-1", timeout=0.5)
        elapsed = asyncio.get_running_loop().time() - started
    assert result.state == "timed_out"
    assert result.error is not None
    assert result.error.startswith("job timed out after 0.5s")
    assert elapsed < 5  # far below the server's hang: the job timeout cut it


async def test_hung_server_is_abandoned_for_a_peer_after_the_request_timeout(pages, runner_url):
    hung = ScriptedRunnerServer().always(200, "hang")
    policy = RetryPolicy(max_attempts=1, backoff=0.01, request_timeout=0.3)
    with serve_app(hung) as base:
        run = executor(avail("hung", base), avail("good", runner_url), policy=policy)
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert (result.state, result.server) == ("completed", "good")


async def test_429_moves_to_another_server_without_counting_as_a_failure(pages, runner_url):
    full = ScriptedRunnerServer().always(429, {"code": "TOO_MANY_REQUESTS"}, {"Retry-After": "5"})
    with serve_app(full) as base:
        run = executor(avail("full", base), avail("free", runner_url))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert (result.state, result.server) == ("completed", "free")
    assert run.health.ejected_reason("full") is None


async def test_429_on_the_only_server_waits_retry_after_and_retries(pages):
    busy_then_ok = (
        ScriptedRunnerServer()
        .then(429, {"code": "TOO_MANY_REQUESTS"}, {"Retry-After": "0.3"})
        .always(200, ts_results(("a", "pass"), ("b", "pass")))
    )
    with serve_app(busy_then_ok) as base:
        started = asyncio.get_running_loop().time()
        result = await executor(avail("only", base)).run(job(pages), "job-1", timeout=10)
        elapsed = asyncio.get_running_loop().time() - started
    assert result.state == "completed"
    assert 0.3 <= elapsed < 5  # waited Retry-After, then went on


async def test_no_server_in_the_region_fails_with_the_reason(pages, runner_url):
    run = executor(avail("us-1", runner_url))
    result = await run.run(job(pages, region="ap-south-1"), "job-1", timeout=10)
    assert result.state == "failed"
    assert result.attempts == 0
    assert result.error == (
        "no runner server is registered in region 'ap-south-1'; add one to the registry setting"
    )


async def test_wrong_number_of_results_is_the_servers_fault(pages, runner_url):
    short = ScriptedRunnerServer().always(200, ts_results(("only-one", "pass")))
    with serve_app(short) as base:
        run = executor(avail("short", base), avail("good", runner_url))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert (result.state, result.server) == ("completed", "good")


async def test_retry_after_zero_does_not_spin_on_a_full_server(pages):
    full = ScriptedRunnerServer().always(429, {"code": "TOO_MANY_REQUESTS"}, {"Retry-After": "0"})
    with serve_app(full) as base:
        result = await executor(avail("full", base)).run(job(pages), "job-1", timeout=1)
    assert result.state == "timed_out"
    # At most one request per 0.1 s floor, not thousands in a busy loop.
    assert full.execute_calls <= 12
