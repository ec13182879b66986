"""Alerts (sql/schema/13_alerts.sql, lifecycle_dagster/location/alerts.py) on real Postgres, a real
Dagster instance and a real HTTP receiver on 127.0.0.1: each kind of event is POSTed once, a sensor
evaluated again (or after a restart) sends nothing twice, a receiver that fails twice gets the alert
on the third try after the backoff, and one alert that keeps failing never holds back the others."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, CompensationTask, Task, artifacts
from lifecycle_dagster.location import alerts
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import build_compensation_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.store.db import connect

from alert_receiver import Receiver
from helpers import install, rows, run


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


class Undoable:
    """Completes with an artifact; its undo always fails."""

    name = "A"

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": task.stage_id, "artifacts": artifacts("thing", [{"id": task.stage_id}])}

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        raise RuntimeError("undo service down")


class Crashing:
    """Crashes on every call (counted by its breaker)."""

    name = "B"

    def run(self, task: Task) -> dict[str, Any]:
        raise RuntimeError("model endpoint down")


DAG = {
    "stages": [{"id": "a", "capability": "alpha", "next": ["b"]}, {"id": "b", "capability": "beta"}],
    "defaults": {"retry": {"max_attempts": 1, "base_delay_s": 0}},
}


def _every_kind(db: str, instance: Any) -> str:
    """An execution whose stage b fails for good (and opens agent B's breaker, threshold 1), whose
    undo of stage a fails for good, and a pending queue task waiting for an hour; its id."""
    install(db, "wf", DAG, {"alpha": "A", "beta": "B"})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET config = %s WHERE name = 'B'", (Jsonb({"breaker": {"failure_threshold": 1}}),))
        conn.execute(
            "INSERT INTO task_queue (task_type, capability, status, created_at)"
            " VALUES ('adhoc', 'slow_queue', 'pending', now() - interval '1 hour')"
        )
    registry = AgentRegistry([Undoable(), Crashing()])
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'the run failed')", (eid,))
        row = conn.execute(
            "SELECT d.* FROM workflow_definitions d JOIN workflow_executions e ON e.workflow_definition_id = d.id"
            " WHERE e.id = %s",
            (eid,),
        ).fetchone()
    assert row is not None
    build_compensation_job(dict(row)).execute_in_process(
        instance=instance,
        tags={"lifecycle/execution_id": eid},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "compensation_failed"}]
    return eid


def _sensor(db: str) -> dg.SensorDefinition:
    return definitions_from_snapshot(fetch_snapshot(db)).get_repository_def().get_sensor_def("lifecycle_alert_sensor")


def test_each_kind_is_posted_once_even_after_a_restart(
    db: str, instance: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid = _every_kind(db, instance)
    monkeypatch.setenv("LIFECYCLE_DAGSTER_ALERT_URL", receiver.url)
    sensor = _sensor(db)
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    by_kind = {p["kind"]: p for p in receiver.received}
    assert sorted(by_kind) == ["breaker_opened", "compensation_failed", "execution_failed", "queue_stale"]
    assert len(receiver.received) == 4
    for p in receiver.received:
        assert p["dedup_key"] == p["key"] == p["_idempotency_key"] and p["text"] and "\n" not in p["text"]
        datetime.fromisoformat(p["at"])
    opened = by_kind["breaker_opened"]
    assert opened["key"].startswith("breaker_opened:B:beta:")
    assert (opened["agent"], opened["capability"], opened["scope"]) == ("B", "beta", "agent")
    failed = by_kind["execution_failed"]
    assert failed["key"] == f"execution_failed:{eid}"
    assert (failed["workflow"], failed["execution_id"], failed["stage"], failed["agent"], failed["capability"]) == (
        "wf",
        eid,
        "b",
        "B",
        "beta",
    )
    assert "model endpoint down" in failed["text"] and failed["on_failure"] == "compensate"
    comp = by_kind["compensation_failed"]
    assert comp["key"] == f"compensation_failed:{eid}"
    assert (comp["execution_id"], comp["stage"], comp["agent"], comp["capability"]) == (eid, "a", "A", "alpha")
    assert "undo service down" in comp["text"]
    stale = by_kind["queue_stale"]
    assert stale["capability"] == "slow_queue" and stale["pending"] == 1 and stale["waited_s"] >= 3600
    assert stale["key"] == f"queue_stale:slow_queue:{stale['task_id']}"

    # the same tick again, then a "restarted" daemon: a new instance object and freshly loaded definitions
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    restarted = dg.DagsterInstance.from_config(str(instance.root_directory))
    try:
        _sensor(db).evaluate_tick(dg.build_sensor_context(instance=restarted))
    finally:
        restarted.dispose()
    assert len(receiver.received) == 4
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.alerts WHERE sent_at IS NOT NULL AND attempts = 1") == [
        {"n": 4}
    ]


def _breaker_event(db: str, agent: str) -> str:
    """A breaker_opened event written as breaker_set_state writes it; the alert's key."""
    with connect(db) as conn:
        row = conn.execute(
            "INSERT INTO workflow_events (event_type, metadata) VALUES ('breaker_opened', %s)"
            " RETURNING to_char(\"timestamp\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS at",
            (Jsonb({"scope": "agent", "key": agent, "agent": agent, "capability": "work", "reason": "error_budget"}),),
        ).fetchone()
    assert row is not None
    return f"breaker_opened:{agent}:work:{row['at']}"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_a_receiver_failing_twice_gets_the_alert_on_the_third_try_after_the_backoff(db: str) -> None:
    key = _breaker_event(db, "flaky")
    clock = Clock()
    first = Receiver(answers={key: [500]})
    port = first.port
    try:
        tick = alerts.send_alerts(db, first.url, queue_age_s=600, now=clock, u=lambda: 0.999)
        assert tick.sent == [] and tick.failed[key].startswith("HTTP 500")
        clock.advance(9.9)  # the first backoff: 10 s (equal jitter, u ~ 1)
        assert alerts.send_alerts(db, first.url, queue_age_s=600, now=clock).failed == {}
        assert len(first.received) == 1
    finally:
        first.stop()
    clock.advance(0.2)
    tick = alerts.send_alerts(db, f"http://127.0.0.1:{port}/hook", queue_age_s=600, now=clock, u=lambda: 0.999)
    assert tick.failed[key].startswith("ConnectError")  # nothing listens: connection refused
    clock.advance(19.9)  # the second backoff: 20 s
    assert alerts.send_alerts(db, f"http://127.0.0.1:{port}/hook", queue_age_s=600, now=clock).failed == {}
    second = Receiver(port=port)
    try:
        clock.advance(0.2)
        tick = alerts.send_alerts(db, second.url, queue_age_s=600, now=clock)
        assert tick.sent == [key] and tick.failed == {}
        assert [p["key"] for p in second.received] == [key]
        clock.advance(3600)
        assert alerts.send_alerts(db, second.url, queue_age_s=600, now=clock).sent == []
    finally:
        second.stop()
    [alert] = rows(db, "SELECT attempts, sent_at IS NOT NULL AS sent, last_error FROM lifecycle.alerts")
    assert alert == {"attempts": 3, "sent": True, "last_error": None}


def test_an_alert_that_keeps_failing_never_holds_back_the_others(db: str) -> None:
    bad = _breaker_event(db, "bad")
    good = [_breaker_event(db, f"good{i}") for i in range(3)]
    receiver = Receiver(always_fail=bad)
    clock = Clock()
    try:
        tick = alerts.send_alerts(db, receiver.url, queue_age_s=600, now=clock)
        assert tick.sent == good and list(tick.failed) == [bad]  # the bad one was tried first
        later = _breaker_event(db, "later")
        for _ in range(3):
            clock.advance(alerts.BACKOFF_MAX_S)
            tick = alerts.send_alerts(db, receiver.url, queue_age_s=600, now=clock)
            assert list(tick.failed) == [bad]
        assert [p["key"] for p in receiver.received].count(later) == 1
        assert sorted({p["key"] for p in receiver.received}) == sorted([bad, *good, later])
        assert [p["key"] for p in receiver.received].count(bad) == 4
    finally:
        receiver.stop()
    [alert] = rows(db, "SELECT attempts, sent_at, last_error FROM lifecycle.alerts WHERE key = %(k)s", k=bad)
    assert alert["attempts"] == 4 and alert["sent_at"] is None and alert["last_error"].startswith("HTTP 500")


def test_a_queue_backing_up_is_one_alert_per_threshold(db: str) -> None:
    with connect(db) as conn:
        for minutes in (30, 20):
            conn.execute(
                "INSERT INTO task_queue (task_type, capability, status, created_at)"
                " VALUES ('adhoc', 'q', 'pending', now() - make_interval(mins => %s))",
                (minutes,),
            )
        now = datetime.now(UTC)
        scan = "SELECT lifecycle.alerts_scan(%s, %s) AS n"
        assert conn.execute(scan, (600, now)).fetchone() == {"n": 1}
        # the oldest is claimed: the next one is stale too, but within the threshold of the first alert
        conn.execute("DELETE FROM task_queue WHERE created_at = (SELECT min(created_at) FROM task_queue)")
        assert conn.execute(scan, (600, now + timedelta(seconds=599))).fetchone() == {"n": 0}
        assert conn.execute(scan, (600, now + timedelta(seconds=600))).fetchone() == {"n": 1}
    keys = [r["key"] for r in rows(db, "SELECT key FROM lifecycle.alerts ORDER BY id")]
    assert len(keys) == 2 and len(set(keys)) == 2 and all(k.startswith("queue_stale:q:") for k in keys)
