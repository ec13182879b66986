"""Versioned schema migrations, applied in order under an advisory lock.

Files are ``sql/migrations/NNNN_snake_name.sql`` with versions 1, 2, 3… and no gaps. Each applied
version is recorded in ``lifecycle.schema_migrations`` with the SHA-256 of its file. An upgrade
runs in ONE transaction holding ``pg_advisory_xact_lock``: two concurrent upgraders serialise and
the second finds nothing to do; a failed file leaves nothing applied. An applied file whose
checksum has changed stops the upgrade before anything runs (River and procrastinate work the
same way: migrations are immutable once released).

Functions, views, triggers, policies and privileges are not in migrations: each is written once
in ``sql/schema/NN_family.sql``. After the pending migrations, in the same transaction, the
upgrader applies every schema file when any of them changed (Flyway's repeatable migrations), then
records the fingerprints of the installed objects (``lifecycle.schema_fingerprints``) that
``doctor`` compares against. See ``sql/README.md``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import psycopg

from lifecycle_dagster.store.sqlfiles import sql_dir

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# an arbitrary constant: the key of the advisory lock that serialises upgrades
ADVISORY_LOCK_KEY = 7_301_402_518_133_770_001

_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS lifecycle;
CREATE TABLE IF NOT EXISTS lifecycle.schema_files (
  name       text        PRIMARY KEY,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lifecycle.schema_migrations (
  version    integer     PRIMARY KEY,
  name       text        NOT NULL,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migration files or the database's record of them are inconsistent."""


@dataclass(frozen=True)
class SqlFile:
    """One SQL file: ``name``, ``path`` and the SHA-256 ``checksum`` of its bytes."""

    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> LiteralString:
        """The file's SQL text."""
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Migration(SqlFile):
    """One migration file ``NNNN_name.sql``: ``name`` without the number, ``version`` (1-based)."""

    version: int


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
        found.append(Migration(m.group(2), path, hashlib.sha256(data).hexdigest(), int(m.group(1))))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise MigrationError(
                f"{mig.path.name}: expected version {expected:04d} (versions start at 1, no gaps or repeats)"
            )
    return found


def applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """``{version: (name, checksum)}`` recorded in the database (empty before the first upgrade)."""
    exists = conn.execute("SELECT to_regclass('lifecycle.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM lifecycle.schema_migrations").fetchall()
    return {int(v): (str(n), str(c)) for v, n, c in rows}


@dataclass(frozen=True)
class Reject:
    """A row of an adopted table that breaks one of our rules: not copied, kept in
    ``lifecycle_adopted.<table>`` and listed in ``lifecycle.adoption_rejects``."""

    table: str
    row_id: str
    rule: str
    message: str


@dataclass
class UpgradeReport:
    """What one upgrade did (or, with ``check``, would do).

    ``applied``: migrations run; ``adopted``: ``{table: (rows copied, rows rejected)}`` when the
    database held the runbook's tables before its first migration; ``rejects``: the rejected
    rows; ``columns_not_carried``: ``(table, column)`` of the adopted tables that ours lack;
    ``repaired``: ``(kind, object, action)`` from ``lifecycle.schema_repair()``; ``drift``:
    ``(kind, object, problem)`` found before migrating; ``check``: nothing was committed.
    """

    applied: list[Migration] = field(default_factory=list)
    adopted: dict[str, tuple[int, int]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    columns_not_carried: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str, str]] = field(default_factory=list)
    drift: list[tuple[str, str, str]] = field(default_factory=list)
    schema_applied: list[str] = field(default_factory=list)
    schema_changed: list[str] = field(default_factory=list)
    check: bool = False


class SchemaDriftError(MigrationError):
    """The installed functions, views, triggers, policies or privileges differ from the shipped
    ones; migrating now would record the drifted objects as shipped. ``drift`` lists them."""

    def __init__(self, drift: list[tuple[str, str, str]]) -> None:
        self.drift = drift
        listed = "; ".join(f"{kind} {obj} ({problem})" for kind, obj, problem in drift[:5])
        more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
        super().__init__(
            f"the schema differs from the shipped one: {listed}{more}. Run `lifecycle-dagster db upgrade "
            "--repair` to restore the shipped definitions first (`lifecycle-dagster doctor` explains each)"
        )


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


def upgrade(dsn: str, folder: Path | None = None) -> list[Migration]:
    """Apply every pending migration to the database at ``dsn``; return the ones applied.

    Runs in one transaction under an advisory lock; a re-run applies nothing. See
    :func:`run_upgrade` for adoption of an existing schema, ``check`` and ``repair``.

    Raises:
        MigrationError: an applied file changed (checksum), or the database records a version
            this code does not have (it was migrated by newer code).
        SchemaDriftError: pending migrations, and the installed schema differs from the shipped one.
        psycopg.Error: a migration's SQL failed (nothing is applied then).
    """
    return run_upgrade(dsn, folder).applied


