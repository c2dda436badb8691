"""A pytest plugin: wall time and the whole machine's CPU-seconds spent during each test.

The CPU is read from ``/proc/stat`` (busy jiffies of every core) before and after each test,
so a test's servers and child processes count, and so does anything else the machine does
meanwhile: run it on a quiet machine, one pytest at a time.

Usage: PYTHONPATH=bench .venv/bin/pytest -m "not scaled" -p pytest_cpu
       (rows appended to $PYTEST_CPU_OUT, default pytest-cpu.tsv: test id, wall s, CPU s)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

OUT = Path(os.environ.get("PYTEST_CPU_OUT", "pytest-cpu.tsv"))
IDLE_FIELDS = (3, 4)  # idle, iowait


def busy_seconds() -> float:
    """CPU-seconds every core of the machine has spent busy since boot."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = sum(jiffies[i] for i in IDLE_FIELDS)
    return (sum(jiffies) - idle) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Time the test with its setup and teardown, as ``--durations`` splits them."""
    busy, wall = busy_seconds(), time.monotonic()
    try:
        return (yield)
    finally:
        with OUT.open("a") as out:
            out.write(
                f"{item.nodeid}\t{time.monotonic() - wall:.2f}\t{busy_seconds() - busy:.2f}\n"
            )
