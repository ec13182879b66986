"""The backoff delay: one Python function and one SQL function, checked against one table of
cases and against each other on a grid up to attempt 2**31 - 1."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lifecycle_dagster.core.retry import retry_delay
from lifecycle_dagster.store.db import connect

CASES: list[dict[str, Any]] = json.loads((Path(__file__).resolve().parents[1] / "retry_delay_cases.json").read_text())
ARGS = ("attempt", "base", "cap", "multiplier", "jitter", "u")
SQL = "SELECT lifecycle.retry_delay(%s, %s, %s, %s, %s, %s) AS d"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(c[k]) for k in ARGS))
def test_python_matches_the_table(case: dict[str, Any]) -> None:
    got = retry_delay(*(case[k] for k in ARGS))
    assert math.isclose(got, case["delay"], rel_tol=1e-12, abs_tol=0.0)


def test_sql_matches_the_table_and_python_exactly(db: str) -> None:
    with connect(db) as conn:
        for case in CASES:
            row = conn.execute(SQL, tuple(case[k] for k in ARGS)).fetchone()
            assert row is not None
            assert math.isclose(row["d"], case["delay"], rel_tol=1e-12, abs_tol=0.0), case
            assert row["d"] == retry_delay(*(case[k] for k in ARGS)), case


ATTEMPTS = [*range(1, 71), 100, 1000, 10**6, 2**31 - 2, 2**31 - 1]
BASES = [0.0, 0.001, 1.0, 7.5, 1e6, 1e300]
CAPS = [0.0, 0.05, 60.0, 86400.0, 1e308]
MULTIPLIERS = [1.0, 1.0001, 1.5, 2.0, 10.0, 1e6]
JITTERS = [("none", 0.0), ("full", 0.0), ("full", 0.37), ("full", 0.999999), ("equal", 0.0), ("equal", 0.999999)]


def test_grid_within_bounds_and_python_equals_sql(db: str) -> None:
    grid = [(a, b, c, m, j, u) for a, b, c, m, (j, u) in itertools.product(ATTEMPTS, BASES, CAPS, MULTIPLIERS, JITTERS)]
    with connect(db) as conn:
        rows = conn.execute(
            "SELECT lifecycle.retry_delay(a, b, c, m, j, u) AS d FROM unnest("
            "%s::int[], %s::float8[], %s::float8[], %s::float8[], %s::text[], %s::float8[]) AS t(a, b, c, m, j, u)",
            [list(col) for col in zip(*grid, strict=True)],
        ).fetchall()
    assert len(rows) == len(grid) > 40_000
    for args, row in zip(grid, rows, strict=True):
        py = retry_delay(*args)
        assert row["d"] == py, args
        cap = args[2]
        assert 0.0 <= py <= cap, args
        a, b, c, m, j, _ = args
        raw = min(c, b) if a == 1 or m == 1.0 else None
        if raw is not None and j == "none":
            assert py == (0.0 if b == 0 or c == 0 else raw), args
        if j == "equal" and b > 0 and c > 0:
            assert py >= min(b, c) / 2 - 1e-300, args  # equal jitter never goes below half the base


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1.0, 60.0, 2.0, "none", 0.0), "attempt must be >= 1"),
        ((1, -1.0, 60.0, 2.0, "none", 0.0), "delays must be finite and >= 0"),
        ((1, 1.0, float("inf"), 2.0, "none", 0.0), "delays must be finite and >= 0"),
        ((1, 1.0, 60.0, 0.5, "none", 0.0), "multiplier must be a finite number >= 1"),
        ((3, 1.0, 60.0, float("nan"), "none", 0.0), "multiplier must be a finite number >= 1"),
        ((-(2**31), 1.0, 60.0, 2.0, "none", 0.0), "attempt must be >= 1"),
        ((1, 1.0, 60.0, 2.0, "full", float("nan")), "u must be in [0, 1)"),
        ((1, 1.0, 60.0, 2.0, "sometimes", 0.0), "jitter must be one of none, full, equal"),
        ((1, 1.0, 60.0, 2.0, "full", 1.0), "u must be in [0, 1)"),
    ],
)
def test_bad_arguments_are_refused_alike(db: str, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        retry_delay(*args)
    with connect(db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(message)):
        conn.execute(SQL, args)
