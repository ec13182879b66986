"""PostgreSQL's ``jsonb @>`` is the oracle of tests/condition_cases.json: each case's answer is
what the real database says, and lifecycle_dagster.core.conditions.contains says the same."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from lifecycle_dagster.core.canonical import canonical_json
from lifecycle_dagster.core.conditions import contains, edge_fires

from helpers import TESTS

CASES: list[dict[str, Any]] = json.loads(
    (TESTS / "condition_cases.json").read_text(encoding="utf-8"), parse_float=Decimal
)


def _contains(conn: psycopg.Connection[Any], doc: Any, pattern: Any) -> bool:
    # canonical_json writes Decimals exactly: the database reads the numbers the table holds
    row = conn.execute("SELECT %s::jsonb @> %s::jsonb", (canonical_json(doc), canonical_json(pattern))).fetchone()
    assert row is not None
    return bool(row[0])


def test_the_database_gives_the_tables_answers(server_dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        wrong = [c["name"] for c in CASES if _contains(conn, c["doc"], c["pattern"]) is not c["contains"]]
        python = [c["name"] for c in CASES if contains(c["doc"], c["pattern"]) is not c["contains"]]
    assert wrong == [] and python == []


def _value(rng: random.Random, depth: int) -> Any:
    atoms: list[Any] = [0, 1, 1.0, 2, "1", "a", "é", True, False, None, 1.5, -0.0, 10**20]
    roll = rng.random()
    if depth <= 0 or roll < 0.4:
        return rng.choice(atoms)
    if roll < 0.7:
        return [_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice("abc"): _value(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def _part_of(rng: random.Random, value: Any) -> Any:
    """Mostly a part of ``value`` (so about half the pairs contain), sometimes anything."""
    if rng.random() < 0.3:
        return _value(rng, 2)
    if isinstance(value, dict):
        return {k: _part_of(rng, v) for k, v in value.items() if rng.random() < 0.6}
    if isinstance(value, list):
        extra = [_value(rng, 1)] if rng.random() < 0.2 else []
        return [_part_of(rng, v) for v in value if rng.random() < 0.6] + extra
    return value


def test_python_agrees_with_the_database_on_random_documents(server_dsn: str) -> None:
    rng = random.Random(17)
    answers = []
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        for _ in range(1500):
            doc = _value(rng, 4)
            pattern = _part_of(rng, doc)
            expected = _contains(conn, doc, pattern)
            assert contains(doc, pattern) is expected, (json.dumps(doc), json.dumps(pattern))
            answers.append(expected)
    assert 300 < sum(answers) < 1200  # both answers were exercised


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c["pattern"], dict)], ids=lambda c: str(c["name"]))
def test_edge_fires_is_when_contained_by_output_and_context(server_dsn: str, case: dict[str, Any]) -> None:
    when = {"output": case["pattern"]}
    doc = {"output": case["doc"], "context": {}}
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        assert _contains(conn, doc, when) is edge_fires(when, None, case["doc"], {})
        assert _contains(conn, doc, when) is not edge_fires(None, when, case["doc"], {})
