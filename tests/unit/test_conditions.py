"""lifecycle_dagster.core.conditions against the shared table tests/condition_cases.json (no
database; tests/sql/test_conditions_sql.py holds the database to the same answers)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from lifecycle_dagster.core.conditions import PATTERN_KEYS, contains, edge_fires, json_key

from helpers import TESTS


def _reject_constant(name: str) -> Any:
    raise ValueError(f"condition_cases.json must be plain JSON, found {name}")


#: decoded with exact numbers (Decimal), as the database reads the same text
CASES: list[dict[str, Any]] = json.loads(
    (TESTS / "condition_cases.json").read_text(encoding="utf-8"),
    parse_float=Decimal,
    parse_constant=_reject_constant,
)


def test_case_table_is_well_formed() -> None:
    assert len(CASES) >= 40
    assert len({c["name"] for c in CASES}) == len(CASES), "case names must be unique"
    for case in CASES:
        assert set(case) == {"name", "doc", "pattern", "contains"}, case["name"]
        assert isinstance(case["contains"], bool), case["name"]
    answers = [c["contains"] for c in CASES]
    assert answers.count(True) >= 15 and answers.count(False) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_contains_matches_table(case: dict[str, Any]) -> None:
    assert contains(case["doc"], case["pattern"]) is case["contains"]


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["name"] != "precision_beyond_double"], ids=lambda c: str(c["name"])
)
def test_contains_matches_table_with_float_numbers(case: dict[str, Any]) -> None:
    # json.loads' own floats give the same answers, but where the text has more digits than a double
    doc, pattern = (json.loads(json.dumps(case[k], default=float)) for k in ("doc", "pattern"))
    assert contains(doc, pattern) is case["contains"]


def test_every_value_contains_itself() -> None:
    for case in CASES:
        for value in (case["doc"], case["pattern"]):
            assert contains(value, value), value


def test_tuples_are_arrays_and_mappings_objects() -> None:
    from types import MappingProxyType

    assert contains(MappingProxyType({"a": (1, 2)}), {"a": [2]})
    assert contains([1, 2], (2,))
    assert not contains((1,), {"a": 1})


WHEN = {"output": {"qualified_any": True}}


@pytest.mark.parametrize(
    ("when", "unless", "output", "context", "fires"),
    [
        (None, None, {}, {}, True),
        (WHEN, None, {"qualified_any": True, "n": 2}, {}, True),
        (WHEN, None, {"qualified_any": False}, {}, False),
        (WHEN, None, {"qualified_any": 1}, {}, False),
        (None, WHEN, {"qualified_any": True}, {}, False),
        (None, WHEN, {}, {}, True),
        (WHEN, WHEN, {"qualified_any": True}, {}, False),
        ({"context": {"region": "eu"}}, None, {}, {"region": "eu", "tier": 2}, True),
        ({"context": {"region": "eu"}}, {"output": {"skip": True}}, {"skip": True}, {"region": "eu"}, False),
        ({"output": {}}, None, {}, {}, True),
        ({"output": {"decision": "approve"}, "context": {"x": 1}}, None, {"decision": "approve"}, {"x": 1.0}, True),
    ],
)
def test_edge_fires(
    when: dict[str, Any] | None, unless: dict[str, Any] | None, output: Any, context: Any, fires: bool
) -> None:
    assert edge_fires(when, unless, output, context) is fires


def test_pattern_keys() -> None:
    assert PATTERN_KEYS == ("output", "context")


def test_json_key_is_jsonb_equality() -> None:
    assert json_key({"a": 1, "b": [1, 2]}) == json_key({"b": [1.0, Decimal("2.00")], "a": 1})
    assert json_key(1) != json_key(True) and json_key(0) != json_key(False)
    assert json_key(None) != json_key(False) and json_key("1") != json_key(1)
    assert json_key([1, 2]) != json_key([2, 1]) and json_key([1]) != json_key([1, 1])
    assert json_key({"a": None}) != json_key({})
    assert json_key(float("nan")) == json_key(float("nan"))  # never raises, even for what is not JSON
