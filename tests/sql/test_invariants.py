"""The invariant checker (lifecycle_dagster.store.invariants) on real Postgres: a clean set of executions
(completed, rolled back, held, cancelled without compensation) has no violation; each rule is then
broken on a copy of it, as a superuser going around the guards where needed (triggers disabled with
session_replication_role = replica), and the checker names it. Also `doctor --invariants`."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentBadRequest, AgentRegistry, Task, default_registry
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import reconcile
from lifecycle_dagster.store.db import close_idle, connect
from lifecycle_dagster.store.invariants import RULES, at_rest, check
from lifecycle_dagster.store.sqlfiles import seed_sql

from helpers import install, rows, run

REPO = Path(__file__).resolve().parents[2]
ACME = json.loads((REPO / "examples/acme.json").read_text())
GLOBEX = json.loads((REPO / "examples/globex.json").read_text())
#: a second completion of qualify, recorded by an ordinary insert (the audit chain stays intact)
EXTRA_COMPLETION = (
    "INSERT INTO workflow_events (execution_id, event_type, stage_id) VALUES (%s, 'stage_completed', 'qualify')"
)


class Refuses:
    name = "Refuser"

    def run(self, task: Task) -> dict[str, Any]:
        raise AgentBadRequest("no")


def _with_db(dsn: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = name
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _admin(server_dsn: str, statement: sql.Composable) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(scope="module")
def clean_world(server_dsn: str, template_db: str, dagster_home: Path) -> Iterator[dict[str, Any]]:
    """A database (used as a template by ``world``) holding four executions at rest: ``completed``
    (ACME), ``rolled_back`` (Globex, compensated by the reconciler's run), ``held`` (failed under
    on_failure: hold), ``cancelled`` (cancel --no-compensate)."""
    name = f"ld_inv_{uuid.uuid4().hex[:10]}"
    _admin(
        server_dsn, sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
    )
    dsn = _with_db(server_dsn, name)
    old = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = dsn
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        with connect(dsn) as conn:
            conn.execute(seed_sql())
        install(
            dsn, "held", {"stages": [{"id": "x", "capability": "refuse"}], "on_failure": "hold"}, {"refuse": "Refuser"}
        )
        registry = AgentRegistry([*(default_registry().get(n) for n in default_registry().names()), Refuses()])
        done, completed = run(dsn, instance, "lifecycle_v1", registry, ACME)
        assert done.success
        failed, rolled_back = run(dsn, instance, "lifecycle_v1", registry, GLOBEX)
        assert not failed.success
        defs = definitions_from_snapshot(fetch_snapshot(dsn)).get_repository_def()
        names = [j.name for j in defs.get_all_jobs() if j.name.endswith("__compensate")]
        [req] = [r for r in reconcile(instance, names, dsn, timeout_s=3600) if isinstance(r, dg.RunRequest)]
        comp = defs.get_job(str(req.job_name)).execute_in_process(
            instance=instance, tags=dict(req.tags), resources={"lifecycle_agents": agents_resource(registry)}
        )
        assert comp.success
        held_result, held = run(dsn, instance, "held", registry)
        assert not held_result.success
        with connect(dsn) as conn:
            d = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()
            assert d is not None
            c = conn.execute(
                "INSERT INTO workflow_executions (workflow_definition_id, context) VALUES (%s, %s) RETURNING id::text",
                (d["id"], Jsonb(ACME)),
            ).fetchone()
            assert c is not None
            conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'test', false)", (c["id"],))
        ids = {"completed": completed, "rolled_back": rolled_back, "held": held, "cancelled": c["id"]}
        statuses = {r["id"]: r["status"] for r in rows(dsn, "SELECT id::text AS id, status FROM workflow_executions")}
        assert statuses == {ids[k]: k if k != "held" else "failed" for k in ids}
    finally:
        instance.dispose()
        close_idle(dsn)  # this process's kept connections would stop the copies made from it
        if old is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = old
    yield {"name": name, **ids}
    _admin(server_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def world(new_db: Any, clean_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A copy of the clean world for one test (DATABASE_URL points at it)."""
    dsn = new_db(clean_world["name"])
    monkeypatch.setenv("DATABASE_URL", dsn)
    return {**clean_world, "dsn": dsn}


