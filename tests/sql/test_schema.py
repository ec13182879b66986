"""The orchestration schema on real Postgres: state machine, definitions, the user's runbook statements
run unmodified, the auth.uid() shim, the seed, and the engine functions (including concurrent joins).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.sqlfiles import seed_sql

from helpers import runbook_absent

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO.parent / "shared" / "seed" / "000_e3ce442ac9e1577a.txt"
LIFECYCLE_FIXTURE = REPO / "tests" / "fixtures" / "lifecycle_v1.json"
NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)

Conn = psycopg.Connection[Any]


def _connect(dsn: str, autocommit: bool = True) -> Conn:
    return psycopg.connect(dsn, autocommit=autocommit, row_factory=dict_row)


def _one(conn: Conn, query: Any, params: Any = None) -> dict[str, Any]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return dict(row)


def _scalar(conn: Conn, query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def _insert_definition(conn: Conn, name: str, dag: dict[str, Any], version: int = 1, active: bool = True) -> str:
    return str(
        _scalar(
            conn,
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active)"
            " VALUES (%s, %s, %s, %s) RETURNING id",
            (name, version, Jsonb(dag), active),
        )
    )


SIMPLE_DAG: dict[str, Any] = {"stages": [{"id": "only", "next": [], "capability": "design"}], "edges": []}


# =============================================================================================
# State machine
# =============================================================================================

STATUSES: dict[str, list[str]] = {
    "execution": [
        "pending",
        "in_progress",
        "waiting",
        "completed",
        "failed",
        "cancelled",
        "compensating",
        "rolled_back",
        "compensation_failed",
    ],
    "stage": [
        "pending",
        "in_progress",
        "waiting",
        "completed",
        "failed",
        "skipped",
        "compensated",
        "compensation_failed",
    ],
    "task": ["pending", "in_progress", "completed", "failed", "cancelled"],
}

# The spec, written out by hand (not read from the database).
EXPECTED_TRANSITIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("execution", "pending", "in_progress"),
        ("execution", "pending", "cancelled"),
        ("execution", "in_progress", "completed"),
        ("execution", "in_progress", "failed"),
        ("execution", "in_progress", "cancelled"),
        ("execution", "failed", "compensating"),
        ("execution", "failed", "in_progress"),
        ("execution", "cancelled", "compensating"),
        ("execution", "compensating", "rolled_back"),
        ("execution", "compensating", "compensation_failed"),
        # an approval stage (docs/branches.md): the execution waits for a decision, then goes on
        ("execution", "in_progress", "waiting"),
        ("execution", "waiting", "in_progress"),
        ("execution", "waiting", "completed"),
        ("execution", "waiting", "failed"),
        ("execution", "waiting", "cancelled"),
        ("stage", "pending", "waiting"),
        ("stage", "waiting", "completed"),
        ("stage", "waiting", "failed"),
        ("stage", "waiting", "skipped"),
        ("stage", "pending", "in_progress"),
        ("stage", "pending", "skipped"),
        ("stage", "in_progress", "completed"),
        ("stage", "in_progress", "failed"),
        ("stage", "in_progress", "pending"),
        ("stage", "in_progress", "skipped"),
        ("stage", "failed", "pending"),
        ("stage", "completed", "compensated"),
        ("stage", "completed", "compensation_failed"),
        ("task", "pending", "in_progress"),
        ("task", "pending", "cancelled"),
        ("task", "in_progress", "completed"),
        ("task", "in_progress", "failed"),
        ("task", "in_progress", "pending"),
        ("task", "in_progress", "cancelled"),
    }
)
FINAL_EXECUTION_STATUSES = ("completed", "rolled_back", "compensation_failed")
TABLE = {"execution": "workflow_executions", "stage": "workflow_execution_logs", "task": "task_queue"}


def _path_to(entity: str, target: str) -> list[str]:
    """Shortest walk of legal transitions from 'pending' (always insertable) to ``target``."""
    queue: deque[list[str]] = deque([["pending"]])
    seen = {"pending"}
    while queue:
        walk = queue.popleft()
        if walk[-1] == target:
            return walk
        for ent, frm, to in sorted(EXPECTED_TRANSITIONS):
            if ent == entity and frm == walk[-1] and to not in seen:
                seen.add(to)
                queue.append([*walk, to])
    raise AssertionError(f"{entity} status {target} is unreachable from pending")


@pytest.fixture(scope="module")
def sm_dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """One migrated database shared by the state-machine cases (each case uses its own rows)."""
    name = f"ld_sm_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    params = conninfo.conninfo_to_dict(server_dsn)
    params["dbname"] = name
    yield conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def sm_conn(sm_dsn: str) -> Iterator[Conn]:
    with _connect(sm_dsn) as conn:
        yield conn


@pytest.fixture(scope="module")
def sm_parent(sm_conn: Conn) -> dict[str, str]:
    """A definition and an execution to hang execution rows and stage logs on."""
    def_id = _insert_definition(sm_conn, "state_machine", SIMPLE_DAG)
    exec_id = _scalar(
        sm_conn,
        "INSERT INTO workflow_executions (workflow_definition_id) VALUES (%s) RETURNING id",
        (def_id,),
    )
    return {"definition_id": def_id, "execution_id": str(exec_id)}


def _new_row(conn: Conn, parent: dict[str, str], entity: str, status: str = "pending") -> str:
    if entity == "execution":
        q = "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, %s) RETURNING id"
        params: tuple[Any, ...] = (parent["definition_id"], status)
    elif entity == "stage":
        # one log per (execution, stage), and the stage must be in the DAG: a fresh execution each
        execution_id = _scalar(
            conn,
            "INSERT INTO workflow_executions (workflow_definition_id) VALUES (%s) RETURNING id",
            (parent["definition_id"],),
        )
        q = "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'only', %s) RETURNING id"
        params = (execution_id, status)
    else:
        q = "INSERT INTO task_queue (task_type, status) VALUES ('t', %s) RETURNING id"
        params = (status,)
    return str(_scalar(conn, q, params))


def _set_status(conn: Conn, entity: str, row_id: str, status: str) -> None:
    if entity == "execution" and status == "completed":
        # an execution completes only when every stage of its DAG did (0004_integrity_guards)
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'only', 'completed')"
            " ON CONFLICT DO NOTHING",
            (row_id,),
        )
    conn.execute(
        sql.SQL("UPDATE {} SET status = %s WHERE id = %s").format(sql.Identifier(TABLE[entity])),
        (status, row_id),
    )


def _status(conn: Conn, entity: str, row_id: str) -> str:
    return str(
        _scalar(
            conn,
            sql.SQL("SELECT status FROM {} WHERE id = %s").format(sql.Identifier(TABLE[entity])),
            (row_id,),
        )
    )


def test_transition_table_is_exactly_the_spec(sm_conn: Conn) -> None:
    rows = sm_conn.execute("SELECT entity, from_status, to_status FROM lifecycle.transitions").fetchall()
    in_db = {(r["entity"], r["from_status"], r["to_status"]) for r in rows}
    assert len(rows) == len(in_db)
    assert in_db - EXPECTED_TRANSITIONS == set(), "transitions in the database that the spec lacks"
    assert EXPECTED_TRANSITIONS - in_db == set(), "transitions of the spec missing from the database"


def test_final_execution_statuses_have_no_way_out() -> None:
    for ent, frm, _ in EXPECTED_TRANSITIONS:
        assert not (ent == "execution" and frm in FINAL_EXECUTION_STATUSES)


PAIRS = [(entity, frm, to) for entity, statuses in STATUSES.items() for frm in statuses for to in statuses]


@pytest.mark.parametrize(("entity", "frm", "to"), PAIRS, ids=[f"{e}:{f}->{t}" for e, f, t in PAIRS])
def test_every_status_pair(sm_conn: Conn, sm_parent: dict[str, str], entity: str, frm: str, to: str) -> None:
    row_id = _new_row(sm_conn, sm_parent, entity)
    walk = _path_to(entity, frm)
    for step in walk[1:]:
        _set_status(sm_conn, entity, row_id, step)  # legal steps: must not raise
    assert _status(sm_conn, entity, row_id) == frm

    if (entity, frm, to) in EXPECTED_TRANSITIONS or frm == to:
        # a legal transition, or an UPDATE that leaves the status as it is (no transition at all)
        _set_status(sm_conn, entity, row_id, to)
        assert _status(sm_conn, entity, row_id) == to
    else:
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            _set_status(sm_conn, entity, row_id, to)
        assert f"illegal {entity} transition {frm} -> {to}" in str(err.value)
        assert _status(sm_conn, entity, row_id) == frm


@pytest.mark.parametrize("entity", list(TABLE))
def test_status_outside_the_check_list_is_refused(sm_conn: Conn, sm_parent: dict[str, str], entity: str) -> None:
    row_id = _new_row(sm_conn, sm_parent, entity)
    # the transition trigger refuses it first ...
    with pytest.raises(psycopg.errors.CheckViolation, match=f"illegal {entity} transition pending -> bogus"):
        _set_status(sm_conn, entity, row_id, "bogus")
    # ... and the CHECK constraint would still refuse it if the transition table allowed it
    with pytest.raises(psycopg.errors.CheckViolation) as err, sm_conn.transaction(force_rollback=True):
        sm_conn.execute(
            "INSERT INTO lifecycle.transitions (entity, from_status, to_status) VALUES (%s, 'pending', 'bogus')",
            (entity,),
        )
        _set_status(sm_conn, entity, row_id, "bogus")
    constraint = f"{TABLE[entity]}_status_valid"
    assert err.value.diag.constraint_name == constraint
    assert constraint in str(err.value)
    assert _status(sm_conn, entity, row_id) == "pending"
    assert _scalar(sm_conn, "SELECT count(*) AS n FROM lifecycle.transitions WHERE to_status = 'bogus'") == 0


@pytest.mark.parametrize("status", STATUSES["task"] + ["bogus"])
def test_task_insert_status(sm_conn: Conn, status: str) -> None:
    if status in ("pending", "in_progress"):
        row = sm_conn.execute(
            "INSERT INTO task_queue (task_type, status) VALUES ('t', %s) RETURNING status", (status,)
        ).fetchone()
        assert row is not None and row["status"] == status
    else:
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            sm_conn.execute("INSERT INTO task_queue (task_type, status) VALUES ('t', %s)", (status,))
        assert f"a task must be inserted as pending or in_progress, not {status}" in str(err.value)


@pytest.mark.parametrize("status", STATUSES["execution"] + ["bogus"])
def test_execution_insert_status(sm_conn: Conn, sm_parent: dict[str, str], status: str) -> None:
    if status in ("pending", "in_progress"):
        row_id = _new_row(sm_conn, sm_parent, "execution", status)
        assert _status(sm_conn, "execution", row_id) == status
    else:
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            _new_row(sm_conn, sm_parent, "execution", status)
        assert f"must be inserted as pending or in_progress, not {status}" in str(err.value)


@pytest.mark.parametrize("status", STATUSES["stage"])
def test_stage_log_insert_status(sm_conn: Conn, sm_parent: dict[str, str], status: str) -> None:
    if status in ("compensated", "compensation_failed"):
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            _new_row(sm_conn, sm_parent, "stage", status)
        assert f"a stage log cannot be inserted as {status}" in str(err.value)
    elif status == "waiting":  # only an approval stage waits (tests/integration/test_branches.py)
        with pytest.raises(psycopg.errors.CheckViolation, match="only an approval stage waits"):
            _new_row(sm_conn, sm_parent, "stage", status)
    else:
        row_id = _new_row(sm_conn, sm_parent, "stage", status)
        assert _status(sm_conn, "stage", row_id) == status


# =============================================================================================
# Definitions
# =============================================================================================


def test_definition_name_and_version_are_unique(db: str) -> None:
    with _connect(db) as conn:
        _insert_definition(conn, "uniq", SIMPLE_DAG, 1, active=False)
        with pytest.raises(psycopg.errors.UniqueViolation) as err:
            _insert_definition(conn, "uniq", SIMPLE_DAG, 1, active=False)
        assert err.value.diag.constraint_name == "workflow_definitions_name_version_key"
        _insert_definition(conn, "uniq", SIMPLE_DAG, 2, active=False)
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_definitions WHERE name = 'uniq'") == 2


def test_two_active_versions_are_refused_at_commit(db: str) -> None:
    with _connect(db, autocommit=False) as conn:
        _insert_definition(conn, "dual", SIMPLE_DAG, 1, active=True)
        _insert_definition(conn, "dual", SIMPLE_DAG, 2, active=True)  # deferred: no error yet
        with pytest.raises(psycopg.errors.ExclusionViolation) as err:
            conn.commit()
        assert err.value.diag.constraint_name == "workflow_definitions_one_active_version"
    with _connect(db) as conn:
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_definitions WHERE name = 'dual'") == 0
        # two active rows of DIFFERENT names are fine
        _insert_definition(conn, "first_name", SIMPLE_DAG)
        _insert_definition(conn, "second_name", SIMPLE_DAG)
        # an active and an inactive row of one name too
        _insert_definition(conn, "first_name", SIMPLE_DAG, 2, active=False)
        with pytest.raises(psycopg.errors.ExclusionViolation):
            conn.execute("UPDATE workflow_definitions SET is_active = true WHERE name = 'first_name' AND version = 2")


def test_new_active_version_and_deactivation_in_one_statement(db: str) -> None:
    with _connect(db) as conn:
        old = _insert_definition(conn, "swap", SIMPLE_DAG, 1, active=True)
        conn.execute(
            """
            WITH new_def AS (
              INSERT INTO workflow_definitions (name, version, dag_schema, is_active)
              VALUES ('swap', 2, %s, true) RETURNING id
            )
            UPDATE workflow_definitions SET is_active = false
            WHERE name = 'swap' AND id <> (SELECT id FROM new_def)
            """,
            (Jsonb(SIMPLE_DAG),),
        )
        rows = conn.execute(
            "SELECT id::text AS id, version, is_active FROM workflow_definitions WHERE name = 'swap' ORDER BY version"
        ).fetchall()
        assert [(r["version"], r["is_active"]) for r in rows] == [(1, False), (2, True)]
        assert rows[0]["id"] == old


def test_dag_schema_is_immutable(db: str) -> None:
    with _connect(db) as conn:
        def_id = _insert_definition(conn, "frozen", SIMPLE_DAG)
        other = {"stages": [{"id": "other", "next": [], "capability": "x"}], "edges": []}
        with pytest.raises(psycopg.errors.CheckViolation, match="immutable"):
            conn.execute("UPDATE workflow_definitions SET dag_schema = %s WHERE id = %s", (Jsonb(other), def_id))
        # the same document (even written with other key order / spacing) is not a change
        reordered = '{"edges": [], "stages": [{"capability": "design", "next": [], "id": "only"}]}'
        conn.execute(
            "UPDATE workflow_definitions SET dag_schema = %s::jsonb, description = 'kept', is_active = false"
            " WHERE id = %s",
            (reordered, def_id),
        )
        row = _one(
            conn,
            "SELECT dag_schema, description, is_active FROM workflow_definitions WHERE id = %s",
            (def_id,),
        )
        assert row == {"dag_schema": SIMPLE_DAG, "description": "kept", "is_active": False}


@pytest.mark.parametrize(
    "assignment",
    ["name = 'renamed'", "version = 7", "id = gen_random_uuid()"],
)
def test_identity_columns_cannot_change(db: str, assignment: str) -> None:
    with _connect(db) as conn:
        def_id = _insert_definition(conn, "fixed", SIMPLE_DAG)
        with pytest.raises(psycopg.errors.CheckViolation, match="id, name and version cannot change"):
            conn.execute(f"UPDATE workflow_definitions SET {assignment} WHERE id = %s", (def_id,))  # type: ignore[arg-type]
        row = _one(conn, "SELECT id::text AS id, name, version FROM workflow_definitions")
        assert row == {"id": def_id, "name": "fixed", "version": 1}


@pytest.mark.parametrize(
    "name",
    ["double__underscore", "Uppercase", "lifecycleV1", "1starts_with_digit", "trailing_", "has-dash", ""],
)
def test_bad_definition_names_are_refused(db: str, name: str) -> None:
    with _connect(db) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        _insert_definition(conn, name, SIMPLE_DAG)
    assert err.value.diag.constraint_name == "workflow_definitions_name_valid"


@pytest.mark.parametrize("name", ["lifecycle_v1", "a", "single_under_scores_2"])
def test_good_definition_names_are_accepted(db: str, name: str) -> None:
    with _connect(db) as conn:
        _insert_definition(conn, name, SIMPLE_DAG)


@pytest.mark.parametrize("doc", ["[]", '"text"', "1", "null"])
def test_dag_schema_must_be_an_object(db: str, doc: str) -> None:
    with _connect(db) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(
            "INSERT INTO workflow_definitions (name, dag_schema) VALUES ('notobj', %s::jsonb)",
            (doc,),
        )
    assert err.value.diag.constraint_name == "workflow_definitions_dag_is_object"


# =============================================================================================
# The runbook's statements, run unmodified
# =============================================================================================

_SECTION = re.compile(r"^## (\d+)\)", re.MULTILINE)
_HEREDOC = re.compile(r"<<'?SQL'?\n(.*?)\nSQL$", re.DOTALL | re.MULTILINE)


def _runbook_sections() -> dict[int, list[str]]:
    """``{section number: [SQL of each heredoc, in order]}``."""
    if not RUNBOOK.exists():
        runbook_absent()
    text = RUNBOOK.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    sections = {int(num): _HEREDOC.findall(body) for num, body in zip(parts[1::2], parts[2::2], strict=True)}
    for wanted, count in ((1, 1), (6, 1), (7, 1), (8, 2)):
        assert len(sections.get(wanted, [])) == count, f"runbook section {wanted}: expected {count} heredoc(s)"
    return sections


@pytest.fixture(scope="module")
def runbook() -> dict[int, list[str]]:
    return _runbook_sections()


def _section1_dag(runbook: dict[int, list[str]]) -> dict[str, Any]:
    m = re.search(r"'(\{.*?\})'::jsonb", runbook[1][0], re.DOTALL)
    assert m is not None
    dag: dict[str, Any] = json.loads(m.group(1))
    return dag


def _run_section8(conn: Conn, runbook: dict[int, list[str]]) -> str:
    execution_id = str(_scalar(conn, runbook[8][0]))
    conn.execute(runbook[8][1].replace("$EXECUTION_ID", execution_id))
    return execution_id


def _definitions(conn: Conn) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in conn.execute(
            "SELECT id::text AS id, name, version, description, dag_schema, is_active,"
            " created_by::text AS created_by"
            " FROM workflow_definitions ORDER BY name, version"
        ).fetchall()
    ]


def test_runbook_heredocs_are_extracted(runbook: dict[int, list[str]]) -> None:
    assert runbook[1][0].lstrip().startswith("INSERT INTO workflow_definitions")
    assert runbook[6][0].lstrip().startswith("WITH current AS")
    assert "$EXECUTION_ID" in runbook[8][1]
    assert _section1_dag(runbook) == json.loads(LIFECYCLE_FIXTURE.read_text())["dag_schema"]


def test_runbook_section1_inserts_and_reruns(db: str, runbook: dict[int, list[str]]) -> None:
    with _connect(db) as conn:
        conn.execute(runbook[1][0])
        first = _definitions(conn)
        assert len(first) == 1
        row = first[0]
        assert (row["name"], row["version"], row["is_active"]) == ("lifecycle_v1", 1, True)
        assert row["description"] == "E2E lifecycle orchestration"
        assert row["created_by"] is None  # auth.uid() shim without claims
        assert row["dag_schema"] == _section1_dag(runbook)

        conn.execute(runbook[1][0])  # "idempotent upsert"
        assert _definitions(conn) == first


def test_runbook_section1_records_the_jwt_subject(db: str, runbook: dict[int, list[str]]) -> None:
    sub = str(uuid.uuid4())
    with _connect(db) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
            conn.execute(runbook[1][0])
        assert _definitions(conn)[0]["created_by"] == sub


def test_runbook_sections_6_and_8(db: str, runbook: dict[int, list[str]]) -> None:
    with _connect(db) as conn:
        conn.execute(runbook[1][0])
        v1 = _definitions(conn)[0]
        conn.execute(runbook[6][0])
        rows = _definitions(conn)
        assert [(r["version"], r["is_active"]) for r in rows] == [(1, False), (2, True)]
        assert rows[0] == {**v1, "is_active": False}
        v2 = rows[1]
        assert v2["name"] == "lifecycle_v1"
        assert v2["description"] == "Lifecycle DAG v2 with integrity checks"
        assert v2["created_by"] == "00000000-0000-0000-0000-000000000000"
        assert v2["dag_schema"]["stages"] == [
            *v1["dag_schema"]["stages"],
            {"id": "post_integrity", "next": [], "capability": "audit"},
        ]
        assert v2["dag_schema"]["edges"] == v1["dag_schema"]["edges"]
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_definitions WHERE is_active") == 1

        execution_id = _run_section8(conn, runbook)
        ex = _one(
            conn,
            "SELECT workflow_definition_id::text AS def, status, current_stage, context, created_by"
            " FROM workflow_executions WHERE id = %s",
            (execution_id,),
        )
        assert ex == {
            "def": v2["id"],
            "status": "in_progress",
            "current_stage": "qualify",
            "context": {"customer": "ACME Corp"},
            "created_by": None,
        }
        logs = conn.execute(
            "SELECT stage_id, status, attempt_number, output_data, started_at IS NOT NULL AS started,"
            " completed_at IS NOT NULL AS done FROM workflow_execution_logs WHERE execution_id = %s",
            (execution_id,),
        ).fetchall()
        assert [dict(r) for r in logs] == [
            {
                "stage_id": "discover",
                "status": "completed",
                "attempt_number": 1,
                "output_data": {"summary": "captured"},
                "started": True,
                "done": True,
            }
        ]


def test_runbook_section1_after_section6_cannot_reactivate_v1(db: str, runbook: dict[int, list[str]]) -> None:
    """Section 1's upsert sets is_active = true on v1; once v2 is active the database refuses that."""
    with _connect(db) as conn:
        conn.execute(runbook[1][0])
        conn.execute(runbook[6][0])
        before = _definitions(conn)
        with pytest.raises(psycopg.errors.ExclusionViolation):
            conn.execute(runbook[1][0])
        assert _definitions(conn) == before


