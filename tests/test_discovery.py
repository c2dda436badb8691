"""Discovery on a temporary project laid out as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import Flow

from helpers import CLI
from runners_orchestrator import ConfigurationError, WorkflowNotFoundError
from runners_orchestrator import discovery as module
from runners_orchestrator.discovery import discover, load_workflow_flow, to_camel, to_snake
from runners_orchestrator.exceptions import DuplicateWorkflowError

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


def test_an_unchanged_file_gives_the_same_workflow_and_flow_again(project):
    # The API discovers every second: its workflows' flows must not be built again each time.
    first = discover().get("nightly_audit")
    flow = first.flow
    again = discover().get("nightly_audit")
    assert again is first
    assert again.flow is flow
    path = first.source
    path.write_text(path.read_text() + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    changed = discover().get("nightly_audit")
    assert changed is not first
    assert changed.flow is not flow


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


# A project that keeps shared code beside its flows: `helpers/` at the root.
HELPER_PROJECT = {
    "pyproject.toml": '[project]\nname = "shop"\n',
    "helpers/__init__.py": "",
    "helpers/base.py": 'GREETING = "hello"\n',
    "helpers/shared.py": """
        from .base import GREETING

        def normalise(name: str) -> str:
            return f"{GREETING} {name.strip().lower()}"
        """,
    "flows/checks.py": """
        from helpers.base import GREETING
        from helpers.shared import normalise

        async def check(name: str = GREETING) -> str:
            return normalise(name)
        """,
    "flows/more/audit.py": """
        import helpers.shared

        async def audit(name: str) -> str:
            return helpers.shared.normalise(name)
        """,
    "flows/plain.py": "async def plain() -> int:\n    return 1\n",
    "docs/README.md": "a folder to run commands from\n",
}


def edit(path: Path, text: str) -> None:
    """Rewrite ``path`` with a modification time that differs, however coarse the clock."""
    path.write_text(textwrap.dedent(text))
    later = time.time_ns() + 1_000_000
    os.utime(path, ns=(later, later))


@pytest.fixture
def helper_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_helpers) -> Path:
    """The project, discovered from a subfolder."""
    write(tmp_path, HELPER_PROJECT)
    monkeypatch.chdir(tmp_path / "docs")
    return tmp_path


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_workflow_file_imports_the_projects_own_package_from_a_subfolder(helper_project):
    found = discover()
    assert found.names() == ["audit", "check", "plain"]
    assert found.broken == []
    assert run(found.get("check").fn(" Shop ")) == "hello shop"
    assert found.get("check").parameters["properties"]["name"]["default"] == "hello"
    assert found.project_imports == {
        helper_project / "helpers" / name for name in ("__init__.py", "base.py", "shared.py")
    }
    discover()
    load_workflow_flow("flows/checks.py:check", helper_project)
    assert sys.path.count(str(helper_project)) == 1  # first, and only once
    assert sys.path[0] == str(helper_project)


def test_changed_helper_reimports_only_the_workflow_files_that_import_it(helper_project):
    first = discover()
    plain, shared = first.get("plain").fn, sys.modules["helpers.shared"]
    edit(
        helper_project / "helpers" / "base.py", 'GREETING = "bonjour"\n'
    )  # imported through shared

    second = discover()
    assert second.get("plain").fn is plain  # imports no helper: not re-imported
    assert run(second.get("check").fn(" Shop ")) == "bonjour shop"
    assert run(second.get("audit").fn("Shop")) == "bonjour shop"
    assert second.get("check").parameters["properties"]["name"]["default"] == "bonjour"
    # The stale modules were executed again, once, for both workflow files.
    assert sys.modules["helpers.shared"] is not shared
    assert second.get("audit").fn.__globals__["helpers"].shared is sys.modules["helpers.shared"]
    assert second.get("check").fn.__globals__["normalise"].__module__ == "helpers.shared"

    third = discover()  # nothing changed since: everything from the cache
    assert third.get("check").fn is second.get("check").fn


def test_unchanged_project_with_helpers_is_not_imported_again(helper_project):
    discover()
    cached = {path: module._cache[path] for path in (helper_project / "flows").rglob("*.py")}
    discover()
    assert all(module._cache[path] is entry for path, entry in cached.items())


def test_broken_helper_is_named_with_the_workflow_files_it_breaks(helper_project):
    discover()
    edit(helper_project / "helpers" / "shared.py", "from .base import GREETING\nRATE = 1 / 0\n")
    found = discover()
    assert found.names() == ["plain"]
    shared = helper_project / "helpers" / "shared.py"
    assert {b.path.name: b.helper for b in found.broken} == {
        "checks.py": shared,
        "audit.py": shared,
    }
    error = "helpers/shared.py (module helpers.shared) failed to import: ZeroDivisionError"
    assert all(b.error.startswith(error) for b in found.broken)
    assert found.problems() == [
        f"{error}: division by zero; skipped the workflow files importing it: "
        "flows/checks.py, flows/more/audit.py"
    ]
    with pytest.raises(ImportError, match=r"flows/checks.py failed to import: helpers/shared.py"):
        load_workflow_flow("flows/checks.py:check", helper_project)

    edit(helper_project / "helpers" / "shared.py", HELPER_PROJECT["helpers/shared.py"])
    fixed = discover()
    assert fixed.names() == ["audit", "check", "plain"]
    assert run(fixed.get("check").fn("Shop")) == "hello shop"


def test_an_error_in_a_helper_function_called_at_import_is_the_workflow_files(helper_project):
    write(
        helper_project, {"flows/eager.py": "from helpers.shared import normalise\nnormalise(1)\n"}
    )
    (broken,) = discover().broken
    assert broken.path.name == "eager.py"
    assert broken.helper is None  # helpers.shared imported fine; the workflow file misused it
    assert broken.error == "AttributeError: 'int' object has no attribute 'strip'"


def test_missing_project_module_is_imported_once_it_exists(helper_project):
    write(
        helper_project, {"flows/later.py": "from helpers.extra import X\nasync def later(): ...\n"}
    )
    (broken,) = discover().broken
    assert broken.error == "ModuleNotFoundError: No module named 'helpers.extra'"
    write(helper_project, {"helpers/extra.py": "X = 1\n"})
    assert "later" in discover().names()


def test_a_module_hiding_the_projects_package_is_named(tmp_path, monkeypatch):
    # Here tests/helpers.py is imported as `helpers`, as an application embedding the API may
    # have a module of the project package's name: the message says so.
    write(tmp_path, HELPER_PROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    found = discover()
    assert found.names() == ["plain"]
    error = found.broken[0].error
    assert error.startswith("ModuleNotFoundError: No module named 'helpers.")
    assert "'helpers' is already imported from " in error
    assert "tests/helpers.py in this process, which hides the project's helpers" in error


def test_list_imports_helpers_from_a_subfolder_and_names_a_broken_one(tmp_path):
    # The installed console script: unlike `python -m`, it puts no working directory on sys.path.
    write(tmp_path, HELPER_PROJECT)
    script = [str(Path(sys.executable).with_name("runners-orchestrator")), "list"]
    listed = subprocess.run(
        script, cwd=tmp_path / "docs", capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert "check(name?)  [flows/checks.py:check]" in listed.stdout
    assert "audit(name)  [flows/more/audit.py:audit]" in listed.stdout
    assert listed.stderr == ""

    (tmp_path / "helpers" / "shared.py").write_text("def normalise(:\n")
    listed = subprocess.run(
        script, cwd=tmp_path / "docs", capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0
    assert listed.stdout == "plain()  [flows/plain.py:plain]\n"
    assert listed.stderr == (
        "runners-orchestrator: warning: helpers/shared.py (module helpers.shared) failed to "
        "import: SyntaxError: invalid syntax (shared.py, line 1); skipped the workflow files "
        "importing it: flows/checks.py, flows/more/audit.py\n"
    )
