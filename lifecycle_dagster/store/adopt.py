"""Adoption of an existing schema: a database that already holds the runbook's tables (made by hand
from the runbook, before lifecycle-dagster) when it is first upgraded.

:func:`lifecycle_dagster.store.migrate.run_upgrade` calls these in its one transaction: before the
first migration, :func:`move_aside` moves the user's tables (and same-named views, sequences and
functions) into the schema ``lifecycle_adopted``; after the migrations and the schema files,
:func:`copy_rows` copies the rows table by table through ``lifecycle.adopt_rows``, each row that
breaks one of our rules kept aside and listed in ``lifecycle.adoption_rejects``.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from lifecycle_dagster.store.sqlfiles import query

# the runbook's tables in foreign-key order (parents first): the order adoption copies them in
ADOPTED_TABLES = (
    "workflow_definitions",
    "agents",
    "agent_ontologies",
    "workflow_executions",
    "workflow_execution_logs",
    "workflow_events",
    "task_queue",
)


@dataclass(frozen=True)
class Reject:
    """A row of an adopted table that breaks one of our rules: not copied, kept in
    ``lifecycle_adopted.<table>`` and listed in ``lifecycle.adoption_rejects``."""

    table: str
    row_id: str
    rule: str
    message: str


def tables_to_adopt(conn: psycopg.Connection) -> list[str]:
    """The runbook's tables that exist in ``public`` (call it only when no migration is recorded)."""
    return [str(r[0]) for r in conn.execute(query("adopt_existing_tables")).fetchall()]


def move_aside(conn: psycopg.Connection) -> None:
    """Move the user's tables, views, sequences and functions whose names ours use into
    ``lifecycle_adopted``, as they are (before the first migration creates ours)."""
    conn.execute(query("adopt_move_aside"))


def copy_rows(
    conn: psycopg.Connection, tables: list[str]
) -> tuple[dict[str, tuple[int, int]], list[Reject], list[tuple[str, str]]]:
    """Copy the rows of the adopted ``tables`` into ours, in :data:`ADOPTED_TABLES` order; return
    ``{table: (rows copied, rows rejected)}``, the rejected rows, and ``(table, column)`` of the
    adopted columns ours lack (their values stay in ``lifecycle_adopted`` only).

    Raises:
        RuntimeError: ``lifecycle.adopt_rows`` returned no row (it always returns one).
        psycopg.Error: the database refused a copy.
    """
    adopted: dict[str, tuple[int, int]] = {}
    for table in ADOPTED_TABLES:
        if table in tables:
            row = conn.execute(query("adopt_rows"), {"table": table}).fetchone()
            if row is None:
                raise RuntimeError(f"lifecycle.adopt_rows({table!r}) returned no row")
            adopted[table] = (int(row[0]), int(row[1]))
    rejects = [Reject(*map(str, r)) for r in conn.execute(query("adoption_rejects")).fetchall()]
    dropped = [(str(t), str(c)) for t, c in conn.execute(query("adopt_dropped_columns")).fetchall()]
    return adopted, rejects, dropped
