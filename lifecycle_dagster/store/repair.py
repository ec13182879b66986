"""Schema drift and its repair: the installed functions, views, triggers, policies and privileges
compared with the shipped ones, and what ``lifecycle-dagster db upgrade --repair`` does about it.

:func:`read_drift` lists the differences (``lifecycle.schema_drift()``, the same as ``doctor``
shows); :func:`repair` drops what is extra and takes back drifted privileges and ownership, so that
re-applying every ``sql/schema/`` file (:func:`lifecycle_dagster.store.migrate.run_upgrade` does it
in the same transaction) restores the shipped definitions. Tables, constraints and the state
machine's rows come from migrations: :func:`unrepairable` lists those, which nothing here undoes.
"""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg

from lifecycle_dagster.store.sqlfiles import query


def read_drift(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """``(kind, object, problem)`` of each difference ``lifecycle.schema_drift()`` finds between the
    installed objects and the fingerprints recorded when the schema files were applied (``[]``
    when that function is not installed yet)."""
    if not _exists(conn, "SELECT to_regprocedure('lifecycle.schema_drift()') IS NOT NULL"):
        return []
    return [(str(k), str(o), str(p)) for k, o, p in conn.execute(query("schema_drift")).fetchall()]


#: kinds whose objects come from migrations (tables and their constraints, the state machine's
#: rows): re-applying sql/schema/ cannot restore them, so --repair refuses to record them as shipped
UNREPAIRABLE = ("table", "constraint", "data")


def unrepairable(drift: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The differences of ``drift`` that re-applying sql/schema/ cannot undo (a table, constraint
    or state-machine row, an extra table in schema lifecycle): recording them as shipped would hide
    them from doctor, so :func:`lifecycle_dagster.store.migrate.run_upgrade` repairs nothing then."""
    return [(k, o, p) for k, o, p in drift if k in UNREPAIRABLE and not (k == "table" and p == "changed")]


def repair(conn: psycopg.Connection, drift: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop what is extra among our objects (a second overload of a runbook function, a policy,
    trigger or rule added to one of our tables, a function or view in schema lifecycle that no file
    defines) and take back every privilege and ownership of the objects whose privileges drifted;
    the caller then re-applies every schema file, which restores what was changed or missing.
    Returns ``(kind, object, action)`` for each difference. The caller has checked that
    :func:`unrepairable` is empty.
    """
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
