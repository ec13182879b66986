"""Invariants of a lifecycle database: what must hold once every execution came to rest, whatever
failed on the way (agents, workers, Dagster, Postgres). ``check(conn)`` reads a live database and
returns one :class:`Violation` per broken rule; ``lifecycle-dagster doctor --invariants`` prints them.

Rules (``Violation.rule``):

``not_quiesced``
    an execution is not in a state it may rest in: ``completed``, ``rolled_back``,
    ``compensation_failed``, ``waiting`` (for a person's decision); ``failed`` only under
    ``on_failure: hold``; ``cancelled`` only when its cancel said ``compensate = false``
    (``cancel --no-compensate``). Work in flight is reported so
    too (``idle_s`` lets recently active executions pass). An execution driven by hand (no Dagster
    run, as the runbook's section 8 does) whose every stage is completed is reported as such: nothing
    will complete it but its owner.
``completion_missing`` / ``completed_twice`` / ``completion_lost``
    every stage the engine ran that is (or was, before its undo) completed has exactly one accepted
    completion: one ``stage_completed`` event and at most one completed task; a ``stage_completed``
    event never belongs to a stage that is not (or was not) completed.
``execution_incomplete``
    a completed execution has every stage of its DAG completed or skipped (a branch not taken, an
    early end: docs/branches.md).
``ran_without_edge`` / ``skipped_with_edge``
    the database's branching agrees with :mod:`lifecycle_dagster.core.conditions`, evaluated here
    in Python on the stored outputs: a stage the engine started had an incoming edge that fired (or
    no parents); a stage skipped because no edge fired has none that fires.
``not_compensated`` / ``compensated_twice`` / ``compensation_order``
    a rolled-back execution has every completed, compensable stage compensated; no stage is
    compensated twice; a stage's undo starts only after the undo of every stage that depended on
    it finished (reverse topological order).
``breaker_outcomes`` / ``breaker_state``
    the outcome rows of every circuit breaker (``sql/schema/07_breakers.sql``) are exactly the counted
    outcomes of the calls recorded in the audit trail (one per call and breaker, success as
    recorded); each breaker's state is the one its latest transition event names.
``audit_chain``
    every hash chain of ``workflow_events`` verifies (:mod:`lifecycle_dagster.store.audit`).
``completed_after_lease``
    no task was completed by a worker after its lease had expired (``sql/schema/05_task_protocol.sql``).

Every query is a named query of ``sql/queries.sql`` (``invariant_*``); the rules that compare rows
with one another read one consistent snapshot (a read-only REPEATABLE READ transaction).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from lifecycle_dagster.core.conditions import edge_fires
from lifecycle_dagster.core.dag import Dag, DagValidationError, parse_dag
from lifecycle_dagster.store import audit
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query

#: statuses an execution may rest in whatever its DAG says
FINAL = ("completed", "rolled_back", "compensation_failed")
#: stage log statuses of a stage that completed (its undo may have followed)
WAS_COMPLETED = ("completed", "compensated", "compensation_failed")

RULES = (
    "not_quiesced",
    "completion_missing",
    "completed_twice",
    "completion_lost",
    "execution_incomplete",
    "ran_without_edge",
    "skipped_with_edge",
    "not_compensated",
    "compensated_twice",
    "compensation_order",
    "breaker_outcomes",
    "breaker_state",
    "audit_chain",
    "completed_after_lease",
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: the rule, what it is about, and a message for people."""

    rule: str
    message: str
    execution_id: str | None = None
    stage_id: str | None = None
    task_id: str | None = None


def at_rest(status: str, on_failure: str, cancel_compensates: bool) -> bool:
    """Whether an execution in ``status`` may stay there (see the module docstring)."""
    if status in FINAL or status == "waiting":  # waiting: for a person's decision, as long as it takes
        return True
    if status == "failed":
        return on_failure == "hold"
    if status == "cancelled":
        return not cancel_compensates
    return False


