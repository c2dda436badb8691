from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from runners_orchestrator.discovery import discover

if TYPE_CHECKING:
    from prefect import Flow

FLOWS = Path(__file__).parents[2] / "flows"


@pytest.fixture(scope="session")
def seed_flows(prefect_server) -> dict[str, Flow[Any, Any]]:
    """The seed's plain functions as discovery wraps them in Prefect flows, as served."""
    found = discover(FLOWS.parent)
    return {
        name: found.workflows[name].flow
        for name in ("orchestrate_runners", "execute_single_runner")
    }


def use_registry(monkeypatch: pytest.MonkeyPatch, *servers: tuple[str, str, str, int]) -> None:
    """Point the orchestrator at these (id, base URL, region, capacity) runner servers."""
    entries = [
        {"id": sid, "url": f"{base}/api/runner", "region": region, "capacity": capacity}
        for sid, base, region, capacity in servers
    ]
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", json.dumps({"servers": entries}))