def test_runbook_sections_1_and_7_on_the_seeded_database(seeded_db: str, runbook: dict[int, list[str]]) -> None:
    with _connect(seeded_db) as conn:
        before = _definitions(conn)
        conn.execute(runbook[1][0])
        assert _definitions(conn) == before

        # a pending stage of an in_progress execution, for section 7's enqueue to pick up
        def_id = before[0]["id"]
        exec_id = str(
            _scalar(
                conn,
                "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'in_progress')"
                " RETURNING id",
                (def_id,),
            )
        )
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, input_data)"
            " VALUES (%s, 'discover', 'pending', '{\"k\": 1}')",
            (exec_id,),
        )
        ontologies_before = conn.execute("SELECT id FROM agent_ontologies ORDER BY id").fetchall()

        conn.execute(runbook[7][0])

        assert conn.execute("SELECT id FROM agent_ontologies ORDER BY id").fetchall() == ontologies_before
        tasks = conn.execute(
            "SELECT workflow_execution_id::text AS e, task_type, input_data, status FROM task_queue"
        ).fetchall()
        assert [dict(t) for t in tasks] == [
            {"e": exec_id, "task_type": "discover", "input_data": {"k": 1}, "status": "pending"}
        ]


# =============================================================================================
# auth.uid() shim
# =============================================================================================


