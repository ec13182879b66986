"""One lock order for the task protocol and the stage transitions (sql/schema/05_task_protocol.sql,
its header): the execution row first, then the agent row (claims only), the stage log, the task.

A real Postgres, four connections in four threads released together by a barrier, 200 rounds of
one execution each. Stage ``a`` has a task held by a worker (claimed in the setup, lease token 1);
stage ``b`` has a pending task, either started by ``lifecycle.stage_start`` (its log in_progress) or
enqueued as the runbook's section 7 does (its log pending: the claim starts the stage). They race:

* a worker's claim (``lifecycle.task_claim``): ``b``'s task, or ``a``'s when the reaper put it back;
* a cancel of the execution (``lifecycle.execution_cancel``, no compensation);
* the reaper (``lifecycle.task_reap`` an hour ahead: every lease has expired);
* the completion of ``a`` (``lifecycle.task_complete`` with its token, or ``lifecycle.stage_complete``
  as a stage op calls it).

No round may deadlock (or fail in any other way), and every round must leave rows the code's
rules allow: see ``_round_problems``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.invariants import check
from lifecycle_dagster.store.sqlfiles import query

from helpers import install

ROUNDS = 200
DAG = {"stages": [{"id": "a", "capability": "q"}, {"id": "b", "capability": "q"}]}
AGENT = "Queue Agent"
OUTPUT = Jsonb({"summary": "done"})
RACERS = ("claim", "cancel", "reap", "complete")


def _claim(conn: Connection, r: dict[str, Any]) -> Any:
    return conn.execute("SELECT * FROM lifecycle.task_claim('racer', %s, 1, 30)", (AGENT,)).fetchall()


def _cancel(conn: Connection, r: dict[str, Any]) -> Any:
    return conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'race', false)", (r["eid"],)).fetchone()


def _reap(conn: Connection, r: dict[str, Any]) -> Any:
    return conn.execute("SELECT lifecycle.task_reap(now() + interval '1 hour') AS n").fetchone()["n"]  # type: ignore[index]


def _complete(conn: Connection, r: dict[str, Any]) -> Any:
    if r["via_stage"]:  # as a stage op completes its stage
        sql = "SELECT lifecycle.stage_complete(%s, %s, %s, p_attempt => 1) AS s"
        return conn.execute(sql, (r["a_log"], r["a_task"], OUTPUT)).fetchone()["s"]  # type: ignore[index]
    sql = "SELECT lifecycle.task_complete(%s, 1, %s) AS s"
    return conn.execute(sql, (r["a_task"], OUTPUT)).fetchone()["s"]  # type: ignore[index]


OPS: dict[str, Callable[[Connection, dict[str, Any]], Any]] = {
    "claim": _claim,
    "cancel": _cancel,
    "reap": _reap,
    "complete": _complete,
}


def _setup(conn: Connection, definition_id: Any, i: int) -> dict[str, Any]:
    """A running execution: stage a's task claimed by worker 'setup', stage b's task pending."""
    eid = conn.execute(
        query("create_execution"), {"definition_id": definition_id, "context": Jsonb({}), "created_by": None}
    ).fetchone()["id"]  # type: ignore[index]
    conn.execute("SELECT lifecycle.execution_ensure(%s, %s, %s)", (definition_id, f"run-{i}", eid))
    a = conn.execute("SELECT log_id, task_id FROM lifecycle.stage_start(%s, 'a', 'q')", (eid,)).fetchone()
    assert a is not None
    [held] = conn.execute("SELECT * FROM lifecycle.task_claim('setup', %s, 1, 30)", (AGENT,)).fetchall()
    assert (held["task_id"], held["lease_token"]) == (a["task_id"], 1)
    pending_log = i % 2 == 1
    if pending_log:  # the runbook's section 7: a pending stage and its task
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'b', 'pending')", (eid,)
        )
        b = conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, 'b', '{}')"
            " RETURNING id AS task_id",
            (eid,),
        ).fetchone()
    else:
        b = conn.execute("SELECT task_id FROM lifecycle.stage_start(%s, 'b', 'q')", (eid,)).fetchone()
    assert b is not None
    return {
        "eid": eid,
        "a_log": a["log_id"],
        "a_task": a["task_id"],
        "b_task": b["task_id"],
        "pending_log": pending_log,
        "via_stage": i % 4 >= 2,
    }


def _round_problems(conn: Connection, r: dict[str, Any], res: dict[str, Any], tally: Counter[str]) -> list[str]:
    """What the round left that the code's rules forbid; counts its outcomes into ``tally``."""
    bad: list[str] = []
    eid = r["eid"]
    ex = conn.execute("SELECT status FROM workflow_executions WHERE id = %s", (eid,)).fetchone()
    tasks = {
        t["task_type"]: t
        for t in conn.execute(
            "SELECT id, task_type, status, attempt, lease_token FROM task_queue WHERE workflow_execution_id = %s",
            (eid,),
        ).fetchall()
    }
    logs = {
        log["stage_id"]: log
        for log in conn.execute(
            "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %s", (eid,)
        ).fetchall()
    }
    evs = conn.execute(
        "SELECT id, event_type, stage_id, metadata FROM workflow_events WHERE execution_id = %s ORDER BY id", (eid,)
    ).fetchall()
    cancelled_at = next((e["id"] for e in evs if e["event_type"] == "workflow_cancelled"), None)

    # the cancel always finds the execution running (nothing completes stage b): it wins its call
    cancel = res["cancel"]
    if not (cancel and cancel["cancelled"] and cancel["previous_status"] == "in_progress"):
        bad.append(f"cancel returned {cancel}")
    if ex is None or ex["status"] != "cancelled" or cancelled_at is None:
        bad.append(f"execution is {ex and ex['status']} after the cancel")

    # the claim takes b's task with its first token; or a's, put back by the reaper (attempt 2, its
    # second token; a is older: it comes first); or nothing: the cancel won (it came first, or held
    # the execution when the claim came: the claim skips a locked execution), b was never claimed
    claim = res["claim"]
    got = [(str(c["task_id"]), c["lease_token"], c["attempt"], str(c["execution_id"])) for c in claim]
    if got == [(str(r["b_task"]), 1, 1, str(eid))]:
        tally["claim won (b)"] += 1
        started = [
            e["id"]
            for e in evs
            if e["event_type"] == "stage_started" and e["stage_id"] == "b" and e["metadata"].get("worker") == "racer"
        ]
        if r["pending_log"] and not (len(started) == 1 and cancelled_at is not None and started[0] < cancelled_at):
            bad.append("the claim that started stage b is not recorded before the cancel")
    elif got == [(str(r["a_task"]), 2, 2, str(eid))]:
        tally["claim won (a, reaped)"] += 1
    elif got:
        bad.append(f"claim returned {claim}")
    else:
        tally["cancel won (claim got nothing)"] += 1
        if (tasks["b"]["status"], tasks["b"]["lease_token"]) != ("cancelled", 0):
            bad.append(f"unclaimed task b is {tasks['b']['status']} (token {tasks['b']['lease_token']})")
        if r["pending_log"] and logs["b"]["status"] != "skipped":
            bad.append(f"unclaimed pending stage b is {logs['b']['status']}, not skipped by the cancel")

    # the completion of a: accepted exactly when its log and task are completed, before the cancel
    done = res["complete"]
    accepted = isinstance(done, str) and not done.startswith("refused")
    tally["completion accepted" if accepted else "completion refused"] += 1
    completed_at = next((e["id"] for e in evs if e["event_type"] == "stage_completed"), None)
    if accepted != (logs["a"]["status"] == "completed") or accepted != (tasks["a"]["status"] == "completed"):
        bad.append(f"completion {done!r} but log a {logs['a']['status']}, task a {tasks['a']['status']}")
    if accepted and not (completed_at is not None and cancelled_at is not None and completed_at < cancelled_at):
        bad.append("an accepted completion is not recorded before the cancel")
    if logs["b"]["status"] == "completed" or tasks["b"]["status"] == "completed":
        bad.append("stage b completed")

    reaped = res["reap"]
    tally[f"reaped {reaped}"] += 1

    # nothing of a cancelled execution is left to run: no pending stage or task ...
    for stage, log in logs.items():
        if log["status"] == "pending":
            bad.append(f"stage {stage} of the cancelled execution is pending")
    for stage, t in tasks.items():
        if t["status"] == "pending":
            bad.append(f"task {stage} of the cancelled execution is pending (attempt {t['attempt']})")
    # ... and a task still held by a worker can no longer complete: its result is refused
    for stage, t in tasks.items():
        if t["status"] == "in_progress":
            tally["task left in_progress"] += 1
            late = conn.execute(
                "SELECT lifecycle.task_complete(%s, %s, %s) AS s", (t["id"], t["lease_token"], OUTPUT)
            ).fetchone()["s"]  # type: ignore[index]
            if not late.startswith("refused"):
                bad.append(f"task {stage}, in_progress in a cancelled execution, completed: {late}")
    left = conn.execute(
        "SELECT count(*) AS n FROM task_queue"
        " WHERE workflow_execution_id = %s AND status IN ('pending', 'in_progress')",
        (eid,),
    ).fetchone()["n"]  # type: ignore[index]
    if left:
        bad.append(f"{left} task(s) still open after the late results were refused")
    return bad


