"""Tests of lifecycle_dagster.core.dag against the shared case table tests/dag_cases.json (no database)."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import random
from collections import Counter
from typing import Any

import pytest

from lifecycle_dagster.core.dag import (
    STAGE_ID_PATTERN,
    Approval,
    Batch,
    Dag,
    DagValidationError,
    Edge,
    Problem,
    RetrySpec,
    Stage,
    parse_dag,
    validate_dag,
)

from helpers import TESTS

CODES = {
    "not_an_object",
    "empty_dag",
    "duplicate_stage",
    "bad_stage_id",
    "unknown_stage",
    "self_loop",
    "cycle",
    "missing_capability",
    "unknown_key",
    "wrong_type",
    "bad_value",
    "next_edges_mismatch",
    "duplicate_edge",
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"dag_cases.json must be plain JSON, found {name}")


CASES: list[dict[str, Any]] = json.loads(
    (TESTS / "dag_cases.json").read_text(encoding="utf-8"), parse_constant=_reject_constant
)
BY_NAME = {c["name"]: c for c in CASES}


def _found(problems: list[Problem]) -> Counter[tuple[str, tuple[str, ...]]]:
    return Counter((p.code, tuple(sorted(p.stages))) for p in problems)


def _expected(case: dict[str, Any]) -> Counter[tuple[str, tuple[str, ...]]]:
    return Counter((p["code"], tuple(sorted(p["stages"]))) for p in case["problems"])


def _quoted(stage_id: str) -> str:
    """How messages quote a stage id: single quotes, control characters escaped as by repr()."""
    return "'" + "".join(repr(c)[1:-1] if c < " " or c == "\x7f" else c for c in stage_id) + "'"


def _edges(*pairs: str) -> list[dict[str, str]]:
    return [{"from": p[0], "to": p[1]} for p in pairs]


def _stages(*ids: str) -> list[dict[str, str]]:
    return [{"id": i, "capability": "work"} for i in ids]


DIAMOND = {"stages": _stages("a", "b", "c", "d"), "edges": _edges("ab", "ac", "bd", "cd")}


# ---------------------------------------------------------------------------- the case table


def test_case_table_is_well_formed() -> None:
    assert len(CASES) >= 40
    assert len(BY_NAME) == len(CASES), "case names must be unique"
    for case in CASES:
        assert set(case) == {"name", "dag", "valid", "problems"}, case["name"]
        assert case["valid"] == (case["problems"] == []), case["name"]
        for p in case["problems"]:
            assert set(p) == {"code", "stages"} and p["code"] in CODES, case["name"]
            assert p["stages"] == sorted(p["stages"]) and "" not in p["stages"], case["name"]
    assert {p["code"] for c in CASES for p in c["problems"]} == CODES, "every code has a case"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_validate_dag_matches_table(case: dict[str, Any]) -> None:
    problems = validate_dag(case["dag"])
    assert _found(problems) == _expected(case), [p.message for p in problems]
    for p in problems:
        assert isinstance(p, Problem) and p.code in CODES
        assert p.path or p.code == "not_an_object"
        for stage_id in p.stages:
            assert _quoted(stage_id) in p.message, p
        assert "\n" not in p.message and "\x00" not in p.message


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parse_dag_raises_iff_invalid(case: dict[str, Any]) -> None:
    if case["valid"]:
        dag = parse_dag(case["dag"])
        assert [s.id for s in dag.stages] == [s["id"] for s in case["dag"]["stages"]]
        assert len(dag.topological_order()) == len(dag.stages)
        return
    with pytest.raises(DagValidationError) as caught:
        parse_dag(case["dag"])
    err = caught.value
    assert isinstance(err, ValueError)
    assert _found(list(err.problems)) == _expected(case)
    text = str(err)
    assert text.startswith(f"invalid workflow DAG ({len(err.problems)} problem(s)):\n")
    assert text.splitlines()[1:] == [f"  - {p.message}" for p in err.problems]


def test_several_problems_are_all_listed_in_one_error() -> None:
    with pytest.raises(DagValidationError) as caught:
        parse_dag(BY_NAME["several_problems_at_once"]["dag"])
    assert len(caught.value.problems) == 11
    assert "stage 'qualify': capability is missing or empty" in str(caught.value)
    assert "stage 'discover': edge to unknown stage 'qualfy'" in str(caught.value)


# ---------------------------------------------------------------------------- problem details


def test_problem_paths_and_messages() -> None:
    problems = validate_dag(
        {
            "stages": [{"id": "a", "capability": "x", "retry": {"max_attempts": 0}}, {"id": "b"}],
            "edges": _edges("az"),
            "on_failure": "explode",
        }
    )
    assert [(p.code, p.stages, p.path) for p in problems] == [
        ("bad_value", (), "on_failure"),
        ("bad_value", ("a",), "stages[0].retry.max_attempts"),
        ("missing_capability", ("b",), "stages[1].capability"),
        ("unknown_stage", ("a",), "edges[0].to"),
    ]
    assert problems[1].message == "stage 'a': retry.max_attempts must be an integer from 1 to 1000, got 0"


def test_cycle_message_prints_the_cycle() -> None:
    [problem] = validate_dag(BY_NAME["cycle_of_three"]["dag"])
    assert problem.stages == ("a", "b", "c")
    assert problem.message.startswith("cycle: a -> b -> c -> a")
    [problem] = validate_dag({"stages": _stages("x", "y", "z"), "edges": _edges("xy", "yz", "zy")})
    assert problem.stages == ("y", "z") and problem.message.startswith("cycle: y -> z -> y")


def test_cycle_path_is_the_index_of_its_first_stage_in_stages() -> None:
    # as lifecycle.dag_validate reports it: an invalid stage declared before counts in the index
    chain = [{"id": s, "capability": "work", "next": [t]} for s, t in ("ab", "ba")]
    doc = {"stages": [{"id": "Bad", "capability": "work"}, *chain]}
    [bad, cycle] = validate_dag(doc)
    assert (bad.code, bad.path) == ("bad_stage_id", "stages[0].id")
    assert (cycle.code, cycle.path, cycle.message) == ("cycle", "stages[1]", "cycle: a -> b -> a (stages 'a', 'b')")


@pytest.mark.parametrize(
    "weird",
    [
        None,
        True,
        0,
        1.5,
        "",
        "x",
        [],
        [None],
        {},
        {"stages": [None, 1, "a", [], {}]},
        {
            "stages": [{"id": ["a"], "capability": {}, "next": [{}], "retry": {"jitter": []}}],
            "edges": [{"from": ["a"], "to": {"x": 1}}, [], None],
            "defaults": {"retry": {"non_retryable": [[]]}},
        },
        {
            "stages": [
                {
                    "id": "a",
                    "capability": "x",
                    "timeout_s": float("nan"),
                    "retry": {"max_attempts": 10**400, "base_delay_s": float("inf")},
                }
            ]
        },
        {1: 2, "stages": [{"id": "a", "capability": "x", 3: 4}]},
    ],
)
def test_validate_never_raises(weird: object) -> None:
    problems = validate_dag(weird)
    assert problems and all(p.code in CODES for p in problems)


def test_error_pickles() -> None:
    err = DagValidationError(validate_dag([]))
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


def test_stage_id_pattern() -> None:
    assert STAGE_ID_PATTERN == r"^[a-z][a-z0-9_]{0,62}$"


# ---------------------------------------------------------------------------- the Dag model


def test_runbook_model() -> None:
    dag = parse_dag(BY_NAME["runbook"]["dag"])
    order = ("discover", "qualify", "target_design", "value_realization", "integrity")
    assert dag.topological_order() == order
    assert dag.edges == tuple(itertools.pairwise(order))
    assert dag.on_failure == "compensate" and dag.default_retry is None and dag.default_timeout_s is None
    assert dag.stage("qualify") == Stage(id="qualify", capability="assessment", next=("target_design",))
    v2 = parse_dag(BY_NAME["runbook_v2_unconnected_stage"]["dag"])
    assert v2.topological_order() == (*order, "post_integrity")
    assert v2.parents("post_integrity") == () and v2.children("post_integrity") == ()


def test_diamond_model() -> None:
    dag = parse_dag(DIAMOND)
    assert dag.topological_order() == ("a", "b", "c", "d")
    assert dag.parents("a") == () and dag.parents("d") == ("b", "c") and dag.parents("b") == ("a",)
    assert dag.children("a") == ("b", "c") and dag.children("c") == ("d",) and dag.children("d") == ()
    assert dag.ancestors("d") == ("a", "b", "c")
    assert dag.ancestors("c") == ("a",) and dag.ancestors("a") == ()
    assert parse_dag(BY_NAME["diamond_via_next"]["dag"]).edges == dag.edges


def test_shuffled_declaration_order() -> None:
    dag = parse_dag({"stages": _stages("d", "c", "b", "a"), "edges": _edges("ab", "ac", "bd", "cd")})
    assert dag.topological_order() == ("a", "c", "b", "d")
    assert dag.edges == (("c", "d"), ("b", "d"), ("a", "c"), ("a", "b"))
    assert dag.parents("d") == ("c", "b") and dag.ancestors("d") == ("a", "c", "b")


def test_ready_stage_declared_first_goes_first() -> None:
    # Kahn with a priority queue, not batch by batch: 'd' is ready after 'a' and declared before 'b'
    dag = parse_dag({"stages": _stages("a", "d", "b", "e"), "edges": _edges("ad", "be")})
    assert dag.topological_order() == ("a", "d", "b", "e")


def test_order_is_stable_across_parses() -> None:
    stages = _stages(*"abcdefgh")
    edges = _edges("ab", "ac", "bd", "cd", "de", "fg", "gh", "ah")
    first = parse_dag({"stages": stages, "edges": edges}).topological_order()
    rng = random.Random(7)
    for _ in range(20):
        shuffled = edges[:]
        rng.shuffle(shuffled)
        dag = parse_dag(json.loads(json.dumps({"stages": stages, "edges": shuffled})))
        assert dag.topological_order() == first == ("a", "b", "c", "d", "e", "f", "g", "h")


def test_options_are_parsed() -> None:
    dag = parse_dag(BY_NAME["all_options"]["dag"])
    charge, ship = dag.stages
    assert charge.retry == RetrySpec(
        max_attempts=5,
        base_delay_s=0.5,
        max_delay_s=30.0,
        multiplier=2.0,
        jitter="full",
        non_retryable=("CardDeclined", "Fraud"),
    )
    assert isinstance(charge.retry.max_delay_s, float)
    assert (charge.timeout_s, charge.compensate, charge.description) == (120.0, "undo_x", "take the money")
    assert (ship.timeout_s, ship.compensate, ship.retry, ship.next) == (0.25, False, None, ())
    assert dag.default_retry == RetrySpec(max_attempts=3, jitter="none")
    assert dag.default_timeout_s == 600.0
    assert parse_dag(BY_NAME["on_failure_hold"]["dag"]).on_failure == "hold"
    retry = parse_dag(BY_NAME["max_attempts_integral_float"]["dag"]).stages[0].retry
    assert retry is not None and retry.max_attempts == 3 and isinstance(retry.max_attempts, int)
    assert parse_dag(BY_NAME["single_stage"]["dag"]).stages[0].next is None


def test_unknown_stage_lookups_raise_key_error() -> None:
    dag = parse_dag(DIAMOND)
    for lookup in (dag.stage, dag.parents, dag.children, dag.ancestors):
        with pytest.raises(KeyError, match="no stage 'zz'"):
            lookup("zz")


def test_hand_built_cyclic_dag_has_no_order() -> None:
    dag = Dag(stages=(Stage("a", "x"), Stage("b", "x")), edges=(("a", "b"), ("b", "a")))
    with pytest.raises(ValueError, match="cycle"):
        dag.topological_order()


# ---------------------------------------------------------------------------- branches and approvals


def test_edges_from_and_to_carry_the_conditions_in_declaration_order() -> None:
    dag = parse_dag(BY_NAME["branch_next_objects_when_unless"]["dag"])
    when = {"output": {"qualified_any": True}}
    assert dag.edges_from("qualify") == (
        Edge("qualify", "design", when=when),
        Edge("qualify", "report", unless=when),
    )
    assert dag.edges_to("report") == (Edge("qualify", "report", unless=when), Edge("design", "report"))
    assert dag.edges_to("qualify") == () and dag.edges_from("report") == ()
    assert dag.stage("qualify").next == ("design", "report")
    assert dag.children("qualify") == ("design", "report") and dag.parents("report") == ("qualify", "design")
    assert dag.ancestors("report") == ("qualify", "design")
    assert dag.edges == (("qualify", "design"), ("qualify", "report"), ("design", "report"))
    edges_form = parse_dag(BY_NAME["branch_edges_when_unless"]["dag"])
    assert edges_form.edge_specs == dag.edge_specs and edges_form.edges == dag.edges
    with pytest.raises(KeyError):
        dag.edges_from("nope")


def test_edge_fires() -> None:
    dag = parse_dag(BY_NAME["branch_both_forms_agree"]["dag"])
    plain, conditional = dag.edges_from("a")
    assert plain == Edge("a", "b") and plain.fires({}, {})
    assert conditional.target == "c"
    assert conditional.fires({"skip": False}, {"region": "eu", "tier": 1})
    assert not conditional.fires({"skip": True}, {"region": "eu"})
    assert not conditional.fires({}, {"region": "us"})


def test_edges_from_a_dag_built_by_hand_have_no_conditions() -> None:
    dag = Dag(stages=(Stage("a", "w"), Stage("b", "w")), edges=(("a", "b"),))
    assert dag.edges_from("a") == (Edge("a", "b"),) and dag.edges_to("b") == (Edge("a", "b"),)


def test_edge_conditions_are_copies_and_edges_hash() -> None:
    doc = copy.deepcopy(BY_NAME["branch_edges_when_unless"]["dag"])
    dag = parse_dag(doc)
    doc["edges"][0]["when"]["output"]["qualified_any"] = False
    assert dag.edges_from("qualify")[0].when == {"output": {"qualified_any": True}}
    assert len(set(dag.edge_specs)) == 3


def test_approval_stage_model() -> None:
    dag = parse_dag(BY_NAME["approval_stage_full"]["dag"])
    sign_off = dag.stage("sign_off")
    assert sign_off.kind == "approval" and sign_off.capability == "" and sign_off.timeout_s == 86400
    assert sign_off.approval == Approval(
        approvers=(
            "role:finance_approver",
            "5b0c3a52-6f0e-4b8e-9d7a-2a4f4b0b9e11",
            "5B0C3A52-6F0E-4B8E-9D7A-2A4F4B0B9E12",
            "role:a.b:c-d_9",
        ),
        timeout_s=86400,
        on_timeout="approve",
        on_reject="branch",
    )
    assert sign_off.next == ("deliver", "rework")
    [to_deliver, _] = dag.edges_from("sign_off")
    assert to_deliver.fires({"decision": "approve", "comment": None}, {})
    assert not to_deliver.fires({"decision": "reject"}, {})
    design = dag.stage("design")
    assert design.kind == "agent" and design.approval is None and design.capability == "work"
    minimal = parse_dag(BY_NAME["approval_stage_minimal"]["dag"]).stage("sign_off").approval
    assert minimal == Approval(("role:finance_approver",), None, "reject", "end")


def test_next_object_problem_paths() -> None:
    problems = validate_dag(BY_NAME["next_object_one_problem_per_reference_plus_patterns"]["dag"])
    assert [(p.code, p.path) for p in problems] == [
        ("unknown_stage", "stages[0].next[0].to"),
        ("wrong_type", "stages[0].next[0].when"),
        ("bad_value", "stages[0].next[0].unless"),
    ]
    assert problems[2].message == (
        "stage 'a': next[0].unless must have the key output, context or both, and no other; got {}"
    )


def test_an_invalid_kind_skips_the_rules_of_either_kind() -> None:
    [problem] = validate_dag({"stages": [{"id": "a", "kind": "Approval", "approvers": "x", "retry": 5}]})
    assert (problem.code, problem.path) == ("bad_value", "stages[0].kind")
    assert problem.message == "stage 'a': kind must be one of agent, approval, got 'Approval'"


def test_canonical_form_of_the_new_keys_is_key_order_free() -> None:
    from lifecycle_dagster.core.canonical import canonical_json

    doc = BY_NAME["approval_stage_full"]["dag"]
    shuffled = json.loads(json.dumps(doc), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert shuffled == doc and list(shuffled["stages"][1]) != list(doc["stages"][1])
    assert canonical_json(shuffled) == canonical_json(doc)
    assert '"approvers":["role:finance_approver",' in canonical_json(doc)  # arrays keep their order


def test_batch_is_parsed_with_its_default_wait() -> None:
    assert parse_dag(BY_NAME["batch_executions_and_wait"]["dag"]).batch == Batch(500, 2.0)
    only = parse_dag(BY_NAME["batch_executions_only_waits_the_default"]["dag"]).batch
    assert only == Batch(1, 5.0) and isinstance(only.max_wait_s, float)
    integral = parse_dag(BY_NAME["batch_integral_float_executions"]["dag"]).batch
    assert integral is not None and integral.max_executions == 100 and isinstance(integral.max_executions, int)
    assert parse_dag(BY_NAME["batch_null_is_no_batch"]["dag"]).batch is None
    assert parse_dag(DIAMOND).batch is None
    with pytest.raises(AttributeError):
        Batch(1, 5.0).max_executions = 2  # type: ignore[misc]


def test_batch_problem_paths_messages_and_order() -> None:
    problems = validate_dag(BY_NAME["batch_everything_wrong"]["dag"])
    assert [(p.code, p.stages, p.path, p.message) for p in problems] == [
        ("unknown_key", (), "batch.alpha", "workflow DAG: unknown key 'batch.alpha'"),
        ("unknown_key", (), "batch.zeta", "workflow DAG: unknown key 'batch.zeta'"),
        (
            "wrong_type",
            (),
            "batch.max_executions",
            "workflow DAG: batch.max_executions must be an integer from 1 to 10000, got a boolean",
        ),
        (
            "wrong_type",
            (),
            "batch.max_wait_s",
            "workflow DAG: batch.max_wait_s must be a number from 0 to 3600, got a string",
        ),
    ]
    [zero] = validate_dag(BY_NAME["batch_executions_zero"]["dag"])
    assert zero.message == "workflow DAG: batch.max_executions must be an integer from 1 to 10000, got 0"
    [not_object] = validate_dag(BY_NAME["batch_not_an_object"]["dag"])
    assert (not_object.path, not_object.message) == (
        "batch",
        "workflow DAG: batch must be an object or null, got a number",
    )
    # schedule, then batch, then the stages
    mixed = validate_dag(BY_NAME["batch_with_stage_and_schedule_problems"]["dag"])
    assert [p.path for p in mixed] == [
        "schedule.cron",
        "batch.max_executions",
        "batch.max_wait_s",
        "stages[0].capability",
    ]
    [huge] = validate_dag({"stages": [{"id": "a", "capability": "w"}], "batch": {"max_executions": float("inf")}})
    assert huge.code == "bad_value" and "a double can hold" in huge.message
