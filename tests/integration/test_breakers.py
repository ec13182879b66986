"""Circuit breakers per agent and per capability (0006): thresholds, error budget, latency SLA,
cooldown and probes at pinned times; fail-fast and routing around open breakers through real runs;
exact counts under concurrent recorders; caller-fault errors; the runbook's trip_circuit_breaker."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentBadRequest, AgentOverloaded, AgentRegistry, Task
from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import create_execution, events, install, rows, run, runbook_section

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAG = {"stages": [{"id": "work", "capability": "work", "retry": {"max_attempts": 1}}]}
CALLER_FAULTS = [
    "bad_request",
    "bad_input",
    "integrity_failed",
    "missing_upstream",
    "no_agent",
    "agent_not_registered",
    "cancelled",
    "breaker_open",
]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _agent(db: str, name: str, capability: str, config: dict[str, Any] | None = None) -> str:
    """A new active agent serving ``capability``; its id."""
    with connect(db) as conn:
        row = conn.execute(
            "INSERT INTO agents (name, config) VALUES (%s, %s) RETURNING id::text AS id", (name, Jsonb(config or {}))
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration', %s)",
            (row["id"], Jsonb({"capability": capability})),
        )
    return str(row["id"])


def _agent_id(db: str, name: str) -> str:
    [row] = rows(db, "SELECT id::text AS id FROM agents WHERE name = %(n)s", n=name)
    return str(row["id"])


def _record(conn: Any, scope: str, key: str, success: bool, latency_ms: float | None, when: datetime) -> str:
    row = conn.execute(
        "SELECT lifecycle.breaker_record(%s, %s, %s, %s, %s) AS state", (scope, key, success, latency_ms, when)
    ).fetchone()
    return str(row["state"])


def _route(conn: Any, capability: str, when: datetime) -> str | None:
    row = conn.execute("SELECT agent_name FROM lifecycle.capability_route(%s, %s)", (capability, when)).fetchone()
    return None if row is None else str(row["agent_name"])


def _breaker(db: str, scope: str, key: str) -> dict[str, Any] | None:
    found = rows(
        db,
        "SELECT state, opened_at, probes_left FROM lifecycle.breakers WHERE scope = %(s)s AND key = %(k)s",
        s=scope,
        k=key,
    )
    return found[0] if found else None


def _state(db: str, scope: str, key: str) -> str:
    b = _breaker(db, scope, key)
    return "closed" if b is None else str(b["state"])


def _breaker_events(db: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r["event_type"], r["metadata"])
        for r in rows(
            db,
            "SELECT event_type, metadata FROM workflow_events"
            " WHERE execution_id IS NULL AND event_type LIKE 'breaker%%' ORDER BY id",
        )
    ]


def _outcomes(db: str, scope: str, key: str) -> list[dict[str, Any]]:
    return rows(
        db,
        "SELECT success, latency_ms, error_code, task_id::text AS task_id FROM lifecycle.breaker_outcomes"
        " WHERE scope = %(s)s AND key = %(k)s ORDER BY id",
        s=scope,
        k=key,
    )


def _opened(meta: dict[str, Any], **numbers: Any) -> dict[str, Any]:
    """The expected breaker_opened metadata: the default settings plus ``numbers``."""
    return {
        "window_s": 60,
        "failure_threshold": 5,
        "error_budget": 0.5,
        "latency_sla_ms": None,
        "cooldown_s": 30,
        **meta,
        **numbers,
    }


class Counting:
    """Counts its calls; raises ``error`` on each when given."""

    def __init__(self, name: str, error: BaseException | None = None) -> None:
        self.name = name
        self.error = error
        self.calls = 0

    def run(self, task: Task) -> dict[str, Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"summary": f"{self.name} did {task.stage_id}"}


# ------------------------------------------------------------------------------------------------
# closed -> open


def test_failures_reaching_the_threshold_over_the_budget_open_the_breaker(db: str) -> None:
    a = _agent(db, "worker", "work")
    with connect(db) as conn:
        assert [_record(conn, "agent", a, False, 100.0, at(i)) for i in range(4)] == ["closed"] * 4
        assert _breaker_events(db) == []
        assert _record(conn, "agent", a, False, 120.0, at(4)) == "open"
    [(kind, meta)] = _breaker_events(db)
    assert kind == "breaker_opened"
    assert meta == _opened(
        {"scope": "agent", "key": a, "agent": "worker", "capability": "work", "from": "closed"},
        reason="error_budget",
        failures=5,
        calls=5,
        rate=1.0,
        p95_ms=120.0,
    )
    b = _breaker(db, "agent", a)
    assert b is not None and (b["state"], b["opened_at"], b["probes_left"]) == ("open", at(4), 0)
    # operators see it in the breakers query
    with connect(db) as conn:
        [status] = [dict(r) for r in conn.execute(query("breakers")).fetchall()]
    assert {k: status[k] for k in ("scope", "name", "state", "opened_at", "half_open_at", "calls", "failures")} == {
        "scope": "agent",
        "name": "worker",
        "state": "open",
        "opened_at": at(4),
        "half_open_at": at(34),
        "calls": 5,
        "failures": 5,
    }


def test_the_error_budget_must_be_exceeded_not_just_reached(db: str) -> None:
    a = _agent(db, "worker", "work")
    with connect(db) as conn:
        for i in range(5):
            assert _record(conn, "agent", a, True, 10.0, at(i)) == "closed"
        for i in range(5):  # 5 failures of 10 calls: rate 0.5, not over the budget
            assert _record(conn, "agent", a, False, 10.0, at(5 + i)) == "closed"
        assert _record(conn, "agent", a, False, 10.0, at(10)) == "open"
    [(_, meta)] = _breaker_events(db)
    assert (meta["failures"], meta["calls"], meta["rate"]) == (6, 11, 0.5455)


def test_only_failures_inside_the_window_count(db: str) -> None:
    a = _agent(db, "worker", "work")
    with connect(db) as conn:
        for _ in range(4):
            _record(conn, "agent", a, False, 10.0, at(0))
        # the window is (now - 60 s, now]: at 60 s the four failures at 0 s have left it
        assert _record(conn, "agent", a, False, 10.0, at(60)) == "closed"
        assert [_record(conn, "agent", a, False, 10.0, at(61 + i)) for i in range(3)] == ["closed"] * 3
        assert _record(conn, "agent", a, False, 10.0, at(64)) == "open"
    [(_, meta)] = _breaker_events(db)
    assert (meta["failures"], meta["calls"]) == (5, 5)


def test_latency_sla_breach_opens_the_breaker(db: str) -> None:
    sla = {"breaker": {"latency_sla_ms": 500}}
    a = _agent(db, "slow", "work", sla)
    b = _agent(db, "slower", "other", sla)
    with connect(db) as conn:
        for i in range(19):
            assert _record(conn, "agent", a, True, 100.0, at(i)) == "closed"
        # one slow call in 20: the p95 (nearest rank) is still 100 ms
        assert _record(conn, "agent", a, True, 1000.0, at(19)) == "closed"
        # two in 21: the p95 is 1000 ms
        assert _record(conn, "agent", a, True, 1000.0, at(20)) == "open"
        # fewer calls than failure_threshold are not judged
        assert [_record(conn, "agent", b, True, 1000.0, at(i)) for i in range(4)] == ["closed"] * 4
        assert _record(conn, "agent", b, True, 1000.0, at(4)) == "open"
    [(_, meta_a), (_, meta_b)] = _breaker_events(db)
    assert meta_a == _opened(
        {"scope": "agent", "key": a, "agent": "slow", "capability": "work", "from": "closed"},
        reason="latency_sla",
        failures=0,
        calls=21,
        rate=0.0,
        p95_ms=1000.0,
        latency_sla_ms=500,
    )
    assert (meta_b["reason"], meta_b["calls"], meta_b["p95_ms"]) == ("latency_sla", 5, 1000.0)


# ------------------------------------------------------------------------------------------------
# open -> half_open -> closed | open


def _open(db: str, key: str, start: float = 0) -> None:
    with connect(db) as conn:
        for i in range(5):
            _record(conn, "agent", key, False, 10.0, at(start + i))
    assert _state(db, "agent", key) == "open"


def test_after_the_cooldown_a_probe_success_closes_it(db: str) -> None:
    a = _agent(db, "worker", "work")
    _open(db, a)  # opened at 4 s
    with connect(db) as conn:
        assert _route(conn, "work", at(33.999)) is None
        assert _route(conn, "work", at(34)) == "worker"  # the probe
        assert _breaker(db, "agent", a) == {"state": "half_open", "opened_at": at(4), "probes_left": 0}
        assert _route(conn, "work", at(34)) is None  # one probe at a time
        assert _record(conn, "agent", a, True, 50.0, at(35)) == "closed"
        assert _route(conn, "work", at(35)) == "worker"
        # the window starts again when it closes: the five old failures are gone
        assert [_record(conn, "agent", a, False, 10.0, at(36 + i)) for i in range(4)] == ["closed"] * 4
    kinds = [(k, m.get("from"), m.get("reason")) for k, m in _breaker_events(db)]
    assert kinds == [
        ("breaker_opened", "closed", "error_budget"),
        ("breaker_half_open", "open", None),
        ("breaker_closed", "half_open", "probes_succeeded"),
    ]
    _, half, closed = _breaker_events(db)
    assert half[1]["cooldown_s"] == 30 and half[1]["half_open_probes"] == 1
    assert datetime.fromisoformat(half[1]["opened_at"]) == at(4)
    assert (closed[1]["successes"], closed[1]["failures"], closed[1]["calls"]) == (1, 0, 1)


def test_a_probe_failure_reopens_it_and_a_lost_probe_comes_back(db: str) -> None:
    a = _agent(db, "worker", "work")
    _open(db, a)
    with connect(db) as conn:
        assert _route(conn, "work", at(34)) == "worker"
        assert _record(conn, "agent", a, False, 10.0, at(35)) == "open"
        assert _route(conn, "work", at(64.9)) is None  # a new cooldown from 35 s
        assert _route(conn, "work", at(65)) == "worker"
        # this probe's outcome never arrives (say a caller-fault error): after another cooldown
        # from the probe, a new one is let through
        assert _route(conn, "work", at(94.9)) is None
        assert _route(conn, "work", at(95)) == "worker"
    kinds = [(k, m.get("reason")) for k, m in _breaker_events(db)]
    assert kinds == [
        ("breaker_opened", "error_budget"),
        ("breaker_half_open", None),
        ("breaker_opened", "probe_failed"),
        ("breaker_half_open", None),
    ]
    reopened = _breaker_events(db)[2][1]
    assert (reopened["from"], reopened["failures"], reopened["calls"]) == ("half_open", 1, 1)
    assert _breaker(db, "agent", a) == {"state": "half_open", "opened_at": at(35), "probes_left": 0}


def test_half_open_probes_must_all_succeed(db: str) -> None:
    a = _agent(db, "worker", "work", {"breaker": {"half_open_probes": 2, "cooldown_s": 10}})
    _open(db, a)
    with connect(db) as conn:
        assert [_route(conn, "work", at(14)) for _ in range(3)] == ["worker", "worker", None]
        assert _record(conn, "agent", a, True, 10.0, at(15)) == "half_open"
        assert _record(conn, "agent", a, True, 10.0, at(15)) == "closed"


# ------------------------------------------------------------------------------------------------
# Through real runs


def test_open_breaker_fails_fast_without_calling_the_agent(db: str, instance: Any) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    worker = _agent_id(db, "worker")
    agent = Counting("worker", AgentOverloaded("down"))
    registry = AgentRegistry([agent])
    for i in range(1, 5):
        result, _ = run(db, instance, "wf", registry)
        assert not result.success and agent.calls == i
    assert (_state(db, "agent", worker), _state(db, "capability", "work")) == ("closed", "closed")
    assert _breaker_events(db) == []

    result, _ = run(db, instance, "wf", registry)  # the fifth failure
    assert not result.success and agent.calls == 5
    assert (_state(db, "agent", worker), _state(db, "capability", "work")) == ("open", "open")
    [(k1, agent_meta), (k2, capability_meta)] = _breaker_events(db)
    assert (k1, k2) == ("breaker_opened", "breaker_opened")
    p95 = agent_meta.pop("p95_ms")
    assert isinstance(p95, float) and p95 >= 0
    assert agent_meta == _opened(
        {"scope": "agent", "key": worker, "agent": "worker", "capability": "work", "from": "closed"},
        reason="error_budget",
        failures=5,
        calls=5,
        rate=1.0,
    )
    assert (capability_meta["scope"], capability_meta["key"], capability_meta["agent"]) == ("capability", "work", None)
    assert (capability_meta["failures"], capability_meta["calls"]) == (5, 5)

    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    assert agent.calls == 5  # never reached
    assert rows(db, "SELECT id FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid) == []
    [failed] = [m for t, _, m in events(db, eid) if t == "stage_failed"]
    assert failed["error_code"] == "breaker_open" and failed["task_id"] is None
    message = failed["error"]
    assert message.startswith(
        "circuit breaker open: no agent may be called for capability 'work' (stage 'work'); open breakers: "
        "capability 'work' open since "
    )
    assert ", agent 'worker' open since " in message
    [execution] = rows(db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert execution == {"status": "failed", "error_message": f"stage work failed: {message}"}
    assert len(_outcomes(db, "agent", worker)) == len(_outcomes(db, "capability", "work")) == 5


def test_routes_around_an_open_breaker_to_a_healthy_agent(db: str, instance: Any) -> None:
    install(db, "wf", DAG, {"work": "worker_a"})
    _agent(db, "worker_b", "work")
    a, b = _agent_id(db, "worker_a"), _agent_id(db, "worker_b")
    bad, good = Counting("worker_a", AgentOverloaded("down")), Counting("worker_b")
    registry = AgentRegistry([bad, good])
    for _ in range(5):
        result, _ = run(db, instance, "wf", registry)
        assert not result.success
    assert (bad.calls, good.calls) == (5, 0)
    # the capability's breaker stays closed while one of its agents is
    assert (_state(db, "agent", a), _state(db, "agent", b), _state(db, "capability", "work")) == (
        "open",
        "closed",
        "closed",
    )
    assert [(k, m["scope"], m["agent"]) for k, m in _breaker_events(db)] == [("breaker_opened", "agent", "worker_a")]

    result, eid = run(db, instance, "wf", registry)
    assert result.success
    assert (bad.calls, good.calls) == (5, 1)
    assert rows(
        db,
        "SELECT a.name, t.status FROM task_queue t JOIN agents a ON a.id = t.agent_id"
        " WHERE t.workflow_execution_id = %(e)s",
        e=eid,
    ) == [{"name": "worker_b", "status": "completed"}]
    [started] = [m for t, _, m in events(db, eid) if t == "stage_started"]
    assert started["agent"] == "worker_b"
    assert [o["success"] for o in _outcomes(db, "capability", "work")] == [False] * 5 + [True]
    assert [o["success"] for o in _outcomes(db, "agent", b)] == [True]


def test_the_capability_breaker_opens_only_when_every_agent_is_open(db: str) -> None:
    a = _agent(db, "worker_a", "work")
    b = _agent(db, "worker_b", "work")
    with connect(db) as conn:
        for i in range(5):
            _record(conn, "agent", a, False, 10.0, at(i))
            assert _record(conn, "capability", "work", False, 10.0, at(i)) == "closed"
        assert _route(conn, "work", at(5)) == "worker_b"
        for i in range(5, 10):
            _record(conn, "agent", b, False, 10.0, at(i))
            _record(conn, "capability", "work", False, 10.0, at(i))
        assert _state(db, "capability", "work") == "open"
        assert _route(conn, "work", at(10)) is None
        # once open it fails fast for its cooldown, even with a healthy agent added meanwhile
        _agent(db, "worker_c", "work")
        assert _route(conn, "work", at(10)) is None
        breakers = [dict(r) for r in conn.execute(query("capability_breakers"), {"capability": "work"}).fetchall()]
        assert [(r["scope"], r["name"], r["state"]) for r in breakers] == [
            ("capability", "work", "open"),
            ("agent", "worker_a", "open"),
            ("agent", "worker_b", "open"),
            ("agent", "worker_c", "closed"),
        ]
        assert _route(conn, "work", at(38.9)) is None  # worker_a half-opens, the capability not yet
        # after its cooldown (opened at 9 s) it half-opens; worker_a (opened at 4 s) too
        assert _route(conn, "work", at(39)) == "worker_a"
    opened = [(k, m["scope"], m["agent"]) for k, m in _breaker_events(db)]
    assert opened == [
        ("breaker_opened", "agent", "worker_a"),
        ("breaker_opened", "agent", "worker_b"),
        ("breaker_opened", "capability", None),
        ("breaker_half_open", "agent", "worker_a"),
        ("breaker_half_open", "capability", None),
    ]
    capability_meta = _breaker_events(db)[2][1]
    assert capability_meta == _opened(
        {"scope": "capability", "key": "work", "agent": None, "capability": "work", "from": "closed"},
        reason="error_budget",
        failures=10,
        calls=10,
        rate=1.0,
        p95_ms=10.0,
    )


# ------------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_recorders_never_lose_a_count(db: str) -> None:
    workers, per_worker = 8, 25
    total = workers * per_worker
    # it opens only if one evaluation sees every failure; the other never opens
    exact = _agent(db, "exact", "work", {"breaker": {"failure_threshold": total}})
    above = _agent(db, "above", "work", {"breaker": {"failure_threshold": total + 1}})
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def record() -> None:
        try:
            with connect(db) as conn:
                barrier.wait(timeout=30)
                for _ in range(per_worker):
                    _record(conn, "agent", exact, False, 10.0, T0)
                    _record(conn, "agent", above, False, 10.0, T0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=record) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(_outcomes(db, "agent", exact)) == len(_outcomes(db, "agent", above)) == total
    assert (_state(db, "agent", exact), _state(db, "agent", above)) == ("open", "closed")
    [(kind, meta)] = _breaker_events(db)
    assert (kind, meta["agent"], meta["failures"], meta["calls"], meta["failure_threshold"]) == (
        "breaker_opened",
        "exact",
        total,
        total,
        total,
    )


# ------------------------------------------------------------------------------------------------
# What counts


def _dispatch(db: str, timeout_s: float | None = None, now: datetime | None = None) -> tuple[str, str, str]:
    """A new execution of wf with its 'work' stage started: (execution id, log id, task id)."""
    row, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_ensure(%s, %s, %s)", (row["id"], f"run-{eid}", eid))
        started = conn.execute(
            "SELECT log_id::text AS log_id, task_id::text AS task_id FROM lifecycle.stage_start("
            "%s, 'work', 'work', '{}'::jsonb, 1, coalesce(%s, now()), %s)",
            (eid, now, timeout_s),
        ).fetchone()
    assert started is not None and started["task_id"] is not None
    return eid, str(started["log_id"]), str(started["task_id"])


def test_caller_fault_errors_do_not_count(db: str, instance: Any) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    worker = _agent_id(db, "worker")
    with connect(db) as conn:
        for code in CALLER_FAULTS:
            assert conn.execute("SELECT lifecycle.breaker_caller_fault(%s) AS f", (code,)).fetchone() == {"f": True}
        for code in ("timeout", "overloaded", "rate_limited", "agent_crashed", "bad_output", "weird", None):
            assert conn.execute("SELECT lifecycle.breaker_caller_fault(%s) AS f", (code,)).fetchone() == {"f": False}
    for code in CALLER_FAULTS:
        _, log_id, task_id = _dispatch(db)
        with connect(db) as conn:
            conn.execute("SELECT lifecycle.stage_fail(%s, %s, 'their fault', %s)", (log_id, task_id, code))
    _, log_id, task_id = _dispatch(db)
    with connect(db) as conn:
        conn.execute(
            "SELECT lifecycle.stage_schedule_retry(%s, %s, 1, 'their fault', 'bad_request', 'AgentBadRequest', 0)",
            (log_id, task_id),
        )
    # through a real run too
    agent = Counting("worker", AgentBadRequest("field x is required"))
    result, _ = run(db, instance, "wf", AgentRegistry([agent]))
    assert not result.success and agent.calls == 1
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.breaker_outcomes") == [{"n": 0}]

    # an agent's own failure does count, for the agent and the capability
    _, log_id, task_id = _dispatch(db)
    with connect(db) as conn:
        conn.execute(
            "SELECT lifecycle.stage_schedule_retry(%s, %s, 1, 'busy', 'overloaded', 'AgentOverloaded', 0)",
            (log_id, task_id),
        )
    for scope, key in (("agent", worker), ("capability", "work")):
        [outcome] = _outcomes(db, scope, key)
        assert (outcome["success"], outcome["error_code"], outcome["task_id"]) == (False, "overloaded", task_id)


def test_a_timed_out_result_counts_once_and_other_refusals_not_at_all(db: str) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    worker = _agent_id(db, "worker")
    _, log_id, task_id = _dispatch(db, timeout_s=1, now=at(0))
    with connect(db) as conn:
        refused = conn.execute(
            'SELECT lifecycle.stage_complete(%s, %s, \'{"summary": "late"}\', %s) AS s', (log_id, task_id, at(2.5))
        ).fetchone()
        assert refused == {"s": "refused_timed_out"}
        reason = conn.execute(
            "SELECT metadata ->> 'reason' AS r, metadata ->> 'code' AS c FROM workflow_events"
            " WHERE event_type = 'stage_result_refused'"
        ).fetchone()
        assert reason is not None and reason["c"] == "refused_timed_out"
        assert reason["r"].startswith("attempt 1 timed out at ")
        retry = conn.execute(
            "SELECT lifecycle.stage_schedule_retry(%s, %s, 1, 'late', 'timeout', 'AgentTimeout', 0, %s) AS s",
            (log_id, task_id, at(2.5)),
        ).fetchone()
        assert retry == {"s": "retrying"}
    for scope, key in (("agent", worker), ("capability", "work")):
        assert _outcomes(db, scope, key) == [
            {"success": False, "latency_ms": 2500.0, "error_code": "timeout", "task_id": task_id}
        ]

    eid, log_id, task_id = _dispatch(db)
    with connect(db) as conn:
        conn.execute("SELECT * FROM lifecycle.execution_cancel(%s)", (eid,))
        late = conn.execute(
            'SELECT lifecycle.stage_complete(%s, %s, \'{"summary": "x"}\') AS s', (log_id, task_id)
        ).fetchone()
        assert late == {"s": "refused_execution_stopped"}
    assert len(_outcomes(db, "agent", worker)) == 1


def test_a_success_records_its_latency(db: str) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    worker = _agent_id(db, "worker")
    _, log_id, task_id = _dispatch(db, now=at(0))
    with connect(db) as conn:
        done = conn.execute(
            'SELECT lifecycle.stage_complete(%s, %s, \'{"summary": "ok"}\', %s) AS s', (log_id, task_id, at(0.25))
        ).fetchone()
    assert done == {"s": "completed"}
    assert _outcomes(db, "agent", worker) == [
        {"success": True, "latency_ms": 250.0, "error_code": None, "task_id": task_id}
    ]


# ------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("breaker", "fragment"),
    [
        ({"error_budget": 2}, "error_budget: 2 is out of range"),
        ({"failure_threshold": 2.5}, "failure_threshold: 2.5 is out of range"),
        ({"window_s": 0}, "window_s: 0 is out of range"),
        ({"cooldown_s": "30"}, 'cooldown_s must be a number, got "30"'),
        ({"windw_s": 10}, "unknown key(s) windw_s; known: cooldown_s, error_budget"),
        ("fast", "must be a JSON object, got string"),
    ],
)
def test_bad_breaker_settings_are_refused_clearly(db: str, breaker: Any, fragment: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _agent(db, "worker", "work", {"breaker": breaker})
    assert str(caught.value.diag.message_primary).startswith("agent worker: config.breaker ")
    assert fragment in str(caught.value.diag.message_primary)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"window_s": 1e-400}', "window_s must be a number a double can hold"),  # > 0 as numeric, 0 as a double
        ('{"latency_sla_ms": 1e-400}', "latency_sla_ms must be a number a double can hold"),
        ('{"error_budget": 1e-400}', "error_budget must be a number a double can hold"),
        ('{"cooldown_s": 1e-400}', "cooldown_s must be a number a double can hold"),
        ('{"error_budget": -1e400}', "error_budget must be a number a double can hold"),
    ],
)
def test_breaker_settings_a_double_cannot_hold_are_refused(db: str, text: str, fragment: str) -> None:
    """JSON written by SQL keeps 1e-400 exactly; routing, the status view and `breakers` read it as
    a double and would fail on every call: refused when written, with the reason."""
    with connect(db) as conn, pytest.raises(psycopg.errors.CheckViolation) as caught:
        conn.execute(
            "INSERT INTO agents (name, config) VALUES ('worker', jsonb_build_object('breaker', %s::jsonb))", (text,)
        )
    assert str(caught.value.diag.message_primary).startswith("agent worker: config.breaker ")
    assert fragment in str(caught.value.diag.message_primary)
    assert "(finite, and not so small that it rounds to 0)" in str(caught.value.diag.message_primary)


def test_settings_override_the_defaults(db: str) -> None:
    a = _agent(db, "worker", "work", {"breaker": {"window_s": 10, "latency_sla_ms": 250}})
    with connect(db) as conn:
        row = conn.execute("SELECT lifecycle.breaker_config('agent', %s) AS c", (a,)).fetchone()
        capability = conn.execute("SELECT lifecycle.breaker_config('capability', 'work') AS c").fetchone()
    assert row == {
        "c": {
            "window_s": 10,
            "failure_threshold": 5,
            "error_budget": 0.5,
            "latency_sla_ms": 250,
            "cooldown_s": 30,
            "half_open_probes": 1,
        }
    }
    assert capability is not None and capability["c"]["window_s"] == 60


# ------------------------------------------------------------------------------------------------
# The runbook's trip_circuit_breaker


def test_trip_circuit_breaker_as_the_runbook_calls_it(db: str) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    worker = _agent_id(db, "worker")
    eid, log_id, task_id = _dispatch(db)
    with connect(db) as conn:
        conn.execute(
            "SELECT lifecycle.stage_schedule_retry(%s, %s, 1, 'busy', 'overloaded', 'AgentOverloaded', 0)",
            (log_id, task_id),
        )
        conn.execute("SELECT trip_circuit_breaker(%s, %s)", (eid, "p95 latency over SLA"))
    [execution] = rows(
        db,
        "SELECT status, error_message, circuit_breaker_state, updated_at FROM workflow_executions WHERE id = %(e)s",
        e=eid,
    )
    assert (execution["status"], execution["error_message"]) == (
        "failed",
        "circuit breaker tripped: p95 latency over SLA",
    )
    state = execution["circuit_breaker_state"]
    assert datetime.fromisoformat(state.pop("tripped_at")) == execution["updated_at"]
    assert state == {
        "reason": "p95 latency over SLA",
        "agent": "worker",
        "agent_id": worker,
        "stage": "work",
        "task_id": task_id,
        "previous_status": "in_progress",
    }
    assert events(db, eid)[-1] == (
        "workflow_failed",
        "work",
        {
            "reason": "p95 latency over SLA",
            "error_code": "circuit_breaker_tripped",
            "agent": "worker",
            "previous_status": "in_progress",
        },
    )
    assert _state(db, "agent", worker) == "open"
    [(kind, meta)] = [(k, m) for k, m in _breaker_events(db) if m["scope"] == "agent"]
    assert (kind, meta["reason"], meta["trip_reason"], meta["execution_id"], meta["task_id"]) == (
        "breaker_opened",
        "tripped",
        "p95 latency over SLA",
        eid,
        task_id,
    )
    assert (meta["failures"], meta["calls"]) == (1, 1)
    with connect(db) as conn:
        assert conn.execute("SELECT agent_name FROM lifecycle.capability_route('work')").fetchone() is None

        # tripping it again: the status stays failed, no second workflow_failed, the breaker stays open
        conn.execute("SELECT lifecycle.execution_trip(%s, 'again', %s)", (eid, at(0)))
    [again] = rows(db, "SELECT status, circuit_breaker_state FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert again["status"] == "failed"
    assert (again["circuit_breaker_state"]["reason"], again["circuit_breaker_state"]["previous_status"]) == (
        "again",
        "failed",
    )
    assert [t for t, _, _ in events(db, eid)].count("workflow_failed") == 1
    assert events(db, eid)[-1] == (
        "circuit_breaker_tripped",
        "work",
        {"reason": "again", "agent": "worker", "status": "failed"},
    )
    assert len([k for k, m in _breaker_events(db) if m["scope"] == "agent"]) == 1
    b = _breaker(db, "agent", worker)
    assert b is not None and (b["state"], b["opened_at"]) == ("open", at(0))


def test_trip_circuit_breaker_on_a_pending_execution_fails_it_through_in_progress(db: str) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    _, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_trip(%s, 'manual stop', %s)", (eid, at(0)))
    [execution] = rows(db, "SELECT status, circuit_breaker_state FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert execution["status"] == "failed"
    state = execution["circuit_breaker_state"]
    assert datetime.fromisoformat(state.pop("tripped_at")) == at(0)
    assert state == {
        "reason": "manual stop",
        "agent": None,
        "agent_id": None,
        "stage": None,
        "task_id": None,
        "previous_status": "pending",
    }
    assert events(db, eid) == [
        (
            "workflow_failed",
            None,
            {
                "reason": "manual stop",
                "error_code": "circuit_breaker_tripped",
                "agent": None,
                "previous_status": "pending",
            },
        )
    ]
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.breakers") == [{"n": 0}]


def test_trip_circuit_breaker_leaves_other_statuses_but_records_the_trip(db: str) -> None:
    install(db, "wf", DAG, {"work": "worker"})
    _, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'stop', false)", (eid,))
        conn.execute("SELECT lifecycle.execution_trip(%s, 'too late', %s)", (eid, at(0)))
    [execution] = rows(db, "SELECT status, circuit_breaker_state FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert execution["status"] == "cancelled"
    assert (execution["circuit_breaker_state"]["reason"], execution["circuit_breaker_state"]["previous_status"]) == (
        "too late",
        "cancelled",
    )
    assert events(db, eid)[-1] == (
        "circuit_breaker_tripped",
        None,
        {"reason": "too late", "agent": None, "status": "cancelled"},
    )


def test_trip_circuit_breaker_of_an_unknown_execution_is_a_clear_error(db: str) -> None:
    missing = uuid.uuid4()
    with connect(db) as conn, pytest.raises(psycopg.errors.NoDataFound) as caught:
        conn.execute("SELECT trip_circuit_breaker(%s, 'x')", (missing,))
    assert caught.value.diag.message_primary == f"trip_circuit_breaker: unknown workflow execution {missing}"


def test_one_overload_each(db: str) -> None:
    for name in ("trip_circuit_breaker", "execution_trip", "capability_route"):
        assert rows(db, "SELECT count(*) AS n FROM pg_proc WHERE proname = %(p)s", p=name) == [{"n": 1}]


def test_the_runbook_section4_function_is_replaced_not_overloaded(db: str) -> None:
    with connect(db) as conn:
        conn.execute(runbook_section(4))  # the user runs section 4 as written, after migrating
    assert rows(db, "SELECT count(*) AS n FROM pg_proc WHERE proname = 'trip_circuit_breaker'") == [{"n": 1}]
    migrate.run_upgrade(db, repair=True)  # the wrapper is back
    assert rows(db, "SELECT count(*) AS n FROM pg_proc WHERE proname = 'trip_circuit_breaker'") == [{"n": 1}]
    with connect(db) as conn, pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT trip_circuit_breaker(%s, 'x')", (uuid.uuid4(),))