def test_claim_cancel_reap_and_complete_never_deadlock_and_leave_consistent_rows(db: str) -> None:
    install(db, "race", DAG, {"q": AGENT})
    with connect(db) as conn:
        conn.execute(
            "UPDATE agents SET kind = 'queue', config = %s WHERE name = %s", (Jsonb({"concurrency": 2}), AGENT)
        )
        definition_id = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'race'").fetchone()["id"]  # type: ignore[index]

    barrier = threading.Barrier(len(RACERS) + 1)
    current: dict[str, Any] = {}
    results: dict[str, Any] = {}
    errors: list[tuple[int, str, BaseException]] = []
    lock = threading.Lock()

    def racer(name: str) -> None:
        with connect(db) as conn:
            conn.execute("SET statement_timeout = '30s'")
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # superuser only
                conn.execute("SET deadlock_timeout = '100ms'")  # a deadlock is found sooner
            for i in range(ROUNDS):
                barrier.wait(60)
                try:
                    out = OPS[name](conn, current)
                except psycopg.Error as exc:
                    out = exc
                    with lock:
                        errors.append((i, name, exc))
                with lock:
                    results[name] = out
                barrier.wait(60)

    threads = [threading.Thread(target=racer, args=(n,), name=f"racer-{n}") for n in RACERS]
    for t in threads:
        t.start()
    tally: Counter[str] = Counter()
    problems: list[str] = []
    try:
        with connect(db) as conn:
            for i in range(ROUNDS):
                current.clear()
                current.update(_setup(conn, definition_id, i))
                results.clear()
                barrier.wait(60)  # go
                barrier.wait(60)  # all four done
                if any(isinstance(v, BaseException) for v in results.values()):
                    tally["round with an error"] += 1
                else:
                    problems += [f"round {i}: {p}" for p in _round_problems(conn, current, dict(results), tally)]
                # whatever a failed round left open is closed, so that the next round starts clean
                conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'cleanup', false)", (current["eid"],))
                conn.execute("UPDATE task_queue SET status = 'cancelled' WHERE status IN ('pending', 'in_progress')")
                if i % 50 == 49:
                    problems += [f"round {i}: invariant {v.rule}: {v.message}" for v in check(conn)]
    finally:
        barrier.abort()  # a racer still waiting (the main loop failed) stops instead of hanging
        for t in threads:
            t.join(60)

    deadlocks = Counter(name for _, name, exc in errors if isinstance(exc, psycopg.errors.DeadlockDetected))
    others = [
        f"round {i} {name}: {type(exc).__name__}: {exc}"
        for i, name, exc in errors
        if not isinstance(exc, psycopg.errors.DeadlockDetected)
    ]
    inconsistent = len({p.split(":")[0] for p in problems})
    summary = (
        f"outcomes {dict(sorted(tally.items()))}; deadlock victims {dict(deadlocks)}; "
        f"other errors {len(others)}; inconsistent rounds {inconsistent}"
    )
    print(summary, *problems[:10], sep="\n")
    assert not deadlocks, summary
    assert not others, "\n".join(others[:10])
    assert not problems, summary + "\n" + "\n".join(problems[:20])
    # every round ran to its end, and both sides of the claim/cancel race were seen
    claim_won = tally["claim won (b)"] + tally["claim won (a, reaped)"]
    cancel_won = tally["cancel won (claim got nothing)"]
    assert claim_won + cancel_won == ROUNDS, summary
    assert tally["claim won (b)"] >= 1 and cancel_won >= 1, summary
    assert tally["completion accepted"] >= 1 and tally["completion refused"] >= 1, summary
