"""Check suites: the checks a team runs continuously, declared in ``checks/*.toml``.

One file is one suite, named for the file (``checks/shop.toml`` is the suite ``shop``)::

    description = "Shop pages, every five minutes from two regions"
    schedule = { interval = "5m" }           # or { cron = "*/5 * * * *", timezone = "UTC" }
    alert_after = 2                          # consecutive failures before a check alerts
    options = { max_concurrency = 10 }       # the workflow's options, as the API takes them

    [[alerts]]
    type = "slack"                           # or "webhook" (generic JSON)
    url = "https://hooks.slack.com/services/T000/B000/XXXX"

    [[jobs]]
    url = "https://shop.example.com/checkout"
    runners = ["cookieBannerVisibleTest", "pageHasTitle"]
    regions = ["us-east-1", "eu-west-1"]
    tags = ["checkout"]

Files, not a table in ``pyproject.toml``: a team's suites grow long, are owned by different
people, and are edited while ``dev`` runs, which watches them like the workflow files.

A *check* is one URL x runner x region; :func:`check_key` names it. A suite job with several
regions becomes one :class:`~runners_orchestrator.models.RunnerJob` per region, carrying its
``suite`` and ``tags`` as extra fields, so that every result names the suite and tags of its
check without the orchestration core knowing about suites.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.models import HttpUrl, OrchestrateOptions, RunnerJob

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "DEFAULT_SUITE_PATTERNS",
    "SUITE_TAG_PREFIX",
    "AlertDestination",
    "Schedule",
    "Suite",
    "SuiteError",
    "SuiteJob",
    "SuiteScan",
    "check_key",
    "load_suite",
    "load_suites",
    "scan_suites",
]

DEFAULT_SUITE_PATTERNS = ("checks/**/*.toml",)
"""Where suites are looked for, relative to the project root."""

SUITE_TAG_PREFIX = "suite:"
"""Tag of a suite's deployment (and so of its flow runs): ``suite:shop``."""

