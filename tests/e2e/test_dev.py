"""`runners-orchestrator dev` as a user runs it: one command, real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from playwright.async_api import async_playwright

from helpers import CLI, descendants, free_port
from runners_orchestrator.orphans import LEDGER_ENV
from runners_orchestrator.runner_server.engines.browser import CHROMIUM_ARGS

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).parents[2]
PREFIX = "/api/orchestrator"


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def start_at_first_answer(api: str, job: dict[str, object], result: dict[str, object]) -> None:
    """What a script does: wait for the API to answer, then start a run at once."""
    deadline = time.monotonic() + 150
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(f"{api}{PREFIX}").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.02)
        response = http.post(f"{api}{PREFIX}/orchestrate_runners", json={"jobs": [job]})
        result.update(status=response.status_code, body=response.text)


@pytest.fixture(scope="module")
def dev(tmp_path_factory, pages) -> Iterator[dict[str, object]]:
    ports = {"api": free_port(), "prefect": free_port(), "runner": free_port()}
    while True:  # the second runner server takes the next port: it must be free too
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", ports["runner"] + 1))
            break
        except OSError:
            ports["runner"] = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    state = tmp_path_factory.mktemp("dev-state")
    process = subprocess.Popen(
        [
            *CLI,
            "dev",
            "--host",
            "::",  # uvicorn binds it IPv6-only: the API is reached on [::1]
            "--port",
            str(ports["api"]),
            "--prefect-port",
            str(ports["prefect"]),
            "--runner-port",
            str(ports["runner"]),
            "--state-dir",
            str(state),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    api = f"http://[::1]:{ports['api']}"
    first_start: dict[str, object] = {}
    job = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
    prober = threading.Thread(target=start_at_first_answer, args=(api, job, first_start))
    prober.start()
    started = time.monotonic()
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=150 - (time.monotonic() - started))
        except queue.Empty:
            process.kill()
            pytest.fail("dev was not ready in 150s:\n" + "\n".join(seen[-40:]))
        seen.append(line)
        if "is ready" in line:
            break
    ready_in = time.monotonic() - started
    while seen[-1].strip():  # the banner's URLs, up to its closing blank line
        seen.append(lines.get(timeout=10))
    prober.join(60)
    info = {
        "process": process,
        "api": api,
        "ports": ports,
        "ready_in": ready_in,
        "lines": lines,
        "banner": "".join(seen),
        "first_start": first_start,
        "state": state,
    }
    try:
        yield info
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def test_a_start_sent_the_moment_the_api_first_answers_is_accepted(dev):
    assert dev["first_start"]["status"] == 202, dev["first_start"]


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # gone meanwhile
        return ""


def result_of(api: str, name: str, body: dict[str, object]) -> httpx.Response:
    """Start ``name`` with ``body`` and poll its status URL until the run has ended."""
    started = httpx.post(f"{api}{PREFIX}/{name}", json=body)
    assert started.status_code == 202, started.text
    status_url = f"{api}{started.json()['statusUrl']}"
    deadline = time.monotonic() + 60
    while (done := httpx.get(status_url)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return done


def run_to_its_end(api: str, job: dict[str, object]) -> None:
    done = result_of(api, "executeSingleRunner", {"job": job})
    assert done.json()["state"] == "completed", done.json()


def test_dev_runs_each_flow_run_on_a_thread_of_its_serving_process(dev, pages):
    """`dev` starts `serve-flows --start in-process` (its default): no run gets a process,
    and a run leaves nothing open behind it in the long-lived serving process."""
    job = {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}
    run_to_its_end(dev["api"], job)
    pids = descendants(dev["process"].pid)
    serving = [pid for pid in pids if "serve-flows --start in-process" in command_line(pid)]
    assert len(serving) == 1, [command_line(pid) for pid in pids]
    assert not [pid for pid in pids if "forkserver" in command_line(pid)]  # no run's process
    # Its supervisor keeps the runs on its threads in the state folder, for the next start.
    environ = Path(f"/proc/{serving[0]}/environ").read_bytes().split(b"\0")
    ledger = dev["state"] / "in-process-runs"
    assert f"{LEDGER_ENV}={ledger}".encode() in environ
    assert ledger.is_dir()

    def open_files() -> int:
        time.sleep(1)  # the last run's thread has closed what it closes
        return len(list(Path(f"/proc/{serving[0]}/fd").iterdir()))

    before = open_files()
    for _ in range(10):
        run_to_its_end(dev["api"], job)
    # Each run's connections to the runner servers closed with it: two per run stayed open
    # for the garbage collector before (+20 here); slack for Prefect's own pools.
    assert open_files() < before + 8


def test_ready_banner_and_every_url_answers(dev):
    ports = dev["ports"]
    api = dev["api"]
    banner = dev["banner"]
    assert f"http://[::]:{ports['api']}/api/orchestrator" in banner  # IPv6 host in brackets
    if shutil.which("chromium"):  # CI installs it: dev then runs the browser engine
        assert "browser (headless Chromium: " in banner
    # The repo ships no suite: the banner says how to add one.
    assert re.search(r"check suites +none \(add one in checks/\*\*/\*\.toml", banner), banner
    assert httpx.get(f"{api}{PREFIX}").json()["orchestrators"] == [
        "execute_single_runner",
        "orchestrate_runners",
    ]
    assert httpx.get(f"{api}/schema/openapi.json").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{ports['prefect']}/api/health").json() is True
    for port, region in ((ports["runner"], "us-east-1"), (ports["runner"] + 1, "eu-west-1")):
        assert httpx.get(f"http://127.0.0.1:{port}/api/runner/health").json()["region"] == region


def test_seed_curl_sequence_and_a_burst_of_starts(dev, pages):
    api = dev["api"]
    jobs = [
        {
            "url": pages.url("/banner-visible"),
            "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
            "region": "us-east-1",
        },
        {
            "url": pages.url("/banner-missing"),
            "runners": ["cookieBannerVisibleTest"],
            "region": "eu-west-1",
        },
    ]
    done = result_of(api, "orchestrateRunners", {"jobs": jobs})
    assert done.status_code == 200
    assert done.json()["summary"] == {
        "total": 3,
        "passed": 2,
        "failed": 1,
        "errored": 0,
        "failovers": 0,
    }

    # A bounded burst: Prefect's SQLite "database is locked" must never reach a user.
    burst = [
        httpx.post(
            f"{api}{PREFIX}/execute_single_runner",
            json={"job": {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]}},
            timeout=60,
        ).status_code
        for _ in range(20)
    ]
    assert burst == [202] * 20


def run_cli(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHESTRATOR_"))}
    return subprocess.run(
        [*CLI, "run", *args],
        cwd=ROOT,
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_run_wait_exit_codes(dev, pages, tmp_path):
    through_api = {"ORCHESTRATOR_API_URL": dev["api"]}
    passing = tmp_path / "passing.json"
    passing.write_text(
        json.dumps([{"url": pages.url("/banner-visible"), "runners": ["cookieBannerVisibleTest"]}])
    )
    ok = run_cli("orchestrateRunners", "--jobs", str(passing), "--wait", env_extra=through_api)
    assert ok.returncode == 0, ok.stderr
    assert "cookieBannerVisibleTest" in ok.stdout
    assert "1 checks: 1 passed, 0 failed, 0 errored" in ok.stdout

    failing = tmp_path / "failing.json"
    failing.write_text(
        json.dumps(
            {
                "jobs": [
                    {"url": pages.url("/banner-missing"), "runners": ["cookieBannerVisibleTest"]}
                ]
            }
        )
    )
    bad = run_cli(
        "orchestrate_runners",
        "--jobs",
        str(failing),
        "--wait",
        "--json",
        "--option",
        "maxConcurrency=2",
        env_extra=through_api,
    )
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["summary"]["failed"] == 1

    job = json.dumps({"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"]})
    prefect = {"PREFECT_API_URL": f"http://127.0.0.1:{dev['ports']['prefect']}/api"}
    direct = run_cli("execute_single_runner", "--job", job, "--wait", "--json", env_extra=prefect)
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["results"][0]["details"] == {"title": "Peer Test Page"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["nope", "--job", "{}"],
            "unknown workflow 'nope'; available: execute_single_runner, orchestrate_runners",
        ),
        (
            ["orchestrate_runners", "--jobs", "/nonexistent/jobs.json"],
            "cannot read jobs file /nonexistent/jobs.json",
        ),
        (["orchestrate_runners", "--job", "{not json"], "--job is not valid JSON"),
        (["orchestrate_runners", "--job", '{"runners": ["x"]}'], "jobs.0.url: Field required"),
        (["orchestrate_runners"], "give NAME with --jobs FILE or --job JSON, or --suite NAME"),
    ],
)
def test_run_usage_errors_exit_2_with_one_line(dev, args, message):
    result = run_cli(*args, env_extra={"ORCHESTRATOR_API_URL": dev["api"]})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_port_in_use_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "dev", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"runners-orchestrator: error: port {port} on 127.0.0.1 is already in use; "
        "choose another with --port"
    )


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (.ci/run installs it; CI never skips this)",
)
@pytest.mark.timeout(300)  # checks in a real browser, then the Prefect UI in another one
async def test_prefect_ui_run_page_shows_the_results_table(dev, pages):
    api = dev["api"]
    jobs = [
        {
            "url": pages.url("/banner-visible"),
            "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
            "region": "us-east-1",
        },
        {"url": pages.url("/title"), "runners": ["exampleTitleVisibleTest"], "region": "eu-west-1"},
    ]
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        started = (await client.post(f"{PREFIX}/orchestrateRunners", json={"jobs": jobs})).json()
        deadline = time.monotonic() + 150  # catches a hang; a busy machine takes its time
        while (await client.get(started["statusUrl"])).status_code == 202:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    shots = Path(os.environ.get("SCREENSHOT_DIR", str(ROOT / ".state" / "screenshots")))
    shots.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the browser
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS)
        )
        try:
            # Tall enough for the flow run's artifacts (results, progress, checkpoints) and the
            # task runs' (the results table) on one screen.
            page = await browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(60_000)  # the UI re-renders as it polls; a busy machine
            await page.goto(started["uiUrl"], timeout=60_000)
            await page.get_by_text("Artifacts", exact=True).first.click(timeout=60_000)
            table_card = page.get_by_text("Every check: one row per job and runner.").first
            await table_card.wait_for(timeout=60_000)
            await page.get_by_text("jobs done: 2/2").first.wait_for(timeout=60_000)
            await page.screenshot(path=str(shots / "prefect-ui-run.png"))
            await table_card.scroll_into_view_if_needed()
            await table_card.click()
            for text in (
                "cookieBannerVisibleTest",
                pages.url("/banner-visible"),
                "eu-west-1",
                "pass",
            ):
                await page.get_by_text(text, exact=True).first.wait_for(timeout=60_000)
            await page.screenshot(path=str(shots / "prefect-ui-results.png"))
        finally:
            await browser.close()


def test_sigterm_stops_every_process_it_started(dev):
    process = dev["process"]
    family = descendants(process.pid)
    assert len(family) >= 5  # prefect, two runner servers, flows, api (and their children)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    deadline = time.monotonic() + 10
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(family) == set()