def test_auth_uid_shim(db: str) -> None:
    sub = str(uuid.uuid4())
    with _connect(db) as conn:
        assert _scalar(conn, "SELECT auth.uid() AS u") is None
        with conn.transaction():
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
            assert str(_scalar(conn, "SELECT auth.uid() AS u")) == sub
        # the claim was local to that transaction
        assert _scalar(conn, "SELECT auth.uid() AS u") is None
        with conn.transaction():
            conn.execute("SELECT set_config('request.jwt.claims', '{\"role\": \"anon\"}', true)")
            assert _scalar(conn, "SELECT auth.uid() AS u") is None


# =============================================================================================
# Seed
# =============================================================================================

SEED_AGENTS = {
    "opportunity": "Opportunity Agent",
    "assessment": "Assessment Agent",
    "design": "Design Agent",
    "execution": "Realization Agent",
    "governance": "Integrity Agent",
}


def _snapshot(conn: Conn) -> dict[str, list[Any]]:
    return {
        "definitions": _definitions(conn),
        "agents": [dict(r) for r in conn.execute("SELECT * FROM agents ORDER BY name").fetchall()],
        "ontologies": [dict(r) for r in conn.execute("SELECT * FROM agent_ontologies ORDER BY id").fetchall()],
    }


def test_seed_installs_the_runbook_lifecycle(db: str) -> None:
    with _connect(db) as conn:
        conn.execute(seed_sql())
        defs = _definitions(conn)
        assert len(defs) == 1
        d = defs[0]
        assert (d["name"], d["version"], d["is_active"], d["created_by"]) == ("lifecycle_v1", 1, True, None)
        assert d["description"] == "E2E lifecycle orchestration"
        assert d["dag_schema"] == json.loads(LIFECYCLE_FIXTURE.read_text())["dag_schema"]

        agents = conn.execute("SELECT name, kind, is_active FROM agents ORDER BY name").fetchall()
        assert [(a["name"], a["kind"], a["is_active"]) for a in agents] == [
            (name, "python", True) for name in sorted(SEED_AGENTS.values())
        ]
        onto = conn.execute(
            "SELECT o.knowledge, o.domain, o.version, a.name FROM agent_ontologies o JOIN agents a ON a.id = o.agent_id"
        ).fetchall()
        assert len(onto) == 5
        assert {o["knowledge"]["capability"]: o["name"] for o in onto} == SEED_AGENTS
        assert all(o["knowledge"] == {"capability": o["knowledge"]["capability"]} for o in onto)
        assert {(o["domain"], o["version"]) for o in onto} == {("orchestration", 1)}


