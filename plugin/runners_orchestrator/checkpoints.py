"""Durable resume: a retried flow run re-runs only the jobs that had not completed.

As each job of an orchestration completes, its :class:`JobResult` is written to Prefect's
database as an artifact of the flow run (type :data:`CHECKPOINT_ARTIFACT_TYPE`). When the
same flow run runs again — Prefect's *Retry* button, ``POST /api/orchestrator/runs/{id}/retry``,
or a flow retry — it reads those artifacts first and skips every job already completed, so
the summary it returns covers all jobs while each check ran once.

Why artifacts, and not Prefect's task-result cache: a cached task result lives in *result
storage*, by default the disk of the process that ran it; a retry served by another process
(another machine, on the scaled topology) would not see it without shared storage. Artifacts
live in Prefect's database, which every process reaches through the API.

Cost: each write holds only the results that completed since the previous one, and at most
one write is in flight per run, so results that complete together share one write; storage
grows with the number of jobs, not with its square. A write waits ``FLUSH_SECONDS`` for more
jobs to join it. What a crash can lose is what completed in that half second and during the
write in flight (those jobs run again on the retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from prefect.runtime import flow_run

from runners_orchestrator.models import JobResult
from runners_orchestrator.results import to_json

if TYPE_CHECKING:
    from collections.abc import Sequence
    from uuid import UUID

    from runners_orchestrator.models import RunnerJob

__all__ = ["CHECKPOINT_ARTIFACT_TYPE", "Checkpoint"]

CHECKPOINT_ARTIFACT_TYPE = "runners-orchestrator-checkpoint"
PAGE = 200
FLUSH_SECONDS = 0.5
"""How long a write waits for more completed jobs to join it: fewer artifacts on the run page
and fewer writes to Prefect, for at most this much more to redo after a crash."""

logger = logging.getLogger("runners_orchestrator.checkpoints")


class Checkpoint:
    """The completed jobs of one flow run: read on a retry, written as jobs complete."""

    def __init__(self, flow_run_id: UUID | str | None, attempt: int = 1) -> None:
        self.flow_run_id = flow_run_id
        self.attempt = attempt
        self._pending: list[JobResult] = []
        self._writer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.written = 0
        """Results written so far by this attempt."""

    @classmethod
    def current(cls) -> Checkpoint:
        """The checkpoint of the flow run we are in; one that keeps nothing outside a run."""
        return cls(flow_run.id, int(flow_run.run_count or 1))

    async def completed(self, numbered: Sequence[tuple[str, RunnerJob]]) -> dict[str, JobResult]:
        """Results of the jobs an earlier attempt of this flow run completed, by job id.

        The first attempt asks nothing. A recorded result counts only when it is for the
        same job (same id and same job), and only when it completed: a job that failed or
        timed out runs again.
        """
        if self.flow_run_id is None or self.attempt <= 1:
            return {}
        wanted = dict(numbered)
        done: dict[str, JobResult] = {}
        for data in await self._read():
            try:
                result = JobResult.model_validate(data)
            except ValueError:
                continue
            if result.state == "completed" and wanted.get(result.job_id) == result.job:
                done[result.job_id] = result
        logger.info("resuming: %d of %d jobs completed before", len(done), len(numbered))
        return done

    async def _read(self) -> list[Any]:
        from prefect.client.orchestration import get_client  # noqa: PLC0415
        from prefect.client.schemas.filters import (  # noqa: PLC0415
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterType,
        )
        from prefect.client.schemas.sorting import ArtifactSort  # noqa: PLC0415

        artifact_filter = ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[self.flow_run_id]),
            type=ArtifactFilterType(any_=[CHECKPOINT_ARTIFACT_TYPE]),
        )
        found: list[Any] = []
        async with get_client() as client:
            offset = 0
            while True:
                page = await client.read_artifacts(
                    artifact_filter=artifact_filter,
                    sort=ArtifactSort.CREATED_DESC,
                    limit=PAGE,
                    offset=offset,
                )
                for artifact in page:
                    data = artifact.data
                    if isinstance(data, str):
                        import json  # noqa: PLC0415

                        data = json.loads(data)
                    if isinstance(data, list):
                        found.extend(data)
                if len(page) < PAGE:
                    return found
                offset += PAGE

    def record(self, result: JobResult) -> None:
        """Keep a completed job; written soon, together with any that complete meanwhile."""
        if self.flow_run_id is None or result.state != "completed":
            return
        self._pending.append(result)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        from prefect.artifacts import Artifact  # noqa: PLC0415

        while self._pending:
            # Jobs completing together share one write; closing writes at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), FLUSH_SECONDS)
            batch, self._pending = self._pending, []
            try:
                await Artifact(
                    type=CHECKPOINT_ARTIFACT_TYPE,
                    data=[to_json(result) for result in batch],
                    description=f"{len(batch)} completed jobs, kept so that a retry skips them.",
                ).acreate()
                self.written += len(batch)
            except Exception:  # a checkpoint is insurance: never fail the run for it
                logger.warning("could not record %d completed jobs", len(batch), exc_info=True)

    async def close(self) -> None:
        """Write what is left now, and wait until every recorded result is written."""
        self._closing.set()
        while self._writer is not None and not self._writer.done():
            await self._writer
