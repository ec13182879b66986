"""What an execution that a command ran here came to, and what happens to it next: the summary
line and the next steps `run` and `resume` print."""

from __future__ import annotations

import time

import click

from lifecycle_dagster.cli.output import summary_line
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.sqlfiles import query

__all__ = ["daemon_running", "next_steps", "print_summary"]


def print_summary(dsn: str, execution_id: str, elapsed_s: float) -> None:
    """Print the summary line (status, stages done, seconds) and, unless the execution completed,
    what happens next (:func:`next_steps`)."""
    with connect(dsn) as conn:
        p = fetch_one(conn, "execution_progress", {"execution_id": execution_id})
        due = conn.execute(query("compensation_due_for"), {"execution_id": execution_id}).fetchone() is not None
    click.echo(summary_line(p, elapsed_s))
    status = str(p["status"])
    daemon = status == "failed" and due and daemon_running()  # asked only when it matters
    for line in next_steps(execution_id, status, compensation_due=due, daemon=daemon, stage=p["current_stage"]):
        click.echo(line)


def next_steps(
    execution_id: str, status: str, *, compensation_due: bool, daemon: bool, stage: str | None = None
) -> list[str]:
    """The lines saying what happens next to an execution that ended ``status`` in this command:
    the reconciler of a running daemon compensates it, or the commands that do
    (``compensate ID``, ``retry ID`` while its compensation has not started)."""
    if status in ("compensating", "rolled_back", "compensation_failed"):
        done = {"rolled_back": "its completed stages were undone", "compensation_failed": "an undo failed"}
        return [
            f"next: compensation {'is under way' if status == 'compensating' else 'ended'}"
            f"{': ' + done[status] if status in done else ''} (lifecycle-dagster status {execution_id})"
        ]
    if status == "waiting":
        return [
            f"next: it waits for a decision: lifecycle-dagster decide {execution_id} {stage or 'STAGE'} "
            f"approve|reject; then a running daemon continues it, or: lifecycle-dagster resume {execution_id}"
        ]
    if status != "failed":
        return []
    if compensation_due and daemon:
        return [
            "next: the daemon's reconciler compensates it within about 10 s (undoes its completed stages); "
            f"follow it with: lifecycle-dagster status {execution_id}"
        ]
    why = "no dagster-daemon is running to compensate it" if compensation_due else "it is held (on_failure: hold)"
    lines = [f"next: {why}; by hand:"]
    lines.append(f"  undo its completed stages:      lifecycle-dagster compensate {execution_id}")
    lines.append(f"  or run its failed stage again:  lifecycle-dagster retry {execution_id}")
    return lines


def daemon_running(within_s: float = 60.0) -> bool:
    """Whether a dagster-daemon on this Dagster home ran its sensor daemon in the last
    ``within_s`` seconds (its heartbeat); False when there is no Dagster home here."""
    settings = Settings.from_env()
    if not (settings.dagster_home / "dagster.yaml").exists():
        return False
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(settings.dagster_home))
    try:
        beat = instance.get_daemon_heartbeats().get("SENSOR")
        return beat is not None and time.time() - beat.timestamp < within_s
    except Exception:  # an instance that cannot say: assume none
        return False
    finally:
        instance.dispose()
