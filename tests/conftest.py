from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import httpx
import pytest

from helpers import PageServer, cli_process, free_port, serve_app
from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV
from runners_orchestrator.runner_server import RunnerServerConfig, create_runner_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator


@pytest.fixture(scope="session")
def pages() -> Iterator[PageServer]:
    """Test pages on 127.0.0.1."""
    with PageServer() as server:
        yield server


@pytest.fixture(scope="session")
def runner_url() -> Iterator[str]:
    """A runner server with the default configuration, on a real socket."""
    with serve_app(create_runner_app(RunnerServerConfig(region="us-east-1", capacity=64))) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def cli_runner_server() -> Iterator[str]:
    """A runner server started by the command line, in its own process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ("runner-server", "--port", str(port), "--region", "us-east-1", "--capacity", "4")
    with cli_process(*args, health_url=f"{base}/api/runner/health"):
        yield base


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness  # noqa: PLC0415 - slow import

    with pytest.MonkeyPatch.context() as patch:
        for key, value in EMBEDDED_PREFECT_ENV.items():
            patch.setenv(key, value)
        with prefect_test_harness(server_startup_timeout=60):
            yield


@pytest.fixture
def project_helpers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a temporary project's own `helpers` package be imported here, and forget it after.

    Discovery puts the project root on sys.path and imports its modules: both are undone.
    The tests' own `helpers` module (tests/helpers.py) is hidden meanwhile: a process has
    one module of a name, and here it must be the project's.
    """
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "helpers")
    yield
    for name in [n for n in sys.modules if n == "helpers" or n.startswith("helpers.")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test reads settings anew, from its own environment."""
    from runners_orchestrator.settings import get_settings  # noqa: PLC0415

    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


logging.getLogger("httpx").setLevel(logging.WARNING)
