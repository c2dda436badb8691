"""Discovery time for a project of 500 workflow files: cold, warm, and after one change.

Usage: python bench/discovery_500.py [--files 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from runners_orchestrator.discovery import discover

TEMPLATE = '''"""Workflow {i}."""

from runners_orchestrator import RunnerJob


async def workflow_{i}(jobs: list[RunnerJob], depth: int = 1) -> int:
    """Check {i}."""
    return len(jobs) * depth


async def _helper_{i}() -> None: ...
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "pyproject.toml").write_text("[project]\nname = 'bench'\n")
        for i in range(args.files):
            path = root / "flows" / f"team{i % 20}" / f"wf_{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(TEMPLATE.format(i=i))
        os.chdir(root)

        started = time.perf_counter()
        found = discover()
        cold = time.perf_counter() - started
        assert len(found.workflows) == args.files

        warm = []
        for _ in range(20):
            started = time.perf_counter()
            discover()
            warm.append(time.perf_counter() - started)

        changed = root / "flows" / "team0" / "wf_0.py"
        changed.write_text(TEMPLATE.format(i=0) + "\n# edited\n")
        started = time.perf_counter()
        discover()
        one_changed = time.perf_counter() - started

        started = time.perf_counter()
        for workflow in found.workflows.values():
            _ = workflow.parameters
        schemas = time.perf_counter() - started

    print(f"{args.files} files, one workflow each")
    print(f"cold (import every file)      {cold * 1000:8.1f} ms")
    print(f"warm (cached, median of 20)   {statistics.median(warm) * 1000:8.1f} ms")
    print(f"one file changed              {one_changed * 1000:8.1f} ms")
    print(f"all flows + parameter schemas {schemas * 1000:8.1f} ms (built lazily, on first use)")


if __name__ == "__main__":
    main()
