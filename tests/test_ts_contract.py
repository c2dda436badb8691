"""Replay the requests of ``shared/TS-CONTRACT.md`` against our runner server, over a socket.

The observed TypeScript answers are copied here verbatim. Field names must match byte for
byte; values that depend on the page or the clock (titles, durations) may differ. Where the
TypeScript server answers 500 for a client's mistake, ours answers the right 4xx with the
same body shape, as the contract asks.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

OBSERVED_INFO = json.loads(
    '{"runners":["testFromRunnersDir","exampleTitleVisibleTest","cookieBannerVisibleTest"],'
    '"count":3,"region":"us-east-1","usage":{"method":"POST","endpoint":"/api/runner/execute",'
    '"example":{"url":"https://example.com","runners":["testFromRunnersDir",'
    '"exampleTitleVisibleTest"]}}}'
)
OBSERVED_TITLE_PASS = json.loads(
    '{"region":"us-east-1","results":[{"name":"example_title_visible","status":"pass",'
    '"details":{"title":"Peer Test Page"},"durationMs":1393}]}'
)
OBSERVED_BANNER_PASS = json.loads(
    '{"region":"us-east-1","results":[{"name":"cookie_banner_visible","status":"pass",'
    '"details":{"visible":true,"selector":".cookie-banner","elementCount":1},"durationMs":753}]}'
)
OBSERVED_BANNER_FAIL = json.loads(
    '{"region":"us-east-1","results":[{"name":"cookie_banner_visible","status":"fail",'
    '"details":{"visible":false,"elementCount":0},"durationMs":687}]}'
)
OBSERVED_NOT_FOUND = json.loads(
    '{"defined":true,"code":"RUNNER_NOT_FOUND","status":500,"message":"One or more runners not '
    'found","data":{"missingRunners":["noSuchRunner"],"availableRunners":[]}}'
)
OBSERVED_INPUT_INVALID = json.loads(
    '{"defined":true,"code":"INPUT_VALIDATION_FAILED","status":500,"message":"Runner input '
    'validation failed","data":{"runnerName":"fetchTitleTest","issues":[{"path":["url"],'
    '"message":"Invalid URL","code":"invalid_format"}]}}'
)
OBSERVED_EMPTY_RUNNERS = json.loads(
    '{"defined":false,"code":"BAD_REQUEST","status":400,"message":"Input validation failed",'
    '"data":{"issues":[{"origin":"array","code":"too_small","minimum":1,"inclusive":true,'
    '"path":["runners"],"message":"At least one runner is required"}]}}'
)
OBSERVED_MALFORMED = json.loads(
    '{"defined":false,"code":"BAD_REQUEST","status":400,"message":"Malformed request. Ensure '
    "the request body is properly formatted and the 'Content-Type' header is set correctly.\"}"
)


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not the values themselves."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def execute(base: str, body: Any) -> httpx.Response:
    return httpx.post(f"{base}/api/runner/execute", json=body, timeout=30)


def test_info(cli_runner_server):
    ours = httpx.get(f"{cli_runner_server}/api/runner/info").json()
    assert shape(ours) == shape(OBSERVED_INFO)
    assert {"exampleTitleVisibleTest", "cookieBannerVisibleTest"} <= set(ours["runners"])


@pytest.mark.parametrize(
    ("path", "runner", "observed"),
    [
        ("/title", "exampleTitleVisibleTest", OBSERVED_TITLE_PASS),
        ("/banner-visible", "cookieBannerVisibleTest", OBSERVED_BANNER_PASS),
        ("/banner-missing", "cookieBannerVisibleTest", OBSERVED_BANNER_FAIL),
    ],
)
def test_execute_results(cli_runner_server, pages, path, runner, observed):
    response = execute(cli_runner_server, {"url": pages.url(path), "runners": [runner]})
    assert response.status_code == 200
    ours = response.json()
    assert shape(ours) == shape(observed)
    assert ours["results"][0]["status"] == observed["results"][0]["status"]
    assert ours["results"][0]["details"] | {"title": "-"} == observed["results"][0]["details"] | {
        "title": "-"
    }


def test_unknown_runner_has_the_envelope_with_a_404(cli_runner_server, pages):
    body = {"url": pages.url("/title"), "runners": ["noSuchRunner", "exampleTitleVisibleTest"]}
    response = execute(cli_runner_server, body)
    assert response.status_code == 404
    ours = response.json()
    assert shape(ours) | {"data": None} == shape(OBSERVED_NOT_FOUND) | {"data": None}
    assert set(ours["data"]) == set(OBSERVED_NOT_FOUND["data"])
    assert ours["status"] == 404
    assert ours["data"]["missingRunners"] == ["noSuchRunner"]


def test_invalid_runner_input_has_the_envelope_with_a_400(cli_runner_server):
    body = {"runners": [{"name": "exampleTitleVisibleTest", "input": {"url": "nope"}}]}
    response = execute(cli_runner_server, body)
    assert response.status_code == 400
    ours = response.json()
    assert ours["code"] == OBSERVED_INPUT_INVALID["code"]
    assert ours["message"] == OBSERVED_INPUT_INVALID["message"]
    assert set(ours["data"]) == set(OBSERVED_INPUT_INVALID["data"])
    issue = ours["data"]["issues"][0]
    assert {"path", "message", "code"} <= set(issue)
    assert issue["path"] == ["url"]


def test_empty_runners(cli_runner_server):
    response = execute(cli_runner_server, {"url": "https://example.com/", "runners": []})
    assert response.status_code == 400
    assert response.json() == OBSERVED_EMPTY_RUNNERS


def test_missing_runners_and_bad_url(cli_runner_server):
    missing = execute(cli_runner_server, {"url": "https://example.com/"}).json()
    issue = missing["data"]["issues"][0]
    assert (issue["code"], issue["path"]) == ("invalid_type", ["runners"])
    assert {"expected", "code", "path", "message"} <= set(issue)
    bad = execute(cli_runner_server, {"url": "not a url", "runners": ["x"]}).json()
    issue = bad["data"]["issues"][0]
    assert (issue["code"], issue["format"], issue["path"]) == ("invalid_format", "url", ["url"])


def test_malformed_json_without_content_type(cli_runner_server):
    response = httpx.post(f"{cli_runner_server}/api/runner/execute", content=b"{oops")
    assert response.status_code == 400
    assert response.json() == OBSERVED_MALFORMED
