"""Discovery on a temporary project laid out as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from prefect import Flow

from helpers import CLI
from runners_orchestrator import ConfigurationError, WorkflowNotFoundError
from runners_orchestrator import discovery as module
from runners_orchestrator.discovery import discover, load_workflow_flow, to_camel, to_snake
from runners_orchestrator.exceptions import DuplicateWorkflowError

if TYPE_CHECKING:
    from pathlib import Path

FILES = {
    "pyproject.toml": '[project]\nname = "demo"\n',
    "flows/checks.py": '''
        from prefect import flow
        from helpers_lib import imported_workflow  # imported: not ours

        async def nightly_audit(urls: list[str], depth: int = 1) -> int:
            """Audit every URL.

            Runs nightly.
            """
            return len(urls) * depth

        async def _private_helper() -> None: ...

        def sync_function() -> None: ...

        class Checker:
            async def method(self) -> None: ...

        make = lambda: None

        @flow(name="decorated-flow")
        async def decorated(x: int) -> int:
            return x
        ''',
    "flows/nested/deeper/more.py": """
        async def deep_check(region: str | None = None) -> str:
            return region or "any"
        """,
    "flows/broken.py": "async def oops(:\n",
    "src/flows/extra.py": "async def from_src() -> None: ...\n",
    "helpers_lib.py": "async def imported_workflow() -> None: ...\n",
    "not_flows/ignored.py": "async def ignored() -> None: ...\n",
}


def write(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write(tmp_path, FILES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # so flows can import helpers_lib
    return tmp_path


def test_discovers_public_async_functions_defined_in_the_files(project):
    found = discover()
    assert found.names() == ["decorated", "deep_check", "from_src", "nightly_audit"]
    (broken,) = found.broken
    assert broken.path == project / "flows" / "broken.py"
    assert broken.error.startswith("SyntaxError")


def test_workflow_carries_flow_schema_description_and_entrypoint(project):
    workflow = discover().get("nightly_audit")
    assert isinstance(workflow.flow, Flow)
    assert workflow.flow.name == "nightly_audit"
    assert workflow.description == "Audit every URL.\n\nRuns nightly."
    assert workflow.entrypoint == "flows/checks.py:nightly_audit"
    assert workflow.source == project / "flows" / "checks.py"
    schema = workflow.parameters
    assert schema["required"] == ["urls"]
    assert schema["properties"]["depth"]["default"] == 1
    assert schema["properties"]["urls"]["type"] == "array"


def test_decorated_flow_is_taken_as_it_is(project):
    workflow = discover().get("decorated")
    assert workflow.flow.name == "decorated-flow"


def test_camel_case_resolves_to_the_same_workflow(project):
    found = discover()
    assert found.get("nightlyAudit") is found.get("nightly_audit")
    assert "deepCheck" in found
    assert to_camel("orchestrate_runners") == "orchestrateRunners"
    assert to_snake("orchestrateRunners") == "orchestrate_runners"


def test_unknown_workflow_lists_the_available_ones(project):
    with pytest.raises(WorkflowNotFoundError, match="available: decorated, deep_check"):
        discover().get("nope")


def test_duplicate_names_name_both_files(project):
    write(project, {"flows/copy.py": "async def nightly_audit() -> None: ...\n"})
    with pytest.raises(DuplicateWorkflowError) as caught:
        discover()
    message = str(caught.value)
    assert "flows/checks.py" in message
    assert "flows/copy.py" in message


def test_reserved_route_names_are_refused(project):
    write(project, {"flows/api.py": "async def runs() -> None: ...\n"})
    with pytest.raises(ConfigurationError, match="name the HTTP API uses for its own routes"):
        discover()


def test_custom_pattern(project, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_PATTERN", "not_flows/*.py")
    assert discover().names() == ["ignored"]


def test_changed_file_is_imported_again_and_unchanged_ones_are_not(project):
    first = discover()
    audit = first.get("nightly_audit").fn
    path = project / "flows" / "nested" / "deeper" / "more.py"
    path.write_text("async def renamed_check() -> None: ...\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    second = discover()
    assert "renamed_check" in second.names()
    assert "deep_check" not in second.names()
    assert second.get("nightly_audit").fn is audit  # not re-imported


def test_generated_entrypoint_loads_a_flow_in_a_fresh_process(project):
    flow = load_workflow_flow("flows/checks.py:nightly_audit", project)
    assert isinstance(flow, Flow)
    script = (
        "from runners_orchestrator.discovery import load_workflow_flow;"
        f"f = load_workflow_flow('flows/nested/deeper/more.py:deep_check', {str(project)!r});"
        "print(type(f).__name__, f.name)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Flow deep_check"


def test_list_command(project):
    result = subprocess.run([*CLI, "list"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "nightly_audit(urls, depth?)  [flows/checks.py:nightly_audit]" in result.stdout
    assert "    Audit every URL." in result.stdout
    assert "skipped flows/broken.py: SyntaxError" in result.stderr
    as_json = subprocess.run([*CLI, "list", "--json"], capture_output=True, text=True, check=True)
    listed = {w["name"]: w for w in json.loads(as_json.stdout)}
    assert listed["nightly_audit"]["camelName"] == "nightlyAudit"
    assert listed["nightly_audit"]["parameters"]["required"] == ["urls"]


def test_list_exits_non_zero_on_duplicates(project):
    write(project, {"flows/copy.py": "async def nightly_audit() -> None: ...\n"})
    result = subprocess.run([*CLI, "list"], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "runners-orchestrator: error: two workflows are named 'nightly_audit': "
        "flows/checks.py and flows/copy.py; rename one of them"
    )


def test_discovering_500_files_is_fast_once_imported(tmp_path, monkeypatch):
    # A benchmark lives in bench/discovery_500.py; here only the cache is checked to work.
    write(tmp_path, {"pyproject.toml": "[project]\nname='big'\n"})
    for i in range(500):
        write(
            tmp_path,
            {f"flows/pkg{i % 10}/wf_{i}.py": f"async def wf_{i}(n: int) -> int:\n    return n\n"},
        )
    monkeypatch.chdir(tmp_path)
    assert len(discover().names()) == 500
    imported = dict(module._cache)
    again = discover()
    assert len(again.names()) == 500
    assert all(module._cache[p] is imported[p] for p in imported)
