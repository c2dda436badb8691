"""The runner server over a real socket: built-in runners, errors, timeouts, capacity.

The built-in runners' tests run against both engines (``engine_url``): what the HTTP
engine reads in the HTML, the browser engine must see in the rendered page too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from helpers import free_port, serve_app
from runners_orchestrator import RunnerResult
from runners_orchestrator.runner_server import (
    RunnerContext,
    RunnerRegistry,
    RunnerServerConfig,
    create_runner_app,
    default_registry,
)

if TYPE_CHECKING:
    import httpx

    from helpers import PageServer


async def execute(client: httpx.AsyncClient, base: str, body: Any, **kwargs: Any) -> httpx.Response:
    return await client.post(f"{base}/api/runner/execute", json=body, **kwargs)


SHORT_WAIT = {"waitMs": 300}
"""The browser runners wait this long for a late banner or title (the HTTP ones ignore it)."""


@pytest.fixture(params=["http", pytest.param("browser", marks=pytest.mark.browser)])
def engine_url(request: pytest.FixtureRequest, runner_url: str) -> str:
    """A runner server of each engine, with the same built-in runner names."""
    if request.param == "http":
        return runner_url
    return str(request.getfixturevalue("browser_runner_url"))


async def one_result(client: httpx.AsyncClient, base: str, url: str, runner: str) -> dict[str, Any]:
    body = {"url": url, "runners": [runner], "input": SHORT_WAIT}
    response = await execute(client, base, body)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["name"] == runner
    assert isinstance(result["durationMs"], int)
    # The browser engine adds a screenshot's URL to a failure; the rest is the same.
    shot = (result.get("details") or {}).pop("screenshot", None)
    assert shot is None or result["status"] != "pass"
    if result.get("details") == {}:
        del result["details"]
    return result


@pytest.mark.parametrize(
    ("path", "selector"),
    [("/banner-visible", ".cookie-banner"), ("/banner-data-attribute", "[data-cookie-banner]")],
)
async def test_visible_cookie_banner_passes(client, engine_url, pages: PageServer, path, selector):
    result = await one_result(client, engine_url, pages.url(path), "cookieBannerVisibleTest")
    assert result["status"] == "pass"
    assert result["details"] == {"visible": True, "selector": selector, "elementCount": 1}


async def test_one_banner_matching_every_selector_counts_once(client, engine_url, pages):
    url = pages.url("/banner-all-selectors")
    result = await one_result(client, engine_url, url, "cookieBannerVisibleTest")
    assert result["status"] == "pass"
    assert result["details"] == {
        "visible": True,
        "selector": "[data-cookie-banner]",
        "elementCount": 1,
    }


async def test_two_distinct_banners_count_two(client, engine_url, pages: PageServer):
    # The first is hidden: the result names the selector of the visible one.
    url = pages.url("/banner-two-elements")
    result = await one_result(client, engine_url, url, "cookieBannerVisibleTest")
    assert result["status"] == "pass"
    assert result["details"] == {"visible": True, "selector": "#cookie-banner", "elementCount": 2}


async def test_missing_cookie_banner_fails(client, engine_url, pages: PageServer):
    url = pages.url("/banner-missing")
    result = await one_result(client, engine_url, url, "cookieBannerVisibleTest")
    assert result["status"] == "fail"
    assert result["details"] == {"visible": False, "elementCount": 0}


@pytest.mark.parametrize(
    "path",
    [
        "/banner-hidden-attribute",
        "/banner-display-none",
        "/banner-visibility-hidden",
        "/banner-hidden-parent",
    ],
)
async def test_hidden_cookie_banner_fails(client, engine_url, pages: PageServer, path):
    result = await one_result(client, engine_url, pages.url(path), "cookieBannerVisibleTest")
    assert result["status"] == "fail"
    assert result["details"] == {"visible": False, "elementCount": 1}


async def test_title_present_passes_with_its_text(client, engine_url, pages: PageServer):
    result = await one_result(client, engine_url, pages.url("/title"), "exampleTitleVisibleTest")
    assert result == {
        "name": "exampleTitleVisibleTest",
        "status": "pass",
        "details": {"title": "Peer Test Page"},
        "durationMs": result["durationMs"],
    }


@pytest.mark.parametrize("path", ["/title-empty", "/title-missing"])
async def test_empty_or_missing_title_fails(client, engine_url, pages: PageServer, path):
    result = await one_result(client, engine_url, pages.url(path), "exampleTitleVisibleTest")
    assert result["status"] == "fail"
    assert result["details"] == {"title": ""}


async def test_unreachable_url_is_an_error_result(client, engine_url):
    url = f"http://127.0.0.1:{free_port()}/"
    result = await one_result(client, engine_url, url, "exampleTitleVisibleTest")
    assert result["status"] == "error"
    assert result["errorMessage"].startswith(f"could not fetch {url}")


async def test_page_answering_5xx_is_an_error_result(client, engine_url, pages: PageServer):
    url = pages.url("/status?code=503")
    result = await one_result(client, engine_url, url, "exampleTitleVisibleTest")
    assert result["status"] == "error"
    assert result["errorMessage"] == f"{url} answered HTTP 503"


async def test_runners_run_concurrently_in_request_order(client, engine_url, pages: PageServer):
    # The barrier page answers only once two requests wait on it at the same time: run one
    # after the other, the first would time out and fail.
    barrier = pages.url(f"/barrier?key={uuid.uuid4()}&n=2")
    body = {
        "runners": [
            {"name": "exampleTitleVisibleTest", "input": {"url": barrier}},
            {"name": "cookieBannerVisibleTest", "input": {"url": pages.url("/banner-visible")}},
            {"name": "exampleTitleVisibleTest", "input": {"url": barrier}},
        ],
        "runId": "run-42",
    }
    response = await execute(client, engine_url, body)
    assert response.status_code == 200
    data = response.json()
    assert data["runId"] == "run-42"
    assert data["region"] == "us-east-1"
    assert [r["status"] for r in data["results"]] == ["pass", "pass", "pass"]
    assert [r["name"] for r in data["results"]] == [
        "exampleTitleVisibleTest",
        "cookieBannerVisibleTest",
        "exampleTitleVisibleTest",
    ]


async def test_top_level_url_wins_over_runner_input(client, engine_url, pages: PageServer):
    body = {
        "url": pages.url("/banner-visible"),
        "input": {"url": pages.url("/banner-missing")},
        "runners": [{"name": "cookieBannerVisibleTest", "input": {"url": "http://127.0.0.1:1/"}}],
    }
    response = await execute(client, engine_url, body)
    assert response.json()["results"][0]["status"] == "pass"


async def test_run_id_is_echoed_only_when_sent(client, runner_url, pages: PageServer):
    response = await execute(
        client, runner_url, {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
    )
    assert "runId" not in response.json()


async def test_non_http_url_is_bad_request(client, runner_url):
    response = await execute(
        client, runner_url, {"url": "file:///etc/passwd", "runners": ["exampleTitleVisibleTest"]}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    (issue,) = body["data"]["issues"]
    assert issue["path"] == ["url"]
    assert issue["code"] == "invalid_format"
    assert "use http or https" in issue["message"]


async def test_unknown_runner_is_404_and_nothing_runs(client, runner_url, pages: PageServer):
    body = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest", "noSuchRunner"]}
    response = await execute(client, runner_url, body)
    assert response.status_code == 404
    assert response.json() == {
        "defined": True,
        "code": "RUNNER_NOT_FOUND",
        "status": 404,
        "message": "One or more runners not found",
        "data": {
            "missingRunners": ["noSuchRunner"],
            "availableRunners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
        },
    }


async def test_invalid_runner_input_is_400(client, runner_url):
    body = {"runners": [{"name": "exampleTitleVisibleTest", "input": {"url": "not a url"}}]}
    response = await execute(client, runner_url, body)
    assert response.status_code == 400
    data = response.json()
    assert data["code"] == "INPUT_VALIDATION_FAILED"
    assert data["data"]["runnerName"] == "exampleTitleVisibleTest"
    assert data["data"]["issues"][0]["path"] == ["url"]


@pytest.mark.parametrize(
    ("body", "path", "code"),
    [
        ({"url": "http://127.0.0.1/", "runners": []}, ["runners"], "too_small"),
        ({"url": "http://127.0.0.1/"}, ["runners"], "invalid_type"),
        ({"runners": [5]}, ["runners", 0], "invalid_type"),
        ([1, 2], [], "invalid_type"),
    ],
)
async def test_invalid_body_is_bad_request_with_issues(client, runner_url, body, path, code):
    response = await execute(client, runner_url, body)
    assert response.status_code == 400
    data = response.json()
    assert (data["defined"], data["code"], data["status"]) == (False, "BAD_REQUEST", 400)
    assert data["message"] == "Input validation failed"
    assert {"path": path, "code": code} in [
        {"path": i["path"], "code": i["code"]} for i in data["data"]["issues"]
    ]


@pytest.mark.parametrize("raw", [b'{"url": ', b"", b"\xff\xfe", b"null x"])
async def test_malformed_json_is_bad_request(client, runner_url, raw):
    response = await client.post(f"{runner_url}/api/runner/execute", content=raw)
    assert response.status_code == 400
    assert response.json()["code"] == "BAD_REQUEST"
    assert response.json()["message"].startswith("Malformed request.")


async def test_orpc_wrapped_request_gets_a_wrapped_reply(client, engine_url, pages: PageServer):
    # Without Content-Type, too: the oRPC client reads nothing but the reply's `json` member.
    body = {"json": {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}}
    response = await client.post(
        f"{engine_url}/api/runner/execute", content=json.dumps(body).encode()
    )
    assert response.status_code == 200
    reply = response.json()
    assert list(reply) == ["json"]
    assert reply["json"]["region"] == "us-east-1"
    assert reply["json"]["results"][0]["status"] == "pass"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": "http://127.0.0.1:9/", "runners": ["noSuchRunner"]}, 404, "RUNNER_NOT_FOUND"),
        (
            {"runners": [{"name": "exampleTitleVisibleTest", "input": {"url": "x"}}]},
            400,
            "INPUT_VALIDATION_FAILED",
        ),
        ({"url": "http://127.0.0.1:9/", "runners": []}, 400, "BAD_REQUEST"),
        ([1, 2], 400, "BAD_REQUEST"),
    ],
    ids=["runner-not-found", "input-validation-failed", "empty-runners", "not-an-object"],
)
async def test_orpc_wrapped_request_gets_wrapped_errors_with_their_status(
    client, runner_url, body, status, code
):
    response = await execute(client, runner_url, {"json": body})
    assert response.status_code == status
    reply = response.json()
    assert list(reply) == ["json"]
    envelope = reply["json"]
    assert {"defined", "code", "status", "message", "data"} == set(envelope)
    assert (envelope["code"], envelope["status"]) == (code, status)


async def test_plain_request_gets_plain_errors(client, runner_url):
    response = await execute(client, runner_url, {"runners": ["noSuchRunner"]})
    assert response.status_code == 404
    assert response.json()["code"] == "RUNNER_NOT_FOUND"
    assert "json" not in response.json()


async def test_oversized_body_is_413_in_the_envelope(client, pages: PageServer):
    app = create_runner_app(RunnerServerConfig(max_body_size=1000))
    with serve_app(app) as base:
        body = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"] * 200}
        response = await execute(client, base, body)
    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


async def test_oversized_wrapped_body_is_answered_plain(client, pages: PageServer):
    # The limit stops the read before the body is parsed: nothing says it was wrapped.
    app = create_runner_app(RunnerServerConfig(max_body_size=1000))
    with serve_app(app) as base:
        body = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"] * 200}
        response = await execute(client, base, {"json": body})
    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


async def test_oversized_page_is_an_error_result(client, pages: PageServer):
    app = create_runner_app(RunnerServerConfig(max_page_bytes=10_000))
    with serve_app(app) as base:
        url = pages.url("/big?n=50000")
        result = await one_result(client, base, url, "exampleTitleVisibleTest")
    assert result["status"] == "error"
    assert "larger than 10000 bytes" in result["errorMessage"]


def _registry_with_test_runners() -> RunnerRegistry:
    registry = default_registry()

    @registry.register("hangs")
    async def hangs(ctx: RunnerContext) -> RunnerResult:
        await asyncio.sleep(3600)
        return RunnerResult(name=ctx.name, status="pass")  # pragma: no cover

    @registry.register("raises")
    async def raises(ctx: RunnerContext) -> RunnerResult:
        msg = f"boom on {ctx.url}"
        raise ZeroDivisionError(msg)

    @registry.register("wrongType")
    async def wrong_type(ctx: RunnerContext) -> RunnerResult:
        return {"status": "pass"}  # type: ignore[return-value]

    @registry.register("usesInput")
    async def uses_input(ctx: RunnerContext) -> RunnerResult:
        return RunnerResult(name="ignored", status="pass", details={"seen": ctx.input})

    return registry


@pytest.fixture(scope="module")
def custom_runner_url():
    config = RunnerServerConfig(registry=_registry_with_test_runners(), runner_timeout=0.5)
    with serve_app(create_runner_app(config)) as url:
        yield url


async def test_runner_timeout_is_an_error_and_server_stays_up(client, custom_runner_url, pages):
    body = {"url": pages.url("/title"), "runners": ["hangs", "exampleTitleVisibleTest"]}
    response = await execute(client, custom_runner_url, body)
    assert response.status_code == 200
    hung, title = response.json()["results"]
    assert hung["status"] == "error"
    assert hung["errorMessage"] == "runner hangs timed out after 0.5s"
    assert 450 <= hung["durationMs"] < 5000
    assert title["status"] == "pass"
    health = await client.get(f"{custom_runner_url}/api/runner/health")
    assert health.json()["inFlight"] == 0


async def test_slow_page_times_out_within_the_runner_timeout(client, custom_runner_url, pages):
    result = await one_result(
        client, custom_runner_url, pages.url("/slow?s=3"), "exampleTitleVisibleTest"
    )
    assert result["status"] == "error"
    assert result["durationMs"] < 2900  # the 0.5 s runner timeout, not the 3 s page


async def test_raising_runner_is_an_error_result(client, custom_runner_url, pages):
    body = {"url": pages.url("/title"), "runners": ["raises", "wrongType"]}
    response = await execute(client, custom_runner_url, body)
    raised, wrong = response.json()["results"]
    assert raised == {
        "name": "raises",
        "status": "error",
        "errorMessage": f"ZeroDivisionError: boom on {pages.url('/title')}",
        "durationMs": raised["durationMs"],
    }
    assert wrong["status"] == "error"
    assert wrong["errorMessage"] == "runner returned dict, expected a RunnerResult"


async def test_runner_input_is_merged_and_result_named_as_requested(client, custom_runner_url):
    body = {
        "url": "http://127.0.0.1:9/x",
        "input": {"a": 1, "b": 1},
        "runners": [{"name": "usesInput", "input": {"b": 2}}],
    }
    response = await execute(client, custom_runner_url, body)
    (result,) = response.json()["results"]
    assert result["name"] == "usesInput"
    assert result["details"] == {"seen": {"a": 1, "b": 2, "url": "http://127.0.0.1:9/x"}}


async def test_over_capacity_answers_429_with_retry_after(client, pages: PageServer):
    app = create_runner_app(RunnerServerConfig(capacity=2, retry_after=3))
    with serve_app(app) as base:
        body = {"url": pages.url("/slow?s=1"), "runners": ["exampleTitleVisibleTest"]}
        responses = await asyncio.gather(*(execute(client, base, body) for _ in range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2
        assert statuses.count(429) >= 1
        assert set(statuses) <= {200, 429}
        for response in responses:
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "3"
                assert response.json()["code"] == "TOO_MANY_REQUESTS"
                assert response.json()["data"]["capacity"] == 2
        # Errors count too: a burst of bad requests must not leak a slot.
        bad = await asyncio.gather(*(execute(client, base, {"runners": []}) for _ in range(4)))
        assert {r.status_code for r in bad} <= {400, 429}
        health = (await client.get(f"{base}/api/runner/health")).json()
    assert (health["inFlight"], health["capacity"], health["peakInFlight"]) == (0, 2, 2)
    assert health["served"] + health["refused"] == 12  # every request counted once
    assert health["refused"] == statuses.count(429) + sum(r.status_code == 429 for r in bad)


async def test_over_capacity_answers_in_the_form_of_the_request(client, pages: PageServer):
    app = create_runner_app(RunnerServerConfig(capacity=1, retry_after=2))
    with serve_app(app) as base:
        slow = {"url": pages.url("/slow?s=2"), "runners": ["exampleTitleVisibleTest"]}
        holder = asyncio.create_task(execute(client, base, slow))
        for _ in range(100):  # until the slow request holds the only slot
            if (await client.get(f"{base}/api/runner/health")).json()["inFlight"] == 1:
                break
            await asyncio.sleep(0.02)
        body = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
        wrapped = await execute(client, base, {"json": body})
        plain = await execute(client, base, body)
        malformed = await client.post(f"{base}/api/runner/execute", content=b'{"json": ')
        assert (await holder).status_code == 200
    assert [r.status_code for r in (wrapped, plain, malformed)] == [429, 429, 429]
    assert all(r.headers["Retry-After"] == "2" for r in (wrapped, plain, malformed))
    expected = {
        "defined": True,
        "code": "TOO_MANY_REQUESTS",
        "status": 429,
        "message": "Runner server is at capacity (1 requests in flight); retry after 2s",
        "data": {"inFlight": 1, "capacity": 1},
    }
    assert wrapped.json() == {"json": expected}
    assert plain.json() == expected
    assert malformed.json() == expected


async def test_health_reports_in_flight_live(client, pages: PageServer):
    app = create_runner_app(RunnerServerConfig(region="eu-west-1", capacity=5))
    with serve_app(app) as base:
        body = {"url": pages.url("/slow?s=1"), "runners": ["exampleTitleVisibleTest"]}
        pending = [asyncio.create_task(execute(client, base, body)) for _ in range(3)]
        await asyncio.sleep(0.4)
        during = (await client.get(f"{base}/api/runner/health")).json()
        await asyncio.gather(*pending)
        after = (await client.get(f"{base}/api/runner/health")).json()
    assert during == {
        "status": "ok",
        "region": "eu-west-1",
        "inFlight": 3,
        "capacity": 5,
        "peakInFlight": 3,
        "served": 3,
        "refused": 0,
    }
    assert (after["inFlight"], after["peakInFlight"], after["served"]) == (0, 3, 3)


async def test_info_lists_runners_with_usage_and_engine(client, engine_url, request):
    engine = request.node.callspec.params["engine_url"]
    response = await client.get(f"{engine_url}/api/runner/info")
    assert response.json() == {
        "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
        "count": 2,
        "region": "us-east-1",
        "engine": engine,
        "usage": {
            "method": "POST",
            "endpoint": "/api/runner/execute",
            "example": {
                "url": "https://example.com",
                "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
            },
        },
    }
