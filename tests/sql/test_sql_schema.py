"""sql/schema/ is the one source of every function, view, trigger and policy: each is written
there exactly once, nowhere else, and a freshly migrated database holds exactly what the files
define (the models: procrastinate's schema-vs-migrations test, pgflow's schema sync check)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import psycopg

from lifecycle_dagster.store import migrate

SQL = Path(__file__).resolve().parents[2] / "sql"
_ROUTINE = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|VIEW)\s+([\w.]+)", re.IGNORECASE)
_ON_TABLE = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:CONSTRAINT\s+)?(TRIGGER|POLICY)\s+(\w+)\s.*?\bON\s+([\w.]+)",
    re.IGNORECASE | re.DOTALL,
)


def _defined(text: str) -> list[tuple[str, str]]:
    """(kind, name) of every CREATE in ``text``; triggers and policies as ``name on table``."""
    found = [(kind.upper(), name) for kind, name in _ROUTINE.findall(text)]
    found += [(kind.upper(), f"{name} on {table}") for kind, name, table in _ON_TABLE.findall(text)]
    return found


def _schema_text() -> str:
    return "\n".join(f.sql for f in migrate.discover_schema())


def test_every_object_is_written_once_under_sql_schema() -> None:
    counts = Counter(_defined(_schema_text()))
    assert [key for key, n in counts.items() if n > 1] == []
    assert len(counts) > 100


def test_migrations_define_no_function_view_trigger_or_policy() -> None:
    for mig in migrate.discover():
        # the one exception: Supabase's auth.uid(), shimmed where absent
        assert [d for d in _defined(mig.sql) if d != ("FUNCTION", "auth.uid")] == [], mig.path.name


def test_every_function_has_its_privileges_beside_it() -> None:
    for f in migrate.discover_schema():
        for kind, name in _defined(f.sql):
            if kind == "FUNCTION":
                assert re.search(rf"REVOKE ALL ON FUNCTION {re.escape(name)}\(", f.sql), f"{f.name}: {name}"


def _installed(dsn: str) -> Counter[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """
            SELECT 'FUNCTION', n.nspname || '.' || p.proname
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'lifecycle'
               OR (n.nspname = 'public' AND p.proname IN ('perform_workflow_compensation', 'retry_stage',
                                                          'trip_circuit_breaker', 'start_workflow', 'cancel_execution',
                                                          'decide', 'is_approver_of'))
            UNION ALL
            SELECT 'VIEW', n.nspname || '.' || c.relname
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'v' AND n.nspname IN ('lifecycle', 'public')
            UNION ALL
            SELECT 'TRIGGER', t.tgname || ' on ' || n.nspname || '.' || c.relname
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT t.tgisinternal AND n.nspname IN ('lifecycle', 'public')
            UNION ALL
            SELECT 'POLICY', pol.polname || ' on ' || n.nspname || '.' || c.relname
            FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('lifecycle', 'public')
            """
        ).fetchall()
    return Counter((str(k), str(n)) for k, n in rows)


def test_a_migrated_database_holds_exactly_what_sql_schema_defines(db: str) -> None:
    assert _installed(db) == Counter(_defined(_schema_text()))


def test_the_database_records_the_files_it_applied(db: str) -> None:
    with psycopg.connect(db) as conn:
        assert migrate.applied_schema(conn) == {f.name: f.checksum for f in migrate.discover_schema()}
        assert conn.execute("SELECT count(*) FROM lifecycle.schema_drift()").fetchone() == (0,)


def test_re_applying_the_schema_changes_nothing(db: str) -> None:
    with psycopg.connect(db) as conn:
        before = conn.execute("SELECT kind, object, md5 FROM lifecycle.schema_catalog() ORDER BY 1, 2").fetchall()
    report = migrate.run_upgrade(db, repair=True)
    assert report.repaired == []
    assert report.schema_applied == [f.name for f in migrate.discover_schema()]
    with psycopg.connect(db) as conn:
        after = conn.execute("SELECT kind, object, md5 FROM lifecycle.schema_catalog() ORDER BY 1, 2").fetchall()
        assert conn.execute("SELECT count(*) FROM lifecycle.schema_drift()").fetchone() == (0,)
    assert after == before


def test_a_changed_schema_file_is_applied_by_the_next_upgrade(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE lifecycle.schema_files SET checksum = 'old' WHERE name = '07_breakers.sql'")
        conn.execute("CREATE OR REPLACE FUNCTION lifecycle.breaker_defaults() RETURNS jsonb LANGUAGE sql"
                     " IMMUTABLE AS $$ SELECT '{}'::jsonb $$")
        conn.execute("SELECT lifecycle.schema_fingerprints_record()")  # as if shipped by an older release
    report = migrate.run_upgrade(db)
    assert report.applied == [] and report.schema_applied
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT lifecycle.breaker_defaults() ? 'window_s'").fetchone()
        assert row == (True,)
        assert migrate.applied_schema(conn)["07_breakers.sql"] != "old"


def test_an_unchanged_schema_is_not_re_applied(db: str) -> None:
    report = migrate.run_upgrade(db)
    assert (report.applied, report.schema_applied) == ([], [])


def test_security_definer_functions_fix_their_search_path(db: str) -> None:
    """pg_catalog and pg_temp only: with public on the path, a function created there could win
    the resolution of a built-in's name inside a function that runs as the owner."""
    with psycopg.connect(db) as conn:
        loose = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname IN ('lifecycle', 'public') AND p.prosecdef"
            " AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c = 'search_path=pg_catalog, pg_temp')"
        ).fetchall()
    assert loose == []
