"""The DAG validators agree on conditions and approval stages (issue 17): random documents built
from the new keys (``when``/``unless``, ``next`` objects, ``kind``, ``approvers``, ``on_timeout``,
``on_reject``), each checked by lifecycle_dagster.core.dag and lifecycle.dag_validate, which must
report the same problems: codes, stages, paths and messages (tests/dag_cases.json pins the cases)."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from lifecycle_dagster.core.dag import parse_dag, validate_dag

IDS: list[Any] = ["a", "b", "c", "d", "zz", "", 7]
PATTERNS: list[Any] = [
    {"output": {"ok": True}},
    {"output": {"ok": 1}},
    {"output": {"ok": 1.0}},
    {"context": {"region": "eu"}},
    {"output": {"tags": ["x"]}, "context": {}},
    {},
    {"result": 1},
    {"output": 1, "Context": 2},
    [],
    "ok",
    None,
    3,
]
APPROVERS: list[Any] = [
    "role:finance",
    "role:ops.team",
    "5b0c3a52-6f0e-4b8e-9d7a-2a4f4b0b9e11",
    "5B0C3A52-6F0E-4B8E-9D7A-2A4F4B0B9E11",
    "bob",
    "role:",
    "role:" + "r" * 64,
    5,
    None,
]


def _conditions(rng: random.Random, entry: dict[str, Any]) -> dict[str, Any]:
    for key in ("when", "unless"):
        if rng.random() < 0.4:
            entry[key] = copy.deepcopy(rng.choice(PATTERNS[:5] if rng.random() < 0.7 else PATTERNS))
    if rng.random() < 0.05:
        entry["label"] = "x"
    return entry


def _next_entry(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(IDS[:4])
    if roll < 0.95:
        entry: dict[str, Any] = {"to": rng.choice(IDS)} if rng.random() < 0.95 else {}
        return _conditions(rng, entry)
    return rng.choice([["a"], 1, None])


def _stage(rng: random.Random, sid: str) -> dict[str, Any]:
    approval = rng.random() < 0.35
    s: dict[str, Any] = {"id": sid}
    if approval:
        s["kind"] = "approval"
        if rng.random() < 0.9:
            s["approvers"] = [
                rng.choice(APPROVERS[:4] if rng.random() < 0.8 else APPROVERS) for _ in range(rng.randint(0, 3))
            ]
    else:
        if rng.random() < 0.2:
            s["kind"] = rng.choice(["agent", "agent", "human", 1])
        if rng.random() < 0.95:
            s["capability"] = "work"
    for key, values in (
        ("capability", ["work", ""]),
        ("retry", [{"max_attempts": 2}]),
        ("compensate", [False, "undo"]),
        ("approvers", [["role:x"]]),
        ("on_timeout", ["reject", "approve", "fail", "wait", None]),
        ("on_reject", ["end", "fail", "branch", "loop", 2]),
        ("timeout_s", [60, 0, "1h"]),
    ):
        if rng.random() < 0.12:
            s[key] = copy.deepcopy(rng.choice(values))
    if rng.random() < 0.7:
        s["next"] = [_next_entry(rng) for _ in range(rng.randint(0, 3))]
    return s


def _random_dag(rng: random.Random) -> dict[str, Any]:
    ids = ["a", "b", "c", "d"][: rng.randint(1, 4)]
    dag: dict[str, Any] = {"stages": [_stage(rng, sid) for sid in ids]}
    if rng.random() < 0.5:
        # often the same edges as the next entries (so next_edges_mismatch is sometimes satisfied)
        edges = [
            {"from": s["id"], **(dict(t) if isinstance(t, dict) else {"to": t})}
            for s in dag["stages"]
            for t in s.get("next", [])
            if rng.random() < 0.9
        ]
        for e in edges:
            if rng.random() < 0.15:
                _conditions(rng, e)
        dag["edges"] = edges
    return json.loads(json.dumps(dag))


def _sql(conn: psycopg.Connection[Any], dag: Any) -> Counter[tuple[str, tuple[str, ...], str, str]]:
    found = conn.execute("SELECT code, stages, path, message FROM lifecycle.dag_validate(%s)", (Jsonb(dag),))
    return Counter((r[0], tuple(sorted(r[1])), r[2], r[3]) for r in found.fetchall())


def test_python_and_sql_agree_on_random_branching_and_approval_dags(db: str) -> None:
    rng = random.Random(1717)
    valid = 0
    codes: Counter[str] = Counter()
    with psycopg.connect(db, autocommit=True) as conn:
        for _ in range(600):
            dag = _random_dag(rng)
            python = validate_dag(dag)
            expected = Counter((p.code, tuple(sorted(p.stages)), p.path, p.message) for p in python)
            assert _sql(conn, dag) == expected, json.dumps(dag)
            codes.update(p.code for p in python)
            if not python:
                valid += 1
                parse_dag(dag)
    assert valid >= 20
    assert {"next_edges_mismatch", "duplicate_edge", "bad_value", "wrong_type", "unknown_key"} <= set(codes)
