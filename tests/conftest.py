from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from helpers import PageServer, cli_process, free_port, serve_app
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
