"""What an orchestration shows on its Prefect run page: progress, a results table, a summary.

- a **progress** artifact, updated as jobs finish (at most every half second), which the
  CLI's ``run --wait`` reads for its progress bar;
- a **table** artifact with one row per job and runner: URL, server, region, status, duration,
  and the way a job took when it had to try more than one server;
- a **markdown** summary: the counts (failovers included), every job that could not run with
  its reason, every job that failed over with its tries, and the screenshot of every failed
  or errored browser check, linked and shown (the runner server's absolute URL, which the
  person's browser loads; the table has the URL too).

All of it is skipped outside a Prefect run, so the steps stay testable without Prefect.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.runtime import flow_run

from runners_orchestrator.last_writes import write_last
from runners_orchestrator.results import read_artifact

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient

    from runners_orchestrator.models import JobResult, RunnerResult, RunSummary

__all__ = [
    "ProgressReporter",
    "publish_summary",
    "read_progress",
    "results_table",
    "screenshot_of",
    "summary_markdown",
]

logger = logging.getLogger("runners_orchestrator.reporting")

PROGRESS_PREFIX = "jobs done: "

_PLAIN_URL = re.compile(r"https?://[^\s()<>\[\]]+")

MAX_LISTED = 50
"""Jobs (or screenshots) listed by name in a section of the summary: keeps the page readable."""


def _in_flow_run() -> bool:
    return flow_run.id is not None


class ProgressReporter:
    """Counts finished jobs into a progress artifact of the current flow run."""

    def __init__(self, total: int, every: float = 0.5, *, done: int = 0) -> None:
        self.total = total
        self.done = done
        self.every = every
        self._artifact: UUID | None = None
        self._creating: asyncio.Future[None] | None = None
        self._last = 0.0
        self._lock = asyncio.Lock()  # one update at a time, so the last one written is newest

    def _description(self) -> str:
        return f"{PROGRESS_PREFIX}{self.done}/{self.total}"

    def _percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    async def start(self) -> None:
        """Create the artifact (0 %), beside the first jobs rather than before them."""
        if _in_flow_run():
            self._creating = asyncio.ensure_future(self._create())

    async def _create(self) -> None:
        try:
            self._artifact = await acreate_progress_artifact(0.0, description=self._description())
        except Exception:  # progress is a courtesy: never fail a run for it
            logger.warning("could not create the progress artifact", exc_info=True)

    async def job_done(self) -> None:
        """Count one finished job; update the artifact if enough time has passed.

        The last job's count is left to :meth:`finish`, which the run's end awaits together
        with its other writes.
        """
        self.done += 1
        now = time.monotonic()
        if self.done < self.total and now - self._last >= self.every:
            self._last = now
            await self._update()

    async def finish(self) -> None:
        """Write the final count."""
        await self._update()

    async def _update(self) -> None:
        if self._creating is not None:
            await self._creating
        if self._artifact is None:
            return
        async with self._lock:
            try:
                await aupdate_progress_artifact(
                    self._artifact, self._percent(), description=self._description()
                )
            except Exception:
                logger.warning("could not update the progress artifact", exc_info=True)


def tries_path(job: JobResult) -> str:
    """``us-0 refused → us-1 ok``: where a job went, when it tried more than one server."""
    if len({t.server for t in job.tries}) < 2:  # noqa: PLR2004 - one server: nothing to show
        return ""
    return " → ".join(f"{t.server} {t.outcome}" for t in job.tries)


def screenshot_of(result: RunnerResult) -> str:
    """The URL of a browser check's screenshot (``details.screenshot``), or ``""``.

    Only a plain ``http(s)`` URL: it comes from a runner server, which may be anyone's, and
    goes into Markdown, where a space, a parenthesis or an angle bracket would end the link.
    """
    shot = (result.details or {}).get("screenshot")
    return shot if isinstance(shot, str) and _PLAIN_URL.fullmatch(shot) else ""


def results_table(summary: RunSummary) -> list[dict[str, object]]:
    """One row per job and runner: URL, runner, status, server, region, duration, detail.

    ``tries`` shows the servers a job went through when it failed over or was turned away;
    ``screenshot`` the URL of a failed browser check's screenshot.
    """
    return [
        {
            "job": outcome.job_id,
            "url": outcome.job.url,
            "runner": result.name,
            "status": result.status,
            "server": outcome.server or "",
            "region": outcome.region or "",
            "duration_ms": "" if result.duration_ms is None else result.duration_ms,
            "detail": result.error_message or "",
            "tries": tries_path(outcome),
            "screenshot": screenshot_of(result),
        }
        for outcome in summary.jobs
        for result in outcome.results
    ]


def summary_markdown(summary: RunSummary) -> str:
    """The run's counts and every job that could not run."""
    counts = summary.summary
    lines = [
        f"## Orchestration {summary.state}",
        "",
        (
            f"**{counts.total}** checks in **{len(summary.jobs)}** jobs: "
            f"✅ {counts.passed} passed · ❌ {counts.failed} failed · "
            f"⚠️ {counts.errored} errored · 🔀 {counts.failovers} failovers · "
            f"{summary.duration_ms / 1000:.1f} s"
        ),
    ]
    given_up = [job for job in summary.jobs if job.state != "completed"]
    if given_up:
        lines += ["", "### Jobs that could not run", ""]
        lines += [
            f"- `{job.job_id}` {job.job.url} ({job.state}): {job.error}" for job in given_up[:50]
        ]
        if len(given_up) > 50:  # noqa: PLR2004 - keep the page readable
            lines.append(f"- … and {len(given_up) - 50} more")
    moved = [job for job in summary.jobs if job.failovers]
    if moved:
        lines += ["", "### Jobs that failed over", ""]
        lines += [f"- `{job.job_id}` {job.job.url}: {_tries_detail(job)}" for job in moved[:50]]
        if len(moved) > 50:  # noqa: PLR2004 - keep the page readable
            lines.append(f"- … and {len(moved) - 50} more")
    lines += _screenshots(summary)
    return "\n".join(lines)


