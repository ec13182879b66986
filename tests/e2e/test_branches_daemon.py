"""Issue 17 end to end, through a real dagster-daemon (docs/branches.md): a Supabase-style client
starts lifecycle_signoff (examples/lifecycle_signoff.yaml, published with the CLI); the launch
sensor runs it to its approval stage, where the run ends and the execution waits; a finance
approver decides from a client session (public.decide, row-level security); after an approval the
resume sensor's continuation run finishes it, after a rejection nothing more runs. And initech
(examples/initech.json) ends early, cleanly, with outcome not_qualified.

One daemon (sensor interval 4 s) and one database serve the whole module."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from dagster._core.scheduler.instigation import InstigatorType, TickStatus
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.location.job_factory import CONTINUES_TAG, EXECUTION_ID_TAG
from lifecycle_dagster.store import invariants
from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.sqlfiles import seed_sql

from helpers import as_role, rows, running_daemon

REPO = Path(__file__).resolve().parents[2]
ACME = json.loads((REPO / "examples/acme.json").read_text())
INITECH = json.loads((REPO / "examples/initech.json").read_text())
ALICE = "aaaaaaaa-0000-4000-8000-00000000000a"
SIGNOFF_STAGES = ["discover", "qualify", "target_design", "sign_off", "value_realization", "integrity"]
pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    dsn: str
    instance: dg.DagsterInstance
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def deployment(
    server_dsn: str, template_db: str, dagster_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """A migrated, seeded database holding lifecycle_signoff (published and activated with the
    CLI) and a dagster-daemon running the code location on it."""
    name = f"ld_branches_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    params = conninfo.conninfo_to_dict(server_dsn)
    params["dbname"] = name
    dsn = conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    log = tmp_path_factory.mktemp("branches") / "daemon.log"
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        with connect(dsn) as conn:
            conn.execute(seed_sql())
        published = CliRunner().invoke(
            main,
            ["publish", str(REPO / "examples/lifecycle_signoff.yaml"), "--activate"],
            env={"DATABASE_URL": dsn},
            catch_exceptions=False,
        )
        assert published.exit_code == 0, published.output
        assert "published lifecycle_signoff v1 and activated it" in published.output
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "DAGSTER_HOME": str(dagster_home),
            "LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S": "4",
            # the code server and run workers import this checkout, whatever the venv points at
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        with running_daemon(env, log):
            yield Deployment(dsn, instance, log)
    finally:
        instance.dispose()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def _client(dsn: str, sub: str, roles: list[str] | None = None) -> Iterator[Connection]:
    """A Supabase client session (one committed request): role authenticated, a JWT with ``sub``
    and, given ``roles``, app_metadata.roles."""
    with as_role(dsn, "authenticated", commit=True) as conn:
        claims: dict[str, Any] = {"sub": sub, "role": "authenticated"}
        if roles is not None:
            claims["app_metadata"] = {"roles": roles}
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


def _start(d: Deployment, workflow: str, context: dict[str, Any]) -> str:
    """supabase.rpc('start_workflow', ...) as Alice: a pending execution the launch sensor runs."""
    with _client(d.dsn, ALICE) as conn:
        row = conn.execute("SELECT public.start_workflow(%s, %s)::text AS id", (workflow, Jsonb(context))).fetchone()
    assert row is not None
    return str(row["id"])


def _until(d: Deployment, what: str, seconds: float, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} not within {seconds} s; daemon log:\n{d.tail()}"
        time.sleep(0.5)


def _execution(d: Deployment, eid: str) -> dict[str, Any]:
    [row] = rows(
        d.dsn,
        "SELECT status, outcome, outcome_reason, dagster_run_id, compensation_run_id"
        " FROM workflow_executions WHERE id = %(e)s",
        e=eid,
    )
    return dict(row)


def _stages(d: Deployment, eid: str) -> dict[str, str]:
    found = rows(d.dsn, "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
    return {r["stage_id"]: r["status"] for r in found}


def _count(d: Deployment, eid: str, kind: str) -> dict[str, int]:
    found = rows(
        d.dsn,
        "SELECT stage_id, count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = %(k)s"
        " GROUP BY stage_id",
        e=eid,
        k=kind,
    )
    return {r["stage_id"]: int(r["n"]) for r in found}


def _runs(d: Deployment, eid: str) -> list[dg.DagsterRun]:
    """The Dagster runs of an execution, oldest first."""
    return list(reversed(d.instance.get_runs(dg.RunsFilter(tags={EXECUTION_ID_TAG: eid}))))


def _finished_run(d: Deployment, run_id: str) -> dg.DagsterRun:
    def finished() -> dg.DagsterRun | None:
        run = d.instance.get_run_by_id(run_id)
        return run if run is not None and run.is_finished else None

    run: dg.DagsterRun = _until(d, f"run {run_id} finished", 60, finished)
    return run


def _skipped_steps(d: Deployment, run_id: str) -> set[str]:
    return {
        e.step_key or "" for e in d.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SKIPPED) if e.step_key
    }


def _ticked_since(d: Deployment, sensor: str, since: float) -> bool:
    """Whether a tick of ``sensor`` started after ``since`` (epoch seconds) and ended."""
    for state in d.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name != sensor:
            continue
        done = [TickStatus.SUCCESS, TickStatus.SKIPPED, TickStatus.FAILURE]
        if d.instance.get_ticks(state.instigator_origin_id, state.selector_id, after=since, statuses=done):
            return True
    return False


def _reach_sign_off(d: Deployment, seconds: float = 120) -> tuple[str, dg.DagsterRun]:
    """Start lifecycle_signoff on ACME from a client session; the daemon runs it to sign_off, where
    its run ends successfully and the execution waits."""
    eid = _start(d, "lifecycle_signoff", ACME)
    assert _execution(d, eid)["status"] == "pending"
    _until(d, f"execution {eid} waiting", seconds, lambda: _execution(d, eid)["status"] == "waiting")
    ex = _execution(d, eid)
    assert ex["dagster_run_id"], ex
    run = _finished_run(d, ex["dagster_run_id"])
    assert run.status == dg.DagsterRunStatus.SUCCESS, d.tail()
    assert run.job_name == "lifecycle_signoff__v1" and run.tags[EXECUTION_ID_TAG] == eid
    assert _stages(d, eid) == {
        "discover": "completed",
        "qualify": "completed",
        "target_design": "completed",
        "sign_off": "waiting",
    }
    assert _skipped_steps(d, run.run_id) == {"value_realization", "integrity"}
    [asked] = rows(
        d.dsn,
        "SELECT metadata FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'approval_requested'",
        e=eid,
    )
    assert asked["metadata"]["approvers"] == ["role:finance_approver"]
    return eid, run


def _decide_as_approver(d: Deployment, eid: str, decision: str, comment: str) -> tuple[str, str]:
    """public.decide from a finance approver's client session, who reads the waiting execution
    first (RLS); returns (the decision's status, the approver's id)."""
    approver = str(uuid.uuid4())
    with _client(d.dsn, approver, ["finance_approver"]) as conn:
        seen = conn.execute("SELECT id::text AS id, status FROM workflow_executions WHERE id = %s", (eid,)).fetchall()
        assert seen == [{"id": eid, "status": "waiting"}]
        row = conn.execute("SELECT public.decide(%s, 'sign_off', %s, %s) AS s", (eid, decision, comment)).fetchone()
    assert row is not None
    return str(row["s"]), approver


def _no_violations(d: Deployment) -> None:
    with connect(d.dsn) as conn:
        assert invariants.check(conn) == []


def test_an_approval_from_a_client_session_is_continued_by_the_daemon(deployment: Deployment) -> None:
    d = deployment
    t0 = time.monotonic()
    eid, first = _reach_sign_off(d, seconds=180)  # the first test waits for the daemon to start too
    waited = time.monotonic() - t0

    status, approver = _decide_as_approver(d, eid, "approve", "budget agreed")
    assert status == "continuing"
    t1 = time.monotonic()
    _until(d, f"execution {eid} completed", 90, lambda: _execution(d, eid)["status"] == "completed")
    continued = time.monotonic() - t1

    ex = _execution(d, eid)
    assert (ex["status"], ex["outcome"], ex["compensation_run_id"]) == ("completed", "completed", None)
    assert _stages(d, eid) == dict.fromkeys(SIGNOFF_STAGES, "completed")
    started = _count(d, eid, "stage_started")
    assert {s: started.get(s) for s in ("discover", "qualify", "target_design")} == dict.fromkeys(
        ("discover", "qualify", "target_design"), 1
    )  # the continuation run did not run them again
    assert {s: started.get(s) for s in ("value_realization", "integrity")} == {"value_realization": 1, "integrity": 1}

    runs = _runs(d, eid)
    assert [r.run_id for r in runs[:1]] == [first.run_id] and len(runs) == 2, [r.tags for r in runs]
    second = _finished_run(d, runs[1].run_id)
    assert second.tags[CONTINUES_TAG] == first.run_id
    assert second.status == dg.DagsterRunStatus.SUCCESS, d.tail()
    assert ex["dagster_run_id"] == second.run_id

    [decided] = rows(
        d.dsn,
        "SELECT metadata FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'approval_decided'",
        e=eid,
    )
    assert decided["metadata"]["decision"] == "approve" and decided["metadata"]["decided_by"] == approver
    [out] = rows(
        d.dsn,
        "SELECT output_data FROM workflow_execution_logs WHERE execution_id = %(e)s AND stage_id = 'sign_off'",
        e=eid,
    )
    assert (out["output_data"]["decision"], out["output_data"]["comment"]) == ("approve", "budget agreed")
    _no_violations(d)
    print(f"waiting {waited:.1f} s after the insert; completed {continued:.1f} s after the decision")


def test_a_rejection_from_a_client_session_ends_it_and_nothing_more_runs(deployment: Deployment) -> None:
    d = deployment
    eid, first = _reach_sign_off(d)

    status, _ = _decide_as_approver(d, eid, "reject", "too expensive")
    decided_at = time.time()
    assert status == "completed"  # in the decision's transaction
    ex = _execution(d, eid)
    assert (ex["status"], ex["outcome"], ex["outcome_reason"]) == ("completed", "rejected", "too expensive")
    assert _stages(d, eid) == {
        "discover": "completed",
        "qualify": "completed",
        "target_design": "completed",
        "sign_off": "completed",
        "value_realization": "skipped",
        "integrity": "skipped",
    }
    # a resume tick and a reconciler tick that saw the decision launched nothing
    _until(d, "a resume sensor tick", 30, lambda: _ticked_since(d, "lifecycle_resume_sensor", decided_at))
    _until(d, "a reconciler tick", 30, lambda: _ticked_since(d, "lifecycle_reconciler", decided_at))
    assert [r.run_id for r in _runs(d, eid)] == [first.run_id]
    assert _execution(d, eid) == ex
    assert "value_realization" not in _count(d, eid, "stage_started")
    _no_violations(d)


def test_initech_ends_not_qualified_through_the_daemon(deployment: Deployment) -> None:
    d = deployment
    ids = {workflow: _start(d, workflow, INITECH) for workflow in ("lifecycle_v1", "lifecycle_signoff")}

    def all_completed() -> bool:
        return all(_execution(d, eid)["status"] == "completed" for eid in ids.values())

    _until(d, "both initech executions completed", 90, all_completed)
    done_at = time.time()
    for workflow, eid in ids.items():
        ex = _execution(d, eid)
        assert (ex["outcome"], ex["compensation_run_id"]) == ("not_qualified", None), workflow
        assert ex["outcome_reason"], workflow
        stages = _stages(d, eid)
        assert {s: stages[s] for s in ("discover", "qualify")} == {"discover": "completed", "qualify": "completed"}
        later = {s: st for s, st in stages.items() if s not in ("discover", "qualify")}
        expected = ["target_design", "value_realization", "integrity"] + (["sign_off"] * (workflow != "lifecycle_v1"))
        assert later == dict.fromkeys(expected, "skipped"), workflow
        run = _finished_run(d, ex["dagster_run_id"])
        assert run.status == dg.DagsterRunStatus.SUCCESS, d.tail()
        assert _skipped_steps(d, run.run_id) == set(expected), workflow
    # a reconciler tick after the end: no compensation (nothing is due, no run launched)
    _until(d, "a reconciler tick", 30, lambda: _ticked_since(d, "lifecycle_reconciler", done_at))
    for workflow, eid in ids.items():
        assert len(_runs(d, eid)) == 1, workflow
        assert _count(d, eid, "stage_compensated") == {}, workflow
    with connect(d.dsn) as conn:
        assert conn.execute("SELECT count(*) AS n FROM lifecycle.compensation_due()").fetchone() == {"n": 0}
    _no_violations(d)
