"""Replay the requests of ``shared/TS-CONTRACT.md`` against our runner server, over a socket.

The observed TypeScript answers are copied here verbatim. Field names must match byte for
byte; values that depend on the page or the clock (titles, durations) may differ. Where the
TypeScript server answers 500 for a client's mistake, ours answers the right 4xx with the
same body shape, as the contract asks.

Every execute request is sent in both forms a TypeScript client uses: plain JSON, and
wrapped as ``{"json": body}`` by the upstream orchestrator's oRPC client, which reads its
answer (and its errors) from the reply's ``json`` member only.
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


@pytest.fixture(params=["plain", "orpc"])
def form(request: pytest.FixtureRequest) -> str:
    """How the client sends its body and reads the answer: plain, or the oRPC wrapper."""
    return str(request.param)


def execute(base: str, body: Any, form: str = "plain") -> tuple[int, Any]:
    """POST ``body`` in ``form``; return the status and the answer, unwrapped.

    An oRPC client reads nothing but the reply's ``json`` member, so a wrapped request must
    get exactly ``{"json": answer}``; a plain client must get the answer itself.
    """
    sent = {"json": body} if form == "orpc" else body
    response = httpx.post(f"{base}/api/runner/execute", json=sent, timeout=30)
    answer = response.json()
    if form == "orpc":
        assert list(answer) == ["json"], answer
        return response.status_code, answer["json"]
    assert "json" not in answer, answer
    return response.status_code, answer


def test_info(cli_runner_server):
    ours = httpx.get(f"{cli_runner_server}/api/runner/info").json()
    # One field of ours on top of theirs, which a TypeScript client ignores: the engine.
    assert ours.pop("engine") == "http"
    assert shape(ours) == shape(OBSERVED_INFO)
    assert {"exampleTitleVisibleTest", "cookieBannerVisibleTest"} <= set(ours["runners"])


@pytest.mark.parametrize(
    "case",
    [
        ("/title", "exampleTitleVisibleTest", OBSERVED_TITLE_PASS),
        ("/banner-visible", "cookieBannerVisibleTest", OBSERVED_BANNER_PASS),
        ("/banner-missing", "cookieBannerVisibleTest", OBSERVED_BANNER_FAIL),
    ],
    ids=["title-pass", "banner-pass", "banner-fail"],
)
def test_execute_results(cli_runner_server, pages, form, case):
    path, runner, observed = case
    status, ours = execute(cli_runner_server, {"url": pages.url(path), "runners": [runner]}, form)
    assert status == 200
    assert shape(ours) == shape(observed)
    assert ours["results"][0]["status"] == observed["results"][0]["status"]
    assert ours["results"][0]["details"] | {"title": "-"} == observed["results"][0]["details"] | {
        "title": "-"
    }


def test_unknown_runner_has_the_envelope_with_a_404(cli_runner_server, pages, form):
    body = {"url": pages.url("/title"), "runners": ["noSuchRunner", "exampleTitleVisibleTest"]}
    status, ours = execute(cli_runner_server, body, form)
    assert status == 404
    assert shape(ours) | {"data": None} == shape(OBSERVED_NOT_FOUND) | {"data": None}
    assert set(ours["data"]) == set(OBSERVED_NOT_FOUND["data"])
    assert ours["status"] == 404
    assert ours["data"]["missingRunners"] == ["noSuchRunner"]


def test_invalid_runner_input_has_the_envelope_with_a_400(cli_runner_server, form):
    body = {"runners": [{"name": "exampleTitleVisibleTest", "input": {"url": "nope"}}]}
    status, ours = execute(cli_runner_server, body, form)
    assert status == 400
    assert ours["code"] == OBSERVED_INPUT_INVALID["code"]
    assert ours["message"] == OBSERVED_INPUT_INVALID["message"]
    assert set(ours["data"]) == set(OBSERVED_INPUT_INVALID["data"])
    issue = ours["data"]["issues"][0]
    assert {"path", "message", "code"} <= set(issue)
    assert issue["path"] == ["url"]


def test_empty_runners(cli_runner_server, form):
    status, ours = execute(cli_runner_server, {"url": "https://example.com/", "runners": []}, form)
    assert status == 400
    assert ours == OBSERVED_EMPTY_RUNNERS


def test_missing_runners_and_bad_url(cli_runner_server, form):
    status, missing = execute(cli_runner_server, {"url": "https://example.com/"}, form)
    assert status == 400
    issue = missing["data"]["issues"][0]
    assert (issue["code"], issue["path"]) == ("invalid_type", ["runners"])
    assert {"expected", "code", "path", "message"} <= set(issue)
    status, bad = execute(cli_runner_server, {"url": "not a url", "runners": ["x"]}, form)
    assert status == 400
    issue = bad["data"]["issues"][0]
    assert (issue["code"], issue["format"], issue["path"]) == ("invalid_format", "url", ["url"])


def test_malformed_json_without_content_type(cli_runner_server):
    response = httpx.post(f"{cli_runner_server}/api/runner/execute", content=b"{oops")
    assert response.status_code == 400
    assert response.json() == OBSERVED_MALFORMED


@pytest.mark.parametrize("raw", [b"{oops", b'{"json": {"url": '])
def test_malformed_json_is_answered_plain_even_if_it_starts_like_the_wrapper(
    cli_runner_server, raw
):
    # Nothing that cannot be parsed says the client wants the wrapper.
    response = httpx.post(f"{cli_runner_server}/api/runner/execute", content=raw)
    assert response.status_code == 400
    assert response.json() == OBSERVED_MALFORMED


def test_the_typescript_orchestrators_request_gets_a_reply_it_can_read(cli_runner_server, pages):
    # What its oRPC client sends (TS-CONTRACT.md): runners with their own input, the region,
    # the run id, all wrapped; it reads `results` from the reply's `json` member.
    url = pages.url("/banner-visible")
    request = {
        "json": {
            "url": url,
            "runners": [{"name": "cookieBannerVisibleTest", "input": {"url": url}}],
            "runId": "run-ts-1",
            "region": "us-east-1",
        }
    }
    response = httpx.post(f"{cli_runner_server}/api/runner/execute", json=request, timeout=30)
    assert response.status_code == 200
    reply = response.json()
    assert list(reply) == ["json"]
    assert shape(reply["json"]) == shape(OBSERVED_BANNER_PASS | {"runId": "-"})
    assert reply["json"]["runId"] == "run-ts-1"
    assert reply["json"]["results"][0]["details"] == OBSERVED_BANNER_PASS["results"][0]["details"]


def test_wrapper_with_meta_is_read_as_wrapped(cli_runner_server, pages):
    # The TypeScript server refuses {"json", "meta"} with a 400. Ours reads it as the oRPC
    # client's form (that client adds `meta` when the input holds a Date, a Set, ...) and
    # ignores `meta`; see docs/runner-server.md.
    body = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
    response = httpx.post(
        f"{cli_runner_server}/api/runner/execute", json={"json": body, "meta": []}, timeout=30
    )
    assert response.status_code == 200
    reply = response.json()
    assert list(reply) == ["json"]
    assert shape(reply["json"]) == shape(OBSERVED_TITLE_PASS)