def _screenshots(summary: RunSummary) -> list[str]:
    """A section with each failed browser check's screenshot: a link, and the image itself.

    The image is loaded by the browser of whoever looks at the page, from the runner
    server, which keeps the most recent screenshots (see ``docs/runner-server.md``).
    """
    shots = [
        (job, result, screenshot_of(result))
        for job in summary.jobs
        for result in job.results
        if result.status != "pass" and screenshot_of(result)
    ]
    if not shots:
        return []
    lines = ["", "### Screenshots of failed browser checks", ""]
    for job, result, url in shots[:MAX_LISTED]:
        label = f"{job.job_id} {result.name} {result.status}"
        check = f"{result.name} **{result.status}** on {job.server or '?'}"
        # The image on a line of its own: the Prefect UI shows a link's text, not an image
        # inside it, and an indented one would belong to the list item.
        lines += [f"- `{job.job_id}` {job.job.url} · {check}: [screenshot]({url})", ""]
        lines += [f"![{label}]({url})", ""]
    if len(shots) > MAX_LISTED:
        lines.append(f"- … and {len(shots) - MAX_LISTED} more (their URLs are in the table)")
    return lines


def _tries_detail(job: JobResult) -> str:
    return " → ".join(
        f"{t.server} {t.outcome}"
        + (f" ({t.error})" if t.error and t.outcome != "ok" else "")
        + f" {t.duration_ms} ms"
        for t in job.tries
    )


async def publish_summary(summary: RunSummary) -> None:
    """Attach the results table and the summary to the current flow run.

    Both are among the run's last writes (``last_writes``): made together with the others.
    """
    if not _in_flow_run():
        return
    try:
        table = results_table(summary)
        markdown = summary_markdown(summary)
    except Exception:
        logger.warning("could not attach the results to the run page", exc_info=True)
        return
    description = "Every check: one row per job and runner."
    await write_last(_attach(acreate_table_artifact(table, description=description), "table"))
    await write_last(_attach(acreate_markdown_artifact(markdown, description="Summary"), "summary"))


async def _attach(write: Awaitable[object], what: str) -> None:
    try:
        await write
    except Exception:  # the run page is a courtesy: never fail a run for it
        logger.warning("could not attach the results %s to the run page", what, exc_info=True)


async def read_progress(client: PrefectClient, flow_run_id: UUID) -> tuple[int, int] | None:
    """``(done, total)`` jobs of a flow run, from its progress artifact, if it has one."""
    artifact = await read_artifact(client, flow_run_id, "progress")
    description = artifact.description if artifact else None
    if not description or not description.startswith(PROGRESS_PREFIX):
        return None
    done, _, total = description.removeprefix(PROGRESS_PREFIX).partition("/")
    try:
        return int(done), int(total)
    except ValueError:
        return None
