"""The embedded server's helpers that need no server: whether one runs, stopping none, and
dropping dead holders from the wheel's list of the processes holding a server. (Starting one is
exercised by the whole suite when DATABASE_URL is unset.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lifecycle_dagster.store.embedded import _prune_stale_handles, server_running, stop_server


def test_no_server_runs_on_an_empty_or_stale_data_directory(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    assert not server_running(pgdata)  # no directory
    pgdata.mkdir()
    assert not server_running(pgdata)  # no PG_VERSION
    (pgdata / "PG_VERSION").write_text("18\n")
    assert not server_running(pgdata)  # no postmaster.pid
    assert stop_server(pgdata) is False  # nothing to stop, nothing started


def test_dead_holders_are_dropped_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = tmp_path / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid, os.getpid()]))
    _prune_stale_handles(tmp_path)
    assert json.loads(handles.read_text()) == [os.getpid()]
    _prune_stale_handles(tmp_path / "absent")  # no list: nothing to do, no error
    handles.write_text("[1, 2")  # torn: left to the wheel
    _prune_stale_handles(tmp_path)
    assert handles.read_text() == "[1, 2"
