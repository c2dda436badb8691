"""Suites as scheduled Prefect deployments: in ``prefect.yaml`` and served by ``serve-flows``.

Each suite is one deployment of its workflow (``orchestrate_runners/suite-shop``) with the
suite's jobs as parameters, its schedule, the tags ``runners-orchestrator`` and
``suite:shop`` (so every run of it carries them) and a description. ``deploy`` writes it
into ``prefect.yaml`` beside the workflows' entries, through the workflow's generated
entrypoint module; ``serve-flows`` registers and serves it.

What serving decides, and why (``docs/monitoring.md``):

- **Pause is Prefect's.** Registering sends the deployment's ``paused`` as Prefect has it
  now, never ``False``: Prefect's ``RunnerDeployment`` would otherwise send
  ``paused=False`` on every registration and a restart would resume a suite someone
  paused. A schedule someone switched off in the UI stays off as long as it is unchanged.
- **A removed suite's deployment is deleted.** The file is the suite; a deployment without
  one could not be run by ``run --suite`` either. Prefect deletes its scheduled runs and
  keeps the finished ones (with their ``suite:`` tag), so history survives. Prefect's
  scheduler reads the deployments it schedules, then inserts their runs in a second
  transaction, so a pass that read the deployment before it was deleted inserts runs for it
  afterwards (a CI run saw 50): those are deleted too, looked for over the next 30 s.
- **A broken suite file keeps the last good version running.** Its deployment is served as
  Prefect has it (parameters and schedule of the last valid file); a typo must not
  silently stop monitoring. The problem is reported, one line each, at every (re)start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from runners_orchestrator.deployments import DEPLOYMENTS_DIR, GENERATED_TAG
from runners_orchestrator.monitoring.suites import SUITE_TAG_PREFIX, SuiteError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.runner import Runner

    from runners_orchestrator.discovery import Discovery, Workflow
    from runners_orchestrator.monitoring.suites import Suite, SuiteScan

__all__ = [
    "SCHEDULE_SLUG",
    "check_workflow",
    "describe_suite",
    "prefect_yaml_entries",
    "register_suites",
    "suite_deployments",
]

logger = logging.getLogger("runners_orchestrator.monitoring")

SCHEDULE_SLUG = "suite"
"""The slug of a suite deployment's one schedule, so it is recognised across restarts."""

LEFTOVER_SWEEPS_SECONDS = (1.0, 5.0, 30.0)
"""When, after deleting a removed suite's deployment, its scheduled runs are looked for again.

Prefect's scheduler inserts a pass's runs as soon as it has the database, so runs of a
deployment it read before the deletion land within moments of it; the later looks are
for a loaded database. They run in the serving process, which lives on after registering.
"""

_sweeps: set[asyncio.Task[None]] = set()  # held so that the loop does not drop them


def check_workflow(suite: Suite, discovery: Discovery) -> Workflow:
    """The workflow that runs ``suite``: it must exist, take ``jobs`` and accept the suite's.

    Raises:
        SuiteError: one line naming the file and the ``workflow`` or ``jobs`` field.
    """
    if suite.workflow not in discovery:
        available = ", ".join(discovery.names()) or "none"
        raise SuiteError(
            f"{suite.path}: workflow: no workflow {suite.workflow!r} (available: {available})"
        )
    workflow = discovery.get(suite.workflow)
    if "jobs" not in workflow.parameters.get("properties", {}):
        raise SuiteError(
            f"{suite.path}: workflow: {workflow.name!r} takes no `jobs` parameter, so it "
            "cannot run a suite; use a workflow like orchestrate_runners(jobs, options)"
        )
    try:
        workflow.flow.validate_parameters(suite.parameters())
    except Exception as exc:  # noqa: BLE001 - Prefect's ParameterTypeError, or pydantic's
        reason = " ".join(str(exc).split())[:300]
        raise SuiteError(f"{suite.path}: jobs: {workflow.name} refuses them: {reason}") from None
    return workflow


def suite_deployments(
    suites: Iterable[Suite], discovery: Discovery
) -> tuple[dict[str, tuple[Suite, Workflow]], list[str]]:
    """The suites whose workflow can run them, by name, and a line per suite that cannot."""
    ready: dict[str, tuple[Suite, Workflow]] = {}
    problems: list[str] = []
    for suite in suites:
        try:
            ready[suite.name] = (suite, check_workflow(suite, discovery))
        except SuiteError as exc:
            problems.append(str(exc))
    return ready, problems


