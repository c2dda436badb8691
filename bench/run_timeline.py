"""Where one small run's time goes, submit to result, read back from Prefect itself.

Starts the same stack as `bench/end_to_end.py` (`dev --runner-engine http` on a new state
folder, a local page server), submits ``--runs`` runs of ``--jobs`` instant jobs through the
API one after another, each read until its result is served. Then, for every run, reads
from the Prefect API what the run recorded: its states, its task runs, its artifacts, and
prints each milestone's time after the submit (p50 and p95 over the runs), in order.

Server timestamps and the bench's clock are the same machine's wall clock.

Usage: python bench/run_timeline.py [--runs 20] [--jobs 1] [--pause 1]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import httpx
from end_to_end import (  # bench/ is the script's folder
    Stack,
    completed,
    jobs_for,
    pct,
    running_stack,
)


def _at(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


async def one_run(http: httpx.AsyncClient, stack: Stack, jobs: int) -> dict[str, Any]:
    submitted = time.time()
    response = await http.post(
        f"{stack.api}/orchestrate_runners", json={"jobs": jobs_for(stack, jobs, 0)}
    )
    accepted = time.time()
    run_id, _ = await completed(http, stack, response, poll=0.01)
    return {"id": run_id, "submitted": submitted, "accepted": accepted, "served": time.time()}


async def milestones(
    http: httpx.AsyncClient, stack: Stack, run: dict[str, Any]
) -> dict[str, float]:
    """Each milestone of one run, in seconds after its submit."""
    base = run["submitted"]
    out = {"202 from the API": run["accepted"] - base}
    flow_run = (await http.get(f"{stack.prefect}/flow_runs/{run['id']}")).json()
    out["created in Prefect"] = _at(flow_run["created"]) - base  # type: ignore[operator]
    states = (await http.get(f"{stack.prefect}/flow_run_states/?flow_run_id={run['id']}")).json()
    for state in states:
        out[f"state {state['name']}"] = _at(state["timestamp"]) - base  # type: ignore[operator]
    body = {"flow_runs": {"id": {"any_": [run["id"]]}}}
    tasks = (await http.post(f"{stack.prefect}/task_runs/filter", json=body)).json()
    for task in tasks:
        name = task["name"].rsplit("-", 1)[0]
        for key in ("start_time", "end_time"):
            at = _at(task.get(key))
            if at is not None:
                label = f"task {name} {'start' if key == 'start_time' else 'end'}"
                out[label] = min(out.get(label, at - base), at - base)
    body = {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    artifacts = (await http.post(f"{stack.prefect}/artifacts/filter", json=body)).json()
    for artifact in artifacts:
        label = f"artifact {artifact['type']} created"
        out[label] = max(out.get(label, 0.0), _at(artifact["created"]) - base)  # type: ignore[operator]
        if artifact.get("updated") != artifact.get("created"):
            out[f"artifact {artifact['type']} updated"] = _at(artifact["updated"]) - base  # type: ignore[operator]
    out["result served by the API"] = run["served"] - base
    return out


async def bench(stack: Stack, args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await one_run(http, stack, 2)  # the first run of a fresh stack pays imports
        runs = []
        for _ in range(args.runs):
            await asyncio.sleep(args.pause)  # let the stack settle: one run on an idle stack
            runs.append(await one_run(http, stack, args.jobs))
        await asyncio.sleep(2)  # task runs are recorded from their events a moment later
        seen: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            for label, value in (await milestones(http, stack, run)).items():
                seen[label].append(value)
    print(f"{args.runs} runs of {args.jobs} instant job(s), seconds after the submit:")
    for label, values in sorted(seen.items(), key=lambda item: sorted(item[1])[len(item[1]) // 2]):
        print(
            f"  {label:<55} p50 {sorted(values)[len(values) // 2]:6.3f}  "
            f"p95 {pct(values, 0.95):6.3f}  ({len(values)} runs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--pause", type=float, default=1.0, help="seconds between one run's result and the next"
    )
    args = parser.parse_args()
    with running_stack("run-timeline-") as stack:
        asyncio.run(bench(stack, args))


if __name__ == "__main__":
    main()
