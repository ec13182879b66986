"""One way to name an agent registry (MODULE:FUNCTION) for the code location and the workers."""

from __future__ import annotations

import pytest

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.agents.loading import load_registry
from lifecycle_dagster.location.resources import configured_registry


def test_empty_means_the_builtin_agents() -> None:
    assert sorted(load_registry(None).names()) == sorted(load_registry("  ").names())
    assert "Integrity Agent" in load_registry("").names()


def test_module_function_and_a_bare_module() -> None:
    full = load_registry("queue_agents:registry")
    bare = load_registry("queue_agents")
    assert isinstance(full, AgentRegistry) and sorted(full.names()) == sorted(bare.names())


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("no_such_module_xyz:registry", "ModuleNotFoundError"),
        ("queue_agents:no_such_function", "AttributeError"),
        ("lifecycle_dagster.agents:Task", "TypeError"),
        ("lifecycle_dagster.agents.builtin:BUILTIN_CAPABILITIES", "TypeError"),
    ],
)
def test_a_bad_reference_is_a_clear_error_naming_it(ref: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as caught:
        load_registry(ref)
    assert repr(ref) in str(caught.value)


def test_the_code_location_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_AGENTS", "no_such_module_xyz:registry")
    expected = r"^LIFECYCLE_DAGSTER_AGENTS='no_such_module_xyz:registry' names no usable agent registry"
    with pytest.raises(ValueError, match=expected):
        configured_registry()


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("HEARTBEAT_S", "nan", "LIFECYCLE_DAGSTER_HEARTBEAT_S must be a number > 0, got 'nan'"),
        ("QUEUE_WAIT_S", "-1", "LIFECYCLE_DAGSTER_QUEUE_WAIT_S must be a number > 0, got '-1'"),
        ("SENSOR_INTERVAL_S", "0", "LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S must be an integer >= 1, got '0'"),
        ("MAX_OUTPUT_BYTES", "1.5", "LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES must be an integer >= 1, got '1.5'"),
    ],
)
def test_a_bad_setting_names_its_variable_when_used(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, message: str
) -> None:
    from lifecycle_dagster.settings import Settings

    monkeypatch.setenv(f"LIFECYCLE_DAGSTER_{name}", raw)
    settings = Settings.from_env()  # reading the environment never fails
    assert settings.webserver_url is None or isinstance(settings.webserver_url, str)
    with pytest.raises(ValueError) as caught:
        getattr(settings, name.lower())
    assert str(caught.value) == message


def test_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle_dagster.settings import Settings

    for key in list(__import__("os").environ):
        if key.startswith("LIFECYCLE_DAGSTER_") and key != "LIFECYCLE_DAGSTER_DATA_DIR":
            monkeypatch.delenv(key)
    s = Settings.from_env()
    assert (s.agents, s.webserver_url, s.sensor_interval_s) == (None, None, None)
    assert (s.heartbeat_s, s.heartbeat_timeout_s, s.queue_wait_s, s.max_output_bytes) == (5.0, 120.0, 3600.0, 8388608)
