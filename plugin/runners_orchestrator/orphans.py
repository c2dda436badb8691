"""Runs on threads die with their serving process: its supervisor marks them ``Crashed``.

With ``--start in-process`` a run lives on a thread of the serving process, so a serving
process that dies (``SIGKILL``, the OOM killer, a native crash) ends its runs with nobody left
to say so. Against a Prefect server that runs automations, crash detection marks them once
their heartbeats stop (``crash_detection``, 90 s); the embedded server of ``dev`` runs none,
and the runs would stay ``Running`` for ever.

``serve-flows --reload`` (what ``dev`` runs) supervises the serving process, so it is the one
left to say so. The serving process keeps an empty file per run on one of its threads in a
folder the supervisor gives it (:data:`LEDGER_ENV`), made before the run starts and removed
when the run ends by itself. Whenever the serving process exits, the supervisor proposes
``Crashed`` for every run still listed. Prefect refuses it for a run that reached a final
state after all (a cancelled run, or one killed between its last write and the file's
removal), so nothing final is overwritten. What it cannot tell Prefect (Prefect is down:
``dev`` stops it beside the supervisor) stays listed; ``dev`` keeps the folder in its state
folder, so the next start's supervisor marks those runs before it serves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Self
from uuid import UUID

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

__all__ = ["LEDGER_ENV", "RunLedger", "crash_orphans"]

LEDGER_ENV = "RUNNERS_ORCHESTRATOR_RUN_LEDGER"
"""The folder where a supervised serving process lists the runs on its threads."""

logger = logging.getLogger("runners_orchestrator.orphans")


class RunLedger:
    """The runs on a serving process's threads, one empty file each, named by run id.

    Files, not a pipe: they survive the process that wrote them, whatever killed it, and
    need no reader while it lives.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def from_environment(cls) -> Self | None:
        """The ledger a supervisor gave this process, if any."""
        folder = os.environ.get(LEDGER_ENV)
        return cls(Path(folder)) if folder else None

    def add(self, run_id: UUID) -> None:
        """List a run about to start on a thread."""
        (self.folder / str(run_id)).touch()

    def remove(self, run_id: UUID) -> None:
        """Forget a run whose end is recorded in Prefect."""
        (self.folder / str(run_id)).unlink(missing_ok=True)

    def runs(self) -> list[UUID]:
        """The runs listed now."""
        found = []
        for entry in sorted(self.folder.iterdir()):
            try:
                found.append(UUID(entry.name))
            except ValueError:  # not ours
                continue
        return found


async def crash_orphans(ledger: RunLedger, why: str) -> list[UUID]:
    """Propose ``Crashed`` for every run still listed; return those Prefect accepted.

    A run leaves the ledger once Prefect answered for it, accepted or not. If Prefect does
    not answer, the error propagates and the rest stay listed, for the next call.
    """
    from prefect.client.orchestration import get_client  # noqa: PLC0415
    from prefect.client.schemas.responses import SetStateStatus  # noqa: PLC0415
    from prefect.exceptions import ObjectNotFound  # noqa: PLC0415
    from prefect.states import Crashed  # noqa: PLC0415

    crashed: list[UUID] = []
    orphans = ledger.runs()
    if not orphans:
        return crashed
    async with get_client() as client:
        for run_id in orphans:
            try:
                crash: State[None] = Crashed(message=why)
                answer = await client.set_flow_run_state(run_id, crash)
                accepted = answer.status == SetStateStatus.ACCEPT
            except ObjectNotFound:  # deleted meanwhile
                accepted = False
            if accepted:
                crashed.append(run_id)
                logger.warning("flow run %s marked crashed: %s", run_id, why)
            ledger.remove(run_id)
    return crashed
