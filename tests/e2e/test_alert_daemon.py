"""With dagster-daemon running and LIFECYCLE_DAGSTER_ALERT_URL set: lifecycle_alert_sensor POSTs an
alert to a real receiver, and a restarted daemon sends the next one without sending the first again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import connect

from alert_receiver import Receiver
from helpers import running_daemon

pytestmark = pytest.mark.slow


def _breaker_opened(db: str, agent: str) -> None:
    with connect(db) as conn:
        conn.execute(
            "INSERT INTO workflow_events (event_type, metadata) VALUES ('breaker_opened', %s)",
            (Jsonb({"scope": "agent", "key": agent, "agent": agent, "capability": "work", "reason": "error_budget"}),),
        )


def _wait_for(receiver: Receiver, n: int, seconds: float) -> float:
    t0 = time.monotonic()
    while len(receiver.received) < n and time.monotonic() - t0 < seconds:
        time.sleep(0.5)
    return time.monotonic() - t0


def test_the_daemon_sends_each_alert_once_across_a_restart(db: str, dagster_home: Path, tmp_path: Path) -> None:
    receiver = Receiver()
    env = {
        **os.environ,
        "DATABASE_URL": db,
        "DAGSTER_HOME": str(dagster_home),
        "LIFECYCLE_DAGSTER_ALERT_URL": receiver.url,
        "LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S": "4",
    }
    try:
        _breaker_opened(db, "first")
        with running_daemon(env, tmp_path / "daemon1.log"):
            took = _wait_for(receiver, 1, 120)
        assert [p["agent"] for p in receiver.received] == ["first"], (tmp_path / "daemon1.log").read_text()[-4000:]
        _breaker_opened(db, "second")
        with running_daemon(env, tmp_path / "daemon2.log"):
            _wait_for(receiver, 2, 120)  # a resent "first" would come before "second" (oldest due first)
        assert [p["agent"] for p in receiver.received] == ["first", "second"], (
            (tmp_path / "daemon2.log").read_text()[-4000:]
        )
    finally:
        receiver.stop()
    print(f"first alert {took:.1f} s after the daemon started")
