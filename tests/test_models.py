from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from runners_orchestrator import Attempt, ExecuteRequest, JobResult, RunnerJob, RunnerResult


def test_camel_and_snake_case_are_both_accepted():
    camel = RunnerResult.model_validate(
        {"name": "a", "status": "error", "errorMessage": "x", "durationMs": 3}
    )
    snake = RunnerResult.model_validate(
        {"name": "a", "status": "error", "error_message": "x", "duration_ms": 3}
    )
    assert camel == snake
    assert camel.to_wire() == {"name": "a", "status": "error", "errorMessage": "x", "durationMs": 3}


def test_wire_form_is_camel_case_without_unset_fields():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    job = JobResult(
        job_id="j1",
        job=RunnerJob(url="http://a.example/", runners=["x"]),
        state="completed",
        started_at=now,
        completed_at=now,
        duration_ms=0,
        attempts=1,
    )
    assert job.to_wire() == {
        "jobId": "j1",
        "job": {"url": "http://a.example/", "runners": ["x"]},
        "state": "completed",
        "results": [],
        "attempts": 1,
        "tries": [],
        "startedAt": "2026-01-02T03:04:05Z",
        "completedAt": "2026-01-02T03:04:05Z",
        "durationMs": 0,
    }


def test_a_job_keeps_the_fields_it_was_given_beyond_the_known_ones():
    given = {
        "url": "http://a.example/",
        "runners": ["x"],
        "region": "eu-west-1",
        "name": "checkout page",
        "tags": ["shop"],
    }
    job = RunnerJob.model_validate(given)
    assert job.to_wire() == given
    assert RunnerJob.model_validate(job.to_wire()) == job


@pytest.mark.parametrize(
    "url", ["http://example.org", "https://example.org/a?b=c", "HTTP://127.0.0.1:8080/"]
)
def test_http_urls_are_kept_as_given(url):
    assert RunnerJob(url=url, runners=["x"]).url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
        ("example.org", "scheme 'none' is not allowed"),
        ("http://", "it has no host"),
        ("http://example.org:99999/", "Invalid URL"),
    ],
)
def test_other_urls_are_refused_with_the_reason(url, reason):
    with pytest.raises(ValidationError, match=reason):
        RunnerJob(url=url, runners=["x"])


def test_job_needs_a_runner_and_a_positive_timeout():
    with pytest.raises(ValidationError, match="runners"):
        RunnerJob(url="http://a.example", runners=[])
    with pytest.raises(ValidationError, match="timeout"):
        RunnerJob(url="http://a.example", runners=["x"], timeout=0)


def test_execute_request_merges_input_with_top_level_url_winning():
    request = ExecuteRequest.model_validate(
        {
            "url": "http://top.example/",
            "input": {"url": "http://shared.example/", "depth": 1},
            "runners": ["a", {"name": "b", "input": {"url": "http://own.example/", "depth": 2}}],
        }
    )
    specs = request.runner_specs()
    assert [(s.name, s.input) for s in specs] == [
        ("a", {"url": "http://top.example/", "depth": 1}),
        ("b", {"url": "http://top.example/", "depth": 2}),
    ]


def test_runner_input_url_is_used_without_a_top_level_url():
    request = ExecuteRequest.model_validate(
        {"runners": [{"name": "b", "input": {"url": "http://own.example/"}}]}
    )
    assert request.runner_specs()[0].input == {"url": "http://own.example/"}


def test_failovers_count_moves_after_a_failure_not_after_a_429():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    tries = [
        Attempt(server="a", outcome="refused", duration_ms=1),
        Attempt(server="b", outcome="busy", duration_ms=1, status=429),
        Attempt(server="c", outcome="server_error", duration_ms=1, status=503),
        Attempt(server="c", outcome="server_error", duration_ms=1, status=503),
        Attempt(server="d", outcome="ok", duration_ms=1, status=200),
    ]
    result = JobResult(
        job_id="j1",
        job=RunnerJob(url="http://a.example/", runners=["x"]),
        state="completed",
        started_at=now,
        completed_at=now,
        duration_ms=0,
        attempts=len(tries),
        tries=tries,
    )
    assert result.failovers == 2  # a → b and c → d; b → c followed a 429
    assert JobResult.model_validate(result.to_wire()) == result
