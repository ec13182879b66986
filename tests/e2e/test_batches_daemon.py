"""Issue 18 end to end, through a real dagster-daemon (docs/batches.md): with
LIFECYCLE_DAGSTER_BATCH set, rows inserted as pending (ACME, globex that fails its integrity check,
initech that ends early) are grouped by the launch sensor into batch runs of at most 12; every
execution is bound to its batch's run; globex leaves its batch and is rolled back by the
reconciler's compensation run; the others complete; `lifecycle-dagster status` names the batch."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.location.job_factory import BATCH_SIZE_TAG, BATCH_TAG
from lifecycle_dagster.store import invariants
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import seed_sql

from helpers import rows, running_daemon

REPO = Path(__file__).resolve().parents[2]
CONTEXTS = {name: json.loads((REPO / f"examples/{name}.json").read_text()) for name in ("acme", "globex", "initech")}
pytestmark = pytest.mark.slow


def test_inserted_rows_run_in_batch_runs_through_the_daemon(
    server_dsn: str, template_db: str, dagster_home: Path, tmp_path: Path
) -> None:
    name = f"ld_batches_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    params = conninfo.conninfo_to_dict(server_dsn)
    params["dbname"] = name
    dsn = conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    log = tmp_path / "daemon.log"
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    plan = ["acme"] * 24 + ["globex"] * 2 + ["initech"] * 2
    try:
        with connect(dsn) as conn:
            conn.execute(seed_sql())
            definition = conn.execute(
                "SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1' AND is_active"
            ).fetchone()
            assert definition is not None
            ids: dict[str, str] = {}
            for i, kind in enumerate(plan):  # what a client does: insert the row, pending
                row = conn.execute(
                    "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
                    " VALUES (%s, 'pending', %s) RETURNING id::text",
                    (definition["id"], Jsonb({**CONTEXTS[kind], "n": i})),
                ).fetchone()
                assert row is not None
                ids[row["id"]] = kind
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "DAGSTER_HOME": str(dagster_home),
            "LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S": "4",
            "LIFECYCLE_DAGSTER_BATCH": "12/1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        with running_daemon(env, log):
            deadline = time.monotonic() + 240
            while True:
                done = rows(
                    dsn,
                    "SELECT id::text AS id, status, outcome, dagster_run_id, batch_id::text AS batch_id"
                    " FROM workflow_executions",
                )
                if all(r["status"] in ("completed", "rolled_back") for r in done):
                    break
                assert time.monotonic() < deadline, (
                    f"not all at rest: {Counter(r['status'] for r in done)}\n{log.read_text()[-4000:]}"
                )
                time.sleep(1)

        by_kind = {kind: Counter() for kind in CONTEXTS}  # type: dict[str, Counter[Any]]
        for r in done:
            by_kind[ids[r["id"]]][(r["status"], r["outcome"])] += 1
        assert by_kind["acme"] == {("completed", "completed"): 24}
        assert by_kind["initech"] == {("completed", "not_qualified"): 2}
        assert by_kind["globex"] == {("rolled_back", None): 2}

        batches = rows(dsn, "SELECT id::text AS id, size, run_id FROM lifecycle.batches ORDER BY created_at")
        assert sum(b["size"] for b in batches) == len(plan)
        assert all(b["size"] <= 12 for b in batches) and len(batches) >= 3
        runs = {b["run_id"] for b in batches}
        assert {r["dagster_run_id"] for r in done} == runs  # every execution bound to its batch's run
        for b in batches:
            run = instance.get_run_by_id(b["run_id"])
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS  # globex never failed a run
            assert run.tags[BATCH_TAG] == b["id"] and run.tags[BATCH_SIZE_TAG] == str(b["size"])
        left = rows(
            dsn, "SELECT left_reason, count(*) AS n FROM lifecycle.batch_members WHERE left_at IS NOT NULL GROUP BY 1"
        )
        assert {r["left_reason"]: r["n"] for r in left} == {"failed": 2}
        with connect(dsn) as conn:
            assert invariants.check(conn) == []

        globex = next(i for i, k in ids.items() if k == "globex")
        shown = CliRunner().invoke(main, ["status", globex], env={"DATABASE_URL": dsn}, catch_exceptions=False)
        assert shown.exit_code == 0, shown.output
        [mine] = [b for b in batches if b["run_id"] == next(r["dagster_run_id"] for r in done if r["id"] == globex)]
        assert f"batch:    {mine['id']} ({mine['size']} executions; left it: failed" in shown.output
    finally:
        instance.dispose()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