def describe_suite(suite: Suite) -> str:
    """The deployment's description: the suite's own, else what it is and where it is from."""
    if suite.description:
        return suite.description
    when = suite.schedule.describe() if suite.schedule else "run on demand only"
    jobs = len(suite.runner_jobs())
    return f"Check suite {suite.name} from {suite.path.name}: {jobs} jobs, {when}."


def _tags(suite: Suite, deployment_tags: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([GENERATED_TAG, suite.tag, *deployment_tags]))


def prefect_yaml_entries(
    suites: Iterable[Suite], discovery: Discovery, work_pool: str, deployment_tags: Sequence[str]
) -> list[dict[str, Any]]:
    """The ``prefect.yaml`` entries of ``suites``, in name order.

    The entrypoint is the workflow's generated module, as for the workflow's own entry.
    A suite without a schedule gets ``schedules: []``: ``prefect deploy`` then leaves it
    to be run on demand.

    Raises:
        SuiteError: a suite's workflow cannot run it; one line per suite.
    """
    ready, problems = suite_deployments(sorted(suites, key=lambda s: s.name), discovery)
    if problems:
        raise SuiteError("\n".join(problems))
    entries: list[dict[str, Any]] = []
    for suite, workflow in ready.values():
        schedules = [] if suite.schedule is None else [suite.schedule.to_prefect_yaml()]
        entries.append(
            {
                "name": suite.deployment_name,
                "description": describe_suite(suite),
                "entrypoint": f"{DEPLOYMENTS_DIR}/{workflow.name}.py:{workflow.name}",
                "tags": _tags(suite, deployment_tags),
                "parameters": suite.parameters(),
                "schedules": [{**schedule, "slug": SCHEDULE_SLUG} for schedule in schedules],
                "work_pool": {"name": work_pool},
            }
        )
    return entries


def _suite_name(deployment: DeploymentResponse) -> str | None:
    """The suite a deployment of ours serves (from its ``suite:`` tag), if it is one."""
    if GENERATED_TAG not in deployment.tags or not deployment.name.startswith("suite-"):
        return None
    for tag in deployment.tags:
        if tag.startswith(SUITE_TAG_PREFIX):
            return tag.removeprefix(SUITE_TAG_PREFIX)
    return None


async def _existing(client: PrefectClient) -> dict[str, DeploymentResponse]:
    """Our suite deployments in Prefect, by suite name."""
    from prefect.client.schemas.filters import (  # noqa: PLC0415
        DeploymentFilter,
        DeploymentFilterTags,
    )

    found: dict[str, DeploymentResponse] = {}
    offset = 0
    ours = DeploymentFilter(tags=DeploymentFilterTags(all_=[GENERATED_TAG]))
    while True:
        page = await client.read_deployments(deployment_filter=ours, limit=200, offset=offset)
        for deployment in page:
            name = _suite_name(deployment)
            if name is not None:
                found[name] = deployment
        if len(page) < 200:  # noqa: PLR2004 - Prefect's page size
            return found
        offset += 200


