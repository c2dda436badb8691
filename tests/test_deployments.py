"""Generated deployments: written, checked, kept in step, hand-written parts preserved."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import CLI

HAND_WRITTEN_YAML = """\
# Our team's Prefect project. Keep this comment!
name: shop-checks
prefect-version: 3.9.1

build: null
push: null
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: /srv/shop-checks

deployments:
  # A deployment we wrote by hand: it must survive regeneration.
  - name: nightly-report
    entrypoint: reports/nightly.py:report
    work_pool:
      name: reports
"""


def run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=project, capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "shop"\n\n[tool.runners-orchestrator]\nwork_pool = "checks"\n'
    )
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "audit.py").write_text(
        textwrap.dedent('''
        async def audit(urls: list[str]) -> int:
            """Audit the shop."""
            return len(urls)

        async def smoke(url: str) -> str:
            return url
        ''')
    )
    (tmp_path / "prefect.yaml").write_text(HAND_WRITTEN_YAML)
    return tmp_path


def test_deploy_writes_modules_and_yaml_and_keeps_hand_written_parts(project):
    result = run(project, "deploy")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (project / "deployments").glob("*.py")) == [
        "audit.py",
        "smoke.py",
    ]
    text = (project / "prefect.yaml").read_text()
    assert "# Our team's Prefect project. Keep this comment!" in text
    assert "# A deployment we wrote by hand: it must survive regeneration." in text
    assert "directory: /srv/shop-checks" in text
    assert "- name: nightly-report" in text
    assert text.count("work_pool:\n      name: checks") == 2
    assert "entrypoint: deployments/audit.py:audit" in text
    assert "description: Audit the shop." in text


def test_check_passes_after_deploy_and_names_what_is_stale(project):
    assert run(project, "deploy", "--check").returncode == 1
    run(project, "deploy")
    fresh = run(project, "deploy", "--check")
    assert fresh.returncode == 0, fresh.stderr
    assert "up to date (2 workflows)" in fresh.stdout

    flows = project / "flows" / "audit.py"
    # A parameter changes, a workflow is renamed, one is added.
    flows.write_text(
        textwrap.dedent('''
        async def audit(urls: list[str], depth: int = 1) -> int:
            """Audit the shop."""
            return len(urls)

        async def smoke_test(url: str) -> str:
            return url
        ''')
    )
    (project / "flows" / "new.py").write_text("async def brand_new() -> None: ...\n")
    stale = run(project, "deploy", "--check")
    assert stale.returncode == 1
    lines = stale.stderr.splitlines()
    assert (
        "stale: deployments/audit.py is out of date (its workflow or parameters changed)" in lines
    )
    assert "stale: deployments/brand_new.py is missing (a new workflow)" in lines
    assert "stale: deployments/smoke_test.py is missing (a new workflow)" in lines
    assert "stale: deployments/smoke.py belongs to a workflow that no longer exists" in lines
    assert "stale: prefect.yaml: its generated deployments are out of date" in lines

    run(project, "deploy")
    assert run(project, "deploy", "--check").returncode == 0
    assert not (project / "deployments" / "smoke.py").exists()
    text = (project / "prefect.yaml").read_text()
    assert "- name: smoke\n" not in text
    assert "- name: smoke_test" in text
    assert "- name: nightly-report" in text


def test_deploy_creates_prefect_yaml_when_missing(project):
    (project / "prefect.yaml").unlink()
    assert run(project, "deploy").returncode == 0
    text = (project / "prefect.yaml").read_text()
    assert "set_working_directory" in text
    assert "entrypoint: deployments/smoke.py:smoke" in text
    assert run(project, "deploy", "--check").returncode == 0


def test_repository_deployments_are_current():
    # The committed prefect.yaml and deployments/ are the generated ones (CI guards this).
    root = Path(__file__).parents[1]
    result = run(root, "deploy", "--check")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def helper_project(tmp_path: Path) -> Path:
    files = {
        "pyproject.toml": '[project]\nname = "shop"\n',
        "helpers/__init__.py": "",
        "helpers/shared.py": "def normalise(name: str) -> str:\n    return name.strip().lower()\n",
        "flows/checks.py": textwrap.dedent('''
            from helpers.shared import normalise

            async def check(name: str) -> str:
                """Check a normalised name."""
                return normalise(name)
            '''),
        "docs/README.md": "a folder to run commands from\n",
    }
    for relative, content in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(content)
    return tmp_path


LOAD_WITH_PREFECT = """
import asyncio, sys
from prefect.flows import load_flow_from_entrypoint
flow = load_flow_from_entrypoint(sys.argv[1], use_placeholder_flow=False)
print(type(flow).__name__, flow.name, asyncio.run(flow.fn.__wrapped__(" Shop ")))
"""


def test_deployed_workflow_importing_a_helper_loads_with_prefects_entrypoint_loader(helper_project):
    deployed = run(helper_project / "docs", "deploy")  # from a subfolder
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stderr == ""
    module = helper_project / "deployments" / "check.py"
    assert module.exists()
    # As `prefect deploy` and a worker load it: from the root with the relative entrypoint,
    # and from elsewhere with an absolute one (then only our code puts the root on sys.path).
    for cwd, entrypoint in [
        (helper_project, "deployments/check.py:check"),
        (helper_project / "docs", f"{module}:check"),
    ]:
        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_WITH_PREFECT, entrypoint],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.strip() == "Flow check shop"


def test_workflow_named_like_an_imported_project_package_is_refused(helper_project):
    (helper_project / "flows" / "odd.py").write_text(
        "from helpers.shared import normalise\n\nasync def helpers() -> None: ...\n"
    )
    result = run(helper_project, "deploy")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "runners-orchestrator: error: workflow 'helpers' (flows/odd.py:helpers) would be "
        "deployed as deployments/helpers.py, which a Prefect worker imports as the module "
        "'helpers', hiding the project's helpers that the workflow files import; rename the "
        "function or the module"
    )
