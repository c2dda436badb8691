from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from runners_orchestrator import ConfigurationError
from runners_orchestrator.settings import get_settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path

PYPROJECT = """
[project]
name = "someone-elses-project"

[tool.runners-orchestrator]
pattern = "checks/**/*.py"
route_prefix = "/checks"
max_concurrency = 7
load_balancer = "round-robin"

[tool.runners-orchestrator.registry]
type = "in-memory"
servers = [
  { id = "us-1", url = "http://127.0.0.1:3001/api/runner/", region = "us-east-1", capacity = 4 },
]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    nested = tmp_path / "flows" / "deep"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)  # the project root is found from below
    return tmp_path


def test_defaults_without_any_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.pattern == ["flows/**/*.py", "src/flows/**/*.py"]
    assert settings.registry.type == "in-memory"
    assert settings.registry.servers == []
    assert settings.load_balancer.type == "least-load"
    assert settings.route_prefix == "/api/orchestrator"
    assert settings.api_token is None
    assert settings.api_url is None


def test_pyproject_table_is_read(project):
    settings = get_settings()
    assert settings.pattern == ["checks/**/*.py"]
    assert settings.route_prefix == "/checks"
    assert settings.max_concurrency == 7
    assert settings.load_balancer.type == "round-robin"
    (server,) = settings.registry.servers
    assert (server.id, server.url, server.region, server.capacity) == (
        "us-1",
        "http://127.0.0.1:3001/api/runner",
        "us-east-1",
        4,
    )


def test_environment_wins_over_pyproject(project, monkeypatch):
    registry = {"servers": [{"id": "eu-1", "url": "http://127.0.0.1:4001/api/runner"}]}
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", json.dumps(registry))
    monkeypatch.setenv("ORCHESTRATOR_LOAD_BALANCER", '{"type": "weighted"}')
    monkeypatch.setenv("ORCHESTRATOR_PATTERN", '["a/*.py", "b/*.py"]')
    monkeypatch.setenv("ORCHESTRATOR_API_TOKEN", "s3cret")
    settings = get_settings()
    assert [s.id for s in settings.registry.servers] == ["eu-1"]
    assert settings.load_balancer.type == "weighted"
    assert settings.pattern == ["a/*.py", "b/*.py"]
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.max_concurrency == 7  # still from pyproject


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        (
            "ORCHESTRATOR_REGISTRY",
            '{"servers": [}',
            "ORCHESTRATOR_REGISTRY (or `registry` in [tool.runners-orchestrator]): "
            'not valid JSON (at char 13): expected {"type": "in-memory"',
        ),
        (
            "ORCHESTRATOR_REGISTRY",
            '{"servers": [{"id": "a", "url": "ftp://x"}]}',
            "ORCHESTRATOR_REGISTRY (or `registry` in [tool.runners-orchestrator]) at "
            "servers.0.url: Invalid URL: scheme 'ftp' is not allowed",
        ),
        (
            "ORCHESTRATOR_REGISTRY",
            '{"servers": [{"id": "a", "url": "http://h/"}, {"id": "a", "url": "http://i/"}]}',
            "two servers have the id 'a'",
        ),
        (
            "ORCHESTRATOR_MAX_CONCURRENCY",
            "many",
            "ORCHESTRATOR_MAX_CONCURRENCY (or `max_concurrency` in [tool.runners-orchestrator]): "
            "Input should be a valid integer, unable to parse string as an integer; got many",
        ),
        ("ORCHESTRATOR_JOB_TIMEOUT", "-1", "Input should be greater than 0; got -1"),
        ("ORCHESTRATOR_ROUTE_PREFIX", "api", "must start with '/'"),
        ("ORCHESTRATOR_API_TOKEN", " ", "is empty; unset it to turn authentication off"),
    ],
)
def test_bad_values_name_the_setting_the_value_and_the_expectation(
    tmp_path, monkeypatch, env, value, expected
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    assert expected in str(caught.value)


def test_bad_pyproject_value_is_reported_too(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.runners-orchestrator]\nmax_attempts = 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"max_attempts.*greater than or equal to 1"):
        get_settings()