def _rules(dsn: str, **kw: Any) -> set[str]:
    with connect(dsn) as conn:
        return {v.rule for v in check(conn, **kw)}


def _bypass(dsn: str, *statements: str, **params: Any) -> None:
    """Run ``statements`` as the superuser with every (non-ALWAYS) trigger off."""
    with connect(dsn, autocommit=False) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        for s in statements:
            conn.execute(s, params)


def test_a_clean_world_has_no_violation(world: dict[str, Any]) -> None:
    with connect(world["dsn"]) as conn:
        assert check(conn) == []


def test_at_rest() -> None:
    assert at_rest("completed", "compensate", True) and at_rest("rolled_back", "hold", True)
    assert at_rest("compensation_failed", "compensate", True)
    assert at_rest("failed", "hold", True) and not at_rest("failed", "compensate", True)
    assert at_rest("cancelled", "compensate", False) and not at_rest("cancelled", "compensate", True)
    assert not any(at_rest(s, "hold", False) for s in ("pending", "in_progress", "compensating"))


def test_executions_not_at_rest_are_reported_not_quiesced(world: dict[str, Any]) -> None:
    dsn = world["dsn"]
    with connect(dsn) as conn:
        d = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()
        assert d is not None
        pending = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, context) VALUES (%s, '{}') RETURNING id::text",
            (d["id"],),
        ).fetchone()
        cancelled = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, context) VALUES (%s, '{}') RETURNING id::text",
            (d["id"],),
        ).fetchone()
        assert pending is not None and cancelled is not None
        conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'please undo', true)", (cancelled["id"],))
        found = check(conn)
    assert {(v.rule, v.execution_id) for v in found} == {
        ("not_quiesced", pending["id"]),
        ("not_quiesced", cancelled["id"]),
    }
    assert any("compensation is due" in v.message for v in found)
    assert _rules(dsn, idle_s=3600) == set()  # both just changed: in flight, not stuck


def test_a_completed_stage_without_its_completion(world: dict[str, Any]) -> None:
    # the held execution's failed stage turned completed behind the engine's back
    _bypass(
        world["dsn"],
        "UPDATE workflow_execution_logs SET status = 'completed' WHERE execution_id = %(e)s",
        e=world["held"],
    )
    with connect(world["dsn"]) as conn:
        [v] = check(conn)
    assert (v.rule, v.execution_id, v.stage_id) == ("completion_missing", world["held"], "x")


def test_a_stage_completed_twice(world: dict[str, Any]) -> None:
    with connect(world["dsn"]) as conn:  # an ordinary insert: the audit chain stays intact
        conn.execute(
            EXTRA_COMPLETION,
            (world["completed"],),
        )
        [v] = check(conn)
    assert (v.rule, v.execution_id, v.stage_id) == ("completed_twice", world["completed"], "qualify")


def test_a_completion_lost_and_an_incomplete_execution(world: dict[str, Any]) -> None:
    _bypass(
        world["dsn"],
        "UPDATE workflow_execution_logs SET status = 'failed' WHERE execution_id = %(e)s AND stage_id = 'integrity'",
        e=world["completed"],
    )
    with connect(world["dsn"]) as conn:
        found = check(conn)
    assert {(v.rule, v.stage_id) for v in found} == {("completion_lost", "integrity"), ("execution_incomplete", None)}
    assert all(v.execution_id == world["completed"] for v in found)
    incomplete = next(v.message for v in found if v.rule == "execution_incomplete")
    assert "stage(s) integrity are neither completed nor skipped" in incomplete


def test_a_rolled_back_execution_with_a_stage_left_undone(world: dict[str, Any]) -> None:
    _bypass(
        world["dsn"],
        "UPDATE workflow_execution_logs SET status = 'completed' WHERE execution_id = %(e)s AND stage_id = 'discover'",
        e=world["rolled_back"],
    )
    with connect(world["dsn"]) as conn:
        [v] = check(conn)
    assert (v.rule, v.execution_id, v.stage_id) == ("not_compensated", world["rolled_back"], "discover")


