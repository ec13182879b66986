"""The heartbeat says when it cannot beat: logged with the run and the execution, rate-limited."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from lifecycle_dagster.engine import heartbeat
from lifecycle_dagster.engine.heartbeat import Heartbeat


def _closed_port_dsn() -> str:
    """A DSN whose server refuses connections (a database that is down): a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=1"


def test_failed_beats_are_logged_with_run_and_execution_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heartbeat, "LOG_EVERY_S", 0.5)
    caplog.set_level(logging.WARNING, logger="lifecycle_dagster.engine.heartbeat")
    beat = Heartbeat(_closed_port_dsn(), "run-abc", interval_s=0.02, execution_id="exec-123")
    with beat:
        time.sleep(1.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "lifecycle_dagster.engine.heartbeat"]
    assert beat.beats == 0 and beat.failures >= 10
    # the first failure at once, then one line per 0.5 s at most: 2 or 3 lines for ~1.2 s, not one per beat
    assert 2 <= len(lines) <= 3, lines
    assert all("run run-abc (execution exec-123)" in line and "OperationalError" in line for line in lines)
    assert "(1 failed beat(s) in a row)" in lines[0]
    assert int(lines[-1].split("(")[2].split()[0]) >= 5  # the count of failed beats so far


def test_the_execution_named_once_known(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lifecycle_dagster.engine.heartbeat")
    beat = Heartbeat(_closed_port_dsn(), "run-new", interval_s=0.02)
    with beat:
        time.sleep(0.2)
    [line] = [r.getMessage() for r in caplog.records if r.name == "lifecycle_dagster.engine.heartbeat"]
    assert "run run-new (execution not known yet)" in line