def check(conn: Connection, *, idle_s: float = 0.0) -> list[Violation]:
    """Every violation of the invariants in the database of ``conn`` (autocommit, as
    :func:`lifecycle_dagster.store.db.connect` opens it), rule by rule.

    ``idle_s``: an execution that is not at rest is reported (``not_quiesced``) only when nothing
    happened to it (a change, a heartbeat) for at least this many seconds; 0 reports them all.
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        executions = [dict(r) for r in conn.execute(query("invariant_executions")).fetchall()]
        stages = [dict(r) for r in conn.execute(query("invariant_stages")).fetchall()]
        outcomes = [dict(r) for r in conn.execute(query("invariant_breaker_outcomes")).fetchall()]
        breakers = [dict(r) for r in conn.execute(query("invariant_breaker_states")).fetchall()]
        late = [dict(r) for r in conn.execute(query("invariant_late_completions")).fetchall()]
    found: list[Violation] = []
    found += _executions(executions, idle_s, _finished_by_hand(executions, stages))
    found += _stages(executions, stages)
    found += _breakers(outcomes, breakers)
    found += [
        Violation(
            "audit_chain",
            f"audit chain broken: {link.describe()}",
            execution_id=None if link.stream == audit.GLOBAL_STREAM else link.stream,
        )
        for link in audit.verify(conn).broken
    ]
    found += [
        Violation(
            "completed_after_lease",
            f"task {r['task_id']} (stage {r['stage_id']}) was completed by {r['claimed_by']} at "
            f"{r['completed_at'].isoformat()}, after its lease expired at {r['lease_expires_at'].isoformat()}",
            execution_id=r["execution_id"],
            stage_id=r["stage_id"],
            task_id=r["task_id"],
        )
        for r in late
    ]
    return found


def _finished_by_hand(executions: Iterable[Mapping[str, Any]], stages: Iterable[Mapping[str, Any]]) -> set[str]:
    """The in_progress executions no Dagster run drives whose every stage of the DAG is completed."""
    completed: dict[str, set[str]] = {}
    for s in stages:
        if s["status"] == "completed":
            completed.setdefault(s["execution_id"], set()).add(s["stage_id"])
    found = set()
    for e in executions:
        if e["status"] != "in_progress" or e["dagster_run_id"] is not None:
            continue
        dag = _dag(e["dag_schema_json"])
        if dag is not None and set(dag.topological_order()) <= completed.get(e["execution_id"], set()):
            found.add(e["execution_id"])
    return found


def _executions(executions: Iterable[Mapping[str, Any]], idle_s: float, by_hand: set[str]) -> list[Violation]:
    found = []
    for e in executions:
        if at_rest(e["status"], e["on_failure"], e["cancel_compensates"]):
            continue
        idle = float(e["idle_s"] or 0.0)
        if idle < idle_s:
            continue
        why = {
            "failed": "failed: its compensation is due (on_failure: compensate)",
            "cancelled": "cancelled: its compensation is due (the cancel asked for it)",
        }.get(e["status"], e["status"])
        if e["execution_id"] in by_hand:
            why = (
                "in_progress, driven by hand (no Dagster run) to its last stage: every stage of its DAG is"
                " completed, but nothing completes the execution (set its status to 'completed')"
            )
        found.append(
            Violation(
                "not_quiesced",
                f"execution {e['execution_id']} is not at rest: {why} (idle {idle:.1f} s)",
                execution_id=e["execution_id"],
            )
        )
    return found


def _exact(text: str) -> Any:
    """JSON decoded with its numbers exact (``Decimal``), as jsonb holds them: conditions compare
    ``0.30000000000000001`` and ``0.3`` as the database does (lifecycle_dagster.core.conditions)."""
    return json.loads(text, parse_float=Decimal)


def _floats_outside_patterns(value: Any, key: str | None = None) -> Any:
    """A decoded DAG with its numbers floats (parse_dag's numbers) except in ``when``/``unless``
    patterns, which keep their exact values."""
    if key in ("when", "unless"):
        return value
    if isinstance(value, dict):
        return {k: _floats_outside_patterns(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_outside_patterns(v) for v in value]
    return float(value) if isinstance(value, Decimal) else value


def _dag(text: str) -> Dag | None:
    try:
        return parse_dag(_floats_outside_patterns(_exact(text)))
    except (DagValidationError, ValueError, RecursionError):
        return None


def _stages(executions: Iterable[Mapping[str, Any]], stages: Iterable[Mapping[str, Any]]) -> list[Violation]:
    by_execution: dict[str, dict[str, Mapping[str, Any]]] = {}
    for s in stages:
        by_execution.setdefault(s["execution_id"], {})[s["stage_id"]] = s
    found: list[Violation] = []
    for e in executions:
        eid = e["execution_id"]
        mine = by_execution.get(eid, {})
        dag = _dag(e["dag_schema_json"])
        for sid, s in sorted(mine.items()):
            found += _completions(eid, sid, s)
            if s["compensations"] > 1:
                found.append(
                    Violation(
                        "compensated_twice",
                        f"stage {sid} of execution {eid} was compensated {s['compensations']} times",
                        eid,
                        sid,
                    )
                )
            if e["status"] == "rolled_back" and s["status"] == "completed" and s["compensable"]:
                found.append(
                    Violation(
                        "not_compensated",
                        f"execution {eid} is rolled_back but its completed stage {sid} was never compensated",
                        eid,
                        sid,
                    )
                )
        if e["status"] == "completed" and dag is not None:
            missing = [
                sid
                for sid in dag.topological_order()
                if (mine.get(sid) or {}).get("status") not in ("completed", "skipped")
            ]
            if missing:
                found.append(
                    Violation(
                        "execution_incomplete",
                        f"execution {eid} is completed but stage(s) {', '.join(missing)} are neither "
                        "completed nor skipped",
                        eid,
                    )
                )
        if dag is not None:
            found += _order(eid, dag, mine)
            found += _branches(eid, dag, _exact(e["context_json"] or "{}"), mine)
    return found


#: the stage log message of a stage skipped because no edge into it fired (lifecycle.execution_advance)
NO_EDGE_FIRED = "no incoming edge fired"


def _branches(eid: str, dag: Dag, context: Mapping[str, Any], mine: Mapping[str, Mapping[str, Any]]) -> list[Violation]:
    """The stages started without a fired edge into them, and those skipped although one fires."""
    found = []
    for sid in dag.topological_order():
        s, edges = mine.get(sid), dag.edges_to(sid)
        if s is None or not edges:
            continue
        fired = [e.source for e in edges if _fires(e, mine.get(e.source), context)]
        if s["starts"] > 0 and not fired:
            found.append(
                Violation("ran_without_edge", f"stage {sid} of execution {eid} ran but no edge into it fired", eid, sid)
            )
        if s["status"] == "skipped" and s["error"] == NO_EDGE_FIRED and fired:
            found.append(
                Violation(
                    "skipped_with_edge",
                    f"stage {sid} of execution {eid} was skipped but its edge(s) from {', '.join(fired)} fire",
                    eid,
                    sid,
                )
            )
    return found


def _fires(edge: Any, parent: Mapping[str, Any] | None, context: Mapping[str, Any]) -> bool:
    if parent is None or parent["status"] not in WAS_COMPLETED:
        return False
    return edge_fires(edge.when, edge.unless, _exact(parent["output_json"] or "{}"), context)


def _completions(eid: str, sid: str, s: Mapping[str, Any]) -> list[Violation]:
    """Exactly one accepted completion per completed stage the engine ran."""
    found = []
    was_completed = s["status"] in WAS_COMPLETED
    if s["completions"] > 1 or s["completed_tasks"] > 1:
        found.append(
            Violation(
                "completed_twice",
                f"stage {sid} of execution {eid} completed more than once "
                f"({s['completions']} stage_completed events, {s['completed_tasks']} completed tasks)",
                eid,
                sid,
            )
        )
    if was_completed and s["starts"] > 0 and s["completions"] == 0:
        found.append(
            Violation(
                "completion_missing",
                f"stage {sid} of execution {eid} is {s['status']} but no completion of it was recorded",
                eid,
                sid,
            )
        )
    if not was_completed and (s["completions"] > 0 or s["completed_tasks"] > 0):
        found.append(
            Violation(
                "completion_lost",
                f"stage {sid} of execution {eid} is {s['status'] or 'without a log'} although its completion "
                f"was recorded ({s['completions']} stage_completed events, {s['completed_tasks']} completed tasks)",
                eid,
                sid,
            )
        )
    return found


def _order(eid: str, dag: Dag, mine: Mapping[str, Mapping[str, Any]]) -> list[Violation]:
    """A stage's undo starts after the undo of every stage that depended on it finished."""
    found = []
    for sid, s in sorted(mine.items()):
        started = s["first_compensating"]
        if started is None or sid not in dag.topological_order():
            continue
        for dependent in sorted(dag.descendants(sid)):
            d = mine.get(dependent)
            if d is None:
                continue
            late = d["last_compensated"] is not None and d["last_compensated"] > started
            skipped = d["status"] == "completed" and d["compensable"] and d["compensations"] == 0
            if late or skipped:
                found.append(
                    Violation(
                        "compensation_order",
                        f"stage {sid} of execution {eid} was undone before its dependent stage {dependent}"
                        + (" finished its undo" if late else " was undone (it never was)"),
                        eid,
                        sid,
                    )
                )
    return found


def _breakers(outcomes: Iterable[Mapping[str, Any]], breakers: Iterable[Mapping[str, Any]]) -> list[Violation]:
    found = []
    for o in outcomes:
        task, scope = o["task_id"], o["scope"]
        if o["recorded_key"] is None:
            what = "was counted by no " + scope + " breaker"
        elif o["expected_key"] is None:
            what = f"has an outcome in {scope} breaker {o['recorded_key']} but no counted result"
        elif o["expected_key"] != o["recorded_key"]:
            what = f"was counted by {scope} breaker {o['recorded_key']}, not {o['expected_key']}"
        else:
            what = (
                f"was counted as a {'success' if o['recorded_success'] else 'failure'} by {scope} breaker "
                f"{o['recorded_key']} but it {'succeeded' if o['expected_success'] else 'failed'}"
            )
        found.append(
            Violation(
                "breaker_outcomes",
                f"the call of task {task} (stage {o['stage_id']}) {what}",
                o["execution_id"],
                o["stage_id"],
                task,
            )
        )
    for b in breakers:
        if b["state"] != b["evented_state"]:
            found.append(
                Violation(
                    "breaker_state",
                    f"{b['scope']} breaker {b['key']} is {b['state']} but its latest transition event says "
                    f"{b['evented_state']}",
                )
            )
    return found


__all__ = ["FINAL", "RULES", "Violation", "at_rest", "check"]
