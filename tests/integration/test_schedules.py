"""Schedules (issue 15): a definition's ``schedule`` becomes a Dagster schedule of the code location;
each tick inserts one pending execution keyed by the tick, however often it is evaluated, and the
launch sensor launches it. Real Postgres, real Dagster instance."""

from __future__ import annotations

import threading
import uuid
import zoneinfo
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import psycopg
import pytest

from lifecycle_dagster.core.dag_schedule import known_timezones, tick_key
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.sensors import launch_requests
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.transitions import ScheduleTickStatus, execution_schedule
from lifecycle_dagster.store.versions import publish

from helpers import as_role, rows

CONTEXT = {"customer": "ACME", "source": "schedule"}
BERLIN = ZoneInfo("Europe/Berlin")


def _dag(**schedule: Any) -> dict[str, Any]:
    return {"stages": [{"id": "work", "capability": "work"}], "schedule": schedule}


def _publish(db: str, name: str, dag: dict[str, Any]) -> str:
    with connect(db) as conn:
        publish(conn, name, None, dag, activate=True)
    [row] = rows(db, "SELECT id::text AS id FROM workflow_definitions WHERE name = %(n)s AND is_active", n=name)
    return str(row["id"])


def _repo(db: str) -> Any:
    return definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()


def _tick(repo: Any, instance: Any, name: str, when: datetime) -> str:
    schedule = repo.get_schedule_def(f"{name}__schedule")
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=when, repository_def=repo)
    data = schedule.evaluate_tick(ctx)
    assert not data.run_requests  # the launch sensor launches: a run request here would launch twice
    return str(data.skip_message)


def _scheduled(db: str) -> list[dict[str, Any]]:
    return rows(
        db,
        "SELECT id::text AS id, status, context, schedule_tick FROM workflow_executions"
        " WHERE schedule_tick IS NOT NULL ORDER BY schedule_tick",
    )


def test_a_declared_schedule_is_a_dagster_schedule_of_the_active_version(db: str) -> None:
    _publish(db, "wf", _dag(cron="0 9 * * 1-5", timezone="Europe/Berlin", context=CONTEXT))
    _publish(db, "off", _dag(cron="30 1 * * *", enabled=False))
    with connect(db) as conn:
        publish(conn, "plain", None, {"stages": [{"id": "work", "capability": "work"}]}, activate=True)
        publish(conn, "wf", None, _dag(cron="0 10 * * *"))  # v2, not active: no schedule of its own
    repo = _repo(db)
    # and retention's, on by default (location/retention.py)
    assert sorted(s.name for s in repo.schedule_defs) == [
        "lifecycle_retention_schedule",
        "off__schedule",
        "wf__schedule",
    ]
    wf = repo.get_schedule_def("wf__schedule")
    assert (wf.cron_schedule, wf.execution_timezone, wf.job_name, wf.default_status) == (
        "0 9 * * 1-5",
        "Europe/Berlin",
        "wf__v1",
        dg.DefaultScheduleStatus.RUNNING,
    )
    off = repo.get_schedule_def("off__schedule")
    assert (off.execution_timezone, off.default_status) == ("UTC", dg.DefaultScheduleStatus.STOPPED)


def test_each_tick_inserts_one_pending_execution_however_often_it_is_evaluated(db: str, instance: Any) -> None:
    definition = _publish(db, "wf", _dag(cron="0 2 * * *", timezone="Europe/Berlin", context=CONTEXT))
    repo = _repo(db)
    spring = datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN)  # the day 02:00 does not exist: Dagster ticks at 03:00
    first = _tick(repo, instance, "wf", spring)
    [row] = _scheduled(db)
    assert row["schedule_tick"] == f"schedule:{definition}:2026-03-29T01:00:00Z" == tick_key(definition, spring)
    assert (row["status"], row["context"]) == ("pending", CONTEXT)
    assert first == f"tick {row['schedule_tick']}: inserted pending execution {row['id']} (the launch sensor runs it)"
    # the same tick again (a daemon restarted before it recorded the tick, a second daemon): nothing new
    again = _tick(repo, instance, "wf", spring.astimezone(ZoneInfo("UTC")))
    assert again == f"tick {row['schedule_tick']}: execution {row['id']} was already inserted for this tick"
    assert len(_scheduled(db)) == 1
    _tick(repo, instance, "wf", datetime(2026, 3, 30, 2, 0, tzinfo=BERLIN))
    executions = _scheduled(db)
    assert len(executions) == 2
    # the launch sensor launches each once, run key = execution id
    assert sorted(r.run_key for r in launch_requests(["wf__v1"], db)) == sorted(r["id"] for r in executions)

    # another version activated, the code location not reloaded yet: v1's schedule inserts nothing
    with connect(db) as conn:
        publish(conn, "wf", None, _dag(cron="0 2 * * *"), activate=True)
    late = _tick(repo, instance, "wf", datetime(2026, 3, 31, 2, 0, tzinfo=BERLIN))
    assert "is no longer the active version: nothing inserted" in late
    assert len(_scheduled(db)) == 2


