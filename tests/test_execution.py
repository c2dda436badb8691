"""One job through real runner servers: retries, failover, timeouts, and the TS contract."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from helpers import ScriptedRunnerServer, blackhole, free_port, serve_app, ts_results
from runners_orchestrator import JobResult, RunnerJob
from runners_orchestrator.balancing import LeastLoadBalancer, RoundRobinBalancer
from runners_orchestrator.execution import JobExecutor, RetryPolicy
from runners_orchestrator.registry import AvailableServer, HealthChecker, ServerPool
from runners_orchestrator.settings import ServerConfig

FAST_RETRIES = RetryPolicy(max_attempts=3, backoff=0.01, backoff_max=0.05, request_timeout=5)


def avail(sid: str, base: str, region: str = "us-east-1") -> AvailableServer:
    config = ServerConfig(id=sid, url=f"{base}/api/runner", region=region)
    return AvailableServer(server=config, capacity=10)


def executor(
    *servers: AvailableServer,
    policy: RetryPolicy = FAST_RETRIES,
    health: HealthChecker | None = None,
) -> JobExecutor:
    return JobExecutor(
        pool=ServerPool(available=list(servers)),
        balancer=RoundRobinBalancer(),
        health=health or HealthChecker(ejection_seconds=30),
        policy=policy,
    )


def outcomes(result: JobResult) -> list[tuple[str, str]]:
    return [(t.server, t.outcome) for t in result.tries]


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
    ("status", "code"), [(500, "INPUT_VALIDATION_FAILED"), (400, "BAD_REQUEST")]
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


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "orpc-wrapped"])
@pytest.mark.parametrize("status", [500, 404])
async def test_runner_not_found_is_never_retried_but_a_peer_that_may_have_it_is_tried(
    pages, status, wrapped
):
    """A server lacking a runner is not asked again for this job; a peer may have it.

    The TypeScript server says so with a 500, ours with a 404; the peer's runners are
    unknown, so it may have it (docs/runner-server.md, *Routing by capability*).
    """
    body = {"defined": True, "code": "RUNNER_NOT_FOUND", "status": status, "message": "nope"}
    first = ScriptedRunnerServer().always(status, {"json": body} if wrapped else body)
    peer = ScriptedRunnerServer().always(200, ts_results(("a", "pass"), ("b", "pass")))
    with serve_app(first) as one, serve_app(peer) as two:
        run = executor(avail("one", one), avail("two", two))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
        alone = executor(avail("one", one))
        lone = await alone.run(job(pages), "job-2", timeout=10)
    assert result.state == "completed"
    assert [(t.server, t.outcome) for t in result.tries] == [("one", "job_error"), ("two", "ok")]
    assert lone.state == "failed"
    assert lone.error is not None
    assert lone.error.startswith("RUNNER_NOT_FOUND: nope")
    assert (first.execute_calls, peer.execute_calls) == (2, 1)


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
    assert [(t.outcome, t.status) for t in result.tries] == [
        ("server_error", 503),
        ("server_error", 502),
        ("ok", 200),
    ]
    assert result.failovers == 0  # retried where it was, never moved


async def test_failing_server_fails_over_to_a_peer_of_the_same_region(pages, runner_url):
    broken = ScriptedRunnerServer().always(500, {"code": "INTERNAL", "message": "boom"})
    other_region = ScriptedRunnerServer("eu-west-1").always(200, ts_results(("a", "pass")))
    with serve_app(broken) as bad, serve_app(other_region) as eu:
        run = executor(avail("bad", bad), avail("eu", eu, "eu-west-1"), avail("good", runner_url))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert result.state == "completed"
    assert result.server == "good"
    assert result.attempts == 4  # three on the broken server, one on its peer
    assert outcomes(result) == [("bad", "server_error")] * 3 + [("good", "ok")]
    assert result.failovers == 1
    assert broken.execute_calls == 3
    assert other_region.execute_calls == 0
    assert run.health.ejected_reason("bad") is not None


async def test_dead_server_fails_over_without_retrying(pages, runner_url):
    dead = avail("dead", f"http://127.0.0.1:{free_port()}")
    run = executor(dead, avail("alive", runner_url))
    result = await run.run(job(pages), "job-1", timeout=10, first=dead)
    assert (result.state, result.server, result.attempts) == ("completed", "alive", 2)
    assert outcomes(result) == [("dead", "refused"), ("alive", "ok")]
    assert result.tries[0].error is not None
    assert result.tries[0].error.startswith("cannot connect")


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
    policy = RetryPolicy(max_attempts=1, backoff=0.01, request_timeout=1)
    with serve_app(hung) as base:
        run = executor(avail("hung", base), avail("good", runner_url), policy=policy)
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert (result.state, result.server) == ("completed", "good")


async def test_timed_out_server_is_left_for_a_peer_at_once_not_retried(pages, runner_url):
    # Retrying a silent server max_attempts times would outlast the job's timeout.
    hung = ScriptedRunnerServer().always(200, "hang")
    policy = RetryPolicy(max_attempts=3, backoff=0.01, request_timeout=1)
    with serve_app(hung) as base:
        run = executor(avail("hung", base), avail("good", runner_url), policy=policy)
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert outcomes(result) == [("hung", "timed_out"), ("good", "ok")]
    assert hung.execute_calls == 1
    assert run.health.is_out("hung")


async def test_429_is_recorded_but_is_not_a_failover(pages, runner_url):
    full = ScriptedRunnerServer().always(429, {"code": "TOO_MANY_REQUESTS"}, {"Retry-After": "5"})
    with serve_app(full) as base:
        run = executor(avail("full", base), avail("free", runner_url))
        result = await run.run(job(pages), "job-1", timeout=10, first=run.pool.available[0])
    assert [(t.server, t.outcome, t.status) for t in result.tries] == [
        ("full", "busy", 429),
        ("free", "ok", 200),
    ]
    assert result.failovers == 0
    assert result.to_wire()["tries"][0] == {
        "server": "full",
        "outcome": "busy",
        "durationMs": result.tries[0].duration_ms,
        "status": 429,
        "error": "at capacity (429)",
    }


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


async def test_ejection_learned_by_one_job_is_seen_by_every_job_of_the_run(pages, runner_url):
    # Each job gets its own executor, as each execute_runner task does; they share only the
    # process's health checker.
    health = HealthChecker(ejection_seconds=30)
    dead = avail("dead", f"http://127.0.0.1:{free_port()}")
    alive = avail("alive", runner_url)
    results = []
    for n in range(10):
        run = executor(dead, alive, health=health)
        results.append(await run.run(job(pages), f"job-{n}", timeout=10, first=dead))
    assert all(r.state == "completed" for r in results)
    tries_on_dead = [t for r in results for t in r.tries if t.server == "dead"]
    assert len(tries_on_dead) == 1  # the first job learned it; the other nine never went


async def test_failed_jobs_do_not_lengthen_an_ejection_probes_do():
    health = HealthChecker(ejection_seconds=10)
    health.eject("a", "refused")
    first = health._ejected["a"].until
    health.eject("a", "refused by a job that was already in flight")
    assert health._ejected["a"].until == first  # one ejection per failure streak


async def test_silent_server_costs_one_job_its_connect_timeout_then_none(pages, runner_url):
    """40 jobs over a server that drops connects and a healthy peer, 10 at a time."""
    policy = RetryPolicy(max_attempts=3, backoff=0.01, request_timeout=30, connect_timeout=0.5)
    jobs = [job(pages, "/slow?s=0.1", runners=["exampleTitleVisibleTest"]) for _ in range(40)]

    async def run_all(*servers: AvailableServer) -> tuple[list[JobResult], float]:
        run = JobExecutor(
            pool=ServerPool(available=list(servers)),
            balancer=LeastLoadBalancer(),
            health=HealthChecker(ejection_seconds=30),
            policy=policy,
        )
        window = asyncio.Semaphore(10)

        async def one(n: int, given: RunnerJob) -> JobResult:
            async with window:
                return await run.run(given, f"job-{n}", timeout=60)

        started = time.monotonic()
        results = await asyncio.gather(*(one(n, j) for n, j in enumerate(jobs, start=1)))
        return list(results), time.monotonic() - started

    _, healthy = await run_all(avail("good", runner_url))
    with blackhole() as silent:
        results, elapsed = await run_all(avail("silent", silent), avail("good", runner_url))

    assert all(r.state == "completed" for r in results), [r.error for r in results]
    assert {r.server for r in results} == {"good"}
    per_server = Counter(t.server for r in results for t in r.tries)
    assert per_server["silent"] <= 1  # at most one job ever tried it
    waited = [r for r in results if any(t.outcome == "connect_timeout" for t in r.tries)]
    assert len(waited) <= 1
    for r in waited:  # that job failed over at once, and says so
        assert outcomes(r) == [("silent", "connect_timeout"), ("good", "ok")]
        assert r.failovers == 1
    # Only catches a hang (each job waiting its 30 s request timeout), with room for a loaded
    # machine: the counts above are the proof.
    assert elapsed < 3 * healthy + 5
    print(  # noqa: T201 - the figures for the docs, seen with -s
        f"40 jobs: healthy peer alone {healthy:.2f}s; with the silent server {elapsed:.2f}s, "
        f"{per_server['silent']} try on it, {len(waited)} job waited the connect timeout"
    )


async def test_silent_only_server_is_retried_then_the_job_fails(pages):
    policy = RetryPolicy(max_attempts=2, backoff=0.01, request_timeout=5, connect_timeout=0.2)
    with blackhole() as silent:
        result = await executor(avail("silent", silent), policy=policy).run(
            job(pages), "job-1", timeout=10
        )
    assert result.state == "failed"
    assert outcomes(result) == [("silent", "connect_timeout")] * 2  # no peer: retried
    assert result.error == "every runner server failed: silent: no connection within 0.2s"


async def test_ejected_server_is_out_for_new_jobs_until_a_probe_brings_it_back(pages):
    # Long enough that a loaded machine cannot outlast it before the first job looks.
    health = HealthChecker(ejection_seconds=1)
    server = ScriptedRunnerServer().always(200, ts_results(("a", "pass"), ("b", "pass")))
    with serve_app(server) as base:
        only = avail("only", base)
        health.eject("only", "cannot connect: refused")
        out = await executor(only, health=health).run(job(pages), "job-1", timeout=10)
        assert out.state == "failed"
        assert out.error == (
            "no healthy runner server in region 'us-east-1' (only: cannot connect: refused)"
        )
        assert server.execute_calls == 0
        await asyncio.sleep(1.05)  # the probe is due: the next job probes, then uses it
        back = await executor(only, health=health).run(job(pages), "job-2", timeout=10)
    assert (back.state, back.server, back.attempts) == ("completed", "only", 1)
    assert not health.is_out("only")


async def test_a_server_that_answers_429_is_confirmed_and_not_tried_one_job_at_a_time(pages):
    # A trial ends with any HTTP answer: a full server is reachable, so jobs may go on
    # sending to it in parallel (each then gets its own 429 or result).
    busy_then_ok = (
        ScriptedRunnerServer()
        .then(429, {"code": "TOO_MANY_REQUESTS"}, {"Retry-After": "0.1"})
        .always(200, ts_results(("a", "pass"), ("b", "pass")))
    )
    health = HealthChecker()
    with serve_app(busy_then_ok) as base:
        run = executor(avail("only", base), health=health)
        first = await run.run(job(pages), "job-1", timeout=10)
    assert outcomes(first) == [("only", "busy"), ("only", "ok")]
    assert not health.on_trial("only")
    assert "only" in health._confirmed
