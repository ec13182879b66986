"""Reading one row of a named query where the caller knows one must exist."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import DictRow

from lifecycle_dagster.store.sqlfiles import query


class RowMissing(LookupError):
    """A named query that must return a row returned none (the row was deleted meanwhile, or the
    schema is not the one this code expects). ``str()`` names the query and its parameters."""


def fetch_one(conn: psycopg.Connection[DictRow], name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The first row of named query ``name`` (``sql/queries.sql``) as a dict.

    Raises:
        RowMissing: the query returned no row.
        psycopg.Error: the query failed.
    """
    row = conn.execute(query(name), dict(params or {})).fetchone()
    if row is None:
        shown = ", ".join(f"{k}={v!r}" for k, v in (params or {}).items())
        raise RowMissing(f"query {name}({shown}) returned no row")
    return dict(row)