def test_seed_dag_is_exactly_the_runbook_section1_dag(db: str, runbook: dict[int, list[str]]) -> None:
    with _connect(db) as conn:
        conn.execute(seed_sql())
        assert _definitions(conn)[0]["dag_schema"] == _section1_dag(runbook)


def test_seed_twice_changes_nothing(db: str) -> None:
    with _connect(db) as conn:
        conn.execute(seed_sql())
        first = _snapshot(conn)
        conn.execute(seed_sql())
        assert _snapshot(conn) == first


def test_seed_never_reactivates_a_deactivated_v1(db: str) -> None:
    with _connect(db) as conn:
        conn.execute(seed_sql())
        conn.execute("UPDATE workflow_definitions SET is_active = false WHERE name = 'lifecycle_v1'")
        before = _snapshot(conn)
        conn.execute(seed_sql())
        assert _snapshot(conn) == before
        assert [d["is_active"] for d in before["definitions"]] == [False]


def test_seed_after_runbook_section6_keeps_v2_active(db: str, runbook: dict[int, list[str]]) -> None:
    with _connect(db) as conn:
        conn.execute(seed_sql())
        conn.execute(runbook[6][0])
        before = _snapshot(conn)
        assert [(d["version"], d["is_active"]) for d in before["definitions"]] == [(1, False), (2, True)]
        conn.execute(seed_sql())
        assert _snapshot(conn) == before


