"""The command line's answers to bad input: one clear line, exit 1, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from lifecycle_dagster.cli.main import main

from helpers import rows

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"customer": "ACME", "note": NaN}', "not valid JSON: NaN is not JSON"),
        ('{"customer": "ACME", "note": "a\\u0000b"}', "the context contains a NUL character"),
        ('{"customer": "ACME", "note": "\\ud800"}', "the context contains a lone UTF-16 surrogate"),
        ("[1, 2]", "the context must be a JSON object"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_run_refuses_a_context_postgres_cannot_store(
    seeded_db: str, dagster_home: Path, tmp_path: Path, content: str, message: str
) -> None:
    f = tmp_path / "ctx.json"
    f.write_text(content)
    result = _cli("run", "lifecycle_v1", "--context", str(f), env={"DAGSTER_HOME": str(dagster_home)})
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert rows(seeded_db, "SELECT count(*) AS n FROM workflow_executions") == [{"n": 0}]


def test_run_unknown_workflow(seeded_db: str, dagster_home: Path) -> None:
    result = _cli("run", "nope", "--context", str(REPO / "examples/acme.json"), env={"DAGSTER_HOME": str(dagster_home)})
    assert result.exit_code == 1
    assert "no active version of workflow 'nope'" in result.output


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("garbage", "database error: "),
        ("postgresql://postgres@127.0.0.1:5432/ld_no_such_database", 'database "ld_no_such_database" does not exist'),
    ],
)
def test_a_bad_database_url_is_one_line(url: str, fragment: str) -> None:
    result = _cli("db", "upgrade", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_validate_reads_json_by_json_rules(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"name": "x", "stages": [{"id": "a", "capability": "c", "timeout_s": 1e3}]}))
    result = _cli("validate", str(good))
    assert result.exit_code == 0, result.output
    assert "valid (1 stages: a)" in result.output
    nan = tmp_path / "nan.json"
    nan.write_text('{"stages": [{"id": "a", "capability": "c", "timeout_s": NaN}]}')
    result = _cli("validate", str(nan))
    assert result.exit_code == 1
    assert "not valid JSON" in result.output
    yml = tmp_path / "wf.yaml"
    yml.write_text("name: x\nstages:\n  - {id: a, capability: c, next: [b]}\n  - {id: b, capability: c}\n")
    result = _cli("validate", str(yml))
    assert result.exit_code == 0 and "a -> b" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps(
            {"stages": [{"id": "a", "capability": "c", "next": ["b"]}, {"id": "b", "capability": "c", "next": ["a"]}]}
        )
    )
    result = _cli("validate", str(broken))
    assert result.exit_code == 1 and "cycle: a -> b -> a" in result.output


def test_validate_all_reports_a_row_nested_too_deeply(seeded_db: str) -> None:
    depth = 5000
    deep = '{"stages":[{"id":"a","capability":"c","description":' + "[" * depth + "]" * depth + "}]}"
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        # a row stored before the database validated DAGs (0007) or with the check disabled
        conn.execute("ALTER TABLE workflow_definitions DISABLE TRIGGER workflow_definitions_valid_dag")
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active)"
            " VALUES ('bad_deep', 1, %s::jsonb, true)",
            (deep,),
        )
    result = _cli("validate", "--all")
    assert result.exit_code == 1
    assert "lifecycle_v1__v1: valid" in result.output
    assert "bad_deep v1: SKIPPED by the code location:" in result.output
    assert "nested too deeply" in result.output


def test_a_users_dagster_home_that_stores_elsewhere_is_warned_about(seeded_db: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    result = CliRunner().invoke(main, ["home"], env={"DAGSTER_HOME": str(home)})
    assert result.exit_code == 0
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"  # left alone
    assert "was not written by this tool for this database" in result.output


def test_validate_all_fails_loudly_on_a_bad_agents_registry(seeded_db: str) -> None:
    """One clear error naming the variable, not every definition reported as SKIPPED."""
    result = CliRunner().invoke(
        main, ["validate", "--all"], env={"LIFECYCLE_DAGSTER_AGENTS": "no_such_module_xyz:registry"}
    )
    assert result.exit_code == 1
    assert "the code location cannot load: LIFECYCLE_DAGSTER_AGENTS='no_such_module_xyz:registry'" in result.output
    assert "SKIPPED" not in result.output and "ModuleNotFoundError" in result.output


def _failed_run(home: Path) -> tuple[str, str]:
    """`run` on globex (its integrity check fails) with Dagster home ``home``: (output, execution id)."""
    result = _cli(
        "run", "lifecycle_v1", "--context", str(REPO / "examples/globex.json"), env={"DAGSTER_HOME": str(home)}
    )
    assert result.exit_code == 1, result.output
    execution_id = result.output.splitlines()[0].split()[1]
    return result.output, execution_id


def test_run_shows_each_stage_then_a_summary_and_what_happens_next(seeded_db: str, tmp_path: Path) -> None:
    output, execution_id = _failed_run(tmp_path / "home")  # a new home: no daemon has ever beaten in it
    lines = output.splitlines()
    progress = [ln for ln in lines if ln.startswith("stage ")]  # stderr, plain: not a terminal
    assert progress[-1] == next(ln for ln in progress if ln.startswith("stage integrity: failed (attempt 1, "))
    assert "stage discover: completed (attempt 1, agent Opportunity Agent, " in output
    summary = next(i for i, ln in enumerate(lines) if ln.startswith("summary: "))
    assert lines[summary].startswith("summary: failed, 4/5 stages done, ")
    assert lines[summary + 1 :] == [
        "next: no dagster-daemon is running to compensate it; by hand:",
        f"  undo its completed stages:      lifecycle-dagster compensate {execution_id}",
        f"  or run its failed stage again:  lifecycle-dagster retry {execution_id}",
    ]


def test_a_failed_run_says_a_running_daemon_compensates_it(seeded_db: str, tmp_path: Path) -> None:
    import time

    from dagster import DagsterInstance
    from dagster._daemon.types import DaemonHeartbeat

    from lifecycle_dagster.location.instance import prepare_home

    home = prepare_home(tmp_path / "home", seeded_db, managed=False)
    instance = DagsterInstance.from_config(str(home))
    try:  # the heartbeat a dagster-daemon's sensor daemon writes every few seconds
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "test", []))
    finally:
        instance.dispose()
    output, execution_id = _failed_run(home)
    assert output.splitlines()[-1] == (
        "next: the daemon's reconciler compensates it within about 10 s (undoes its completed stages); "
        f"follow it with: lifecycle-dagster status {execution_id}"
    )
