"""An execution's trace on its row (migration 0008, ``lifecycle.execution_set_trace_parent``): the
first traceparent stored wins, a malformed one or an unknown execution is refused by name, and a
task inserted afterwards carries it to its worker (trigger ``task_queue_fill``)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.store import transitions as t
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import install, rows

FIRST = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECOND = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_first_trace_stored_wins_and_tasks_carry_it(db: str) -> None:
    install(db, "wf", {"stages": [{"id": "a", "capability": "q"}]}, {"q": "Agent"})
    with connect(db) as conn:
        definition = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'wf'").fetchone()
        assert definition is not None
        params = {"definition_id": definition["id"], "context": Jsonb({}), "created_by": None}
        eid = str(conn.execute(query("create_execution"), params).fetchone()["id"])  # type: ignore[index]
        untraced = conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type) VALUES (%s, 'a') RETURNING trace_parent", (eid,)
        ).fetchone()
        assert untraced == {"trace_parent": None}
        assert t.execution_set_trace_parent(conn, execution_id=eid, trace_parent=FIRST) == FIRST
        assert t.execution_set_trace_parent(conn, execution_id=eid, trace_parent=SECOND) == FIRST
        conn.execute("DELETE FROM task_queue")
        conn.execute("INSERT INTO task_queue (workflow_execution_id, task_type) VALUES (%s, 'a')", (eid,))
        with pytest.raises(psycopg.errors.CheckViolation, match="workflow_executions_trace_parent_valid"):
            conn.execute("UPDATE workflow_executions SET trace_parent = 'not-a-traceparent'")
        with pytest.raises(psycopg.errors.NoDataFound, match="unknown workflow execution"):
            t.execution_set_trace_parent(conn, execution_id=str(uuid.uuid4()), trace_parent=FIRST)
    assert rows(db, "SELECT trace_parent FROM workflow_executions") == [{"trace_parent": FIRST}]
    assert rows(db, "SELECT trace_parent FROM task_queue") == [{"trace_parent": FIRST}]
