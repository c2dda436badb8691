"""A Prefect server that schedules, two runner servers, and a project with check suites;
for history and alerts, a webhook receiver, a page that toggles and the recording flow.

Prefect's test harness runs its server as "ephemeral", which starts no scheduler: the
suites' scheduled runs need a real ``prefect server start``, configured as ``dev``
configures it (``EMBEDDED_PREFECT_ENV``), on SQLite in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from monitoring_helpers import TogglePage, WebhookReceiver

from helpers import CLI, PAGES, free_port, serve_app
from runners_orchestrator.discovery import discover
from runners_orchestrator.embedded import EMBEDDED_PREFECT_ENV
from runners_orchestrator.runner_server import RunnerServerConfig, create_runner_app

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def scheduling_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` with the embedded default's settings; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-scheduling")
    port = free_port()
    env = {
        **os.environ,
        **EMBEDDED_PREFECT_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    prefect = str(Path(sys.executable).parent / "prefect")
    process = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the Prefect server did not start in 120s"
            time.sleep(0.2)
        yield api
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def regions() -> Iterator[dict[str, str]]:
    """Two runner servers, one per region: region → base URL."""
    with contextlib.ExitStack() as stack:
        yield {
            region: stack.enter_context(
                serve_app(create_runner_app(RunnerServerConfig(region=region, capacity=32)))
            )
            for region in ("us-east-1", "eu-west-1")
        }


class Project:
    """A project folder with the repository's workflows and the suites a test writes."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env

    def suite(self, name: str, text: str) -> Path:
        path = self.root / "checks" / f"{name}.toml"
        path.write_text(text)
        return path

    def clear_suites(self) -> None:
        for path in (self.root / "checks").glob("*.toml"):
            path.unlink()

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def cli_raw(self, command: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    @contextlib.contextmanager
    def serving(self, *args: str) -> Iterator[ServeFlows]:
        """``serve-flows ARGS`` in its own session, stopped (with its children) afterwards."""
        log_path = self.root / f"serve-{time.monotonic_ns()}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [*CLI, "serve-flows", "--log-level", "info", *args],
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                yield ServeFlows(process, log_path)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


class ServeFlows:
    """A running ``serve-flows`` and its log."""

    def __init__(self, process: subprocess.Popen[Any], log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def project(
    scheduling_prefect: str, regions: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Project:
    """The repository's workflows in a fresh folder, pointed at the scheduling Prefect."""
    root = tmp_path_factory.mktemp("suites-project")
    (root / "pyproject.toml").write_text('[project]\nname = "checks-demo"\n')
    shutil.copytree(ROOT / "flows", root / "flows")
    (root / "checks").mkdir()
    registry = {
        "servers": [
            {"id": region, "url": f"{url}/api/runner", "region": region}
            for region, url in regions.items()
        ]
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("ORCHESTRATOR_")}
    env |= {
        "PREFECT_API_URL": scheduling_prefect,
        "PREFECT_HOME": str(root / ".prefect"),
        "ORCHESTRATOR_REGISTRY": json.dumps(registry),
        "PWD": str(root),
    }
    return Project(root, env)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def toggle_page(pages) -> Iterator[TogglePage]:
    page = TogglePage(pages)
    yield page
    PAGES.pop(page.path, None)


@pytest.fixture(scope="session")
def orchestrate(prefect_server) -> Callable[..., Any]:
    """The seed's orchestration flow as discovery serves it (it records its result)."""
    return discover(ROOT).get("orchestrate_runners").flow


@pytest.fixture
def use_runner(monkeypatch, runner_url) -> str:
    """The orchestrator's registry: the session's runner server, region us-east-1."""
    registry = {
        "servers": [{"id": "us-1", "url": f"{runner_url}/api/runner", "region": "us-east-1"}]
    }
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", json.dumps(registry))
    return runner_url
