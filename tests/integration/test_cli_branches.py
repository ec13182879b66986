"""The command line of issue 17 (docs/branches.md): `run` stops at an approval stage (exit 3) and
says what comes next, `status` shows the stage waiting, `decide` records a decision once, `resume`
runs the continuation here, and an early end shows its outcome in `status` and `list`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lifecycle_dagster.cli.main import main

from helpers import rows

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(seeded_db: str, dagster_home: Path) -> Any:
    """``cli(*args)``: the command line on ``seeded_db`` (DATABASE_URL) with lifecycle_signoff
    published and active."""
    env = {"DAGSTER_HOME": str(dagster_home)}

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    published = invoke("publish", str(REPO / "examples/lifecycle_signoff.yaml"), "--activate")
    assert published.exit_code == 0, published.output
    return invoke


def _execution_id(output: str) -> str:
    first = output.splitlines()[0]
    assert first.startswith("execution "), output
    return first.split()[1]


def _stage_line(output: str, stage: str) -> str:
    return next(ln for ln in output.splitlines() if ln.startswith(f"{stage} "))


def test_run_stops_at_the_approval_then_decide_and_resume_finish_it(cli: Any, seeded_db: str) -> None:
    ran = cli("run", "lifecycle_signoff", "--context", str(REPO / "examples/acme.json"))
    assert ran.exit_code == 3, ran.output
    eid = _execution_id(ran.output)
    assert "status: waiting" in ran.output
    assert ran.output.splitlines()[-1] == (
        f"next: it waits for a decision: lifecycle-dagster decide {eid} sign_off approve|reject; "
        f"then a running daemon continues it, or: lifecycle-dagster resume {eid}"
    )

    status = cli("status", eid)
    assert status.exit_code == 0, status.output
    assert "  status:   waiting" in status.output
    sign_off = _stage_line(status.output, "sign_off")
    assert re.search(r"\bwaiting\b.*\(approval\)\s+waits for a decision until \d{4}-\d\d-\d\dT", sign_off), sign_off
    assert re.search(r"\bcompleted\b", _stage_line(status.output, "target_design"))
    assert re.search(r"\bnot_started\b", _stage_line(status.output, "value_realization"))

    resumed_early = cli("resume", eid)
    assert resumed_early.exit_code == 1
    assert f"execution {eid} is waiting: it waits for a decision: lifecycle-dagster decide {eid}" in (
        resumed_early.output
    )

    decided = cli("decide", eid, "sign_off", "approve", "--comment", "ok", "--as", "cli:finance")
    assert decided.exit_code == 0, decided.output
    assert decided.output.strip() == (
        f"approved stage 'sign_off' of execution {eid} as cli:finance: its next stages are pending: "
        f"a running daemon starts the continuation run within about 10 s, or run it here: "
        f"lifecycle-dagster resume {eid}"
    )
    [ex] = rows(seeded_db, "SELECT status::text AS status FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex["status"] == "in_progress"  # continuing: the continuation run has yet to start

    resumed = cli("resume", eid)
    assert resumed.exit_code == 0, resumed.output
    assert f"continuing execution {eid} (lifecycle_signoff v1): value_realization" in resumed.output
    assert "status: completed" in resumed.output
    assert re.search(r"^summary: completed, 6/6 stages done, ", resumed.output, re.MULTILINE), resumed.output
    [ex] = rows(seeded_db, "SELECT status::text AS status, outcome FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex == {"status": "completed", "outcome": "completed"}
    started = rows(
        seeded_db,
        "SELECT stage_id, count(*) AS n FROM workflow_events WHERE execution_id = %(e)s"
        " AND event_type = 'stage_started' GROUP BY stage_id",
        e=eid,
    )
    assert {r["stage_id"]: r["n"] for r in started} == {
        "discover": 1,
        "qualify": 1,
        "target_design": 1,
        "value_realization": 1,
        "integrity": 1,
    }

    again = cli("decide", eid, "sign_off", "reject")
    assert again.exit_code == 1
    assert "refused (refused_not_waiting): stage 'sign_off' does not wait for a decision" in again.output
    [n] = rows(
        seeded_db,
        "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'approval_decided'",
        e=eid,
    )
    assert n == {"n": 1}

    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"^{eid}\s+lifecycle_signoff\s+1\s+completed\s", listed.output, re.MULTILINE), listed.output


def test_a_rejection_from_the_cli_ends_the_execution(cli: Any, seeded_db: str) -> None:
    ran = cli("run", "lifecycle_signoff", "--context", str(REPO / "examples/acme.json"))
    assert ran.exit_code == 3, ran.output
    eid = _execution_id(ran.output)
    decided = cli("decide", eid, "sign_off", "reject", "--comment", "too expensive")
    assert decided.exit_code == 0, decided.output
    assert decided.output.startswith(f"rejected stage 'sign_off' of execution {eid} as cli:")
    assert decided.output.rstrip().endswith(": the execution completed")
    status = cli("status", eid)
    assert "  outcome:  rejected  (too expensive)" in status.output
    assert re.search(r"\bskipped\b", _stage_line(status.output, "value_realization"))
    resumed = cli("resume", eid)
    assert resumed.exit_code == 1
    assert f"execution {eid} is completed: nothing of it is pending" in resumed.output
    listed = cli("list")
    assert re.search(rf"^{eid}\s+lifecycle_signoff\s+1\s+completed \(rejected\)\s", listed.output, re.MULTILINE)


def test_initech_completes_not_qualified(cli: Any, seeded_db: str) -> None:
    ran = cli("run", "lifecycle_v1", "--context", str(REPO / "examples/initech.json"))
    assert ran.exit_code == 0, ran.output
    eid = _execution_id(ran.output)
    assert "status: completed" in ran.output
    summary = r"^summary: completed \(not_qualified\), 2/5 stages done, 3 skipped, "
    assert re.search(summary, ran.output, re.MULTILINE), ran.output

    status = cli("status", eid)
    assert status.exit_code == 0, status.output
    assert "  status:   completed" in status.output
    assert re.search(r"^  outcome:  not_qualified  \(.+\)$", status.output, re.MULTILINE), status.output
    for stage in ("target_design", "value_realization", "integrity"):
        assert re.search(r"\bskipped\b", _stage_line(status.output, stage)), status.output

    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"^{eid}\s+lifecycle_v1\s+1\s+completed \(not_qualified\)\s", listed.output, re.MULTILINE), (
        listed.output
    )
    assert rows(seeded_db, "SELECT count(*) AS n FROM lifecycle.compensation_due()") == [{"n": 0}]
