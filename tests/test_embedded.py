"""`dev`'s choice of runner engine, without starting the stack."""

from __future__ import annotations

import shutil

import pytest

from runners_orchestrator.embedded import DevStack, StackError
from runners_orchestrator.settings import get_settings


def stack(tmp_path, engine: str, lines: list[str]) -> DevStack:
    return DevStack(
        settings=get_settings(), project_root=tmp_path, runner_engine=engine, out=lines.append
    )


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_dev_uses_the_browser_engine_when_chromium_is_there(tmp_path):
    lines: list[str] = []
    from runners_orchestrator.runner_server.engines.browser import find_chromium  # noqa: PLC0415

    # The headless shell when Debian's chromium-headless-shell is installed, else chromium.
    assert stack(tmp_path, "auto", lines).runner_engine_and_chromium() == (
        "browser",
        find_chromium(None),
    )
    assert lines == []


def test_dev_falls_back_to_http_in_one_line_without_chromium(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PLAYWRIGHT_BROWSERS_PATH", raising=False)
    lines: list[str] = []
    assert stack(tmp_path, "auto", lines).runner_engine_and_chromium() == ("http", None)
    (line,) = lines
    assert line.startswith("runner servers use the HTTP engine (scripts are not run); ")
    assert "ORCHESTRATOR_CHROMIUM" in line
    assert "apt-get install chromium" in line
    assert "playwright install chromium" in line
    with pytest.raises(StackError, match="no Chromium found"):
        stack(tmp_path, "browser", []).runner_engine_and_chromium()
    assert stack(tmp_path, "http", lines).runner_engine_and_chromium() == ("http", None)


def test_the_ready_banner_names_the_suites_it_schedules(tmp_path):
    lines: list[str] = []
    dev = stack(tmp_path, "http", lines)
    assert dev._suites_line() == "none (add one in checks/**/*.toml: docs/monitoring.md)"
    (tmp_path / "checks").mkdir()
    job = '[[jobs]]\nurl = "http://127.0.0.1:9/"\nrunners = ["exampleTitleVisibleTest"]\n'
    (tmp_path / "checks" / "shop.toml").write_text(f'schedule = {{ interval = "5m" }}\n{job}')
    (tmp_path / "checks" / "adhoc.toml").write_text(job)
    (tmp_path / "checks" / "broken.toml").write_text("jobs = [")
    assert dev._suites_line() == (
        "adhoc (on demand), shop (every 5m (UTC)), 1 problem(s) in suite files, see the log above"
    )
