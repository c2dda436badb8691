"""The browser engine over a real socket, with Debian's headless Chromium.

What only a browser sees (scripts, stylesheets), isolation between checks, a browser
killed mid-check, capacity, and a user's own browser runner.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from litestar import Litestar

from helpers import CLI, serve_app
from runners_orchestrator import RunnerResult
from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.runner_server import (
    RunnerContext,
    RunnerServerConfig,
    RunnerServerPlugin,
    create_runner_app,
    default_registry,
)
from runners_orchestrator.runner_server.engines.browser import CRASHED, BrowserEngine
from test_runner_server import execute, one_result

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx
    from playwright.async_api import Page

    from helpers import PageServer

pytestmark = pytest.mark.browser


def _drivers() -> set[int]:
    """Playwright's driver processes (one per started Playwright) below this test process."""
    mine = str(os.getpid())
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"run-driver" in cmdline and _descends_from(int(entry.name), mine):
            pids.add(int(entry.name))
    return pids


def _browser_pids(driver: int) -> set[int]:
    """The Chromium browser processes (not renderers) that ``driver`` launched."""
    mine = str(driver)
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        is_browser = b"--remote-debugging-pipe" in cmdline and not any(
            arg.startswith(b"--type=") for arg in cmdline
        )
        if is_browser and stat[0] != "Z" and _descends_from(int(entry.name), mine):
            pids.add(int(entry.name))
    return pids


def _descends_from(pid: int, ancestor: str) -> bool:
    while pid > 1:
        try:
            pid = int((Path(f"/proc/{pid}/stat")).read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if str(pid) == ancestor:
            return True
    return False


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, RunnerServerPlugin, int]]:
    """A browser-engine server of our own, whose engine the tests look into."""
    registry = default_registry("browser")

    @registry.register_browser("linkCountTest")
    async def link_count(page: Page, ctx: RunnerContext) -> RunnerResult:
        """Pass when the page has at least ``min`` links (a user's own browser runner)."""
        count = await page.locator("a").count()
        status = "pass" if count >= int(ctx.input.get("min", 1)) else "fail"
        return RunnerResult(name=ctx.name, status=status, details={"links": count})

    config = RunnerServerConfig(engine="browser", registry=registry, capacity=2, retry_after=4)
    plugin = RunnerServerPlugin(config)
    others = _drivers()  # other browser servers of this session run in this process too
    with serve_app(Litestar(plugins=[plugin])) as url:
        (driver,) = _drivers() - others
        yield url, plugin, driver


def _engine(plugin: RunnerServerPlugin) -> BrowserEngine:
    engine = plugin.engine
    assert isinstance(engine, BrowserEngine)
    return engine


async def test_banner_added_by_a_script_after_one_second(client, runner_url, server, pages):
    url = pages.url("/banner-late")
    body = {"url": url, "runners": ["cookieBannerVisibleTest"], "input": {"waitMs": 20_000}}
    http = (await execute(client, runner_url, body)).json()["results"][0]
    browser = (await execute(client, server[0], body)).json()["results"][0]
    assert http["status"] == "fail"
    assert browser["status"] == "pass", browser
    assert browser["details"] == {"visible": True, "selector": ".cookie-banner", "elementCount": 1}
    # It passes as soon as the banner shows, not at the end of the 20 s wait.
    assert 900 <= browser["durationMs"] < 10_000


@pytest.mark.parametrize(
    "path",
    ["/banner-stylesheet-hidden", "/banner-zero-size", "/banner-transparent"],
)
async def test_banner_a_person_cannot_see_fails(client, server, pages: PageServer, path):
    result = await one_result(client, server[0], pages.url(path), "cookieBannerVisibleTest")
    assert result["status"] == "fail"
    assert result["details"] == {"visible": False, "elementCount": 1}


async def test_banner_removed_by_a_script_fails(client, server, pages: PageServer):
    url = pages.url("/banner-removed")
    result = await one_result(client, server[0], url, "cookieBannerVisibleTest")
    assert result["status"] == "fail"
    assert result["details"] == {"visible": False, "elementCount": 0}


async def test_title_set_by_a_script_passes(client, runner_url, server, pages: PageServer):
    url = pages.url("/title-script")
    http = await one_result(client, runner_url, url, "exampleTitleVisibleTest")
    browser = await one_result(client, server[0], url, "exampleTitleVisibleTest")
    assert http["status"] == "fail"
    assert browser["status"] == "pass"
    assert browser["details"] == {"title": "Set By Script"}


async def test_consent_remembered_by_one_check_does_not_leak_into_the_next(
    client, server, pages: PageServer
):
    url = pages.url("/banner-until-consent")
    first = await one_result(client, server[0], url, "cookieBannerVisibleTest")
    second = await one_result(client, server[0], url, "cookieBannerVisibleTest")
    assert [first["status"], second["status"]] == ["pass", "pass"]
    assert _engine(server[1]).open_contexts == 0


async def test_page_that_never_loads_is_an_error_within_the_timeout(client, pages: PageServer):
    config = RunnerServerConfig(engine="browser", runner_timeout=5)
    with serve_app(create_runner_app(config)) as base:
        url = pages.url("/never-loads")
        body = {"url": url, "runners": ["cookieBannerVisibleTest"]}
        (result,) = (await execute(client, base, body)).json()["results"]
        # What the page showed when the time ran out: kept back from loading to take it.
        shot = await client.get(result["details"]["screenshot"])
        assert shot.headers["content-type"] == "image/jpeg"
    assert result["status"] == "error"
    assert result["errorMessage"].startswith(f"{url} did not finish loading within ")
    assert result["durationMs"] < 7000  # the 5 s timeout, not the image's 30 s


