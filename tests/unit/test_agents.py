"""Tests for the built-in lifecycle agents (lifecycle_dagster.agents)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lifecycle_dagster.agents import (
    BUILTIN_CAPABILITIES,
    AgentError,
    AgentRegistry,
    DesignAgent,
    IntegrityAgent,
    OpportunityAgent,
    Task,
    builtin,
    default_registry,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUNBOOK = [  # stage id, capability (the runbook order)
    ("discover", "opportunity"),
    ("qualify", "assessment"),
    ("target_design", "design"),
    ("value_realization", "execution"),
    ("integrity", "governance"),
]
# The documented constants, restated so the expectations below are computed independently.
SAVINGS, MINIMUM, THRESHOLD, CONFIDENCE = 0.35, 10_000, 0.05, 0.8


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return data


def make_task(stage_id: str, capability: str, context: Any, upstream: Any) -> Task:
    return Task.from_input_data(
        execution_id="exec-1",
        stage_id=stage_id,
        capability=capability,
        attempt=1,
        input_data={"context": context, "upstream": upstream},
    )


def run_stages(context: dict[str, Any], upto: int = 5) -> dict[str, dict[str, Any]]:
    """Run the first `upto` runbook stages; return {capability: output}."""
    registry = default_registry()
    upstream: dict[str, Any] = {}
    outputs: dict[str, dict[str, Any]] = {}
    for stage_id, capability in RUNBOOK[:upto]:
        task = make_task(stage_id, capability, context, upstream)
        output = registry.get(BUILTIN_CAPABILITIES[capability]).run(task)
        outputs[capability] = output
        upstream[stage_id] = {"capability": capability, "output": output}
    return outputs


def test_constants_match_the_documented_formulas() -> None:
    assert (builtin.SAVINGS_FACTOR, builtin.MIN_OPPORTUNITY) == (SAVINGS, MINIMUM)
    assert (builtin.QUALIFY_THRESHOLD, builtin.CONFIDENCE) == (THRESHOLD, CONFIDENCE)


def test_acme_every_stage_exact_values() -> None:
    out = run_stages(load("acme"))

    # Opportunity: potential = process_cost * (1 - automation_rate) * 0.35, dropped below 10,000.
    manufacturing = round(450_000 * (1 - 0.2) * SAVINGS, 2)
    logistics = round(300_000 * (1 - 0.35) * SAVINGS, 2)
    finance = round(200_000 * (1 - 0.5) * SAVINGS, 2)
    facilities = round(40_000 * (1 - 0.3) * SAVINGS, 2)
    assert (manufacturing, logistics, finance, facilities) == (126_000, 68_250, 35_000, 9_800)
    assert facilities < MINIMUM
    opp = out["opportunity"]
    assert opp["opportunities"] == [
        {"id": "OPP-1", "segment": "Manufacturing", "potential_value": manufacturing},
        {"id": "OPP-2", "segment": "Logistics", "potential_value": logistics},
        {"id": "OPP-3", "segment": "Finance", "potential_value": finance},
    ]
    assert opp["dropped"] == [{"segment": "Facilities", "potential_value": facilities}]
    assert opp["total_potential"] == 229_250.00

    # Assessment: score = round(potential / annual_spend, 4), qualified iff >= 0.05.
    scores = {
        "Manufacturing": round(manufacturing / 1_200_000, 4),
        "Logistics": round(logistics / 800_000, 4),
        "Finance": round(finance / 2_500_000, 4),
    }
    assert scores == {"Manufacturing": 0.105, "Logistics": 0.0853, "Finance": 0.014}
    assessment = out["assessment"]
    assert [(q["id"], q["score"]) for q in assessment["qualified"]] == [
        ("OPP-1", scores["Manufacturing"]),
        ("OPP-2", scores["Logistics"]),
    ]
    assert assessment["rejected"] == [
        {
            "id": "OPP-3",
            "segment": "Finance",
            "potential_value": finance,
            "score": 0.014,
            "reason": "score 0.0140 < threshold 0.05",
        }
    ]
    assert assessment["qualified"][0]["reason"] == "score 0.1050 >= threshold 0.05"
    assert assessment["total_qualified"] == round(manufacturing + logistics, 2) == 194_250.00

    # Design: target = round(potential * 0.8, 2).
    target_m = round(manufacturing * CONFIDENCE, 2)
    target_l = round(logistics * CONFIDENCE, 2)
    assert (target_m, target_l) == (100_800, 54_600)
    design = out["design"]
    assert [t["target_value"] for t in design["targets"]] == [target_m, target_l]
    assert design["total_target"] == 155_400.00

    # Realization: realised = actuals[segment]; attainment = round(realised / target, 4).
    execution = out["execution"]
    assert execution["realisations"] == [
        {
            "id": "OPP-1",
            "segment": "Manufacturing",
            "target_value": target_m,
            "realised_value": 61_250.5,
            "attainment": round(61_250.5 / target_m, 4),
        },
        {
            "id": "OPP-2",
            "segment": "Logistics",
            "target_value": target_l,
            "realised_value": 58_500.0,
            "attainment": round(58_500 / target_l, 4),
        },
    ]
    assert [r["attainment"] for r in execution["realisations"]] == [0.6076, 1.0714]
    assert execution["total_realised"] == 119_750.50
    assert execution["attainment"] == round(119_750.5 / 155_400, 4) == 0.7706
    assert execution["untargeted_actuals"] == {}

    # Integrity passes.
    assert out["governance"] == {
        "checks": [
            "upstream_complete",
            "totals_reconcile",
            "realised_within_potential",
            "no_untargeted_actuals",
        ],
        "passed": True,
        "summary": "ACME Corp: all 4 integrity checks passed",
    }


# each example context, and the stages its lifecycle runs: acme completes, globex fails at
# integrity (the 5th), initech ends at qualify (the 2nd)
EXAMPLE_STAGES = {"acme": 5, "globex": 4, "initech": 2}
ASSESSMENT_KEYS = {"qualified", "rejected", "total_qualified", "artifacts", "summary"}
OUTCOME = r"^[a-z][a-z0-9_]{0,62}$"  # docs/branches.md: an `end.outcome` is a name


@pytest.mark.parametrize("example", sorted(EXAMPLE_STAGES))
def test_outputs_have_summary_and_are_json(example: str) -> None:
    outputs = run_stages(load(example), upto=EXAMPLE_STAGES[example])
    for output in outputs.values():
        assert isinstance(output["summary"], str)
        assert 0 < len(output["summary"]) < 120 and "\n" not in output["summary"]
        assert json.loads(json.dumps(output)) == output


def test_agents_are_deterministic_and_do_not_mutate_input() -> None:
    context = load("acme")
    before = copy.deepcopy(context)
    assert run_stages(context) == run_stages(context)
    assert context == before


def test_globex_fails_integrity_with_clear_message() -> None:
    context = load("globex")
    outputs = run_stages(context, upto=4)
    assert outputs["execution"]["untargeted_actuals"] == {"Research": 15_000.0}
    upstream = {sid: {"capability": cap, "output": outputs[cap]} for sid, cap in RUNBOOK[:4]}
    with pytest.raises(AgentError) as info:
        IntegrityAgent().run(make_task("integrity", "governance", context, upstream))
    assert info.value.code == "integrity_failed"
    assert (
        str(info.value)
        == info.value.message
        == (
            "integrity failed: realised value 140,000.00 EUR for Retail (OPP-1) exceeds its "
            "potential 126,000.00 EUR; actuals of 15,000.00 EUR reported for Research, "
            "which was never targeted"
        )
    )


@pytest.mark.parametrize("example", ["acme", "globex"])
def test_qualifying_examples_do_not_end_early(example: str) -> None:
    """At least one opportunity qualifies: no stage's output has `end`, and the assessment's keys
    are exactly those it always had (runbook-shaped DAGs behave as before)."""
    outputs = run_stages(load(example), upto=4)
    assert all("end" not in output for output in outputs.values())
    assert set(outputs["assessment"]) == ASSESSMENT_KEYS
    second = {"acme": "OPP-2", "globex": "OPP-3"}[example]
    assert [q["id"] for q in outputs["assessment"]["qualified"]] == ["OPP-1", second]


def test_initech_ends_the_lifecycle_not_qualified() -> None:
    """Every opportunity scores below the threshold: the assessment's output is the usual one plus
    `end`, outcome not_qualified, with the figures in its reason (docs/branches.md)."""
    context = load("initech")
    outputs = run_stages(context, upto=2)
    potentials = {
        "Software Services": round(320_000 * (1 - 0.6) * SAVINGS, 2),
        "Customer Support": round(150_000 * (1 - 0.45) * SAVINGS, 2),
        "Office Operations": round(60_000 * (1 - 0.3) * SAVINGS, 2),
        "Printing": round(25_000 * (1 - 0.5) * SAVINGS, 2),
    }
    assert potentials == {
        "Software Services": 44_800,
        "Customer Support": 28_875,
        "Office Operations": 14_700,
        "Printing": 4_375,
    }
    assert potentials["Printing"] < MINIMUM <= min(v for k, v in potentials.items() if k != "Printing")
    assert [o["segment"] for o in outputs["opportunity"]["opportunities"]] == [
        "Software Services",
        "Customer Support",
        "Office Operations",
    ]
    scores = [round(44_800 / 3_000_000, 4), round(28_875 / 900_000, 4), round(14_700 / 400_000, 4)]
    assert scores == [0.0149, 0.0321, 0.0367] and max(scores) < THRESHOLD

    assessment = outputs["assessment"]
    assert set(assessment) == ASSESSMENT_KEYS | {"end"}
    assert assessment["qualified"] == [] and assessment["total_qualified"] == 0
    rejected = [(r["id"], r["score"]) for r in assessment["rejected"]]
    assert rejected == list(zip(["OPP-1", "OPP-2", "OPP-3"], scores, strict=True))
    assert assessment["summary"] == "Initech: 0 of 3 opportunities qualified, worth 0.00 USD"
    assert assessment["end"] == {
        "outcome": "not_qualified",
        "reason": (
            "3 opportunities scored, none reached the threshold 0.05 (best: OPP-3 Office Operations, score 0.0367)"
        ),
    }
    assert re.fullmatch(OUTCOME, assessment["end"]["outcome"]) and len(assessment["end"]["reason"]) <= 1000
    assert "end" not in outputs["opportunity"]


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        # every segment too small: nothing to score
        (
            [{"name": "Retail", "annual_spend": 500_000, "process_cost": 20_000, "automation_rate": 0.5}],
            "0 opportunities scored, none reached the threshold 0.05",
        ),
        # one opportunity, rejected
        (
            [{"name": "Retail", "annual_spend": 1_000_000, "process_cost": 100_000, "automation_rate": 0}],
            "1 opportunity scored, none reached the threshold 0.05 (best: OPP-1 Retail, score 0.0350)",
        ),
    ],
)
def test_not_qualified_reason_counts_what_was_scored(segments: list[dict[str, Any]], reason: str) -> None:
    context = {"customer": "Hooli", "currency": "USD", "segments": segments}
    assert run_stages(context, upto=2)["assessment"]["end"] == {"outcome": "not_qualified", "reason": reason}


def test_a_score_exactly_at_the_threshold_qualifies_and_does_not_end() -> None:
    segments = [  # potential 40,000 * 0.35 = 14,000; 14,000 / 280,000 = 0.05
        {"name": "Retail", "annual_spend": 280_000, "process_cost": 40_000, "automation_rate": 0},
        {"name": "Research", "annual_spend": 1_000_000, "process_cost": 100_000, "automation_rate": 0},
    ]
    assessment = run_stages({"customer": "Hooli", "currency": "USD", "segments": segments}, upto=2)["assessment"]
    assert [(q["segment"], q["score"]) for q in assessment["qualified"]] == [("Retail", THRESHOLD)]
    assert set(assessment) == ASSESSMENT_KEYS


def test_integrity_reports_missing_stages_and_unreconciled_totals() -> None:
    context = load("acme")
    outputs = run_stages(context, upto=4)
    broken = dict(outputs["design"], total_target=155_400.01)
    upstream = {
        "discover": {"capability": "opportunity", "output": outputs["opportunity"]},
        "target_design": {"capability": "design", "output": broken},
        "value_realization": {"capability": "execution", "output": {}},
    }
    with pytest.raises(AgentError) as info:
        IntegrityAgent().run(make_task("integrity", "governance", context, upstream))
    message = info.value.message
    assert info.value.code == "integrity_failed"
    assert "upstream 'assessment' stage" in message
    assert "design total_target 155,400.01 USD does not equal the sum of its items 155,400.00 USD" in message
    assert "the execution stage produced an empty output" in message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["segments"][1].update(process_cost=-1),
            "context.segments[1].process_cost must be a non-negative number",
        ),
        (
            lambda c: c["segments"][0].update(automation_rate=1.5),
            "context.segments[0].automation_rate must be a number in [0, 1]",
        ),
        (
            lambda c: c["segments"][2].update(annual_spend="lots"),
            "context.segments[2].annual_spend must be a positive number",
        ),
        (
            lambda c: c["segments"][3].update(annual_spend=0),
            "context.segments[3].annual_spend must be a positive number",
        ),
        (
            lambda c: c["segments"][0].update(process_cost=True),
            "context.segments[0].process_cost must be a non-negative number",
        ),
        (
            lambda c: c["segments"][1].update(process_cost=900_000),
            "context.segments[1].process_cost must not exceed annual_spend",
        ),
        (
            lambda c: c["segments"][1].update(name="Manufacturing"),
            "context.segments[1].name 'Manufacturing' is already used by an earlier segment",
        ),
        (lambda c: c.update(segments=[]), "context.segments must be a non-empty list"),
        (lambda c: c.pop("customer"), "context.customer must be a non-empty string"),
        (
            lambda c: c.update(currency="usd"),
            "context.currency must be a three-letter upper-case code such as 'USD'",
        ),
        (
            lambda c: c["actuals"].update(Marketing=5),
            "context.actuals.Marketing does not name a segment in context.segments",
        ),
        (
            lambda c: c["actuals"].update(Logistics=None),
            "context.actuals.Logistics must be a non-negative number",
        ),
    ],
)
def test_bad_input_names_the_field_path(mutate: Any, expected: str) -> None:
    context = load("acme")
    mutate(context)
    with pytest.raises(AgentError) as info:
        OpportunityAgent().run(make_task("discover", "opportunity", context, {}))
    assert info.value.code == "bad_input"
    assert str(info.value) == expected


def test_bad_upstream_output_names_the_field_path() -> None:
    upstream = {"qualify": {"capability": "assessment", "output": {"qualified": [{"id": "OPP-1"}]}}}
    with pytest.raises(AgentError) as info:
        DesignAgent().run(make_task("target_design", "design", load("acme"), upstream))
    assert (info.value.code, info.value.message) == (
        "bad_input",
        "assessment.output.qualified[0].segment must be a string",
    )


def test_task_output_of() -> None:
    output = {"total_potential": 1.0}
    task = make_task("qualify", "assessment", {}, {"discover": {"capability": "opportunity", "output": output}})
    assert task.output_of("opportunity") == output
    with pytest.raises(AgentError) as info:
        task.output_of("design")
    assert info.value.code == "missing_upstream"
    assert info.value.message == (
        "stage 'qualify' needs the output of an upstream 'design' stage, "
        "but its upstream stages are: discover (opportunity)"
    )
    with pytest.raises(AgentError, match="upstream stages are: none"):
        make_task("discover", "opportunity", {}, None).output_of("opportunity")


@pytest.mark.parametrize(
    ("input_data", "expected"),
    [
        ({"upstream": {}}, "input_data.context must be an object"),
        ({"context": {}, "upstream": []}, "input_data.upstream must be an object"),
        (
            {"context": {}, "upstream": {"discover": {"output": {}}}},
            "input_data.upstream.discover.capability must be a string",
        ),
        (
            {"context": {}, "upstream": {"discover": {"capability": "opportunity"}}},
            "input_data.upstream.discover.output must be an object",
        ),
    ],
)
def test_task_from_input_data_rejects_malformed_data(input_data: Any, expected: str) -> None:
    with pytest.raises(AgentError) as info:
        Task.from_input_data(execution_id="e", stage_id="s", capability="c", attempt=1, input_data=input_data)
    assert (info.value.code, str(info.value)) == ("bad_input", expected)
    with pytest.raises(AgentError, match="attempt must be an integer >= 1"):
        Task.from_input_data(execution_id="e", stage_id="s", capability="c", attempt=0, input_data={"context": {}})


def test_registry() -> None:
    registry = default_registry()
    assert registry.names() == (
        "Assessment Agent",
        "Design Agent",
        "Integrity Agent",
        "Opportunity Agent",
        "Realization Agent",
    )
    assert set(BUILTIN_CAPABILITIES) == {
        "opportunity",
        "assessment",
        "design",
        "execution",
        "governance",
    }
    for name in BUILTIN_CAPABILITIES.values():
        assert registry.get(name).name == name
    with pytest.raises(ValueError, match="already registered"):
        registry.register(DesignAgent())
    small = AgentRegistry([DesignAgent(), OpportunityAgent()])
    with pytest.raises(KeyError) as info:
        small.get("Pricing Agent")
    assert info.value.args[0] == (
        "agent 'Pricing Agent' is not registered in this code location; registered: Design Agent, Opportunity Agent"
    )