def run_upgrade(dsn: str, folder: Path | None = None, *, check: bool = False, repair: bool = False) -> UpgradeReport:
    """Upgrade the database at ``dsn`` in ONE transaction under an advisory lock.

    1. ``repair``: drop what is extra among our objects and re-apply every schema file, which puts
       back the shipped definition of every function, view, trigger, policy and privilege that
       differs. Without it, an upgrade with work to do on a drifted schema raises
       :class:`SchemaDriftError` (it would silently replace what was changed by hand).
    2. Adoption: a database with no migration recorded that already holds any of the runbook's
       seven tables has them (and same-named views, sequences and functions) moved into the schema
       ``lifecycle_adopted``; then every migration runs; then the rows are copied table by table,
       each row that breaks a rule reported in the result and in ``lifecycle.adoption_rejects``.
    3. Pending migrations, in order; then every ``sql/schema/`` file when any changed (or a
       migration ran), and the fingerprints of what they installed.
    With ``check`` all of it runs and is rolled back: the report is the plan.

    Raises:
        MigrationError: see :func:`upgrade`; SchemaDriftError; psycopg.Error (nothing committed).
    """
    from lifecycle_dagster.store.sqlfiles import query

    migrations = discover(folder)
    files = discover_schema()
    report = UpgradeReport(check=check)
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(_CREATE_TABLE)
        done = applied(conn)
        _check_applied(done, migrations)
        pending = [m for m in migrations if m.version not in done]
        installed = applied_schema(conn)
        stale = [f for f in files if installed.get(f.name) != f.checksum] or (
            files if set(installed) != {f.name for f in files} else []
        )
        report.schema_changed = [f.name for f in stale]
        drift = _drift(conn) if done else []
        report.drift = drift
        if repair:
            if not done:
                raise MigrationError(
                    "this database has no lifecycle schema yet: run `lifecycle-dagster db upgrade` first"
                )
            report.repaired = _repair(conn, drift)
            stale = files
        elif (pending or stale) and drift:
            blocking = [d for d in drift if _blocks_migrating(d)]
            if blocking:
                raise SchemaDriftError(blocking)
        adopt = [str(r[0]) for r in conn.execute(query("adopt_existing_tables")).fetchall()] if not done else []
        if adopt:
            conn.execute(query("adopt_move_aside"))
        for mig in pending:
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO lifecycle.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )
        if pending or stale:
            _apply_schema(conn, files)
        if adopt:
            for table in ADOPTED_TABLES:
                if table in adopt:
                    row = conn.execute(query("adopt_rows"), {"table": table}).fetchone()
                    assert row is not None
                    report.adopted[table] = (int(row[0]), int(row[1]))
            report.rejects = [Reject(*map(str, r)) for r in conn.execute(query("adoption_rejects")).fetchall()]
            report.columns_not_carried = [
                (str(t), str(c)) for t, c in conn.execute(query("adopt_dropped_columns")).fetchall()
            ]
        report.applied = pending
        report.schema_applied = [f.name for f in files] if (pending or stale) else []
        if check:
            conn.rollback()
        else:
            conn.commit()
    return report


class SchemaFile(SqlFile):
    """One file of ``sql/schema/``; its ``name`` is the file name, ``NN_family.sql``."""


_SCHEMA_FILE = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")


