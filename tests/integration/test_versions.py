"""Versioned publishing (issue "versions"): the database's DAG validator agrees with dag.py,
publish / activate under concurrency, the CLI, runs pinned to their version, the webserver reload.
Real Postgres and real Dagster throughout."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentOverloaded, AgentRegistry, Task
from lifecycle_dagster.cli.main import main
from lifecycle_dagster.core.dag import parse_dag, validate_dag
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.reload import WEBSERVER_URL_ENV, reload_code_location
from lifecycle_dagster.location.retention import RETENTION_JOB
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.versions import (
    FINAL_STATUSES,
    PublishError,
    activate,
    isolated_stages,
    list_versions,
    publish,
)

from helpers import TESTS, install, rows, run, runbook_section

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CASES: list[dict[str, Any]] = json.loads((TESTS / "dag_cases.json").read_text(encoding="utf-8"))


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _chain(*ids: str, capability: str = "work") -> dict[str, Any]:
    """A chain of stages, each ``next`` the following one."""
    return {
        "stages": [
            {"id": s, "capability": capability, **({"next": [ids[i + 1]]} if i + 1 < len(ids) else {})}
            for i, s in enumerate(ids)
        ]
    }


def _definitions(dsn: str, name: str) -> list[dict[str, Any]]:
    return rows(
        dsn,
        "SELECT version, is_active, dag_schema, description FROM workflow_definitions WHERE name = %(n)s"
        " ORDER BY version",
        n=name,
    )


def _definition_events(dsn: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r["event_type"], r["metadata"])
        for r in rows(
            dsn,
            "SELECT event_type, metadata FROM workflow_events WHERE execution_id IS NULL"
            " AND event_type LIKE 'definition_%%' ORDER BY id",
        )
    ]


def _loaded_jobs(dsn: str) -> list[str]:
    """The jobs the code location builds now (what a reload would load)."""
    repo = definitions_from_snapshot(fetch_snapshot(dsn)).get_repository_def()
    return sorted(j.name for j in repo.get_all_jobs() if j.name != RETENTION_JOB)


# =============================================================================================
# The database's validator and dag.py agree
# =============================================================================================


def _sql_problems(conn: psycopg.Connection[Any], dag: Any) -> list[tuple[str, tuple[str, ...], str]]:
    """(code, stages in code-point order, message) of each problem the database finds."""
    return [
        (r[0], tuple(r[1]), r[2])
        for r in conn.execute(
            'SELECT code, ARRAY(SELECT s FROM unnest(stages) AS s ORDER BY s COLLATE "C"), message'
            " FROM lifecycle.dag_validate(%s)",
            (Jsonb(dag),),
        ).fetchall()
    ]


def _has_nul(case: dict[str, Any]) -> bool:
    return "\\u0000" in json.dumps(case["dag"])


def test_exactly_two_cases_cannot_be_jsonb() -> None:
    assert sorted(c["name"] for c in CASES if _has_nul(c)) == ["capability_nul", "description_nul"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sql_validator_agrees_with_dag_py(db: str, case: dict[str, Any]) -> None:
    python = validate_dag(case["dag"])
    expected = Counter((p["code"], tuple(p["stages"])) for p in case["problems"])
    assert Counter((p.code, tuple(sorted(p.stages))) for p in python) == expected
    with psycopg.connect(db, autocommit=True) as conn:
        if _has_nul(case):
            # jsonb cannot hold U+0000: such a DAG never reaches the table, whoever sends it
            with pytest.raises(psycopg.errors.UntranslatableCharacter):
                _sql_problems(conn, case["dag"])
            return
        sql = _sql_problems(conn, case["dag"])
    assert Counter((code, stages) for code, stages, _ in sql) == expected
    # the same sentences too, so `validate` and the trigger's error read alike
    assert sorted(m for _, _, m in sql) == sorted(p.message for p in python)


def _random_dag(rng: random.Random) -> Any:
    ids: list[Any] = ["a", "b", "c", "d", "e", "B", "", "x1", 7, None]
    values: list[Any] = [None, True, False, 0, 1, -1, 2.5, 3.0, 1e308, 10**400, "", "s", "full", [], {}, ["a"]]

    def value() -> Any:
        return copy.deepcopy(rng.choice(values))

    def stage() -> Any:
        if rng.random() < 0.05:
            return value()
        s: dict[str, Any] = {}
        if rng.random() < 0.95:
            s["id"] = rng.choice(ids)
        if rng.random() < 0.9:
            s["capability"] = rng.choice(["work", "work", "", None, 3])
        if rng.random() < 0.6:
            s["next"] = [rng.choice(ids) for _ in range(rng.randint(0, 3))] if rng.random() < 0.9 else value()
        if rng.random() < 0.2:
            keys = ["max_attempts", "base_delay_s", "max_delay_s", "multiplier", "jitter", "non_retryable", "oops"]
            s["retry"] = {k: value() for k in rng.sample(keys, rng.randint(0, 3))} if rng.random() < 0.9 else value()
        for key in ("timeout_s", "compensate", "description"):
            if rng.random() < 0.1:
                s[key] = value()
        return s

    dag: dict[str, Any] = {}
    if rng.random() < 0.95:
        dag["stages"] = [stage() for _ in range(rng.randint(0, 7))]
    if rng.random() < 0.6:
        dag["edges"] = [
            {"from": rng.choice(ids), "to": rng.choice(ids)} if rng.random() < 0.9 else value()
            for _ in range(rng.randint(0, 7))
        ]
    if rng.random() < 0.1:
        dag["defaults"] = rng.choice([{"retry": {"max_attempts": value()}}, {"timeout_s": value()}, value()])
    if rng.random() < 0.1:
        dag["on_failure"] = value()
    return json.loads(json.dumps(dag))


def test_sql_validator_agrees_on_random_documents(db: str) -> None:
    rng = random.Random(20240301)
    with psycopg.connect(db, autocommit=True) as conn:
        for _ in range(400):
            dag = _random_dag(rng)
            python = Counter((p.code, tuple(sorted(p.stages))) for p in validate_dag(dag))
            assert Counter((code, stages) for code, stages, _ in _sql_problems(conn, dag)) == python, json.dumps(dag)


def test_sql_validator_finds_each_cycle_component_in_a_large_graph(db: str) -> None:
    # 300 stages: a long chain with two separate cycles hanging off it and one between them
    ids = [f"s{i}" for i in range(300)]
    dag = _chain(*ids)
    dag["stages"][150]["next"].append("s100")  # s100 .. s150 is a cycle
    dag["stages"][299]["next"] = ["s280"]  # s280 .. s299 is another
    python = validate_dag(dag)
    assert [(p.code, len(p.stages)) for p in python] == [("cycle", 51), ("cycle", 20)]
    with psycopg.connect(db, autocommit=True) as conn:
        assert sorted(_sql_problems(conn, dag)) == sorted((p.code, tuple(sorted(p.stages)), p.message) for p in python)


# =============================================================================================
# The trigger: any client's INSERT of an invalid DAG is refused
# =============================================================================================


def test_an_invalid_dag_inserted_by_raw_sql_is_refused_naming_the_stage(db: str) -> None:
    bad = _chain("discover", "qualify")
    bad["stages"][1]["next"] = ["discover"]  # a cycle
    bad["stages"].append({"id": "Target", "capability": "design"})
    with psycopg.connect(db, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('wf', 1, %s, true)",
            (Jsonb(bad),),
        )
    diag = err.value.diag
    assert diag.sqlstate == "23514"
    assert diag.constraint_name == "workflow_definitions_dag_valid"
    assert diag.message_primary == (
        "invalid workflow DAG: workflow wf v1 has 2 problems: "
        "stage 'Target': id must match ^[a-z][a-z0-9_]{0,62}$, got 'Target'; "
        "cycle: discover -> qualify -> discover (stages 'discover', 'qualify')"
    )
    assert diag.message_detail == (
        "  - [bad_stage_id at stages[2].id] stage 'Target': id must match ^[a-z][a-z0-9_]{0,62}$, got 'Target'\n"
        "  - [cycle at stages[0]] cycle: discover -> qualify -> discover (stages 'discover', 'qualify')"
    )
    assert rows(db, "SELECT count(*) AS n FROM workflow_definitions") == [{"n": 0}]


def test_every_problem_is_listed_in_the_one_error(db: str) -> None:
    [case] = [c for c in CASES if c["name"] == "several_problems_at_once"]
    messages = [p.message for p in validate_dag(case["dag"])]
    with psycopg.connect(db, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(
            "INSERT INTO workflow_definitions (name, dag_schema) VALUES ('wf', %s)",
            (Jsonb(case["dag"]),),
        )
    text = err.value.diag.message_primary or ""
    assert text.startswith(f"invalid workflow DAG: workflow wf v1 has {len(messages)} problems: ")
    assert len(messages) == 11
    for message in messages:
        assert message in text


def test_a_document_that_is_not_an_object_is_left_to_its_check_constraint(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute("INSERT INTO workflow_definitions (name, dag_schema) VALUES ('wf', '[]')")
    assert err.value.diag.constraint_name == "workflow_definitions_dag_is_object"


def test_existing_rows_are_not_revalidated(db: str) -> None:
    # a row stored before 0007 (trigger off for this insert, as on a database migrated from 0006)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("ALTER TABLE workflow_definitions DISABLE TRIGGER workflow_definitions_valid_dag")
        conn.execute(
            "INSERT INTO workflow_definitions (name, dag_schema, description) VALUES ('legacy', %s, 'old')",
            (Jsonb({"stages": [{"id": "a", "capability": "x", "next": ["a"]}]}),),
        )
        conn.execute("ALTER TABLE workflow_definitions ENABLE TRIGGER workflow_definitions_valid_dag")
        # updates that leave the DAG alone still work (description, activation)
        conn.execute("UPDATE workflow_definitions SET description = 'kept', is_active = true WHERE name = 'legacy'")
    assert rows(db, "SELECT description, is_active FROM workflow_definitions") == [
        {"description": "kept", "is_active": True}
    ]


# ------------------------------------------------------------------------------ the runbook


def test_runbook_section1_then_section6_once_is_accepted_and_twice_is_refused(db: str) -> None:
    with psycopg.connect(db, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(runbook_section(1))
        conn.execute(runbook_section(1))  # the idempotent upsert re-runs cleanly
        conn.execute(runbook_section(6))  # v2 adds post_integrity, connected to nothing: valid
        before = _definitions(db, "lifecycle_v1")
        assert [(d["version"], d["is_active"]) for d in before] == [(1, False), (2, True)]
        assert isolated_stages(parse_dag(before[1]["dag_schema"])) == ("post_integrity",)
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(runbook_section(6))  # would store v3 with post_integrity declared twice
    assert err.value.diag.message_primary == (
        "invalid workflow DAG: workflow lifecycle_v1 v3 has 1 problem: "
        "stage 'post_integrity': declared 2 times (stages[5], stages[6])"
    )
    assert _definitions(db, "lifecycle_v1") == before


# =============================================================================================
# Publishing
# =============================================================================================


def _publish_in_thread(dsn: str, barrier: threading.Barrier, dag: dict[str, Any], out: list[Any]) -> None:
    with connect(dsn) as conn:  # its own connection
        barrier.wait()
        try:
            out.append((dag, publish(conn, "wf", "concurrent", dag, activate=True)))
        except BaseException as exc:  # reported by the test
            out.append((dag, exc))


def test_eight_concurrent_publishers_get_versions_1_to_8_and_one_active(db: str) -> None:
    dags = [_chain(*[f"s{j}" for j in range(i + 1)]) for i in range(8)]  # 8 different DAGs
    barrier = threading.Barrier(8)
    results: list[Any] = []
    threads = [threading.Thread(target=_publish_in_thread, args=(db, barrier, d, results)) for d in dags]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not isinstance(r, BaseException) for _, r in results), results
    assert len(results) == 8
    assert sorted(r.version for _, r in results) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r.created and r.activated for _, r in results)
    # each activation deactivated the one before it: a chain without gaps
    assert sorted((r.version, r.previous_version) for _, r in results) == [(1, None)] + [
        (v, v - 1) for v in range(2, 9)
    ]
    stored = _definitions(db, "wf")
    assert [d["version"] for d in stored] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [d["is_active"] for d in stored] == [False] * 7 + [True]
    # every publisher's DAG is stored once, under the version it was told
    assert {r.version: dag for dag, r in results} == {d["version"]: d["dag_schema"] for d in stored}
    by_version = {r.version: r.definition_id for _, r in results}
    assert by_version == {
        r["version"]: r["id"] for r in rows(db, "SELECT version, id::text AS id FROM workflow_definitions")
    }
    events = _definition_events(db)
    assert Counter(t for t, _ in events) == {"definition_published": 8, "definition_activated": 8}
    assert [m["version"] for t, m in events if t == "definition_activated"] == [1, 2, 3, 4, 5, 6, 7, 8]
    for _, m in events:
        assert m["name"] == "wf" and m["definition_id"] == by_version[m["version"]]


def test_eight_concurrent_identical_publishers_store_one_version(db: str) -> None:
    barrier = threading.Barrier(8)
    results: list[Any] = []
    dag = _chain("a", "b")
    threads = [threading.Thread(target=_publish_in_thread, args=(db, barrier, dag, results)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not isinstance(r, BaseException) for _, r in results), results
    assert [(r.version, r.active) for _, r in results] == [(1, True)] * 8
    assert sorted(r.created for _, r in results) == [False] * 7 + [True]
    assert [(d["version"], d["is_active"]) for d in _definitions(db, "wf")] == [(1, True)]
    assert [t for t, _ in _definition_events(db)] == ["definition_published", "definition_activated"]


def test_publish_identical_content_creates_nothing(db: str) -> None:
    dag = _chain("a", "b")
    with connect(db) as conn:
        first = publish(conn, "wf", "two stages", dag)
        assert (first.version, first.created, first.active, first.activated) == (1, True, False, False)
        # the same DAG written with other key order, and the same description: nothing
        reordered = {"stages": [{"next": ["b"], "capability": "work", "id": "a"}, {"capability": "work", "id": "b"}]}
        again = publish(conn, "wf", "two stages", reordered)
        assert (again.version, again.created, again.active, again.previous_version) == (1, False, False, None)
        assert again.definition_id == first.definition_id
        # identical, with activate: the latest version becomes active, still nothing stored
        on = publish(conn, "wf", "two stages", dag, activate=True)
        assert (on.version, on.created, on.active, on.activated) == (1, False, True, True)
        still = publish(conn, "wf", "two stages", dag, activate=True)
        assert (still.version, still.created, still.active, still.activated) == (1, False, True, False)
        # a new description is new content: v2
        described = publish(conn, "wf", "two stages, described", dag)
        assert (described.version, described.created, described.active) == (2, True, False)
        # identical to v1 but not to the latest (v2): v3
        back = publish(conn, "wf", "two stages", dag)
        assert (back.version, back.created) == (3, True)
    assert [(d["version"], d["is_active"], d["description"]) for d in _definitions(db, "wf")] == [
        (1, True, "two stages"),
        (2, False, "two stages, described"),
        (3, False, "two stages"),
    ]
    assert [(t, m["version"]) for t, m in _definition_events(db)] == [
        ("definition_published", 1),
        ("definition_activated", 1),
        ("definition_published", 2),
        ("definition_published", 3),
    ]


def test_publish_refuses_an_invalid_dag_and_an_invalid_name(db: str) -> None:
    with connect(db) as conn:
        with pytest.raises(ValueError, match="edge to unknown stage 'zz'"):
            publish(conn, "wf", None, {"stages": [{"id": "a", "capability": "x", "next": ["zz"]}]})
        with pytest.raises(PublishError, match="invalid workflow name 'Bad__name'"):
            publish(conn, "Bad__name", None, _chain("a"))
        # the database refuses on its own too (a client that skips the Python check)
        with pytest.raises(psycopg.errors.CheckViolation, match="stage 'a': edge to unknown stage 'zz'"):
            conn.execute(
                "SELECT * FROM lifecycle.definition_publish('wf', NULL, %s, true)",
                (Jsonb({"stages": [{"id": "a", "capability": "x", "next": ["zz"]}]}),),
            )
    assert rows(db, "SELECT count(*) AS n FROM workflow_definitions") == [{"n": 0}]
    assert _definition_events(db) == []


def test_publish_refuses_to_run_under_repeatable_read(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(psycopg.errors.InvalidTransactionState, match="must run in a READ COMMITTED transaction"):
            conn.execute("SELECT * FROM lifecycle.definition_publish('wf', NULL, %s, true)", (Jsonb(_chain("a")),))


def test_a_stored_versions_dag_cannot_change(db: str) -> None:
    with connect(db) as conn:
        v1 = publish(conn, "wf", None, _chain("a", "b"), activate=True)
        with pytest.raises(psycopg.errors.CheckViolation, match=r"workflow_definitions wf\.v1 is immutable"):
            conn.execute(
                "UPDATE workflow_definitions SET dag_schema = %s WHERE id = %s", (Jsonb(_chain("a")), v1.definition_id)
            )
        with pytest.raises(psycopg.errors.CheckViolation, match="id, name and version cannot change"):
            conn.execute("UPDATE workflow_definitions SET version = 5 WHERE id = %s", (v1.definition_id,))
    assert [d["dag_schema"] for d in _definitions(db, "wf")] == [_chain("a", "b")]


def test_activate_switches_the_active_version_in_one_transaction(db: str) -> None:
    with connect(db) as conn:
        publish(conn, "wf", None, _chain("a"), activate=True)
        publish(conn, "wf", None, _chain("a", "b"), activate=True)
        back = activate(conn, "wf", 1)
        assert (back.version, back.activated, back.previous_version) == (1, True, 2)
        again = activate(conn, "wf", 1)
        assert (again.version, again.activated, again.previous_version) == (1, False, 1)
        with pytest.raises(PublishError, match=r"^workflow 'wf' has no version 3 \(versions: 1, 2\)$"):
            activate(conn, "wf", 3)
        with pytest.raises(PublishError, match=r"^no workflow named 'nope'$"):
            activate(conn, "nope", 1)
    assert [(d["version"], d["is_active"]) for d in _definitions(db, "wf")] == [(1, True), (2, False)]
    activations = [(m["version"], m["previous_version"]) for t, m in _definition_events(db) if t.endswith("activated")]
    assert activations == [(1, None), (2, 1), (1, 2)]


# =============================================================================================
# The command line
# =============================================================================================


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_cli_publish_activate_versions(db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEBSERVER_URL_ENV, raising=False)
    v1 = _write(tmp_path / "v1.json", {"name": "wf", "description": "first", **_chain("a", "b")})
    result = _cli("publish", str(v1))
    assert result.exit_code == 0, result.output
    assert result.stdout == "published wf v1 (not active: `lifecycle-dagster activate wf 1` activates it)\n"

    v2 = tmp_path / "v2.yaml"
    v2.write_text(
        "name: wf\ndescription: second\nstages:\n"
        "  - {id: a, capability: work, next: [b]}\n  - {id: b, capability: work}\n  - {id: c, capability: work}\n"
        "edges:\n  - {from: a, to: b}\n  - {from: b, to: c}\n"
        "on_failure: hold\n"
    )
    result = _cli("publish", str(v2), "--activate")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "published wf v2 and activated it"
    assert lines[1].startswith("new versions appear in Dagster when the code location reloads: press Reload")
    assert WEBSERVER_URL_ENV in lines[1] and len(lines) == 2

    result = _cli("publish", str(v2), "--activate")
    assert (result.exit_code, result.stdout) == (0, "wf: identical to version 2: nothing published\n")

    result = _cli("activate", "wf", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "activated wf v1 (v2 deactivated)"
    result = _cli("activate", "wf", "1")
    assert (result.exit_code, result.stdout) == (0, "wf v1 is already the active version: nothing changed\n")
    result = _cli("activate", "wf", "7")
    assert result.exit_code == 1
    assert result.output == "Error: workflow 'wf' has no version 7 (versions: 1, 2)\n"
    result = _cli("activate", "ghost", "1")
    assert (result.exit_code, result.output) == (1, "Error: no workflow named 'ghost'\n")

    # one unfinished execution on v2 (pending), one finished on v1
    with connect(db) as conn:
        ids = {
            r["version"]: r["id"]
            for r in conn.execute("SELECT version, id::text AS id FROM workflow_definitions WHERE name = 'wf'")
        }
        conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'pending')", (ids[2],)
        )
        conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'pending')", (ids[1],)
        )
        conn.execute("UPDATE workflow_executions SET status = 'cancelled' WHERE workflow_definition_id = %s", (ids[1],))
        conn.execute(
            "UPDATE workflow_executions SET status = 'compensating' WHERE workflow_definition_id = %s", (ids[1],)
        )
        conn.execute(
            "UPDATE workflow_executions SET status = 'rolled_back' WHERE workflow_definition_id = %s", (ids[1],)
        )
    created = {
        r["version"]: r["at"]
        for r in rows(db, "SELECT version, created_at AS at FROM workflow_definitions WHERE name = 'wf'")
    }
    result = _cli("versions", "wf")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "version  active  created_at                 stages  unfinished",
        f"      1  yes     {created[1].isoformat(timespec='seconds'):<25}       2           0",
        f"      2  no      {created[2].isoformat(timespec='seconds'):<25}       3           1",
    ]
    result = _cli("versions", "ghost")
    assert (result.exit_code, result.output) == (1, "Error: no workflow named 'ghost'\n")

    events = _definition_events(db)
    assert [(t, m["version"]) for t, m in events] == [
        ("definition_published", 1),
        ("definition_published", 2),
        ("definition_activated", 2),
        ("definition_activated", 1),
    ]
    assert events[1][1] == {
        "name": "wf",
        "version": 2,
        "definition_id": ids[2],
        "activate": True,
        "created_by": None,
        "stage_count": 3,
    }
    assert events[3][1] == {
        "name": "wf",
        "version": 1,
        "definition_id": ids[1],
        "previous_version": 2,
        "previous_definition_id": ids[2],
    }
    assert rows(db, "SELECT dag_schema FROM workflow_definitions WHERE name = 'wf' AND version = 2") == [
        {
            "dag_schema": {
                "stages": [
                    {"id": "a", "capability": "work", "next": ["b"]},
                    {"id": "b", "capability": "work"},
                    {"id": "c", "capability": "work"},
                ],
                "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
                "on_failure": "hold",
            }
        }
    ]


def test_cli_publish_an_invalid_file_lists_the_problems_and_stores_nothing(db: str, tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", {"name": "wf", "stages": [{"id": "a", "capability": "x", "next": ["a"]}]})
    result = _cli("publish", str(bad), "--activate")
    assert result.exit_code == 1
    assert result.stdout == f"{bad}: invalid workflow DAG (1 problem(s)):\n  - stage 'a': edge to itself (next[0])\n"
    nameless = _write(tmp_path / "nameless.json", _chain("a"))
    result = _cli("publish", str(nameless))
    assert (result.exit_code, result.output) == (
        1,
        f"Error: {nameless}: a definition file to publish needs a 'name' (a string)\n",
    )
    badname = _write(tmp_path / "badname.json", {"name": "Bad", **_chain("a")})
    result = _cli("publish", str(badname))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {badname}: invalid workflow name 'Bad': it must match")
    assert rows(db, "SELECT count(*) AS n FROM workflow_definitions") == [{"n": 0}]


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"description": "a\x00b"}, "the definition contains a NUL character at $.description"),
        ({"description": "x" * (8 * 1024 * 1024)}, "bytes, over the 8388608-byte limit"),
        ({"name": "Bad"}, "invalid workflow name 'Bad': it must match ^[a-z][a-z0-9_]{0,62}$"),
        ({"name": "wf__x"}, "invalid workflow name 'wf__x'"),
        ({"name": None}, "a definition file to publish needs a 'name' (a string)"),
        ({"description": 7}, "'description' must be a string"),
    ],
    ids=["nul_in_description", "over_the_size_limit", "bad_name", "name_with_dunder", "no_name", "description_int"],
)
def test_validate_refuses_what_publish_refuses(db: str, tmp_path: Path, doc: dict[str, Any], problem: str) -> None:
    """`validate FILE` said valid where `publish FILE` (or the database) refused: every rule is one."""
    f = _write(tmp_path / "wf.json", {"name": "wf", **_chain("a", "b"), **doc})
    checked = _cli("validate", "--offline", str(f))
    assert checked.exit_code == 1
    assert next(line for line in checked.output.splitlines() if problem in line).startswith(f"{f}: "), checked.output
    assert "valid (" not in checked.output
    published = _cli("publish", str(f))
    assert published.exit_code == 1 and problem in published.output, published.output
    assert rows(db, "SELECT count(*) AS n FROM workflow_definitions") == [{"n": 0}]


def test_validate_lists_dag_and_file_problems_together(tmp_path: Path) -> None:
    f = _write(tmp_path / "wf.json", {"name": "Bad", "stages": [{"id": "compensate", "capability": "x"}]})
    result = _cli("validate", "--offline", str(f))
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{f}: invalid workflow DAG (1 problem(s)):",
        "  - stage 'compensate': id 'compensate' is reserved: its op would be named like the compensation job"
        " (<name>__v<version>__compensate)",
        f"{f}: invalid workflow name 'Bad': it must match ^[a-z][a-z0-9_]{{0,62}}$, without __ and not ending in _",
    ]


def test_a_stage_named_compensate_is_refused_by_every_validator(db: str, tmp_path: Path) -> None:
    """Its op would be wf__v1__compensate, the compensation job's name: Dagster refused the whole
    code location. Refused by validate, publish and the database; a row stored before (the
    trigger off) is listed by validate --all and skipped by the code location, the others load."""
    dag = {"stages": [{"id": "charge", "capability": "work", "next": ["compensate"]}]}
    dag["stages"].append({"id": "compensate", "capability": "work"})
    f = _write(tmp_path / "wf.json", {"name": "wf", **dag})
    for command in ("validate", "publish"):
        result = _cli(command, str(f))
        assert result.exit_code == 1 and "id 'compensate' is reserved" in result.output, result.output
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="id 'compensate' is reserved"):
            conn.execute("SELECT * FROM lifecycle.definition_publish('wf', NULL, %s, true)", (Jsonb(dag),))
        conn.execute("ALTER TABLE workflow_definitions DISABLE TRIGGER workflow_definitions_valid_dag")
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('wf', 1, %s, true),"
            " ('ok', 1, %s, true)",
            (Jsonb(dag), Jsonb(_chain("a"))),
        )
        conn.execute("ALTER TABLE workflow_definitions ENABLE TRIGGER workflow_definitions_valid_dag")
    result = _cli("validate", "--all")
    assert result.exit_code == 1
    assert "ok__v1: valid" in result.output and "wf__v1: valid" not in result.output
    assert "wf v1: SKIPPED by the code location: invalid workflow DAG" in result.output
    assert _loaded_jobs(db) == ["ok", "ok__v1", "ok__v1__compensate"]


def test_cli_validate_warns_about_unconnected_stages_and_unserved_capabilities(db: str, tmp_path: Path) -> None:
    doc = {"name": "wf", "stages": [{"id": "a", "capability": "work", "next": ["b"]}]}
    doc["stages"] += [{"id": "b", "capability": "work"}, {"id": "lonely", "capability": "audit"}]
    f = _write(tmp_path / "wf.json", doc)
    install(db, "other", _chain("x"), {"work": "worker"})  # an agent serves 'work', none serves 'audit'
    result = _cli("validate", str(f))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{f}: valid (3 stages: a -> b -> lonely)\n"
    assert result.stderr.splitlines() == [
        f"warning: {f}: stage 'lonely' is connected to nothing (no edge in or out): it runs on its own, in parallel"
        " with the rest",
        f"warning: {f}: capability 'audit' (stage 'lonely') is served by no active agent (no_agent)",
    ]
    result = _cli("validate", "--offline", str(f))
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"warning: {f}: stage 'lonely' is connected to nothing (no edge in or out): it runs on its own, in parallel"
        " with the rest"
    ]
    # a one-stage DAG has nothing to connect to
    single = _write(tmp_path / "single.json", {"name": "wf", **_chain("a")})
    result = _cli("validate", str(single))
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{single}: valid (1 stages: a)\n", "")


def test_cli_validate_without_a_usable_database_says_agents_were_not_checked(
    tmp_path: Path, server_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", server_dsn)  # the server's admin database: no schema there
    f = _write(tmp_path / "wf.json", {"name": "wf", **_chain("a", "b")})
    result = _cli("validate", str(f))
    assert result.exit_code == 0
    assert result.stdout == f"{f}: valid (2 stages: a -> b)\n"
    [note] = result.stderr.splitlines()
    assert note.startswith(f"{f}: note: agents not checked: ")
    assert 'relation "agents" does not exist' in note and note.endswith("(--offline skips this check)")


def test_reload_against_nothing_listening_is_an_outcome_not_an_error(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    outcome = reload_code_location(url, timeout_s=5)
    assert not outcome.ok
    assert outcome.message.startswith(f"could not ask the Dagster webserver at {url} to reload: ")
    monkeypatch.setenv(WEBSERVER_URL_ENV, url)
    f = _write(tmp_path / "wf.json", {"name": "wf", **_chain("a")})
    result = _cli("publish", str(f), "--activate")
    assert result.exit_code == 0  # published; only the reload failed
    assert result.stdout == "published wf v1 and activated it\n"
    assert result.stderr.splitlines() == [
        f"warning: {f}: capability 'work' (stage 'a') is served by no active agent (no_agent)",
        f"warning: could not ask the Dagster webserver at {url} to reload: [Errno 111] Connection refused",
    ]


def test_reload_of_a_webserver_that_never_answers_times_out() -> None:
    with socket.socket() as s:  # accepts connections (the backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        started = time.monotonic()
        outcome = reload_code_location(url, timeout_s=1)
        elapsed = time.monotonic() - started
    assert not outcome.ok
    assert outcome.message == f"could not ask the Dagster webserver at {url} to reload: no answer within 1 s"
    assert 1 <= elapsed < 10


def test_reload_of_a_server_that_is_not_dagster_says_what_it_answered() -> None:
    import http.server

    class NotDagster(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b"<html><body>not found</body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotDagster)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        outcome = reload_code_location(url, timeout_s=5)
    finally:
        server.shutdown()
    assert not outcome.ok
    prefix = f"could not ask the Dagster webserver at {url} to reload: "
    assert outcome.message.startswith(prefix)
    reason = outcome.message.removeprefix(prefix)
    assert len(reason) > 3 and not reason.isdigit(), reason  # the client's words, not a stray "0"


@pytest.mark.parametrize("url", ["localhost:3000", "ftp://127.0.0.1:3000", "http://"])
def test_reload_with_a_url_that_is_not_http_says_so(url: str) -> None:
    outcome = reload_code_location(url, timeout_s=1)
    assert not outcome.ok
    assert outcome.message == (
        f"could not ask the Dagster webserver at {url} to reload: "
        "not an http:// or https:// URL with a host (e.g. http://127.0.0.1:3000)"
    )


# =============================================================================================
# Runs stay pinned to their version
# =============================================================================================

PINNING = ["pending", "in_progress", "failed", "cancelled", "compensating"]


@pytest.mark.parametrize("status", [*PINNING, *FINAL_STATUSES])
def test_a_version_is_loaded_while_an_execution_of_it_is_not_final(db: str, status: str) -> None:
    path = {
        "pending": [],
        "in_progress": ["in_progress"],
        "failed": ["in_progress", "failed"],
        "cancelled": ["cancelled"],
        "compensating": ["cancelled", "compensating"],
        "completed": ["in_progress", "completed"],
        "rolled_back": ["cancelled", "compensating", "rolled_back"],
        "compensation_failed": ["cancelled", "compensating", "compensation_failed"],
    }[status]
    with connect(db) as conn:
        v1 = publish(conn, "wf", None, _chain("only"), activate=True)
        publish(conn, "wf", None, _chain("only", "more"), activate=True)
        [ex] = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'pending') RETURNING id",
            (v1.definition_id,),
        ).fetchall()
        if status == "completed":  # an execution completes only with every stage completed
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, started_at, completed_at)"
                " VALUES (%s, 'only', 'completed', now(), now())",
                (ex["id"],),
            )
        for step in path:
            conn.execute("UPDATE workflow_executions SET status = %s WHERE id = %s", (step, ex["id"]))
        [v] = [v for v in list_versions(conn, "wf") if v.version == 1]
    pinned = status in PINNING
    assert (v.active, v.unfinished) == (False, 1 if pinned else 0)
    expected = ["wf", "wf__v2", "wf__v2__compensate"]  # the stable job wf runs the active v2
    assert _loaded_jobs(db) == (["wf", "wf__v1", "wf__v1__compensate", *expected[1:]] if pinned else expected)


class _Preparer:
    name = "preparer"

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": "prepared"}


class _FailsOnceThenWaits:
    """Attempt 1: a retryable error. Attempt 2: waits for ``go``, then succeeds."""

    name = "worker"

    def __init__(self) -> None:
        self.go = threading.Event()
        self.attempts: list[int] = []

    def run(self, task: Task) -> dict[str, Any]:
        self.attempts.append(task.attempt)
        if task.attempt == 1:
            raise AgentOverloaded("busy, try again")
        if not self.go.wait(60):
            raise RuntimeError("the test never said go")
        return {"summary": f"worked on attempt {task.attempt}"}


V1 = {
    "stages": [
        {"id": "prep", "capability": "prep", "next": ["work"]},
        {
            "id": "work",
            "capability": "work",
            "retry": {"max_attempts": 3, "base_delay_s": 0.3, "max_delay_s": 0.3, "jitter": "none"},
        },
    ]
}
V2 = {
    "stages": [
        {"id": "prep", "capability": "prep", "next": ["work"]},
        {"id": "work", "capability": "work", "next": ["check"]},
        {"id": "check", "capability": "work"},
    ]
}


def test_a_run_started_on_v1_finishes_on_v1_after_v2_is_activated(db: str, instance: Any) -> None:
    install(db, "wf", V1, {"prep": "preparer", "work": "worker"})
    worker = _FailsOnceThenWaits()
    seen: dict[str, Any] = {}

    def operator() -> None:
        """While the run waits to retry 'work': publish and activate v2, look at what loads."""
        try:
            deadline = time.monotonic() + 60
            while not rows(db, "SELECT 1 AS x FROM workflow_events WHERE event_type = 'stage_retrying'"):
                assert time.monotonic() < deadline, "the run never scheduled its retry"
                time.sleep(0.02)
            seen["status"] = rows(db, "SELECT status FROM workflow_executions")
            with connect(db) as conn:
                seen["v2"] = publish(conn, "wf", "v2", V2, activate=True)
                seen["versions"] = [(v.version, v.active, v.unfinished) for v in list_versions(conn, "wf")]
            seen["jobs_meanwhile"] = _loaded_jobs(db)
        except BaseException as exc:
            seen["error"] = exc
        finally:
            worker.go.set()

    helper = threading.Thread(target=operator)
    helper.start()
    result, eid = run(db, instance, "wf", AgentRegistry([_Preparer(), worker]))
    helper.join(60)
    assert "error" not in seen, seen.get("error")
    assert result.success
    assert worker.attempts == [1, 2]
    assert seen["status"] == [{"status": "in_progress"}]
    assert (seen["v2"].version, seen["v2"].activated, seen["v2"].previous_version) == (2, True, 1)
    assert seen["versions"] == [(1, False, 1), (2, True, 0)]
    assert seen["jobs_meanwhile"] == ["wf", "wf__v1", "wf__v1__compensate", "wf__v2", "wf__v2__compensate"]
    # the execution ran v1's DAG to the end and keeps v1's row
    [ex] = rows(
        db,
        "SELECT e.status, d.version FROM workflow_executions e"
        " JOIN workflow_definitions d ON d.id = e.workflow_definition_id WHERE e.id = %(e)s",
        e=eid,
    )
    assert ex == {"status": "completed", "version": 1}
    assert rows(
        db,
        "SELECT stage_id, status, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s"
        " ORDER BY stage_id",
        e=eid,
    ) == [
        {"stage_id": "prep", "status": "completed", "attempt_number": 1},
        {"stage_id": "work", "status": "completed", "attempt_number": 2},
    ]
    # finished: a reload no longer loads v1, unless it is active again
    assert _loaded_jobs(db) == ["wf", "wf__v2", "wf__v2__compensate"]
    with connect(db) as conn:
        activate(conn, "wf", 1)
    assert _loaded_jobs(db) == ["wf", "wf__v1", "wf__v1__compensate"]


def test_active_definitions_keeps_its_columns(db: str) -> None:
    with connect(db) as conn:
        publish(conn, "wf", "d", _chain("a"), activate=True)
        [row] = conn.execute(query("active_definitions")).fetchall()
    assert set(row) == {"id", "name", "description", "version", "dag_schema_json", "is_active"}
    assert row["is_active"] is True
    assert (row["name"], row["description"], row["version"], json.loads(row["dag_schema_json"])) == (
        "wf",
        "d",
        1,
        _chain("a"),
    )


# =============================================================================================
# A running webserver reloads the code location
# =============================================================================================

JOBS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name locationOrLoadError {
  __typename ... on RepositoryLocation { repositories { jobs { name } } } ... on PythonError { message } } } } } }
"""


