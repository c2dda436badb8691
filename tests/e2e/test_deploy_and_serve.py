"""Generated deployments through Prefect's own CLI and worker, and a real serve-flows process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from helpers import CLI, wait_for_deployment

PREFECT = [str(Path(sys.executable).parent / "prefect")]
HELPER = """\
DEFAULT_NAME = "world"


def normalise(name: str) -> str:
    return name.strip()
"""


@pytest.fixture
def project(tmp_path: Path, prefect_server) -> tuple[Path, dict[str, str]]:
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "demo"\n\n[tool.runners-orchestrator]\nwork_pool = "{pool}"\n'
    )
    (tmp_path / "flows" / "greetings").mkdir(parents=True)
    (tmp_path / "flows" / "greetings" / "hello.py").write_text(
        textwrap.dedent('''
        import os

        from helpers.shared import DEFAULT_NAME, normalise


        async def greet(name: str = DEFAULT_NAME) -> str:
            """Greet someone, from wherever the run happens."""
            return f"hello {normalise(name)} from {os.getpid()}"
        ''')
    )
    # Shared code beside the flows, imported by the workflow: the worker, the served
    # runner and every run's process must import it too.
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (tmp_path / "helpers" / "shared.py").write_text(HELPER)
    (tmp_path / "docs").mkdir()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "ORCHESTRATOR_WORK_POOL": pool,
        # As a shell started in the project root would have it: prefect.yaml's pull step
        # sets the working directory to "{{ $PWD }}" of the worker.
        "PWD": str(tmp_path),
    }
    return tmp_path, env


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


async def wait_final(flow_run_id: uuid.UUID, timeout: float = 60) -> object:
    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            await asyncio.sleep(0.2)
    pytest.fail(f"flow run {flow_run_id} did not finish within {timeout}s")


@pytest.mark.timeout(300)  # four Prefect CLI processes in a row: slow, not hung, on a busy machine
async def test_prefect_deploy_all_then_a_worker_runs_the_generated_deployment(project):
    root, env = project
    sh([*CLI, "deploy"], root, env)
    pool = env["ORCHESTRATOR_WORK_POOL"]
    sh([*PREFECT, "work-pool", "create", pool, "--type", "process"], root, env)
    sh([*PREFECT, "--no-prompt", "deploy", "--all"], root, env)

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("greet/greet")
        assert deployment.entrypoint == "deployments/greet.py:greet"
        assert deployment.work_pool_name == pool
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters={"name": "worker"}
        )
    worker_log = sh([*PREFECT, "worker", "start", "--pool", pool, "--run-once"], root, env)
    finished = await wait_final(run.id)
    assert finished.state.is_completed(), worker_log  # type: ignore[attr-defined]
    result = await finished.state.result()  # type: ignore[attr-defined]
    assert result.startswith("hello worker from ")


async def test_serve_flows_completes_a_run_submitted_through_the_api(project):
    root, env = project
    process = subprocess.Popen(
        [*CLI, "serve-flows", "--log-level", "warning"],
        cwd=root / "docs",  # a subfolder: the project root, not the working directory, is imported
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # nobody reads it: a full pipe must not stall the server
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deployment = await wait_for_deployment("greet/greet", process)
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"name": "served"}
            )
        finished = await wait_final(run.id)
        assert finished.state.is_completed(), finished.state  # type: ignore[attr-defined]
        result = await finished.state.result()  # type: ignore[attr-defined]
        assert result.startswith("hello served from ")
        assert result != f"hello served from {process.pid}"  # ran in its own process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def test_reload_serves_a_workflow_added_while_running(project):
    root, env = project
    process = subprocess.Popen(
        [*CLI, "serve-flows", "--reload", "--log-level", "warning"],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await wait_for_deployment("greet/greet", process)
        (root / "flows" / "greetings" / "later.py").write_text(
            "async def added_later(n: int = 2) -> int:\n    return n * 21\n"
        )
        deployment = await wait_for_deployment("added_later/added_later", process)
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment.id)
        finished = await wait_final(run.id)
        assert await finished.state.result() == 42  # type: ignore[attr-defined]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        # The reloader stops its child too: nothing of the session is left running
        # (exited processes that this container's init has not reaped yet do not count).
        # The fork server exits on its own once its parent is gone: on a loaded machine that
        # takes a moment, so wait for it (a leftover process still fails the test).
        deadline = time.monotonic() + 20
        while True:
            listing = subprocess.run(
                ["ps", "-o", "pid=,stat=,args=", "-s", str(process.pid)],
                capture_output=True,
                text=True,
                check=False,
            )
            running = [line for line in listing.stdout.splitlines() if " Z" not in line]
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert running == []


async def run_until(deployment_id: uuid.UUID, expected: str, timeout: float = 60) -> None:
    """Submit runs until one returns ``expected``: the reloaded server serves the new code."""
    deadline = time.monotonic() + timeout
    seen: list[object] = []
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.create_flow_run_from_deployment(deployment_id)
            finished = await wait_final(run.id)
            if finished.state.is_completed():  # type: ignore[attr-defined]
                result = await finished.state.result()  # type: ignore[attr-defined]
                seen.append(result)
                if result.startswith(expected):
                    return
            else:  # a run caught by a restart
                seen.append(finished.state)  # type: ignore[attr-defined]
            await asyncio.sleep(0.5)
    pytest.fail(f"no run returned {expected!r} within {timeout}s; got {seen}")


async def served_default(name: str) -> object:
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
    return deployment.parameter_openapi_schema["properties"]["name"]["default"]


@pytest.mark.timeout(240)  # three reloads, each importing Prefect again on a shared machine
async def test_reload_follows_an_edited_helper_and_recovers_from_a_broken_one(project):
    # The helper gives the workflow its parameter's default. A run's process imports the
    # helper from disk, but the workflow function, its defaults included, comes pickled
    # from the serving process: only a restarted server serves the new default.
    root, env = project
    process = subprocess.Popen(
        [*CLI, "serve-flows", "--reload", "--log-level", "warning"],
        cwd=root / "docs",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    helper = root / "helpers" / "shared.py"
    try:
        deployment = await wait_for_deployment("greet/greet", process)
        await run_until(deployment.id, "hello world from ")

        helper.write_text(HELPER.replace('"world"', '"edited"'))
        await run_until(deployment.id, "hello edited from ")
        assert await served_default("greet/greet") == "edited"

        # Broken: the only workflow cannot be imported, so the server exits; the reloader
        # stays, and serves again once the helper is fixed.
        helper.write_text("def normalise(:\n")
        await asyncio.sleep(6)
        assert process.poll() is None

        helper.write_text(HELPER.replace('"world"', '"fixed"'))
        await run_until(deployment.id, "hello fixed from ")
        assert await served_default("greet/greet") == "fixed"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