def test_a_stage_compensated_twice_and_out_of_order(world: dict[str, Any]) -> None:
    # target_design's undo recorded (again) after the undo of qualify and discover, which it depends on
    with connect(world["dsn"]) as conn:
        conn.execute(
            "INSERT INTO workflow_events (execution_id, event_type, stage_id) VALUES (%s, 'stage_compensated',"
            " 'target_design')",
            (world["rolled_back"],),
        )
        found = check(conn)
    assert {(v.rule, v.stage_id) for v in found} == {
        ("compensated_twice", "target_design"),
        ("compensation_order", "qualify"),
        ("compensation_order", "discover"),
    }


def test_the_rolled_back_order_as_recorded_is_reverse_topological(world: dict[str, Any]) -> None:
    compensated = [
        r["stage_id"]
        for r in rows(
            world["dsn"],
            "SELECT stage_id FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_compensated'"
            " ORDER BY id",
            e=world["rolled_back"],
        )
    ]
    assert compensated == ["value_realization", "target_design", "qualify", "discover"]


def test_breaker_outcomes_that_do_not_match_the_calls(world: dict[str, Any]) -> None:
    dsn = world["dsn"]
    [task] = rows(
        dsn,
        "SELECT id::text AS id FROM task_queue WHERE workflow_execution_id = %(e)s AND task_type = 'qualify'",
        e=world["completed"],
    )
    with connect(dsn) as conn:
        conn.execute("DELETE FROM lifecycle.breaker_outcomes WHERE task_id = %s AND scope = 'agent'", (task["id"],))
        conn.execute(
            "UPDATE lifecycle.breaker_outcomes SET success = false WHERE task_id = %s AND scope = 'capability'",
            (task["id"],),
        )
        found = check(conn)
    assert [(v.rule, v.task_id, v.stage_id) for v in found] == [("breaker_outcomes", task["id"], "qualify")] * 2
    assert "was counted by no agent breaker" in found[0].message
    assert "counted as a failure by capability breaker assessment but it succeeded" in found[1].message


def test_an_outcome_without_a_counted_call(world: dict[str, Any]) -> None:
    # the held stage failed with bad_request (the caller's fault): its call counts for no breaker
    [task] = rows(
        dsn := world["dsn"],
        "SELECT id, agent_id::text AS agent FROM task_queue WHERE workflow_execution_id = %(e)s",
        e=world["held"],
    )
    with connect(dsn) as conn:
        conn.execute(
            "SELECT lifecycle.breaker_record('agent', %s, false, 1.0, now(), %s, 'bad_request')",
            (task["agent"], task["id"]),
        )
        [v] = check(conn)
    assert v.rule == "breaker_outcomes" and "but no counted result" in v.message


def test_a_breaker_state_no_transition_explains(world: dict[str, Any]) -> None:
    with connect(world["dsn"]) as conn:
        conn.execute(
            "UPDATE lifecycle.breakers SET state = 'open', opened_at = now()"
            " WHERE scope = 'capability' AND key = 'design'"
        )
        [v] = check(conn)
    assert v.rule == "breaker_state" and v.message == (
        "capability breaker design is open but its latest transition event says closed"
    )


def test_a_rewritten_event_breaks_its_audit_chain(world: dict[str, Any]) -> None:
    _bypass(
        world["dsn"],
        "UPDATE workflow_events SET metadata = metadata || '{\"attempt\": 9}'"
        " WHERE execution_id = %(e)s AND event_type = 'stage_started' AND stage_id = 'qualify'",
        e=world["completed"],
    )
    with connect(world["dsn"]) as conn:
        [v] = check(conn)
    assert (v.rule, v.execution_id) == ("audit_chain", world["completed"])
    assert "hash mismatch" in v.message


def test_a_task_completed_after_its_lease_expired(world: dict[str, Any]) -> None:
    dsn = world["dsn"]
    [task] = rows(
        dsn,
        "SELECT id::text AS id FROM task_queue WHERE workflow_execution_id = %(e)s AND task_type = 'target_design'",
        e=world["completed"],
    )
    with connect(dsn) as conn:  # as if a queue worker had held it on a lease that ran out first
        conn.execute(
            "UPDATE task_queue SET claimed_by = 'worker-1', lease_expires_at = completed_at - interval '2 s'"
            " WHERE id = %s",
            (task["id"],),
        )
        [v] = check(conn)
    assert (v.rule, v.task_id, v.stage_id) == ("completed_after_lease", task["id"], "target_design")
    assert "worker-1" in v.message