def _webserver_jobs(url: str) -> list[str]:
    import httpx

    body = httpx.post(f"{url}/graphql", json={"query": JOBS_QUERY}, timeout=60).json()
    [entry] = body["data"]["workspaceOrError"]["locationEntries"]
    assert entry["name"] == "lifecycle_dagster"
    loaded = entry["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", loaded
    return sorted(j["name"] for r in loaded["repositories"] for j in r["jobs"] if j["name"] != RETENTION_JOB)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the webserver's process group (its code server included), then SIGKILL; wait for
    every process of it to be gone."""
    import psutil

    try:
        members = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        _, alive = psutil.wait_procs(members, timeout=30)
        if not alive:
            break
    proc.wait(10)
    _, alive = psutil.wait_procs(members, timeout=5)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_publish_and_activate_reload_a_running_webserver(
    db: str, dagster_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    import psutil

    install(db, "wf", _chain("a"), {"work": "worker"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": db, "DAGSTER_HOME": str(dagster_home)}
    log = (tmp_path / "webserver.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    code_servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the webserver did not come up"
            time.sleep(0.5)
        assert _webserver_jobs(url) == ["wf", "wf__v1", "wf__v1__compensate"]
        code_servers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "grpc" in " ".join(p.cmdline())]

        monkeypatch.setenv(WEBSERVER_URL_ENV, url)
        v2 = _write(tmp_path / "v2.json", {"name": "wf", **_chain("a", "b")})
        result = _cli("publish", str(v2), "--activate")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            "published wf v2 and activated it (v1 deactivated)",
            f"code location 'lifecycle_dagster' reloaded on {url}",
        ]
        assert _webserver_jobs(url) == ["wf", "wf__v2", "wf__v2__compensate"]

        result = _cli("activate", "wf", "1")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            "activated wf v1 (v2 deactivated)",
            f"code location 'lifecycle_dagster' reloaded on {url}",
        ]
        assert _webserver_jobs(url) == ["wf", "wf__v1", "wf__v1__compensate"]

        outcome = reload_code_location(url, location="no_such_location")
        assert not outcome.ok
        assert outcome.message.startswith(
            f"code location 'no_such_location' was not reloaded on {url}: RepositoryLocationNotFound: "
        )
    finally:
        code_servers += [
            p
            for p in (psutil.Process(proc.pid).children(recursive=True) if psutil.pid_exists(proc.pid) else [])
            if "grpc" in " ".join(p.cmdline())
        ]
        _stop_group(proc)
        log.close()
    _, alive = psutil.wait_procs(code_servers, timeout=30)
    assert not alive, f"code servers left behind: {[p.pid for p in alive]}"


def test_publish_on_an_unmigrated_database_says_to_upgrade(
    new_db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", new_db())  # an empty database: no migrations at all
    f = _write(tmp_path / "wf.json", {"name": "wf", **_chain("a")})
    result = _cli("publish", str(f))
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        "",
        "Error: this database has no versioned publishing yet: run `lifecycle-dagster db upgrade` first\n",
    )


def test_cli_validate_conditions_and_approval_stages(db: str, tmp_path: Path) -> None:
    """An approval stage calls no agent: no capability warning for it; the new keys' problems are
    listed as the database words them (issue 17)."""
    when = {"output": {"decision": "approve"}}
    doc = {
        "name": "wf",
        "stages": [
            {"id": "a", "capability": "work", "next": ["sign_off"]},
            {"id": "sign_off", "kind": "approval", "approvers": ["role:finance"], "next": [{"to": "b", "when": when}]},
            {"id": "b", "capability": "work"},
        ],
    }
    install(db, "other", _chain("x"), {"work": "worker"})
    good = _write(tmp_path / "good.json", doc)
    result = _cli("validate", str(good))
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout == f"{good}: valid (3 stages: a -> sign_off -> b)\n"
    doc["stages"][1].update(capability="work", approvers=[], next=[{"to": "b", "when": {"status": "ok"}}])
    doc["stages"][0]["on_reject"] = "end"
    bad = _write(tmp_path / "bad.json", doc)
    result = _cli("validate", "--offline", str(bad))
    assert result.exit_code == 1
    listed = result.output.splitlines()[1:]
    with psycopg.connect(db, autocommit=True) as conn:
        assert sorted(listed) == sorted(f"  - {m}" for _, _, m in _sql_problems(conn, {"stages": doc["stages"]}))
    assert listed == [
        "  - stage 'a': only an approval stage has on_reject",
        "  - stage 'sign_off': an approval stage has no capability",
        "  - stage 'sign_off': approvers is empty: an approval stage needs approvers",
        "  - stage 'sign_off': next[0].when must have the key output, context or both, and no other; got 'status'",
    ]
