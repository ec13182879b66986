"""One way to name an agent registry (MODULE:FUNCTION) for the code location and the workers."""

from __future__ import annotations

import pytest

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.agents.loading import load_registry
from lifecycle_dagster.resources import configured_registry


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
    with pytest.raises(ValueError, match=r"^LIFECYCLE_DAGSTER_AGENTS: agent registry 'no_such_module_xyz:registry'"):
        configured_registry()
