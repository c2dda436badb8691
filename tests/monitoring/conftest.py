"""Monitoring fixtures: a webhook receiver, a page that toggles, the recording flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from monitoring_helpers import TogglePage, WebhookReceiver

from helpers import PAGES
from runners_orchestrator.discovery import discover

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).parents[2]


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def toggle_page(pages) -> Iterator[TogglePage]:
    page = TogglePage(pages)
    yield page
    PAGES.pop(page.path, None)


@pytest.fixture(scope="session")
def orchestrate(prefect_server) -> Callable[..., Any]:
    """The seed's orchestration flow as discovery serves it (it records its result)."""
    return discover(ROOT).get("orchestrate_runners").flow


@pytest.fixture
def use_runner(monkeypatch, runner_url) -> str:
    """The orchestrator's registry: the session's runner server, region us-east-1."""
    registry = {
        "servers": [{"id": "us-1", "url": f"{runner_url}/api/runner", "region": "us-east-1"}]
    }
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", json.dumps(registry))
    return runner_url
