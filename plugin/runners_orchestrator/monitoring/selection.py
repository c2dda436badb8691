"""Select what to run: one suite, narrowed by tag and region, as ``checkly test`` does.

``run --suite shop --tag checkout --region eu-west-1`` and the API's start with a body
``{"suite": "shop", "tags": ["checkout"], "regions": ["eu-west-1"]}`` both come here. The
run is a run of the suite's own deployment, so it carries the suite's tags and counts as
the suite's run (in the Prefect UI and in history), with only the matching jobs.

A job is kept when it has *every* tag asked for and its region is *one of* the regions
asked for: tags narrow (``--tag checkout --tag eu`` is both), regions choose where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from runners_orchestrator.exceptions import OrchestratorError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from runners_orchestrator.monitoring.suites import Suite

__all__ = [
    "EmptySelectionError",
    "SuiteNotFoundError",
    "SuiteRun",
    "SuiteSelection",
    "select_suite_run",
]


class SuiteNotFoundError(OrchestratorError, LookupError):
    """No suite has that name; ``available`` lists those that exist."""

    def __init__(self, name: str, available: Sequence[str], broken: bool = False) -> None:  # noqa: FBT001, FBT002
        self.name = name
        self.available = list(available)
        listed = ", ".join(self.available) or "none (add a file to checks/)"
        why = f"the file of suite {name!r} is invalid" if broken else f"no suite {name!r}"
        super().__init__(f"{why}; available suites: {listed}")


class EmptySelectionError(OrchestratorError, ValueError):
    """The tags and regions asked for match none of the suite's jobs."""

    def __init__(self, suite: Suite, tags: Sequence[str], regions: Sequence[str]) -> None:
        jobs = suite.runner_jobs()
        known_tags = sorted({tag for job in jobs for tag in job.to_wire().get("tags", [])})
        known_regions = sorted({job.region or "(any)" for job in jobs})
        wanted = []
        if tags:
            wanted.append(f"every tag of {', '.join(tags)}")
        if regions:
            wanted.append(f"a region in {', '.join(regions)}")
        super().__init__(
            f"no job of suite {suite.name!r} has {' and '.join(wanted)}; its tags: "
            f"{', '.join(known_tags) or 'none'}; its regions: {', '.join(known_regions)}"
        )


class SuiteSelection(BaseModel):
    """What a client asks to run: a suite, and optionally tags and regions to narrow it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(min_length=1, description="The suite's name (its file name).")
    tags: list[str] = Field(
        default_factory=list, description="Keep only the jobs that have every one of these tags."
    )
    regions: list[str] = Field(
        default_factory=list, description="Keep only the jobs in one of these regions."
    )


@dataclass(frozen=True)
class SuiteRun:
    """A selection resolved against the suite files: the suite and the run's parameters."""

    suite: Suite
    parameters: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)

    @property
    def job_count(self) -> int:
        """How many jobs the run has."""
        return len(self.parameters["jobs"])


def select_suite_run(
    suites: Mapping[str, Suite],
    selection: SuiteSelection,
    broken: frozenset[str] = frozenset(),
) -> SuiteRun:
    """The run of ``selection``: the suite's parameters with only the matching jobs.

    Raises:
        SuiteNotFoundError: no valid suite has that name (``broken``: its file is invalid).
        EmptySelectionError: the tags and regions match none of its jobs.
    """
    suite = suites.get(selection.suite)
    if suite is None:
        raise SuiteNotFoundError(selection.suite, sorted(suites), selection.suite in broken)
    parameters = suite.parameters(tags=selection.tags, regions=selection.regions)
    if not parameters["jobs"]:
        raise EmptySelectionError(suite, selection.tags, selection.regions)
    return SuiteRun(suite, parameters, list(selection.tags), list(selection.regions))
