"""Prefect's own floor for one flow run, beside one instant job through the API.

Starts the same stack as `bench/end_to_end.py` (`dev --runner-engine http` on a new state
folder, a local page server). Then, alternated, ``--runs`` times each, one after another:

- **bare flow**: an ``async`` flow that returns at once, called in this process on the
  stack's Prefect server (its result persisted, as a workflow's is). What any design that
  makes one Prefect flow run per submit pays at least: the run created, ``Running``,
  ``Completed``, with no deployment, no runner picking it up, no API and no work.
- **bare flow, 1 task** and **bare flow, 20 tasks** (gathered): the same with task runs
  that return at once, what Prefect's per-job task run adds.
- **bare flow served by Prefect**: the same bare flow (``bench/floor_flow.py``) as a
  deployment on Prefect's own ``Runner`` in this process (a process per run, as
  ``flow.serve()`` runs it; polling every 0.1 s where its default is 10 s), a run created
  from the deployment and read until ``Completed``: the served path without our code.
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
from typing import TYPE_CHECKING, Any

from end_to_end import Stack, jobs_for, load, pct, running_stack, through_api

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


async def _served(deployment_id: Any) -> None:
    """A run of the served bare flow, from its creation until Prefect has it Completed."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment_id)
        while True:
            state = (await client.read_flow_run(run.id)).state
            if state is not None and state.is_final():
                break
            await asyncio.sleep(0.01)
    if not state.is_completed():
        raise SystemExit(f"the served bare flow's run ended {state.type}: {state.message}")


def _cases(
    stack: Stack, served: Callable[[], Awaitable[object]]
) -> dict[str, Callable[[], Awaitable[object]]]:
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
        "bare flow served by Prefect's Runner": served,
        "one instant job through the API": instant,
    }


async def bench(stack: Stack, runs: int) -> None:
    # Prefect reads its settings at import: point it at the stack's server first.
    os.environ["PREFECT_API_URL"] = stack.prefect
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="prefect-floor-")
    from floor_flow import bare_served
    from prefect.runner import Runner

    runner = Runner(name="prefect-floor", query_seconds=0.1, pause_on_shutdown=False)
    deployment_id = await runner.aadd_flow(bare_served, name="floor")
    serving = asyncio.create_task(runner.start())
    cases = _cases(stack, lambda: _served(deployment_id))
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
    await runner.stop()
    serving.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with running_stack("prefect-floor-") as stack:
        asyncio.run(bench(stack, args.runs))


if __name__ == "__main__":
    main()
