"""Discovery time for a project of 500 workflow files: cold, warm, and after one change.

Two projects, each measured in a fresh process: workflow files importing only installed
packages, and workflow files that each import the project's own ``helpers/shared.py``.

Usage: python bench/discovery_500.py [--files 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runners_orchestrator.discovery import discover

TEMPLATE = '''"""Workflow {i}."""

from runners_orchestrator import RunnerJob
{imports}

async def workflow_{i}(jobs: list[RunnerJob], depth: int = 1) -> int:
    """Check {i}."""
    return len(jobs) * depth


async def _helper_{i}() -> None: ...
'''

HELPER_IMPORT = "from helpers.shared import normalise\n"


def _touch(path: Path, text: str) -> None:
    path.write_text(text)
    later = time.time_ns() + 1_000_000  # a distinct modification time, however coarse the clock
    os.utime(path, ns=(later, later))


def measure(files: int, *, helpers: bool) -> dict[str, float]:
    """Milliseconds for each step, in a fresh temporary project."""
    imports = HELPER_IMPORT if helpers else ""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "pyproject.toml").write_text("[project]\nname = 'bench'\n")
        if helpers:
            (root / "helpers").mkdir()
            (root / "helpers" / "__init__.py").write_text("")
            _touch(root / "helpers" / "shared.py", "def normalise(s: str) -> str:\n    return s\n")
        for i in range(files):
            path = root / "flows" / f"team{i % 20}" / f"wf_{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(TEMPLATE.format(i=i, imports=imports))
        os.chdir(root)

        started = time.perf_counter()
        found = discover()
        figures["cold"] = time.perf_counter() - started
        assert len(found.workflows) == files, found.problems()

        warm = []
        for _ in range(20):
            started = time.perf_counter()
            discover()
            warm.append(time.perf_counter() - started)
        figures["warm"] = statistics.median(warm)

        _touch(root / "flows" / "team0" / "wf_0.py", TEMPLATE.format(i=0, imports=imports) + "#\n")
        started = time.perf_counter()
        discover()
        figures["one file changed"] = time.perf_counter() - started

        if helpers:
            _touch(
                root / "helpers" / "shared.py", "def normalise(s: str) -> str:\n    return s\n#\n"
            )
            started = time.perf_counter()
            again = discover()
            figures["helper changed"] = time.perf_counter() - started
            assert len(again.workflows) == files, again.problems()
        else:
            started = time.perf_counter()
            for workflow in found.workflows.values():
                _ = workflow.parameters
            figures["schemas"] = time.perf_counter() - started
        os.chdir(Path(folder).parent)
    return {step: seconds * 1000 for step, seconds in figures.items()}


def _in_fresh_process(files: int, *, helpers: bool) -> dict[str, float]:
    args = [sys.executable, __file__, "--files", str(files), "--only", str(int(helpers))]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    figures: dict[str, float] = json.loads(result.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--only", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only is not None:
        print(json.dumps(measure(args.files, helpers=bool(args.only))))
        return
    plain = _in_fresh_process(args.files, helpers=False)
    shared = _in_fresh_process(args.files, helpers=True)
    print(f"{args.files} files, one workflow each")
    print(f"cold (import every file)      {plain['cold']:8.1f} ms")
    print(f"warm (cached, median of 20)   {plain['warm']:8.1f} ms")
    print(f"one file changed              {plain['one file changed']:8.1f} ms")
    print(f"all flows + parameter schemas {plain['schemas']:8.1f} ms (built lazily, on first use)")
    print(f"{args.files} files, each importing helpers/shared.py from the project")
    print(f"cold (import every file)      {shared['cold']:8.1f} ms")
    print(f"warm (cached, median of 20)   {shared['warm']:8.1f} ms")
    print(f"one file changed              {shared['one file changed']:8.1f} ms")
    print(f"the helper changed            {shared['helper changed']:8.1f} ms (all re-imported)")


if __name__ == "__main__":
    main()
