from __future__ import annotations

import pytest

from runners_orchestrator import ConfigurationError, RunnerNotFoundError, RunnerResult
from runners_orchestrator.runner_server import RunnerContext, RunnerRegistry, default_registry


def test_decorator_registers_under_the_given_or_function_name():
    registry = RunnerRegistry()

    @registry.register()
    async def my_check(ctx: RunnerContext) -> RunnerResult:
        """Check something."""
        return RunnerResult(name=ctx.name, status="pass")

    @registry.register("namedCheck")
    async def other(ctx: RunnerContext) -> RunnerResult:
        return RunnerResult(name=ctx.name, status="pass")

    assert registry.names() == ["my_check", "namedCheck"]
    assert registry.get("my_check").description == "Check something."


def test_two_runners_with_one_name_are_refused():
    registry = default_registry()

    async def impostor(ctx: RunnerContext) -> RunnerResult:
        return RunnerResult(name=ctx.name, status="pass")

    with pytest.raises(ConfigurationError, match="'cookieBannerVisibleTest' is registered twice"):
        registry.register("cookieBannerVisibleTest")(impostor)


def test_sync_functions_are_refused():
    registry = RunnerRegistry()

    def sync(ctx: RunnerContext) -> RunnerResult:
        return RunnerResult(name=ctx.name, status="pass")

    with pytest.raises(ConfigurationError, match="must be an async function"):
        registry.register()(sync)  # type: ignore[arg-type]


def test_unknown_runner_names_the_available_ones():
    with pytest.raises(RunnerNotFoundError, match="available: cookieBannerVisibleTest"):
        default_registry().get("nope")


def test_installed_entry_points_contribute_runners(tmp_path, monkeypatch):
    # A real installed distribution, as pip would leave it: a module and its dist-info.
    (tmp_path / "acme_checks.py").write_text(
        "from runners_orchestrator import RunnerResult\n"
        "async def robots(ctx):\n"
        "    return RunnerResult(name=ctx.name, status='pass')\n"
        "def register(registry):\n"
        "    registry.register('robotsTxtTest')(robots)\n"
    )
    dist = tmp_path / "acme_checks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-checks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[runners_orchestrator.runners]\nacme = acme_checks:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "robotsTxtTest" in default_registry().names()


def test_broken_entry_point_names_itself(tmp_path, monkeypatch):
    dist = tmp_path / "broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[runners_orchestrator.runners]\nbad = no_such_module_here:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"entry point 'bad' \(no_such_module_here"):
        default_registry()
