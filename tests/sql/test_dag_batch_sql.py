"""The DAG validators agree on the top-level ``batch`` key: lifecycle_dagster.core.dag_batch and
lifecycle.dag_check_batch report the same problems (codes, stages, paths, messages) in the same
order, for every ``batch_*`` case of tests/dag_cases.json and for random documents."""

from __future__ import annotations

import json
import random
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.core.dag import Batch, parse_dag, validate_dag

from helpers import TESTS

CASES = [
    c for c in json.loads((TESTS / "dag_cases.json").read_text(encoding="utf-8")) if c["name"].startswith("batch_")
]
VALUES: list[Any] = [
    1,
    5,
    500,
    10000,
    10001,
    0,
    -1,
    2.5,
    100.0,
    0.25,
    3600,
    3600.5,
    1e20,
    True,
    False,
    None,
    "5",
    [],
    {},
]


def _python(dag: Any) -> list[tuple[str, list[str], str, str]]:
    return [(p.code, list(p.stages), p.path, p.message) for p in validate_dag(dag)]


def _sql(conn: psycopg.Connection[Any], dag: Any) -> list[tuple[str, list[str], str, str]]:
    found = conn.execute("SELECT code, stages, path, message FROM lifecycle.dag_validate(%s)", (Jsonb(dag),))
    return [(r[0], list(r[1]), r[2], r[3]) for r in found.fetchall()]


def test_there_are_batch_cases() -> None:
    assert len(CASES) >= 12
    assert {c["valid"] for c in CASES} == {True, False}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_python_and_sql_report_the_same_batch_problems_in_order(db: str, case: dict[str, Any]) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        assert _sql(conn, case["dag"]) == _python(case["dag"])


def _random_batch(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rng.choice(VALUES)
    batch: dict[str, Any] = {}
    for key in ("max_executions", "max_wait_s", "size", "Max_wait_s"):
        if rng.random() < (0.9 if key.startswith("max") else 0.1):
            batch[key] = rng.choice(VALUES)
    return batch


def test_python_and_sql_agree_on_random_batches(db: str) -> None:
    rng = random.Random(4242)
    valid = 0
    with psycopg.connect(db, autocommit=True) as conn:
        for _ in range(300):
            dag = json.loads(json.dumps({"stages": [{"id": "a", "capability": "work"}], "batch": _random_batch(rng)}))
            python = _python(dag)
            assert _sql(conn, dag) == python, json.dumps(dag)
            if not python:
                valid += 1
                batch = parse_dag(dag).batch
                assert batch is None or isinstance(batch, Batch)
    assert valid >= 20


def test_a_definition_with_a_bad_batch_is_refused_by_the_database(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "SELECT lifecycle.dag_assert_valid(%s, 'ok')",
            (Jsonb({"stages": [{"id": "a", "capability": "work"}], "batch": {"max_executions": 3}}),),
        )
        with pytest.raises(psycopg.errors.CheckViolation, match=r"batch\.max_executions must be an integer"):
            conn.execute(
                "SELECT lifecycle.dag_assert_valid(%s, 'bad')",
                (Jsonb({"stages": [{"id": "a", "capability": "work"}], "batch": {"max_executions": 0}}),),
            )