INTERVAL_ANCHOR = datetime(2020, 1, 1)  # noqa: DTZ001 - naive on purpose: the suite's zone
"""Where interval schedules count from, in the suite's time zone: a 5m suite runs at :00,
:05, ... of the clock, and the schedule is the same at every restart and regeneration."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class SuiteError(ConfigurationError):
    """A suite file is invalid; the message names the file and the field."""


def check_key(url: str, runner: str, region: str | None) -> str:
    """The stable id of one check (URL x runner x region), as history and alerts key it.

    Sixteen hex digits of a SHA-256: short enough for a URL path, and the same in every
    process and after a restart.
    """
    canonical = "\x1f".join((url, runner, region or ""))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _parse_duration(value: Any) -> Any:
    """``"5m"``, ``"30s"``, ``"1.5h"``, or a number of seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write 30s, 5m, 1h or a number of seconds"
            )
        return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Schedule(_Strict):
    """When a suite runs: a cron expression or an interval, in a time zone."""

    cron: str | None = None
    interval: timedelta | None = None
    timezone: str = "UTC"

    _parse_interval = field_validator("interval", mode="before")(
        lambda cls, value: _parse_duration(value)  # noqa: ARG005 - a validator's signature
    )

    @field_validator("interval")
    @classmethod
    def _at_least_a_second(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(seconds=1):
            raise ValueError("must be at least 1s")
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from prefect.client.schemas.schedules import CronSchedule  # noqa: PLC0415

            try:
                CronSchedule(cron=value)
            except ValidationError as exc:
                raise ValueError(f"{value!r} is not a cron expression (five fields)") from exc
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (Europe/Berlin, UTC)") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron or interval")
        return self

    def to_prefect(self) -> Any:
        """Prefect's schedule object (``CronSchedule`` or ``IntervalSchedule``)."""
        from prefect.client.schemas.schedules import (  # noqa: PLC0415 - Prefect is slow to import
            CronSchedule,
            IntervalSchedule,
        )

        if self.cron is not None:
            return CronSchedule(cron=self.cron, timezone=self.timezone)
        assert self.interval is not None  # noqa: S101 - _one_kind
        return IntervalSchedule(
            interval=self.interval, anchor_date=self.anchor(), timezone=self.timezone
        )

    def anchor(self) -> datetime:
        """Where an interval schedule counts from: :data:`INTERVAL_ANCHOR` in its time zone.

        Aware: Prefect takes a naive anchor as UTC, whatever the schedule's zone.
        """
        return INTERVAL_ANCHOR.replace(tzinfo=ZoneInfo(self.timezone))

    def to_prefect_yaml(self) -> dict[str, Any]:
        """The schedule as an entry of ``schedules:`` in ``prefect.yaml``."""
        if self.cron is not None:
            return {"cron": self.cron, "timezone": self.timezone}
        assert self.interval is not None  # noqa: S101 - _one_kind
        seconds = self.interval.total_seconds()
        return {
            "interval": int(seconds) if seconds.is_integer() else seconds,
            "anchor_date": self.anchor().isoformat(),
            "timezone": self.timezone,
        }

    def describe(self) -> str:
        """``every 5m (UTC)`` or ``cron */5 * * * * (Europe/Berlin)``, for people."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.timezone})"
        assert self.interval is not None  # noqa: S101 - _one_kind
        seconds = self.interval.total_seconds()
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size and (seconds / size).is_integer():
                return f"every {int(seconds / size)}{unit} ({self.timezone})"
        return f"every {seconds:g}s ({self.timezone})"


class AlertDestination(_Strict):
    """Where a suite's alerts go: a generic JSON webhook or a Slack incoming webhook."""

    type: Literal["webhook", "slack"] = "webhook"
    url: HttpUrl
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers (an ``Authorization`` for a webhook of your own)."""


class SuiteJob(_Strict):
    """One page of a suite: its runners, run in each of its regions."""

    url: HttpUrl
    runners: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    regions: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """One job per region; none: one job, on a server of any region."""
    tags: list[str] = Field(default_factory=list)
    input: dict[str, Any] | None = None
    timeout: int | None = Field(default=None, gt=0)
    """Per-job timeout in milliseconds."""


class Suite(_Strict):
    """A named set of checks, run on a schedule by one deployment of ``workflow``."""

    name: str
    path: Path
    description: str | None = None
    workflow: str = "orchestrate_runners"
    schedule: Schedule | None = None
    """None: the suite runs only when asked (``run --suite``), never on its own."""
    jobs: list[SuiteJob] = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    """Tags every job of the suite has."""
    options: OrchestrateOptions = Field(default_factory=OrchestrateOptions)
    alerts: list[AlertDestination] = Field(default_factory=list)
    alert_after: int | None = Field(default=None, ge=1)
    """Consecutive failures before a check alerts; unset: the ``alert_after`` setting."""

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a suite name: lower-case letters, digits, '-' and '_', "
                "starting with a letter or digit (rename the file)"
            )
        return value

    @property
    def deployment_name(self) -> str:
        """The Prefect deployment that runs this suite: ``suite-shop``."""
        return f"suite-{self.name}"

    @property
    def tag(self) -> str:
        """The tag on the suite's deployment and runs: ``suite:shop``."""
        return f"{SUITE_TAG_PREFIX}{self.name}"

    def runner_jobs(
        self, *, tags: Iterable[str] = (), regions: Iterable[str] = ()
    ) -> list[RunnerJob]:
        """The suite's jobs, one per region, filtered by tag and region.

        A job is kept when it has every tag in ``tags`` and its region is in ``regions``
        (an empty filter keeps all). Each job carries ``suite`` and ``tags`` as extra
        fields, echoed in its result.
        """
        wanted_tags, wanted_regions = set(tags), set(regions)
        jobs: list[RunnerJob] = []
        for job in self.jobs:
            job_tags = sorted({*self.tags, *job.tags})
            if not wanted_tags <= set(job_tags):
                continue
            regions_of_job: list[str | None] = [*job.regions] or [None]
            for region in regions_of_job:
                if wanted_regions and region not in wanted_regions:
                    continue
                fields: dict[str, Any] = {
                    "url": job.url,
                    "runners": job.runners,
                    "region": region,
                    "input": job.input,
                    "timeout": job.timeout,
                    "suite": self.name,
                    "tags": job_tags,
                }
                jobs.append(RunnerJob.model_validate(fields))
        return jobs

    def parameters(
        self, *, tags: Iterable[str] = (), regions: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The suite workflow's flow-run parameters: ``{"jobs": [...], "options": {...}}``."""
        jobs = [job.to_wire() for job in self.runner_jobs(tags=tags, regions=regions)]
        options = self.options.to_wire()
        return {"jobs": jobs, "options": options} if options else {"jobs": jobs}


def _where(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def load_suite(path: Path) -> Suite:
    """Read and validate one suite file.

    Raises:
        SuiteError: the file is not TOML or a field is wrong; one line per problem,
            each naming the file and the field (``checks/shop.toml: jobs[0].url: ...``).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    for reserved in ("name", "path"):
        if reserved in data:
            raise SuiteError(f"{path}: {reserved}: the suite's name is its file name; remove it")
    try:
        return Suite.model_validate({**data, "name": path.stem, "path": path})
    except ValidationError as exc:
        lines = [
            f"{path}: {_where(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False)
        ]
        raise SuiteError("\n".join(lines)) from None


@dataclass(frozen=True)
class SuiteScan:
    """What a look at the suite files found: the valid suites, and what is wrong with the rest.

    Serving goes on with the valid suites when a file breaks (a typo must not stop the
    monitoring of everything else); ``deploy`` refuses (its output must be exact).
    """

    suites: dict[str, Suite] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One line per problem, each naming the file and the field."""
    broken: frozenset[str] = frozenset()
    """Names of the suites whose file is invalid (the name is the file's)."""

    def raise_problems(self) -> None:
        """Raise the problems, if any, as one :class:`SuiteError` of one line each.

        Raises:
            SuiteError: a suite file is invalid.
        """
        if self.problems:
            raise SuiteError("\n".join(self.problems))


def scan_suites(project_root: Path, patterns: Sequence[str] = DEFAULT_SUITE_PATTERNS) -> SuiteScan:
    """Read every suite file; keep the valid ones and report the others, one line per problem.

    Two files giving one suite name: the first (in path order) is kept, the second reported.
    """
    files = sorted(
        {
            path
            for pattern in patterns
            for path in project_root.glob(pattern)
            if path.is_file() and not path.name.startswith(".")
        }
    )
    suites: dict[str, Suite] = {}
    problems: list[str] = []
    broken: set[str] = set()
    for path in files:
        try:
            suite = load_suite(path)
        except SuiteError as exc:
            problems.extend(str(exc).splitlines())
            broken.add(path.stem)
            continue
        if suite.name in suites:
            problems.append(
                f"{path}: two suites are named {suite.name!r} ({suites[suite.name].path} too); "
                "rename one file"
            )
            continue
        suites[suite.name] = suite
    return SuiteScan(suites, problems, frozenset(broken - set(suites)))


def load_suites(
    project_root: Path, patterns: Sequence[str] = DEFAULT_SUITE_PATTERNS
) -> dict[str, Suite]:
    """Every suite of the project, by name, in file order.

    Raises:
        SuiteError: a file is invalid (every invalid file is reported, one after another),
            or two files give one suite name.
    """
    scan = scan_suites(project_root, patterns)
    scan.raise_problems()
    return scan.suites