def _schedule(suite: Suite, existing: DeploymentResponse | None) -> list[Any]:
    """The suite's schedule; switched off if someone switched it off and it is unchanged."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate  # noqa: PLC0415

    if suite.schedule is None:
        return []
    schedule = suite.schedule.to_prefect()
    active = True
    for current in existing.schedules if existing is not None else []:
        if current.slug == SCHEDULE_SLUG and current.schedule == schedule:
            active = current.active
    return [DeploymentScheduleCreate(schedule=schedule, active=active, slug=SCHEDULE_SLUG)]


async def _serve(
    runner: Runner,
    workflow: Workflow,
    *,
    name: str,
    description: str | None,
    tags: list[str],
    parameters: dict[str, Any],
    schedules: list[Any],
    existing: DeploymentResponse | None,
) -> UUID:
    deployment_id: UUID = await runner.aadd_flow(
        workflow.flow,
        name=name,
        description=description,
        tags=tags,
        parameters=parameters,
        schedules=schedules,
        # Prefect's pause, as it is now: never resume what someone paused.
        paused=existing.paused if existing is not None else False,
    )
    if existing is not None and existing.schedules and not schedules:
        # The schedule was removed from the file: take it off the deployment too.
        async with _client() as client:
            for schedule in existing.schedules:
                await client.delete_deployment_schedule(deployment_id, schedule.id)
    return deployment_id


def _client() -> Any:
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    return get_client()


async def register_suites(
    runner: Runner,
    discovery: Discovery,
    scan: SuiteScan,
    *,
    deployment_tags: Sequence[str] = (),
) -> list[str]:
    """Register the suites' deployments on ``runner``; delete those of removed suites.

    Returns:
        One line per problem (invalid files, suites their workflow cannot run), for the
        caller to report; the other suites are served regardless.
    """
    ready, problems = suite_deployments(scan.suites.values(), discovery)
    problems = [*scan.problems, *problems]
    unrunnable = set(scan.suites) - set(ready)
    async with _client() as client:
        existing = await _existing(client)
        for suite, workflow in ready.values():
            current = existing.get(suite.name)
            try:
                await _serve(
                    runner,
                    workflow,
                    name=suite.deployment_name,
                    description=describe_suite(suite),
                    tags=_tags(suite, deployment_tags),
                    parameters=suite.parameters(),
                    schedules=_schedule(suite, current),
                    existing=current,
                )
            except Exception as exc:  # noqa: BLE001 - Prefect refused it: serve the rest
                reason = " ".join(str(exc).split())[:300]
                problems.append(f"{suite.path}: Prefect refused the suite's deployment: {reason}")
                continue
            logger.info(
                "serving suite %s (%s, %s)",
                suite.name,
                workflow.name,
                suite.schedule.describe() if suite.schedule else "on demand",
            )
        for name in sorted((scan.broken | unrunnable) & set(existing)):
            await _keep_last_good(runner, client, discovery, existing[name])
        gone = [existing[name] for name in sorted(set(existing) - set(scan.suites) - scan.broken)]
        for deployment in gone:
            await client.delete_deployment(deployment.id)
            logger.info("suite %s is gone: deleted its deployment", _suite_name(deployment))
    if gone:
        sweep = asyncio.create_task(_sweep_later([d.id for d in gone]))
        _sweeps.add(sweep)
        sweep.add_done_callback(_sweeps.discard)
    return problems


async def _delete_scheduled_runs(client: PrefectClient, deployment_ids: list[UUID]) -> int:
    """Delete the runs still scheduled for deleted deployments; how many there were."""
    from prefect.client.schemas.filters import (  # noqa: PLC0415
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType  # noqa: PLC0415
    from prefect.exceptions import ObjectNotFound  # noqa: PLC0415

    left = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
    )
    deleted = 0
    while runs := await client.read_flow_runs(flow_run_filter=left, limit=200):
        for run in runs:
            with contextlib.suppress(ObjectNotFound):  # deleted by someone else meanwhile
                await client.delete_flow_run(run.id)
                deleted += 1
    if deleted:
        logger.info("deleted %d scheduled runs of removed suites", deleted)
    return deleted


async def _sweep_later(deployment_ids: list[UUID]) -> None:
    """Delete the runs Prefect's scheduler inserts after a deployment's deletion (above)."""
    waited = 0.0
    for at in LEFTOVER_SWEEPS_SECONDS:
        await asyncio.sleep(at - waited)
        waited = at
        try:
            async with _client() as client:
                await _delete_scheduled_runs(client, deployment_ids)
        except Exception:  # Prefect unreachable for now: the next look may do
            logger.warning("could not look for scheduled runs of removed suites", exc_info=True)


async def _keep_last_good(
    runner: Runner, client: PrefectClient, discovery: Discovery, deployment: DeploymentResponse
) -> None:
    """Serve a broken suite's deployment as Prefect has it: its last valid version."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate  # noqa: PLC0415

    flow = await client.read_flow(deployment.flow_id)
    workflow = next((w for w in discovery.workflows.values() if w.flow.name == flow.name), None)
    if workflow is None:
        logger.warning(
            "%s: its workflow %s is gone too; its runs wait until both are back",
            deployment.name,
            flow.name,
        )
        return
    schedules = [
        DeploymentScheduleCreate(schedule=s.schedule, active=s.active, slug=s.slug)
        for s in deployment.schedules
    ]
    await _serve(
        runner,
        workflow,
        name=deployment.name,
        description=deployment.description,
        tags=list(deployment.tags),
        parameters=dict(deployment.parameters),
        schedules=schedules,
        existing=deployment,
    )
    logger.warning(
        "suite file of %s is invalid: serving its last valid version until it is fixed",
        deployment.name,
    )
