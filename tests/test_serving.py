"""What `serve-flows --reload` watches, on a temporary project with shared code."""

from __future__ import annotations

import asyncio
import textwrap
from typing import TYPE_CHECKING

import pytest

from runners_orchestrator.serving import _next_change, watched_paths

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PATTERNS = ["flows/**/*.py", "src/flows/**/*.py"]


@pytest.fixture
def project(tmp_path: Path, project_helpers) -> Path:
    files = {
        "pyproject.toml": '[project]\nname = "shop"\n',
        "helpers/__init__.py": "",
        "helpers/shared.py": "def normalise(name: str) -> str:\n    return name\n",
        "common.py": "LIMIT = 3\n",
        "flows/checks.py": """
            import common
            from helpers.shared import normalise

            async def check(name: str) -> str:
                return normalise(name) * common.LIMIT
            """,
        "scripts/tool.py": "print('not imported by any workflow')\n",
    }
    for relative, content in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(textwrap.dedent(content))
    return tmp_path


def test_reload_watches_the_flows_and_the_project_modules_they_import(project):
    assert watched_paths(project, PATTERNS) == [
        project / "common.py",
        project / "flows",
        project / "helpers",
    ]


def test_a_duplicate_name_leaves_the_workflow_folders_watched(project):
    (project / "flows" / "copy.py").write_text("async def check() -> None: ...\n")
    assert watched_paths(project, PATTERNS) == [project / "flows"]


async def changed_after(project: Path, edit: Callable[[], object], timeout: float = 6) -> bool:
    """Whether a watch over ``project`` (as --reload sets it up) returns after ``edit``."""
    stop = asyncio.Event()
    watching = asyncio.ensure_future(_next_change(watched_paths(project, PATTERNS), project, stop))
    await asyncio.sleep(0.5)  # the watchers are set up
    edit()
    done, _ = await asyncio.wait({watching}, timeout=timeout)
    stop.set()
    await watching
    return bool(done)


async def test_an_edited_helper_is_a_change(project):
    assert await changed_after(project, (project / "helpers" / "shared.py").touch)


async def test_a_new_package_at_the_root_is_a_change(project):
    # A workflow file may be waiting for it: "No module named 'reports'".
    assert await changed_after(project, (project / "reports").mkdir)


async def test_files_no_workflow_imports_are_not_a_change(project):
    def edit() -> None:
        (project / "scripts" / "tool.py").touch()
        (project / "notes.md").write_text("not Python\n")
        (project / ".state").mkdir()

    assert not await changed_after(project, edit, timeout=3)


async def test_stop_ends_the_watch_at_once(project):
    stop = asyncio.Event()
    watching = asyncio.ensure_future(_next_change(watched_paths(project, PATTERNS), project, stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(watching, 2)
