from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prefect import Flow, flow

if TYPE_CHECKING:
    from types import ModuleType

FLOWS = Path(__file__).parents[2] / "flows"


def load_seed() -> ModuleType:
    """The seed workflows, loaded from flows/ as a user's file would be."""
    spec = importlib.util.spec_from_file_location(
        "orchestrate_runners", FLOWS / "orchestrate_runners.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def seed_flows(prefect_server) -> dict[str, Flow[Any, Any]]:
    """The seed's plain functions wrapped as Prefect flows (discovery will do this)."""
    seed = load_seed()
    return {
        "orchestrate_runners": flow(seed.orchestrate_runners),
        "execute_single_runner": flow(seed.execute_single_runner),
    }


def use_registry(monkeypatch: pytest.MonkeyPatch, *servers: tuple[str, str, str, int]) -> None:
    """Point the orchestrator at these (id, base URL, region, capacity) runner servers."""
    entries = [
        {"id": sid, "url": f"{base}/api/runner", "region": region, "capacity": capacity}
        for sid, base, region, capacity in servers
    ]
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", json.dumps({"servers": entries}))
