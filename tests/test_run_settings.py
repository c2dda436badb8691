"""How `serve-flows` hands a run its settings: once, as environment, computed once."""

from __future__ import annotations

from prefect import tags
from prefect.context import serialize_context
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_KEY,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    Settings,
    temporary_settings,
)

from runners_orchestrator.run_process import _context_without_settings, _SettingsEnvironmentOnce


def test_the_settings_environment_is_computed_once_per_settings_object(monkeypatch):
    computed: list[int] = []
    original = Settings.to_environment_variables

    def counting(self: Settings, **options: object) -> dict[str, str]:
        computed.append(1)
        return original(self, **options)

    monkeypatch.setattr(Settings, "to_environment_variables", counting)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 31}):
        first = _SettingsEnvironmentOnce().to_environment_variables(exclude_unset=True)
        again = _SettingsEnvironmentOnce().to_environment_variables(exclude_unset=True)
        assert first == again
        assert first["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "31"
        assert len(computed) == 1
        again["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "changed by the caller"
        assert _SettingsEnvironmentOnce().to_environment_variables(exclude_unset=True) == first
    # New settings (a new settings context): computed again, with the new values.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 47}):
        changed = _SettingsEnvironmentOnce().to_environment_variables(exclude_unset=True)
    assert changed["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "47"
    assert len(computed) == 2
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 47}):
        assert _SettingsEnvironmentOnce().flows.heartbeat_frequency == 47  # the rest: as is


def test_a_runs_context_is_prefects_without_the_settings():
    with tags("nightly"), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 31}):
        full = serialize_context()
        handed = _context_without_settings()
        assert full["settings_context"]  # Prefect's own carries them: validated again
        assert handed["settings_context"] == {}
        assert {k: v for k, v in handed.items() if k != "settings_context"} == {
            k: v for k, v in full.items() if k != "settings_context"
        }
        assert handed["tags_context"]["current_tags"] == {"nightly"}
        # Only a copy of the context stood in: the settings context here is untouched.
        assert serialize_context()["settings_context"] == full["settings_context"]


def test_secret_settings_reach_a_run_through_its_environment():
    # The run's process no longer gets a serialized copy of the settings: a secret the
    # serving process holds (from a profile, say) must be in the environment it hands over.
    with temporary_settings({PREFECT_API_KEY: "pnu_secret", PREFECT_API_AUTH_STRING: "u:p"}):
        environment = _SettingsEnvironmentOnce().to_environment_variables(exclude_unset=True)
    assert environment["PREFECT_API_KEY"] == "pnu_secret"
    assert environment["PREFECT_API_AUTH_STRING"] == "u:p"
