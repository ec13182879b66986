"""Small helpers shared by tests: install definitions and agents, run an execution in-process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.sqlfiles import query


def install(dsn: str, name: str, dag_schema: dict[str, Any], agents: dict[str, str]) -> None:
    """An active definition ``name`` v1 and, for each capability, an agent of the given name."""
    with connect(dsn) as conn:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES (%s, 1, %s, true)",
            (name, Jsonb(dag_schema)),
        )
        for capability, agent_name in agents.items():
            row = conn.execute(
                "INSERT INTO agents (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
                " RETURNING id",
                (agent_name,),
            ).fetchone()
            assert row is not None
            conn.execute(
                "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration', %s)",
                (row["id"], Jsonb({"capability": capability})),
            )


def create_execution(dsn: str, name: str, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The active definition row of ``name`` and a new pending execution of it."""
    with connect(dsn) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": name}).fetchone()
        assert row is not None
        created = conn.execute(
            query("create_execution"),
            {"definition_id": row["id"], "context": Jsonb(context or {}), "created_by": None},
        ).fetchone()
    assert created is not None
    return dict(row), str(created["id"])


def run(dsn: str, instance: Any, name: str, registry: AgentRegistry, context: dict[str, Any] | None = None) -> Any:
    """Run a new execution of ``name`` in-process; return (Dagster result, execution id)."""
    row, eid = create_execution(dsn, name, context)
    result = build_job(row).execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )
    return result, eid


def rows(dsn: str, sql: Any, **params: Any) -> list[dict[str, Any]]:
    """All rows of a query as dicts."""
    with connect(dsn) as conn:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def events(dsn: str, eid: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(event_type, stage_id, metadata) of an execution, in order."""
    return [
        (r["event_type"], r["stage_id"], r["metadata"])
        for r in rows(
            dsn,
            "SELECT event_type, stage_id, metadata FROM workflow_events WHERE execution_id = %(e)s ORDER BY id",
            e=eid,
        )
    ]


@contextlib.contextmanager
def running_daemon(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dagster-daemon run -w workspace.yaml` from the repository root, in its own process group,
    logging to ``log_path``; on exit its whole group gets SIGTERM, then SIGKILL if still there."""
    repo = Path(__file__).resolve().parent.parent
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield daemon
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(daemon.pid, sig)
                    daemon.wait(15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


#: the tests folder (shared case tables, fixtures, helper modules)
TESTS = Path(__file__).resolve().parent
#: the runbook, in ../shared beside the repository
RUNBOOK = TESTS.parent.parent / "shared" / "seed" / "000_e3ce442ac9e1577a.txt"
_SECTION = re.compile(r"^## (\d+)\)", re.MULTILINE)
_HEREDOC = re.compile(r"<<'?SQL'?\n(.*?)\nSQL$", re.DOTALL | re.MULTILINE)


def runbook_statements(section: int) -> list[str]:
    """The SQL of the runbook's section ``section``, one string per psql heredoc; skips the test
    when the runbook is not beside the checkout (``../shared/seed``)."""
    if not RUNBOOK.exists():
        runbook_absent()
    parts = _SECTION.split(RUNBOOK.read_text(encoding="utf-8"))
    found = {int(n): _HEREDOC.findall(body) for n, body in zip(parts[1::2], parts[2::2], strict=True)}
    return [str(s) for s in found[section]]


def runbook_absent() -> None:
    """A test that needs the runbook beside the checkout: under CI (``CI`` set, as .ci/run sets
    it) its absence fails the test (a skip is not a pass); elsewhere the test is skipped."""
    message = f"runbook {RUNBOOK} is absent (it belongs beside the checkout, in ../shared/seed)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def runbook_section(section: int) -> str:
    """The SQL of the runbook's section ``section`` that has one psql heredoc (see
    :func:`runbook_statements`)."""
    [statement] = runbook_statements(section)
    return statement


@contextlib.contextmanager
def as_role(dsn: str, role: str, sub: str | None = None, *, commit: bool = False) -> Iterator[Connection]:
    """What PostgREST does for a request: one transaction as ``role`` with the JWT claims of user
    ``sub``; rolled back at the end unless ``commit``."""
    with connect(dsn, autocommit=False) as conn:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        if sub is not None:
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub, "role": role}),))
        yield conn
        if commit:
            conn.commit()
        else:
            conn.rollback()


def send_json(handler: Any, code: int, body: bytes) -> None:
    """Answer an ``http.server`` request with status ``code`` and the JSON ``body`` (bytes)."""
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
