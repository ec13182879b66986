"""The Dagster instance: a DAGSTER_HOME whose ``dagster.yaml`` stores runs, events and sensor
state with dagster-postgres, in the ``dagster`` schema of the orchestration database (never in
our tables), embedded or not. Runs, sensors and the daemon then share one durable store.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psycopg
import yaml
from psycopg import conninfo, sql
from sqlalchemy.engine import URL

from lifecycle_dagster.settings import DAGSTER_SCHEMA
from lifecycle_dagster.store.db import connect


def storage_url(dsn: str, schema: str = DAGSTER_SCHEMA) -> str:
    """The SQLAlchemy URL dagster-postgres uses for ``dsn``: the psycopg2 driver (dagster-postgres
    breaks on psycopg 3 under SQLAlchemy 2.1) with ``search_path`` set to ``schema``.
    """
    info = conninfo.conninfo_to_dict(dsn)
    host = str(info.pop("host", "") or "")
    query: dict[str, str] = {"options": f"-csearch_path={schema}"}
    port = info.pop("port", None)
    for key in ("sslmode", "sslrootcert", "application_name", "connect_timeout"):
        if key in info:
            query[key] = str(info.pop(key))
    socket = host.startswith("/")
    if socket:
        query["host"] = host
    url = URL.create(
        "postgresql+psycopg2",
        username=str(info.get("user") or "postgres"),
        password=str(info["password"]) if info.get("password") else None,
        host=None if socket else (host or "localhost"),
        port=int(port) if port and not socket else None,
        database=str(info.get("dbname") or "postgres"),
        query=query,
    )
    return url.render_as_string(hide_password=False)


def dagster_yaml(dsn: str) -> str:
    """The ``dagster.yaml`` text for an instance storing into ``dsn``'s ``dagster`` schema."""
    config = {
        "storage": {"postgres": {"postgres_url": storage_url(dsn)}},
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
        },
        "concurrency": {"runs": {"max_concurrent_runs": 4}},
        # runs stuck starting or cancelling are failed by the daemon; a killed run worker is caught
        # by the execution heartbeat (the default launcher cannot health-check run workers)
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "cancel_timeout_seconds": 180},
        "telemetry": {"enabled": False},
    }
    return str(yaml.safe_dump(config, sort_keys=False))


def prepare_home(home: Path, dsn: str, *, managed: bool = True) -> Path:
    """Create ``home`` with its ``dagster.yaml`` (owner-only: it holds the connection URL) and the
    ``dagster`` schema; return ``home``. Safe to call on every start.

    ``managed=False`` (DAGSTER_HOME chosen by the user): an existing ``dagster.yaml`` is left
    exactly as it is; only a missing one is written.
    """
    home.mkdir(parents=True, exist_ok=True)
    if not managed and (home / "dagster.yaml").exists():
        return home
    with connect(dsn) as conn, contextlib.suppress(psycopg.errors.UniqueViolation):
        # IF NOT EXISTS still races with a concurrent creator: the loser's error is harmless
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(DAGSTER_SCHEMA)))
    target = home / "dagster.yaml"
    text = dagster_yaml(dsn)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        tmp = home / ".dagster.yaml.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(target)
    return home


def stores_elsewhere(home: Path, dsn: str) -> bool:
    """True when ``home/dagster.yaml`` differs from what :func:`dagster_yaml` writes for ``dsn``."""
    target = home / "dagster.yaml"
    return target.exists() and target.read_text(encoding="utf-8") != dagster_yaml(dsn)
