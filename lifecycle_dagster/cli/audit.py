"""``lifecycle-dagster audit``: show an execution's audit feed, verify the event hash chains.

Exit codes: 0 success; 1 a broken chain, an unknown execution or a database error.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.common import main
from lifecycle_dagster.cli.output import print_table
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

#: the columns of ``audit show``'s table (view column, title), then the metadata
_TABLE_COLUMNS = (
    ("event_timestamp", "time (UTC)"),
    ("event_type", "event"),
    ("stage_id", "stage"),
    ("stage_status", "stage status"),
    ("attempt_number", "attempt"),
)


@main.group("audit")
def audit_group() -> None:
    """The tamper-evident audit feed (workflow_events, hash-chained per execution)."""


def _execution_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise click.ClickException(f"not an execution id (a UUID): {text!r}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        from lifecycle_dagster.core.canonical import format_timestamp

        return format_timestamp(value)
    return str(value)


def _metadata(value: Any) -> str:
    """An event's metadata as compact JSON (sorted keys), cut to 200 characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= 200 else text[:199] + "…"


@audit_group.command("show")
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"execution_id": ..., "events": [...]}.')
def show_cmd(execution_id: str, as_json: bool) -> None:
    """Print EXECUTION_ID's audit feed (the rows of workflow_audit_feed), newest event first: a table of time,
    event, stage, stage status, attempt and metadata, or with --json one JSON document
    ``{"execution_id": ..., "events": [...]}`` whose events carry every column of the view
    (timestamps ISO 8601 in UTC). An unknown execution is an error (exit 1).
    """
    eid = _execution_id(execution_id)
    with connect(_dsn()) as conn:
        found = conn.execute(query("audit_execution_exists"), {"execution_id": eid}).fetchone()
        if not found or not found["found"]:
            raise click.ClickException(f"no execution {eid}")
        rows = conn.execute(query("audit_feed"), {"execution_id": eid}).fetchall()
    if as_json:
        events = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
        click.echo(json.dumps({"execution_id": eid, "events": events}, ensure_ascii=False))
        return
    if rows:
        first = rows[0]
        click.echo(f"execution {eid}  {first['workflow_name']} v{first['version']}  status {first['workflow_status']}")
    else:
        click.echo(f"execution {eid}: no events")
        return
    print_table(
        [title for _, title in _TABLE_COLUMNS] + ["metadata"],
        [[_cell(row[key]) for key, _ in _TABLE_COLUMNS] + [_metadata(row["metadata"])] for row in rows],
    )
    click.echo(f"{len(rows)} event(s)")


@audit_group.command("verify")
@click.argument("execution_id", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON document: {"ok", "events", "streams", "unchained", "broken": [...]}.',
)
def verify_cmd(execution_id: str | None, as_json: bool) -> None:
    """Recompute the hash chain of EXECUTION_ID's events (every stream when omitted) from the rows.

    Prints "N events in M streams verified" and exits 0 when every link holds and every stream
    still ends at its head (lifecycle.audit_heads); otherwise prints, for each broken stream, its
    first broken link (stream, event id, expected and stored hash; a stream, or its newest events,
    removed outside retention is named by its head event) and exits 1. Events stored before the
    chain existed (no hash) are counted and skipped. --json prints the same as one JSON document
    (same exit codes).
    """
    from lifecycle_dagster.store.audit import verify

    eid = _execution_id(execution_id) if execution_id is not None else None
    with connect(_dsn()) as conn:
        if eid is not None:
            found = conn.execute(query("audit_execution_exists"), {"execution_id": eid}).fetchone()
            if not found or not found["found"]:
                raise click.ClickException(f"no execution {eid}")
        report = verify(conn, eid)
    if as_json:
        from dataclasses import asdict

        document = {
            "ok": report.ok,
            "events": report.events,
            "streams": report.streams,
            "unchained": report.unchained,
            "broken": [asdict(link) for link in report.broken],
        }
        click.echo(json.dumps(document, ensure_ascii=False))
        sys.exit(0 if report.ok else 1)
    for link in report.broken:
        click.echo(f"broken: {link.describe()}", err=True)
    note = f" ({report.unchained} older events without a hash skipped)" if report.unchained else ""
    if report.broken:
        click.echo(
            f"{len(report.broken)} of {report.streams} stream(s) broken; {report.events} events read{note}", err=True
        )
        sys.exit(1)
    click.echo(f"{report.events} events in {report.streams} streams verified{note}")
