"""Where the project's SQL lives, and how Python reads it.

All SQL is in ``.sql`` files (the repository's ``sql/`` folder, shipped in the wheel as
``lifecycle_dagster/_sql``): ``migrations/NNNN_name.sql`` (tables) are applied in order by
:mod:`lifecycle_dagster.store.migrate`, then ``schema/NN_family.sql`` (every function, view, trigger,
policy and privilege, written once; see ``sql/README.md``), ``seed.sql`` installs the runbook's lifecycle, and
``queries.sql`` holds every query the Python side runs, each introduced by ``-- name: <name>``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import LiteralString, cast

_NAME_LINE = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """Return the folder holding ``migrations/``, ``seed.sql`` and ``queries.sql``.

    Raises:
        FileNotFoundError: neither the installed copy nor the source tree's ``sql/`` exists.
    """
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_sql", package.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError(f"no sql/ folder found next to {package}")


def parse_queries(text: str) -> dict[str, LiteralString]:
    """Split a ``queries.sql`` text into ``{name: sql}``.

    Raises:
        ValueError: a name appears twice, or text stands before the first ``-- name:`` line.
    """
    parts = _NAME_LINE.split(text)
    head, rest = parts[0], parts[1:]
    if any(line.strip() and not line.strip().startswith("--") for line in head.splitlines()):
        raise ValueError("queries.sql: SQL found before the first '-- name:' line")
    queries: dict[str, LiteralString] = {}
    for name, body in zip(rest[0::2], rest[1::2], strict=True):
        if name in queries:
            raise ValueError(f"queries.sql: query {name!r} is defined twice")
        queries[name] = cast(LiteralString, body.strip())
    return queries


@functools.cache
def queries() -> dict[str, LiteralString]:
    """The named queries of ``queries.sql``, read once per process."""
    return parse_queries((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


def query(name: str) -> LiteralString:
    """One named query.

    Raises:
        KeyError: no query of that name exists in ``queries.sql``.
    """
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None


def seed_sql() -> LiteralString:
    """The text of ``seed.sql``."""
    return (sql_dir() / "seed.sql").read_text(encoding="utf-8")
