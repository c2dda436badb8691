"""Prefect's own floor for one flow run, beside one instant job through the API.

Starts the same stack as `bench/end_to_end.py` (`dev --runner-engine http` on a new state
folder, a local page server). Then, alternated, ``--runs`` times each, one after another:

- **bare flow**: an ``async`` flow that returns at once, called in this process on the
  stack's Prefect server (its result persisted, as a workflow's is). What any design that
  makes one Prefect flow run per submit pays at least: the run created, ``Running``,
  ``Completed``, with no deployment, no runner picking it up, no API and no work.
- **bare flow, 1 task** and **bare flow, 20 tasks** (gathered): the same with task runs
  that return at once, what Prefect's per-job task run adds.
- **one instant job**: ``POST /api/orchestrator/orchestrate_runners`` with one job of an
  instant page, read from the API until its result is served (`end_to_end.through_api`).

Prints each case's p50 / p95 / min. The issue's goals are budgets on top of such a floor:
one instant job 0.5 s; 20 jobs of 1 s pages at 1.15x a plain window of about 1.05 s, so
0.16 s for everything that is not the checks.

Usage: python bench/prefect_floor.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

from end_to_end import Stack, jobs_for, load, pct, running_stack, through_api

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


def _cases(stack: Stack) -> dict[str, Callable[[], Awaitable[object]]]:
    # Prefect reads its settings at import: point it at the stack's server first.
    os.environ["PREFECT_API_URL"] = stack.prefect
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="prefect-floor-")
    from prefect import flow, task

    @task
    async def nothing(index: int) -> int:
        return index

    @flow(persist_result=True)
    async def bare() -> int:
        return 1

    @flow(persist_result=True)
    async def bare_1_task() -> int:
        return await nothing(0)

    @flow(persist_result=True)
    async def bare_20_tasks() -> int:
        return sum(await asyncio.gather(*(nothing(i) for i in range(20))))

    async def instant() -> object:
        return await through_api(stack, jobs_for(stack, 1, 0), 20)

    return {
        "bare flow": bare,
        "bare flow, 1 task": bare_1_task,
        "bare flow, 20 tasks": bare_20_tasks,
        "one instant job through the API": instant,
    }


async def bench(stack: Stack, runs: int) -> None:
    cases = _cases(stack)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for call in cases.values():  # the first call of each pays imports and caches
        await call()
    for _ in range(runs):
        for name, call in cases.items():
            started = time.perf_counter()
            await call()
            times[name].append(time.perf_counter() - started)
            await asyncio.sleep(0.5)  # an idle server, as one user's run meets it
    for name, values in times.items():
        print(
            f"{name} x {runs}: p50 {statistics.median(values):.3f}s, "
            f"p95 {pct(values, 0.95):.3f}s, min {min(values):.3f}s",
            flush=True,
        )
    print(f"load {load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with running_stack("prefect-floor-") as stack:
        asyncio.run(bench(stack, args.runs))


if __name__ == "__main__":
    main()