def discover_schema(folder: Path | None = None) -> list[SchemaFile]:
    """List ``sql/schema/NN_family.sql`` in the order they are applied (by name).

    Raises:
        MigrationError: a file is misnamed.
    """
    folder = folder or sql_dir() / "schema"
    found: list[SchemaFile] = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        if not _SCHEMA_FILE.match(path.name):
            raise MigrationError(f"{path.name}: schema files are named NN_family.sql")
        found.append(SchemaFile(path.name, path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return found


def applied_schema(conn: psycopg.Connection) -> dict[str, str]:
    """``{file name: checksum}`` of the schema files the database last applied."""
    rows = conn.execute("SELECT name, checksum FROM lifecycle.schema_files").fetchall()
    return {str(n): str(c) for n, c in rows}


def _apply_schema(conn: psycopg.Connection, files: list[SchemaFile]) -> None:
    """Apply every schema file in order, record their checksums and the fingerprints of what they
    installed. Bodies are checked when called, not when created (as pg_dump restores them), so a
    file may name a function of a later file."""
    conn.execute("SET LOCAL check_function_bodies = off")
    for f in files:
        try:
            conn.execute(f.sql)
        except psycopg.Error as exc:
            raise MigrationError(f"sql/schema/{f.name}: {exc}") from exc
    conn.execute("RESET check_function_bodies")
    conn.execute("DELETE FROM lifecycle.schema_files")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO lifecycle.schema_files (name, checksum) VALUES (%s, %s)", [(f.name, f.checksum) for f in files]
        )
    conn.execute("SELECT lifecycle.schema_fingerprints_record()")


def _drift(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    from lifecycle_dagster.store.sqlfiles import query

    if not _exists(conn, "SELECT to_regprocedure('lifecycle.schema_drift()') IS NOT NULL"):
        return []
    return [(str(k), str(o), str(p)) for k, o, p in conn.execute(query("schema_drift")).fetchall()]


#: kinds whose objects come from migrations (tables and their constraints, the state machine's
#: rows): re-applying sql/schema/ cannot restore them, so --repair refuses to record them as shipped
UNREPAIRABLE = ("table", "constraint", "data")


def _repair(conn: psycopg.Connection, drift: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop what is extra among our objects (a second overload of a runbook function, a policy,
    trigger or rule added to one of our tables, a function or view in schema lifecycle that no file
    defines) and take back every privilege and ownership of the objects whose privileges drifted;
    the caller then re-applies every schema file, which restores what was changed or missing.
    Returns ``(kind, object, action)`` for each difference.

    Raises:
        MigrationError: a difference that re-applying sql/schema/ cannot undo (a table, constraint
            or state-machine row, an extra table in schema lifecycle): recording it as shipped would
            hide it from doctor, so nothing is repaired.
    """
    left = [(k, o, p) for k, o, p in drift if k in UNREPAIRABLE and not (k == "table" and p == "changed")]
    if left:
        listed = "; ".join(f"{k} {o} ({p})" for k, o, p in left[:5])
        raise MigrationError(
            f"--repair cannot restore {listed}{' and more' if len(left) > 5 else ''}: tables, their "
            "constraints and the state machine's rows come from sql/migrations/ (restore them from a backup, "
            "or move an extra table out of schema lifecycle); nothing was repaired"
        )
    done: list[tuple[str, str, str]] = []
    for kind, obj, problem in drift:
        if problem == "extra" and kind in ("function", "trigger", "policy", "rule", "view"):
            _drop_extra(conn, kind, obj)
            done.append((kind, obj, "dropped"))
            continue
        if kind == "privileges" and problem == "changed":
            _revoke_from_everyone(conn, obj)
        elif kind == "schema" and problem == "changed":
            _revoke_schema_from_everyone(conn, obj.split(" ", 1)[1])
        done.append((kind, obj, "restored"))
    return done


#: how each kind of extra object is found by its catalog name and dropped
_EXTRA = {
    "function": (
        "SELECT p.oid::regprocedure::text AS target FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE format('%%s.%%s(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)) = %s",
        "DROP FUNCTION IF EXISTS {target} CASCADE",
    ),
    "view": (
        "SELECT c.oid::regclass::text AS target, c.relkind FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('v', 'm') AND format('%%s.%%s', n.nspname, c.relname) = %s",
        "DROP {kind} IF EXISTS {target} CASCADE",
    ),
    "trigger": (
        "SELECT quote_ident(t.tgname) AS name, t.tgrelid::regclass::text AS target FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE NOT t.tgisinternal AND format('%%s on %%s.%%s', t.tgname, n.nspname, c.relname) = %s",
        "DROP TRIGGER IF EXISTS {name} ON {target}",
    ),
    "policy": (
        "SELECT quote_ident(pol.polname) AS name, pol.polrelid::regclass::text AS target FROM pg_policy pol"
        " JOIN pg_class c ON c.oid = pol.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE format('%%s on %%s.%%s', pol.polname, n.nspname, c.relname) = %s",
        "DROP POLICY IF EXISTS {name} ON {target}",
    ),
    "rule": (
        "SELECT quote_ident(ru.rulename) AS name, ru.ev_class::regclass::text AS target FROM pg_rewrite ru"
        " JOIN pg_class c ON c.oid = ru.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE format('%%s on %%s.%%s', ru.rulename, n.nspname, c.relname) = %s",
        "DROP RULE IF EXISTS {name} ON {target}",
    ),
}


def _drop_extra(conn: psycopg.Connection, kind: str, obj: str) -> None:
    """Drop the extra object the catalog names ``obj``, found by that exact name in the system
    catalogs (never parsed out of it: a name may hold " on " or parentheses)."""
    from psycopg import sql

    find, drop = _EXTRA[kind]
    for row in conn.execute(find, (obj,)).fetchall():
        target, *rest = row if kind in ("function", "view") else (row[1], row[0])
        parts = {"target": sql.SQL(str(target))}
        if kind == "view":
            parts["kind"] = sql.SQL("MATERIALIZED VIEW" if rest and rest[0] == "m" else "VIEW")
        if kind in ("trigger", "policy", "rule"):
            parts["name"] = sql.SQL(str(rest[0]))
        conn.execute(sql.SQL(drop).format(**parts))


def _revoke_from_everyone(conn: psycopg.Connection, obj: str) -> None:
    """Give the object the catalog calls ``obj`` (``function schema.name(args)``, ``table
    schema.name`` or ``view schema.name``) back to the migrating role and revoke every privilege
    on it, on its columns and identity sequences, from every other role: the schema files then
    grant what is shipped, so a grant made by hand to any role, or a new owner, is gone."""
    from psycopg import sql

    kind, name = obj.split(" ", 1)
    if kind == "function":
        row = conn.execute(_EXTRA["function"][0], (name,)).fetchone()
        if row is None:
            return  # missing: the schema files create it with its grants
        target = sql.SQL(str(row[0]))
        conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO CURRENT_USER").format(target))
        grantees = "SELECT p.proacl AS acl, p.proowner AS owner FROM pg_proc p WHERE p.oid = %s::regprocedure"
        _revoke_acl(conn, grantees, str(row[0]), sql.SQL("FUNCTION {}").format(target))
        return
    row = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE format('%%s.%%s', n.nspname, c.relname) = %s",
        (name,),
    ).fetchone()
    if row is None:
        return
    target = sql.SQL(str(row[0]))
    conn.execute(sql.SQL("ALTER TABLE {} OWNER TO CURRENT_USER").format(target))
    grantees = "SELECT c.relacl AS acl, c.relowner AS owner FROM pg_class c WHERE c.oid = %s::regclass"
    _revoke_acl(conn, grantees, str(row[0]), sql.SQL("TABLE {}").format(target))
    for (column,) in conn.execute(
        "SELECT quote_ident(a.attname) FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attacl IS NOT NULL",
        (str(row[0]),),
    ).fetchall():
        for (grantee,) in conn.execute(
            "SELECT DISTINCT CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(x.grantee::regrole::text) END"
            " FROM pg_attribute a, aclexplode(a.attacl) x"
            " WHERE a.attrelid = %s::regclass AND quote_ident(a.attname) = %s",
            (str(row[0]), column),
        ).fetchall():
            conn.execute(
                sql.SQL("REVOKE ALL ({}) ON TABLE {} FROM {}").format(
                    sql.SQL(str(column)), target, sql.SQL(str(grantee))
                )
            )
    for (seq,) in conn.execute(
        "SELECT s.oid::regclass::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " WHERE d.refobjid = %s::regclass AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')",
        (str(row[0]),),
    ).fetchall():
        grantees = "SELECT c.relacl AS acl, c.relowner AS owner FROM pg_class c WHERE c.oid = %s::regclass"
        _revoke_acl(conn, grantees, str(seq), sql.SQL("SEQUENCE {}").format(sql.SQL(str(seq))))


def _revoke_schema_from_everyone(conn: psycopg.Connection, schema: str) -> None:
    from psycopg import sql

    grantees = "SELECT n.nspacl AS acl, n.nspowner AS owner FROM pg_namespace n WHERE n.nspname = %s"
    _revoke_acl(conn, grantees, schema, sql.SQL("SCHEMA {}").format(sql.Identifier(schema)))


def _revoke_acl(conn: psycopg.Connection, acl_query: str, key: str, target: Any) -> None:
    """REVOKE ALL ON ``target`` from every grantee in the ACL that ``acl_query`` (one ``%s``:
    ``key``) returns, but its owner."""
    from psycopg import sql

    rows = conn.execute(
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(a.grantee::regrole::text) END"
        " FROM (" + acl_query + ") o, aclexplode(o.acl) a WHERE a.grantee <> o.owner",
        (key,),
    ).fetchall()
    for (grantee,) in rows:
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(target, sql.SQL(str(grantee))))


def _exists(conn: psycopg.Connection, sql: LiteralString) -> bool:
    row = conn.execute(sql).fetchone()
    return bool(row and row[0])


def _blocks_migrating(drift: tuple[str, str, str]) -> bool:
    """Every difference blocks an upgrade: the catalog holds only our objects, and applying the
    schema over a drifted one would silently replace what someone changed by hand (a runbook
    section re-run, say). ``--repair`` is the explicit way to put the shipped definitions back."""
    return bool(drift)


def _check_applied(done: dict[int, tuple[str, str]], migrations: list[Migration]) -> None:
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
