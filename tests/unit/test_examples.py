"""The files in examples/: every context is a profile the built-in agents accept, and every
definition file is one `publish` takes (no database)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle_dagster.agents.builtin import parse_profile
from lifecycle_dagster.store.versions import checked_for_publishing, read_definition_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONTEXTS = sorted(EXAMPLES.glob("*.json"))
DEFINITIONS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name.startswith("lifecycle_"))
# the keys of docs/branches.md (conditions, approval stages) are validated once
# lifecycle_dagster.core.conditions exists (issue 17)


def test_the_examples_are_all_here() -> None:
    assert [p.name for p in CONTEXTS] == ["acme.json", "globex.json", "initech.json"]
    assert [p.name for p in DEFINITIONS] == ["lifecycle_signoff.yaml", "lifecycle_v2.yaml"]


@pytest.mark.parametrize("path", CONTEXTS, ids=lambda p: p.name)
def test_every_example_context_is_a_valid_profile(path: Path) -> None:
    profile = parse_profile(json.loads(path.read_text(encoding="utf-8")))
    assert profile.segments


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.name)
def test_every_example_definition_declares_a_valid_context(path: Path) -> None:
    found = read_definition_file(path)
    declared = found.dag["context"]
    assert set(declared["required"]) <= set(declared["example"])
    assert declared["example"] == json.loads((EXAMPLES / "acme.json").read_text(encoding="utf-8"))
    parse_profile(declared["example"])


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.name)
def test_every_example_definition_can_be_published(path: Path) -> None:
    name, _, _, dag = checked_for_publishing(read_definition_file(path))
    assert name == {"lifecycle_v2.yaml": "lifecycle_v1", "lifecycle_signoff.yaml": "lifecycle_signoff"}[path.name]
    assert dag.stages


def test_the_signoff_definition_follows_docs_branches() -> None:
    """The shape docs/branches.md gives: an unconditioned qualify -> target_design (the assessment
    ends the execution itself), the approval stage and its conditioned edge."""
    stages = {s["id"]: s for s in read_definition_file(EXAMPLES / "lifecycle_signoff.yaml").dag["stages"]}
    assert list(stages) == ["discover", "qualify", "target_design", "sign_off", "value_realization", "integrity"]
    assert stages["qualify"]["next"] == ["target_design"]
    assert stages["target_design"]["next"] == ["sign_off"]
    assert stages["sign_off"] == {
        "id": "sign_off",
        "kind": "approval",
        "description": "finance signs off the value targets before they are pursued",
        "approvers": ["role:finance_approver"],
        "timeout_s": 604800,
        "on_timeout": "reject",
        "on_reject": "end",
        "next": [{"to": "value_realization", "when": {"output": {"decision": "approve"}}}],
    }
    assert stages["value_realization"]["next"] == ["integrity"]
