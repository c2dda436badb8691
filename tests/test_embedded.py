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
    assert stack(tmp_path, "auto", lines).runner_engine_and_chromium() == (
        "browser",
        shutil.which("chromium"),
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