# =============================================================================================
# Engine functions
# =============================================================================================


def _route(conn: Conn, capability: str) -> str | None:
    row = conn.execute("SELECT agent_name FROM lifecycle.capability_route(%s)", (capability,)).fetchone()
    return None if row is None else str(row["agent_name"])


def _add_agent(conn: Conn, name: str, capability: str, *, active: bool = True, version: int = 1) -> str:
    agent_id = str(_scalar(conn, "INSERT INTO agents (name, is_active) VALUES (%s, %s) RETURNING id", (name, active)))
    conn.execute(
        "INSERT INTO agent_ontologies (agent_id, domain, knowledge, version) VALUES (%s, 'orchestration', %s, %s)",
        (agent_id, Jsonb({"capability": capability}), version),
    )
    return agent_id


def test_route_capability_seeded(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        row = _one(
            conn,
            "SELECT agent_id::text AS id, agent_name, agent_kind FROM lifecycle.capability_route('design')",
        )
        design_id = _scalar(conn, "SELECT id::text AS id FROM agents WHERE name = 'Design Agent'")
        assert row == {"id": design_id, "agent_name": "Design Agent", "agent_kind": "python"}
        for capability, name in SEED_AGENTS.items():
            assert _route(conn, capability) == name
        assert _route(conn, "audit") is None


def test_route_capability_tie_goes_to_the_first_name(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        _add_agent(conn, "Zeta Designer", "design")
        assert _route(conn, "design") == "Design Agent"
        _add_agent(conn, "Alpha Designer", "design")
        assert _route(conn, "design") == "Alpha Designer"


def test_route_capability_skips_inactive_agents(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        _add_agent(conn, "Alpha Designer", "design", active=False)
        assert _route(conn, "design") == "Design Agent"
        conn.execute("UPDATE agents SET is_active = false WHERE name = 'Design Agent'")
        assert _route(conn, "design") is None
        conn.execute("UPDATE agents SET is_active = true WHERE name = 'Alpha Designer'")
        assert _route(conn, "design") == "Alpha Designer"


def test_route_capability_latest_ontology_version_wins(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        design_id = _scalar(conn, "SELECT id FROM agents WHERE name = 'Design Agent'")
        conn.execute(
            "INSERT INTO agent_ontologies (agent_id, domain, knowledge, version)"
            " VALUES (%s, 'orchestration', '{\"capability\": \"architecture\"}', 2)",
            (design_id,),
        )
        assert _route(conn, "design") is None
        assert _route(conn, "architecture") == "Design Agent"
        # another domain's rows never route, whatever their version
        conn.execute(
            "INSERT INTO agent_ontologies (agent_id, domain, knowledge, version)"
            " VALUES (%s, 'finance', '{\"capability\": \"design\"}', 9)",
            (design_id,),
        )
        assert _route(conn, "design") is None
        assert _route(conn, "architecture") == "Design Agent"


def _v1_id(conn: Conn) -> str:
    return str(_scalar(conn, "SELECT id::text AS id FROM workflow_definitions WHERE name = 'lifecycle_v1'"))


def _ensure(
    conn: Conn, def_id: str, run_id: str, execution_id: str | None = None, now: datetime = NOW
) -> dict[str, Any]:
    return _one(
        conn,
        "SELECT id::text AS id, status, dagster_run_id, created_at, updated_at, context"
        " FROM lifecycle.execution_ensure(%s, %s, %s, %s, %s)",
        (def_id, run_id, execution_id, Jsonb({"customer": "ACME"}), now),
    )


def _events(conn: Conn, execution_id: str, event_type: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(
        'SELECT event_type, stage_id, metadata, "timestamp" FROM workflow_events'
        " WHERE execution_id = %s AND (%s::text IS NULL OR event_type = %s) ORDER BY id",
        (execution_id, event_type, event_type),
    ).fetchall()
    return [dict(r) for r in rows]


def test_ensure_execution_is_idempotent_per_run(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        def_id = _v1_id(conn)
        first = _ensure(conn, def_id, "run-1")
        second = _ensure(conn, def_id, "run-1", now=NOW + timedelta(minutes=5))
        assert first == second
        assert first["status"] == "in_progress"
        assert first["dagster_run_id"] == "run-1"
        assert first["created_at"] == first["updated_at"] == NOW
        assert first["context"] == {"customer": "ACME"}
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_executions") == 1
        started = _events(conn, first["id"], "workflow_started")
        assert len(started) == 1
        assert started[0]["metadata"] == {"dagster_run_id": "run-1"}
        assert started[0]["timestamp"] == NOW
        assert len(_events(conn, first["id"])) == 1


def test_ensure_execution_adopts_a_row_then_refuses_another_run(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        def_id = _v1_id(conn)
        exec_id = str(
            _scalar(
                conn,
                "INSERT INTO workflow_executions (workflow_definition_id) VALUES (%s) RETURNING id",
                (def_id,),
            )
        )
        adopted = _ensure(conn, def_id, "run-a", exec_id)
        assert (adopted["id"], adopted["status"], adopted["dagster_run_id"]) == (
            exec_id,
            "in_progress",
            "run-a",
        )
        assert _ensure(conn, def_id, "run-a", exec_id)["id"] == exec_id  # same run: fine

        with pytest.raises(psycopg.errors.UniqueViolation, match="already bound to Dagster run run-a"):
            _ensure(conn, def_id, "run-b", exec_id)
        row = _one(conn, "SELECT dagster_run_id, status FROM workflow_executions WHERE id = %s", (exec_id,))
        assert row == {"dagster_run_id": "run-a", "status": "in_progress"}
        assert len(_events(conn, exec_id, "workflow_started")) == 1
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_executions WHERE dagster_run_id = 'run-b'") == 0


def _start(
    conn: Conn,
    exec_id: str,
    stage: str,
    capability: str,
    ancestors: dict[str, str] | None = None,
    now: datetime = NOW,
) -> dict[str, Any]:
    return _one(
        conn,
        "SELECT log_id::text AS log_id, task_id::text AS task_id, agent_name, input_data"
        " FROM lifecycle.stage_start(%s, %s, %s, %s, 1, %s)",
        (exec_id, stage, capability, Jsonb(ancestors or {}), now),
    )


def _complete(conn: Conn, started: dict[str, Any], output: dict[str, Any], now: datetime = NOW) -> str:
    return str(
        _scalar(
            conn,
            "SELECT lifecycle.stage_complete(%s, %s, %s, %s) AS s",
            (started["log_id"], started["task_id"], Jsonb(output), now),
        )
    )


def test_start_stage_checks_ancestors_and_never_restarts_a_completed_stage(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        exec_id = _ensure(conn, _v1_id(conn), "run-stages")["id"]

        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            _start(conn, exec_id, "qualify", "assessment", {"discover": "opportunity"})
        assert "upstream stage(s) discover not completed" in str(err.value)
        assert _scalar(conn, "SELECT count(*) AS n FROM workflow_execution_logs") == 0

        discover = _start(conn, exec_id, "discover", "opportunity")
        assert discover["agent_name"] == "Opportunity Agent"
        assert discover["task_id"] is not None
        assert discover["input_data"] == {"context": {"customer": "ACME"}, "upstream": {}}
        # still in progress: qualify may not start yet
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="discover not completed"):
            _start(conn, exec_id, "qualify", "assessment", {"discover": "opportunity"})
        assert _complete(conn, discover, {"found": 3}, NOW + timedelta(seconds=2)) == "in_progress"

        qualify = _start(conn, exec_id, "qualify", "assessment", {"discover": "opportunity"})
        assert qualify["input_data"]["upstream"] == {"discover": {"capability": "opportunity", "output": {"found": 3}}}
        assert _scalar(conn, "SELECT current_stage FROM workflow_executions WHERE id = %s", (exec_id,)) == "qualify"

        with pytest.raises(psycopg.errors.CheckViolation, match="illegal stage transition completed -> in_progress"):
            _start(conn, exec_id, "discover", "opportunity")
        log = _one(
            conn,
            "SELECT status, output_data FROM workflow_execution_logs WHERE execution_id = %s AND stage_id = 'discover'",
            (exec_id,),
        )
        assert log == {"status": "completed", "output_data": {"found": 3}}
        assert _scalar(conn, "SELECT count(*) AS n FROM task_queue WHERE task_type = 'discover'") == 1

        # two missing ancestors are both named
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="qualify, target_design not completed"):
            _start(
                conn,
                exec_id,
                "value_realization",
                "execution",
                {"discover": "opportunity", "qualify": "assessment", "target_design": "design"},
            )


# ---------------------------------------------------------------------------------------------
# Concurrent joins: the last of two sibling stages to complete must complete the execution.

JOIN_DAG: dict[str, Any] = {
    "stages": [
        {"id": "a", "next": [], "capability": "design"},
        {"id": "b", "next": [], "capability": "assessment"},
    ],
    "edges": [],
}
JOIN_ROUNDS = 20


def _wait_for_overlap(monitor: Conn, other_pid: int, other_done: threading.Event, deadline: float) -> str:
    """Hold our open transaction until the sibling's call finished too, or is blocked on a lock
    (necessarily ours: the only other session). Returns which of the two was observed."""
    while time.monotonic() < deadline:
        if other_done.is_set():
            return "both_done"
        blockers = _scalar(monitor, "SELECT cardinality(pg_blocking_pids(%s)) AS n", (other_pid,))
        if blockers:
            return "other_blocked"
        time.sleep(0.002)
    raise AssertionError("the sibling call neither finished nor waited on a lock")


@dataclass
class _JoinRound:
    """Shared state of one round: two workers complete sibling stages of one execution."""

    workers: list[Conn]
    monitors: list[Conn]
    start: threading.Barrier = field(default_factory=lambda: threading.Barrier(2, timeout=10))
    done: list[threading.Event] = field(default_factory=lambda: [threading.Event(), threading.Event()])
    results: list[str | None] = field(default_factory=lambda: [None, None])
    observed: list[str | None] = field(default_factory=lambda: [None, None])
    errors: list[BaseException] = field(default_factory=list)


def _join_worker(rnd: _JoinRound, i: int, started: dict[str, Any]) -> None:
    conn = rnd.workers[i]
    other_pid = rnd.workers[1 - i].info.backend_pid
    try:
        rnd.start.wait()
        rnd.results[i] = _complete(conn, started, {"stage": i})  # inside the worker's open transaction
        rnd.done[i].set()
        rnd.observed[i] = _wait_for_overlap(rnd.monitors[i], other_pid, rnd.done[1 - i], time.monotonic() + 10)
        conn.commit()
    except BaseException as exc:  # reported by the main thread
        rnd.errors.append(exc)
        conn.rollback()
        rnd.done[i].set()


def _run_join_round(rnd: _JoinRound, a: dict[str, Any], b: dict[str, Any]) -> None:
    threads = [
        threading.Thread(target=_join_worker, args=(rnd, 0, a)),
        threading.Thread(target=_join_worker, args=(rnd, 1, b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert rnd.errors == []


def test_concurrent_sibling_completions_complete_the_execution_once(seeded_db: str) -> None:
    with _connect(seeded_db) as setup:
        def_id = _insert_definition(setup, "join_pair", JOIN_DAG)
        rounds = []
        for i in range(JOIN_ROUNDS):
            exec_id = _ensure(setup, def_id, f"join-run-{i}")["id"]
            a = _start(setup, exec_id, "a", "design")
            b = _start(setup, exec_id, "b", "assessment")
            assert a["task_id"] and b["task_id"]
            rounds.append((exec_id, a, b))

    workers = [_connect(seeded_db, autocommit=False) for _ in range(2)]
    monitors = [_connect(seeded_db) for _ in range(2)]
    try:
        with _connect(seeded_db) as check:
            for exec_id, a, b in rounds:
                rnd = _JoinRound(workers, monitors)
                _run_join_round(rnd, a, b)
                # the two calls overlapped: both ran inside open transactions, or one waited on the other
                assert "both_done" in rnd.observed or "other_blocked" in rnd.observed
                assert sorted(r or "" for r in rnd.results) == ["completed", "in_progress"]

                status = _scalar(check, "SELECT status FROM workflow_executions WHERE id = %s", (exec_id,))
                assert status == "completed"
                assert len(_events(check, exec_id, "workflow_completed")) == 1
                assert len(_events(check, exec_id, "stage_completed")) == 2
                logs = check.execute(
                    "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %s ORDER BY stage_id",
                    (exec_id,),
                ).fetchall()
                assert [(r["stage_id"], r["status"]) for r in logs] == [
                    ("a", "completed"),
                    ("b", "completed"),
                ]
                tasks = check.execute(
                    "SELECT DISTINCT status FROM task_queue WHERE workflow_execution_id = %s", (exec_id,)
                ).fetchall()
                assert [r["status"] for r in tasks] == ["completed"]
    finally:
        for c in workers + monitors:
            c.close()


# ------------------------------------------------------------------------------------------------
# 0004_integrity_guards


def test_a_stage_log_names_a_stage_of_the_dag_and_keeps_it(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        exec_id = _scalar(
            conn,
            "INSERT INTO workflow_executions (workflow_definition_id, status)"
            " SELECT id, 'in_progress' FROM workflow_definitions WHERE name = 'lifecycle_v1' RETURNING id",
        )
        with pytest.raises(psycopg.errors.CheckViolation, match="stage nope is not a stage of the DAG"):
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'nope', 'completed')",
                (exec_id,),
            )
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'discover', 'completed')",
            (exec_id,),
        )
        with pytest.raises(psycopg.errors.CheckViolation, match="keeps its execution and stage"):
            conn.execute("UPDATE workflow_execution_logs SET stage_id = 'qualify' WHERE execution_id = %s", (exec_id,))


def test_current_stage_is_a_stage_of_the_dag(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        exec_id = _scalar(
            conn,
            "INSERT INTO workflow_executions (workflow_definition_id, status, current_stage)"
            " SELECT id, 'in_progress', 'discover' FROM workflow_definitions WHERE name = 'lifecycle_v1' RETURNING id",
        )
        conn.execute("UPDATE workflow_executions SET current_stage = 'qualify' WHERE id = %s", (exec_id,))
        with pytest.raises(psycopg.errors.CheckViolation, match="current_stage nonexistent is not a stage"):
            conn.execute("UPDATE workflow_executions SET current_stage = 'nonexistent' WHERE id = %s", (exec_id,))


def test_an_execution_completes_only_with_every_stage_completed(seeded_db: str) -> None:
    with _connect(seeded_db) as conn:
        exec_id = _scalar(
            conn,
            "INSERT INTO workflow_executions (workflow_definition_id, status)"
            " SELECT id, 'in_progress' FROM workflow_definitions WHERE name = 'lifecycle_v1' RETURNING id",
        )
        for stage in ("discover", "qualify"):
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, %s, 'completed')",
                (exec_id, stage),
            )
        with pytest.raises(
            psycopg.errors.CheckViolation,
            match=r"cannot complete: stage\(s\) integrity, target_design, value_realization neither completed "
            r"nor skipped",
        ):
            conn.execute("UPDATE workflow_executions SET status = 'completed' WHERE id = %s", (exec_id,))
        for stage in ("target_design", "value_realization", "integrity"):
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, %s, 'completed')",
                (exec_id, stage),
            )
        conn.execute("UPDATE workflow_executions SET status = 'completed' WHERE id = %s", (exec_id,))
        assert _scalar(conn, "SELECT status FROM workflow_executions WHERE id = %s", (exec_id,)) == "completed"
