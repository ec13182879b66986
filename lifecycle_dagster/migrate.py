"""Versioned schema migrations, applied in order under an advisory lock.

Files are ``sql/migrations/NNNN_snake_name.sql`` with versions 1, 2, 3… and no gaps. Each applied
version is recorded in ``lifecycle_schema_migrations`` with the SHA-256 of its file. An upgrade
runs in ONE transaction holding ``pg_advisory_xact_lock``: two concurrent upgraders serialise and
the second finds nothing to do; a failed file leaves nothing applied. An applied file whose
checksum has changed stops the upgrade before anything runs (River and procrastinate work the
same way: migrations are immutable once released).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import LiteralString

import psycopg

from lifecycle_dagster.sqlfiles import sql_dir

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# an arbitrary constant: the key of the advisory lock that serialises upgrades
ADVISORY_LOCK_KEY = 7_301_402_518_133_770_001

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS lifecycle_schema_migrations (
  version    integer     PRIMARY KEY,
  name       text        NOT NULL,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migration files or the database's record of them are inconsistent."""


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` (1-based), ``name``, file ``path`` and SHA-256 ``checksum``."""

    version: int
    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> LiteralString:
        """The file's SQL text."""
        return self.path.read_text(encoding="utf-8")


def discover(folder: Path | None = None) -> list[Migration]:
    """List the migration files of ``folder`` (default ``sql/migrations``) in version order.

    Raises:
        MigrationError: a file is misnamed, a version repeats, or versions have a gap.
    """
    folder = folder or sql_dir() / "migrations"
    found: list[Migration] = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_name.sql")
        data = path.read_bytes()
        found.append(Migration(int(m.group(1)), m.group(2), path, hashlib.sha256(data).hexdigest()))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise MigrationError(
                f"{mig.path.name}: expected version {expected:04d} (versions start at 1, no gaps or repeats)"
            )
    return found


def applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """``{version: (name, checksum)}`` recorded in the database (empty before the first upgrade)."""
    exists = conn.execute("SELECT to_regclass('lifecycle_schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM lifecycle_schema_migrations").fetchall()
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def upgrade(dsn: str, folder: Path | None = None) -> list[Migration]:
    """Apply every pending migration to the database at ``dsn``; return the ones applied.

    Runs in one transaction under an advisory lock; a re-run applies nothing.

    Raises:
        MigrationError: an applied file changed (checksum), or the database records a version
            this code does not have (it was migrated by newer code).
        psycopg.Error: a migration's SQL failed (nothing is applied then).
    """
    migrations = discover(folder)
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(_CREATE_TABLE)
        done = applied(conn)
        by_version = {m.version: m for m in migrations}
        for version, (name, checksum) in sorted(done.items()):
            mig = by_version.get(version)
            if mig is None:
                raise MigrationError(
                    f"the database has migration {version:04d}_{name} which this code does not know: "
                    "it was upgraded by a newer lifecycle-dagster"
                )
            if mig.name != name:
                raise MigrationError(
                    f"migration {version:04d} was applied as {version:04d}_{name}.sql, but the file now is "
                    f"{mig.path.name}: applied migrations are never renamed or replaced; add a new one"
                )
            if mig.checksum != checksum:
                raise MigrationError(
                    f"{mig.path.name} was changed after it was applied (checksum {checksum[:12]}… "
                    f"recorded, {mig.checksum[:12]}… on disk): add a new migration instead"
                )
        pending = [m for m in migrations if m.version not in done]
        for mig in pending:
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO lifecycle_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )
        conn.commit()
    return pending
