"""Tables on a terminal (rich): identifiers are never broken, however narrow the terminal."""

from __future__ import annotations

import uuid

import pytest

from lifecycle_dagster.cli import output


def test_ids_stay_whole_in_a_table_wider_than_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    ids = [str(uuid.uuid4()) for _ in range(2)]
    rows = [[ids[0], "lifecycle_v1", "completed", "a note that is long enough to wrap at words", ids[1]]]
    output._rich_table(["ID", "WORKFLOW", "STATUS", "NOTE", "RUN"], rows, right=())
    out = capsys.readouterr().out
    assert ids[0] in out and ids[1] in out  # each on one line, whole: copyable
    assert "completed" in out


def test_a_table_that_fits_is_as_wide_as_its_cells(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    output._rich_table(["ID", "STATUS"], [["abc", "completed"]], right=())
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].split() == ["ID", "STATUS"] and lines[-1].split() == ["abc", "completed"]


def test_dev_leaves_out_only_the_daemons_lines_of_idle_sensor_ticks() -> None:
    from lifecycle_dagster.cli.output import is_idle_tick_line

    daemon = "\x1b[32m2026-12-07 05:44:20 +0000\x1b[0m - dagster.daemon.SensorDaemon - \x1b[34mINFO\x1b[0m - "
    assert is_idle_tick_line(daemon + "Checking for new runs for sensor: lifecycle_launch_sensor\n")
    assert is_idle_tick_line(daemon + "Sensor lifecycle_reconciler skipped: Sensor function returned an empty result\n")
    assert not is_idle_tick_line(daemon + "Launching run for lifecycle_launch_sensor\n")
    assert not is_idle_tick_line(daemon + "Completed launch of run 1b2c for lifecycle_launch_sensor\n")
    error = daemon.replace("INFO", "ERROR")
    assert not is_idle_tick_line(error + "Error occurred during the execution of evaluation_fn for sensor x\n")
    assert not is_idle_tick_line("dagster-webserver - INFO - Serving dagster-webserver on http://127.0.0.1:3000\n")
