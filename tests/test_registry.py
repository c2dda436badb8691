"""Health probing and outlier ejection against real runner servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from helpers import ScriptedRunnerServer, blackhole, free_port, serve_app
from runners_orchestrator import ConfigurationError
from runners_orchestrator.registry import (
    HealthChecker,
    InMemoryRegistry,
    registry_from_config,
)
from runners_orchestrator.settings import RegistryConfig, ServerConfig


def config(sid: str, base: str, region: str = "us-east-1") -> ServerConfig:
    return ServerConfig(id=sid, url=f"{base}/api/runner", region=region, capacity=3)


async def test_healthy_servers_report_their_load_and_dead_ones_are_ejected(runner_url):
    dead = config("dead", f"http://127.0.0.1:{free_port()}")
    alive = config("alive", runner_url)
    checker = HealthChecker(timeout=1, ejection_seconds=30)
    async with httpx.AsyncClient() as client:
        pool = await checker.check(client, [alive, dead])
    assert [s.id for s in pool.available] == ["alive"]
    assert pool.available[0].capacity == 64  # what the server reports, not the configured 3
    (left_out,) = pool.unavailable
    assert left_out.id == "dead"
    assert left_out.reason.startswith("unreachable: ConnectError")
    assert checker.ejected_reason("dead") is not None


async def test_ejected_server_is_skipped_then_probed_again():
    scripted = ScriptedRunnerServer()
    checker = HealthChecker(timeout=1, ejection_seconds=1)
    with serve_app(scripted) as base:
        target = config("flaky", base)
        async with httpx.AsyncClient() as client:
            # Ejected right before the check (a client's TLS set-up can take a loaded
            # machine longer than a short ejection).
            checker.eject("flaky", "failed a job")
            skipped = await checker.check(client, [target])
            assert skipped.available == []
            assert "failed a job (probed again in" in skipped.unavailable[0].reason
            await asyncio.sleep(1.05)
            again = await checker.check(client, [target])
    assert [s.id for s in again.available] == ["flaky"]


async def test_ejection_grows_with_failed_probes_not_with_failed_jobs():
    checker = HealthChecker(ejection_seconds=10)
    checker.eject("a", "down")
    first = checker._ejected["a"].until
    checker.eject("a", "down")  # another job of the same streak
    assert checker._ejected["a"].until == first
    checker.probe_failed("a", "still down")
    assert checker._ejected["a"].until - first > 9  # probed again later: 2 x 10 s
    checker.restore("a")
    assert checker.ejected_reason("a") is None
    assert not checker.is_out("a")


async def test_due_probe_is_claimed_once_and_restores_a_server_that_answers():
    checker = HealthChecker(ejection_seconds=0)
    with serve_app(ScriptedRunnerServer()) as base:
        target = config("back", base)
        checker.eject("back", "refused")
        assert checker.is_out("back")
        assert checker.claim_probe("back")
        assert not checker.claim_probe("back")  # one probe at a time
        async with httpx.AsyncClient() as client:
            assert await checker.reprobe(client, target)
    assert not checker.is_out("back")


async def test_silent_server_fails_its_probe_within_the_health_timeout():
    with blackhole() as silent:
        checker = HealthChecker(timeout=0.3)
        async with httpx.AsyncClient() as client:
            started = asyncio.get_running_loop().time()
            pool = await checker.check(client, [config("silent", silent)])
            elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < 3
    assert pool.unavailable[0].reason == "health probe timed out after 0.3s"
    assert checker.is_out("silent")


async def test_server_without_health_route_is_recognised_by_info():
    # The TypeScript server has no /health; /info proves it is up.
    with serve_app(ScriptedRunnerServer(health=False)) as base:
        async with httpx.AsyncClient() as client:
            pool = await HealthChecker().check(client, [config("ts", base)])
    assert [s.id for s in pool.available] == ["ts"]


async def test_hung_health_probe_times_out_quickly():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        checker = HealthChecker(timeout=0.3)
        async with httpx.AsyncClient() as client:
            started = asyncio.get_running_loop().time()
            pool = await checker.check(client, [config("hung", base)])
            elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < 3  # the probe timeout, not the silent server, ended it
    assert pool.unavailable[0].reason == "health probe timed out after 0.3s"


async def test_health_answering_not_ok_is_unavailable():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status": "draining"}'})

    with serve_app(app) as base:
        async with httpx.AsyncClient() as client:
            pool = await HealthChecker().check(client, [config("d", base)])
    assert pool.unavailable[0].reason == "health status is 'draining'"


async def test_why_none_explains_the_region():
    checker = HealthChecker()
    async with httpx.AsyncClient() as client:
        pool = await checker.check(
            client, [config("eu-dead", f"http://127.0.0.1:{free_port()}", "eu-west-1")]
        )
    assert pool.why_none("ap-south-1") == (
        "no runner server is registered in region 'ap-south-1'; add one to the registry setting"
    )
    assert pool.why_none("eu-west-1").startswith(
        "no healthy runner server in region 'eu-west-1' (eu-dead: unreachable"
    )


async def test_registry_types_by_name_and_path():
    servers = [ServerConfig(id="a", url="http://127.0.0.1:1/api/runner")]
    registry = registry_from_config(RegistryConfig(servers=servers))
    assert isinstance(registry, InMemoryRegistry)
    assert [s.id for s in await registry.servers()] == ["a"]
    by_path = RegistryConfig(type="runners_orchestrator.registry:InMemoryRegistry")
    assert isinstance(registry_from_config(by_path), InMemoryRegistry)
    with pytest.raises(ConfigurationError, match="unknown registry type 'consul'"):
        registry_from_config(RegistryConfig(type="consul"))


async def test_an_http_answer_confirms_a_server_but_does_not_bring_back_one_that_is_out():
    health = HealthChecker()
    health.eject("a", "refused")
    health.confirm("a")
    assert health.is_out("a")
    health.confirm("b")
    assert "b" in health._confirmed
