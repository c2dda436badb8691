"""The commands about the project's files: ``list`` and ``deploy``."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from runners_orchestrator.cli._common import PROG, discover_project, report_broken

if TYPE_CHECKING:
    import argparse

__all__ = ["add_commands"]


def _list(args: argparse.Namespace) -> int:
    discovery = discover_project()
    report_broken(discovery)
    workflows = [discovery.workflows[name] for name in discovery.names()]
    if args.json:
        payload = [
            {
                "name": w.name,
                "camelName": w.camel_name,
                "description": w.description,
                "entrypoint": w.entrypoint,
                "parameters": w.parameters,
            }
            for w in workflows
        ]
        print(json.dumps(payload, indent=2))  # noqa: T201
        return 0
    if not workflows:
        print(f"no workflows found under {discovery.root} (patterns: see ORCHESTRATOR_PATTERN)")  # noqa: T201
    for workflow in workflows:
        properties = workflow.parameters.get("properties", {})
        required = set(workflow.parameters.get("required", []))
        params = ", ".join(f"{p}{'' if p in required else '?'}" for p in properties)
        summary = workflow.description.split("\n", 1)[0]
        print(f"{workflow.name}({params})  [{workflow.entrypoint}]")  # noqa: T201
        if summary:
            print(f"    {summary}")  # noqa: T201
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from runners_orchestrator.deployments import (  # noqa: PLC0415
        plan_deployments,
        write_deployments,
    )
    from runners_orchestrator.monitoring.scheduling import prefect_yaml_entries  # noqa: PLC0415
    from runners_orchestrator.monitoring.suites import load_suites  # noqa: PLC0415
    from runners_orchestrator.settings import get_settings  # noqa: PLC0415

    discovery = discover_project()
    report_broken(discovery)
    settings = get_settings()
    # Strict, unlike serving: the generated files must say exactly what the suites say.
    suites = load_suites(discovery.root, settings.suites)
    entries = prefect_yaml_entries(
        suites.values(), discovery, settings.work_pool, settings.deployment_tags
    )
    plan = plan_deployments(discovery, entries)
    counted = f"{len(plan.modules)} workflows" + (f", {len(suites)} suites" if suites else "")
    if args.check:
        stale = plan.stale()
        for line in stale:
            print(f"stale: {line}", file=sys.stderr)  # noqa: T201
        if stale:
            print(f"{PROG}: deployments are stale; run `{PROG} deploy`", file=sys.stderr)  # noqa: T201
            return 1
        print(f"deployments are up to date ({counted})")  # noqa: T201
        return 0
    changed = write_deployments(plan)
    for line in changed:
        print(f"updated: {line}")  # noqa: T201
    print(  # noqa: T201
        f"{counted}: deployments in deployments/ and prefect.yaml"
        f"{'' if changed else ' (already up to date)'}; `prefect deploy --all` deploys them"
    )
    return 0


def add_commands(commands: Any) -> None:
    """Register ``list`` and ``deploy`` on the top-level parser's subcommands."""
    listing = commands.add_parser(
        "list",
        help="list the discovered workflows with their parameters",
        description="List the workflows discovered in the project's workflow files.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    listing.set_defaults(handler=_list)

    deploy = commands.add_parser(
        "deploy",
        help="write deployments/ and the deployments of prefect.yaml",
        description="Generate one deployment per workflow so `prefect deploy --all` works.",
    )
    deploy.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the files are stale"
    )
    deploy.set_defaults(handler=_deploy)