def test_every_rule_is_named() -> None:
    assert len(set(RULES)) == len(RULES) == 14


def test_doctor_invariants_text_and_json(world: dict[str, Any]) -> None:
    from lifecycle_dagster.cli.main import main

    ok = CliRunner().invoke(main, ["doctor", "--invariants"], env={"DATABASE_URL": world["dsn"]})
    assert ok.exit_code == 0, ok.output
    assert "invariants: ok (every execution at rest, no violation)" in ok.output
    with connect(world["dsn"]) as conn:
        conn.execute(
            EXTRA_COMPLETION,
            (world["completed"],),
        )
    bad = CliRunner().invoke(main, ["doctor", "--invariants"], env={"DATABASE_URL": world["dsn"]})
    assert bad.exit_code == 1
    assert f"VIOLATION [completed_twice] stage qualify of execution {world['completed']} completed more than once" in (
        bad.output
    )
    assert "invariants: 1 violation (completed_twice: 1)" in bad.output
    as_json = CliRunner().invoke(main, ["doctor", "--invariants", "--json"], env={"DATABASE_URL": world["dsn"]})
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert document["ok"] is False and document["problems"] == []
    assert [(v["rule"], v["execution_id"], v["stage_id"], v["task_id"]) for v in document["violations"]] == [
        ("completed_twice", world["completed"], "qualify", None)
    ]
    plain = CliRunner().invoke(main, ["doctor", "--json"], env={"DATABASE_URL": world["dsn"]})
    assert plain.exit_code == 0 and "violations" not in json.loads(plain.stdout)  # only when asked


def test_a_worker_whose_lease_expired_cannot_complete_its_task(world: dict[str, Any]) -> None:
    """What the chaos suite found (0013_chaos_fixes): a result after the lease expired was taken."""
    from datetime import UTC, datetime, timedelta

    dsn = world["dsn"]
    t0 = datetime.now(UTC)
    with connect(dsn) as conn:
        d = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()
        assert d is not None
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, context) VALUES (%s, 'in_progress', %s)"
            " RETURNING id::text",
            (d["id"], Jsonb(ACME)),
        ).fetchone()
        assert e is not None
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'discover', 'pending')",
            (e["id"],),
        )
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Opportunity Agent'")
        t = conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, 'discover', %s)"
            " RETURNING id::text",
            (e["id"], Jsonb({"context": ACME})),
        ).fetchone()
        assert t is not None
        [claim] = conn.execute(
            "SELECT * FROM lifecycle.task_claim('w1', 'Opportunity Agent', 1, 5, %s)", (t0,)
        ).fetchall()
        late = conn.execute(
            'SELECT lifecycle.task_complete(%s, %s, \'{"summary": "late"}\', %s) AS s',
            (t["id"], claim["lease_token"], t0 + timedelta(seconds=6)),
        ).fetchone()
        assert late == {"s": "refused_lease_expired"}, late
        [task] = conn.execute("SELECT status FROM task_queue WHERE id = %s", (t["id"],)).fetchall()
        assert task["status"] == "in_progress"  # the reaper hands it to a live worker
        assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (t0 + timedelta(seconds=7),)).fetchone() == {"n": 1}
        [again] = conn.execute(
            "SELECT * FROM lifecycle.task_claim('w2', 'Opportunity Agent', 1, 5, %s)", (t0 + timedelta(seconds=8),)
        ).fetchall()
        ok = conn.execute(
            'SELECT lifecycle.task_complete(%s, %s, \'{"summary": "in time"}\', %s) AS s',
            (t["id"], again["lease_token"], t0 + timedelta(seconds=9)),
        ).fetchone()
        assert ok is not None and not ok["s"].startswith("refused")
        kinds = [
            r["reason"]
            for r in conn.execute(
                "SELECT metadata ->> 'reason' AS reason FROM workflow_events WHERE event_type = 'task_result_refused'"
                " AND execution_id = %s",
                (e["id"],),
            ).fetchall()
        ]
        assert len(kinds) == 1 and "expired" in kinds[0]
        assert check(conn, idle_s=3600) == []  # nothing completed late (the execution is in flight)