async def test_browser_killed_during_a_check_errors_it_and_the_next_check_passes(
    client, server, pages: PageServer
):
    base, plugin, driver = server
    engine = _engine(plugin)
    launches = engine.launches
    body = {
        "url": pages.url("/banner-missing"),
        "runners": ["cookieBannerVisibleTest"],
        "input": {"waitMs": 20_000},
    }
    pending = asyncio.create_task(execute(client, base, body))
    for _ in range(100):  # until the check waits in its page
        if engine.open_contexts == 1:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    (pid,) = _browser_pids(driver)
    os.kill(pid, signal.SIGKILL)
    response = await asyncio.wait_for(pending, 10)
    (killed,) = response.json()["results"]
    assert killed["status"] == "error"
    assert killed["errorMessage"] == CRASHED
    after = await one_result(client, base, pages.url("/banner-visible"), "cookieBannerVisibleTest")
    assert after["status"] == "pass"
    assert engine.launches == launches + 1
    assert len(_browser_pids(driver)) == 1
    health = (await client.get(f"{base}/api/runner/health")).json()
    assert health["inFlight"] == 0


async def test_over_capacity_is_429_never_5xx_and_nothing_stays_open(
    client: httpx.AsyncClient, server, pages: PageServer
):
    base, plugin, _ = server
    body = {
        "url": pages.url("/banner-late"),
        "runners": ["cookieBannerVisibleTest"],
        "input": {"waitMs": 3000},
    }
    responses = await asyncio.gather(*(execute(client, base, body) for _ in range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2
    assert statuses.count(429) >= 1
    assert set(statuses) <= {200, 429}
    for response in responses:
        if response.status_code == 429:
            assert response.headers["Retry-After"] == "4"
            assert response.json()["data"]["capacity"] == 2
        else:
            assert response.json()["results"][0]["status"] == "pass"
    health = (await client.get(f"{base}/api/runner/health")).json()
    assert (health["inFlight"], health["capacity"]) == (0, 2)
    assert _engine(plugin).open_contexts == 0


async def test_a_users_browser_runner_is_served_like_the_builtins(client, server, pages):
    base, _, _ = server
    info = (await client.get(f"{base}/api/runner/info")).json()
    builtins = ["cookieBannerVisibleTest", "exampleTitleVisibleTest"]
    assert info["runners"] == [*builtins, "linkCountTest"]
    assert info["engine"] == "browser"
    body: dict[str, Any] = {
        "url": pages.url("/banner-visible"),
        "runners": ["linkCountTest", {"name": "linkCountTest", "input": {"min": 0}}],
    }
    results = (await execute(client, base, body)).json()["results"]
    assert [r["status"] for r in results] == ["fail", "pass"]
    assert results[0]["details"]["links"] == 0
    assert "screenshot" in results[0]["details"]  # failures of a user's runner show too


def test_an_http_server_refuses_browser_runners():
    registry = default_registry("browser")
    with pytest.raises(ConfigurationError, match="need a browser"):
        RunnerServerPlugin(RunnerServerConfig(registry=registry))


def test_browser_server_without_chromium_refuses_to_start_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [*CLI, "runner-server", "--engine", "browser"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "runners-orchestrator: error: no Chromium found for the browser engine: set "
        "ORCHESTRATOR_CHROMIUM (or --chromium) to its path, install Debian's package "
        "(apt-get install chromium), or run `playwright install chromium`"
    )


async def test_a_failed_check_links_a_small_screenshot_and_a_pass_none(client, server, pages):
    base, _, _ = server
    body: dict[str, Any] = {
        "url": pages.url("/banner-stylesheet-hidden"),
        "runners": ["cookieBannerVisibleTest", "exampleTitleVisibleTest"],
        "input": {"waitMs": 200},
    }
    banner, title = (await execute(client, base, body)).json()["results"]
    assert banner["status"] == "fail"
    assert banner["details"]["screenshot"].startswith(f"{base}/api/runner/screenshots/")
    shot = await client.get(banner["details"]["screenshot"])
    assert shot.status_code == 200
    assert shot.headers["content-type"] == "image/jpeg"
    assert shot.content.startswith(b"\xff\xd8")  # a JPEG
    assert len(shot.content) < 100_000
    assert title["status"] == "fail"  # no <title> on that page: a second, distinct screenshot
    assert title["details"]["screenshot"] != banner["details"]["screenshot"]

    passing = await one_result(
        client, base, pages.url("/banner-visible"), "cookieBannerVisibleTest"
    )
    assert "screenshot" not in passing["details"]

    errored = await execute(
        client, base, {"url": pages.url("/status?code=503"), "runners": ["exampleTitleVisibleTest"]}
    )
    (result,) = errored.json()["results"]
    assert result["status"] == "error"
    assert (await client.get(result["details"]["screenshot"])).status_code == 200

    missing = await client.get(f"{base}/api/runner/screenshots/nope.jpg")
    assert missing.status_code == 404
    assert missing.json()["code"] == "NOT_FOUND"