def test_two_daemons_evaluating_one_tick_insert_one_row(db: str) -> None:
    definition = _publish(db, "wf", _dag(cron="* * * * *"))
    key = tick_key(definition, datetime(2026, 12, 7, 6, 0, tzinfo=ZoneInfo("UTC")))
    barrier = threading.Barrier(4)
    results: list[ScheduleTickStatus] = []

    def evaluate() -> None:
        with connect(db) as conn:
            barrier.wait()
            results.append(execution_schedule(conn, definition_id=definition, tick=key, context={}).status)

    threads = [threading.Thread(target=evaluate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["created", "exists", "exists", "exists"]
    assert len(_scheduled(db)) == 1


def test_a_tick_key_of_another_definition_is_refused(db: str) -> None:
    definition = _publish(db, "wf", _dag(cron="* * * * *"))
    with connect(db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue, match="is not of definition"):
        execution_schedule(conn, definition_id=definition, tick=f"schedule:{uuid.uuid4()}:x", context={})
    assert _scheduled(db) == []


def test_a_client_cannot_take_a_tick_key(db: str) -> None:
    """authenticated may insert only the columns it is granted (12_security.sql): not schedule_tick."""
    definition = _publish(db, "wf", _dag(cron="* * * * *"))
    user = str(uuid.uuid4())
    with (
        as_role(db, "authenticated", user) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
    ):
        conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, created_by, schedule_tick)"
            " VALUES (%s, 'pending', %s, %s)",
            (definition, user, f"schedule:{definition}:2027-01-01T00:00:00Z"),
        )


def test_python_and_postgres_know_the_same_time_zones(db: str) -> None:
    names = {r["name"] for r in rows(db, "SELECT name FROM lifecycle.dag_timezone_names() AS z(name)")}
    assert names == set(known_timezones()) == zoneinfo.available_timezones()
    assert len(names) > 400


def test_dagster_scheduler_inserts_each_tick_once_across_daylight_saving(db: str, instance: Any) -> None:
    """The daemon's own scheduler loop (``launch_scheduled_runs``, in process, at frozen times):
    the first pass starts the RUNNING-by-default schedule, the next ones evaluate its ticks,
    catching up missed ones; a pass repeated at the same time (a restarted daemon) adds nothing."""
    import logging

    from dagster._core.definitions.definitions_load_context import DefinitionsLoadContext, DefinitionsLoadType
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._scheduler.scheduler import launch_scheduled_runs

    definition = _publish(db, "wf", _dag(cron="0 2 * * *", timezone="Europe/Berlin", context=CONTEXT))
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="lifecycle_dagster.location.definitions", attribute="defs"),
        location_name="lifecycle_dagster",
    )
    logger = logging.getLogger("test_scheduler")

    def scheduler_pass(now: datetime) -> None:
        # each pass loads the code location afresh, as a code server does; the in-process location
        # installs a global load context (DefinitionsLoadContext.set): scoped() puts the old one back
        fresh = DefinitionsLoadContext(load_type=DefinitionsLoadType.INITIALIZATION)
        with (
            DefinitionsLoadContext.scoped(fresh),
            freeze_time(now),
            create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin), instance) as ctx,
        ):
            list(launch_scheduled_runs(ctx, logger, now, iteration_times={}))

    utc = ZoneInfo("UTC")
    scheduler_pass(datetime(2026, 3, 27, 12, 0, tzinfo=utc))  # the schedule starts: no tick yet
    assert _scheduled(db) == []
    # down over 28 Mar 02:00 CET: Dagster does not catch up a missed tick of a schedule without
    # partitions, it evaluates the latest one only (29 Mar: 02:00 does not exist, 03:00 CEST)
    scheduler_pass(datetime(2026, 3, 29, 1, 30, tzinfo=utc))
    scheduler_pass(datetime(2026, 3, 29, 1, 30, tzinfo=utc))  # a restarted daemon, the same moment
    scheduler_pass(datetime(2026, 3, 30, 0, 30, tzinfo=utc))  # 30 Mar 02:00 CEST
    # 25 Oct 02:30 CEST: the first 02:00 has passed, but it is not a tick (the latest is 24 Oct's);
    # Dagster runs the second 02:00, CET
    scheduler_pass(datetime(2026, 10, 25, 0, 30, tzinfo=utc))
    scheduler_pass(datetime(2026, 10, 25, 1, 30, tzinfo=utc))
    assert [r["schedule_tick"] for r in _scheduled(db)] == [
        f"schedule:{definition}:2026-03-29T01:00:00Z",
        f"schedule:{definition}:2026-03-30T00:00:00Z",
        f"schedule:{definition}:2026-10-24T00:00:00Z",
        f"schedule:{definition}:2026-10-25T01:00:00Z",
    ]
    assert all(r["status"] == "pending" and r["context"] == CONTEXT for r in _scheduled(db))
