"""build_job is a pure, deterministic function of one definition row (tested on JSON fixtures),
and the code location loads every job from a snapshot of the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.definitions_load_context import DefinitionsLoadType
from dagster._utils.test.definitions import (
    scoped_definitions_load_context,
    scoped_reconstruction_metadata,
)
from psycopg.types.json import Jsonb

from lifecycle_dagster.core.dag import DagValidationError
from lifecycle_dagster.location.definitions import SNAPSHOT_KEY, definitions_from_snapshot, defs, fetch_snapshot
from lifecycle_dagster.location.job_factory import build_job, build_jobs
from lifecycle_dagster.location.retention import RETENTION_JOB
from lifecycle_dagster.store.db import connect

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def _upstreams(job: dg.JobDefinition) -> dict[str, list[str]]:
    deps = job.graph.dependency_structure
    return {
        node.name: sorted(o.node_name for o in deps.all_upstream_outputs_from_node(node.name))
        for node in job.graph.nodes
    }


def test_lifecycle_job_shape() -> None:
    job = build_job(_fixture("lifecycle_v1"))
    assert job.name == "lifecycle_v1__v1"
    # each node (step key) is its stage id; its op definition keeps a location-wide unique name
    assert _upstreams(job) == {
        "discover": [],
        "qualify": ["discover"],
        "target_design": ["qualify"],
        "value_realization": ["target_design"],
        "integrity": ["value_realization"],
    }
    assert job.tags["lifecycle/definition_id"] == "00000000-0000-0000-0000-0000000000a1"
    assert job.tags["lifecycle/version"] == "1"
    op = job.graph.node_named("qualify").definition
    assert op.name == "lifecycle_v1__v1__qualify"
    assert op.tags["lifecycle/capability"] == "assessment"


def test_diamond_fans_out_and_in() -> None:
    job = build_job(_fixture("diamond"))
    assert _upstreams(job) == {
        "a": [],
        "b": ["a"],
        "c": ["a"],
        "d": ["b", "c"],
    }


def test_build_is_deterministic() -> None:
    a = build_job(_fixture("diamond"))
    b = build_job(json.loads(json.dumps(_fixture("diamond"))))
    assert a.get_job_snapshot_id() == b.get_job_snapshot_id()


def test_invalid_definition_raises_every_problem() -> None:
    row = {**_fixture("diamond"), "dag_schema": {"stages": [{"id": "a", "capability": "x", "next": ["a", "zz"]}]}}
    with pytest.raises(DagValidationError) as err:
        build_job(row)
    text = str(err.value)
    assert "self" in text and "'zz'" in text


def test_invalid_definition_is_skipped_not_fatal() -> None:
    bad = {**_fixture("diamond"), "name": "broken", "dag_schema": {"stages": []}}
    jobs, skipped = build_jobs([_fixture("lifecycle_v1"), bad, _fixture("diamond")])
    assert [j.name for j in jobs] == [
        "lifecycle_v1__v1",
        "lifecycle_v1__v1__compensate",
        "diamond__v1",
        "diamond__v1__compensate",
    ]
    assert [(s.name, s.version) for s in skipped] == [("broken", 1)]
    assert "no stages" in skipped[0].error or "empty" in skipped[0].error


def _loads(rows: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(the jobs the code location holds, the warnings it logged) for a snapshot of ``rows``."""
    with caplog.at_level("WARNING", logger="lifecycle_dagster.location.definitions"):
        repo = definitions_from_snapshot(json.dumps(rows)).get_repository_def()
        # Dagster checks names when jobs resolve; the retention job is always there
        names = sorted(j.name for j in repo.get_all_jobs() if j.name != RETENTION_JOB)
    return names, [r.getMessage() for r in caplog.records]


def test_a_stage_named_like_the_compensation_job_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    # a row stored before the validators reserved the id: its op would be wf__v1__compensate, the
    # name of its compensation job, and Dagster refused the whole code location
    bad = {**_fixture("diamond"), "id": "00000000-0000-0000-0000-0000000000e1", "name": "wf"}
    bad["dag_schema"] = {"stages": [{"id": "charge", "capability": "x", "next": ["compensate"]}]}
    bad["dag_schema"]["stages"].append({"id": "compensate", "capability": "refunds"})
    names, warnings = _loads([_fixture("diamond"), bad], caplog)
    assert names == ["diamond__v1", "diamond__v1__compensate"]
    [warning] = warnings
    assert warning.startswith("workflow wf v1 skipped: invalid workflow DAG (1 problem(s)):")
    assert "stage 'compensate': id 'compensate' is reserved" in warning


@pytest.mark.parametrize(
    ("change", "why"),
    [
        # the same name and version twice in a snapshot: Dagster's "Duplicate job definition"
        (
            {"id": "00000000-0000-0000-0000-0000000000e2"},
            "the Dagster name 'diamond__v1' is already used by workflow diamond v1",
        ),
        # a value Dagster's own checks refuse (a ParameterCheckError, not a definition error)
        (
            {"id": "00000000-0000-0000-0000-0000000000e3", "version": 2, "description": 5},
            "cannot build its jobs: ParameterCheckError",
        ),
    ],
)
def test_a_row_that_cannot_join_the_location_is_skipped_with_why(
    caplog: pytest.LogCaptureFixture, change: dict[str, Any], why: str
) -> None:
    bad = {**_fixture("diamond"), **change}
    names, warnings = _loads([_fixture("diamond"), bad, _fixture("lifecycle_v1")], caplog)
    assert names == ["diamond__v1", "diamond__v1__compensate", "lifecycle_v1__v1", "lifecycle_v1__v1__compensate"]
    [warning] = warnings
    assert warning.startswith(f"workflow diamond v{bad['version']} skipped: {why}")


def test_two_versions_coexist_in_one_code_location() -> None:
    v1 = _fixture("lifecycle_v1")
    v2 = {**v1, "id": "00000000-0000-0000-0000-0000000000a2", "version": 2, "is_active": True}
    snapshot = json.dumps([v1, v2])
    d = definitions_from_snapshot(snapshot)
    repo = d.get_repository_def()
    # the stable job runs the active version, on that version's own graph and op definitions
    stable = repo.get_job("lifecycle_v1")
    assert stable.tags["lifecycle/definition_id"] == v2["id"]
    assert stable.graph is repo.get_job("lifecycle_v1__v2").graph
    # the failure sensor mirrors failed runs of the stable job too (no public accessor in 1.13)
    monitored = repo.get_sensor_def("lifecycle_run_failure_sensor")._monitored_jobs  # type: ignore[attr-defined]
    assert "lifecycle_v1" in {j.name for j in monitored}
    assert sorted(j.name for j in repo.get_all_jobs()) == [
        RETENTION_JOB,  # the retention job (location/retention.py), whatever the snapshot
        "lifecycle_v1",
        "lifecycle_v1__v1",
        "lifecycle_v1__v1__compensate",
        "lifecycle_v1__v2",
        "lifecycle_v1__v2__compensate",
    ]


def test_code_location_loads_every_active_job_and_skips_invalid(seeded_db: str) -> None:
    with connect(seeded_db) as conn:
        # 'broken' stands for a row stored before the database validated DAGs (0007)
        conn.execute("ALTER TABLE workflow_definitions DISABLE TRIGGER workflow_definitions_valid_dag")
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('diamond', 1, %s, true),"
            " ('broken', 1, %s, true), ('inactive', 1, %s, false)",
            (
                Jsonb(_fixture("diamond")["dag_schema"]),
                Jsonb({"stages": [{"id": "a", "capability": "x", "next": ["a"]}]}),
                Jsonb(_fixture("diamond")["dag_schema"]),
            ),
        )
    with scoped_definitions_load_context(DefinitionsLoadType.INITIALIZATION):
        repo = defs().get_repository_def()
    names = sorted(j.name for j in repo.get_all_jobs())
    assert names == [
        "diamond",  # the stable job of each active workflow
        "diamond__v1",
        "diamond__v1__compensate",
        RETENTION_JOB,
        "lifecycle_v1",
        "lifecycle_v1__v1",
        "lifecycle_v1__v1__compensate",
    ]
    names.remove(RETENTION_JOB)
    for name in names:  # each job resolves with its ops (project_fully_featured's test_defs)
        job = repo.get_job(name)
        assert len(job.graph.nodes) == (4 if name.startswith("diamond") else 5)
    # and every sensor loads
    assert sorted(s.name for s in repo.sensor_defs) == [
        "lifecycle_launch_sensor",
        "lifecycle_reconciler",
        "lifecycle_resume_sensor",
        "lifecycle_run_failure_sensor",
    ]


def test_reconstruction_uses_the_snapshot_not_the_table(seeded_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = [RETENTION_JOB, "lifecycle_v1", "lifecycle_v1__v1", "lifecycle_v1__v1__compensate"]
    with scoped_definitions_load_context(DefinitionsLoadType.INITIALIZATION) as ctx:  # a code server loads
        assert [j.name for j in defs().get_repository_def().get_all_jobs()] == v1
        stored = dict(ctx.get_pending_reconstruction_metadata())  # what Dagster stores with each run
    assert stored == {SNAPSHOT_KEY: fetch_snapshot(seeded_db)}
    with connect(seeded_db) as conn:  # the table changes: v1 is gone
        conn.execute("UPDATE workflow_definitions SET is_active = false")
    # a run worker rebuilds from the run's snapshot without reading the table: no database at all
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing_listens_here")
    with scoped_reconstruction_metadata(stored):
        repo = defs().get_repository_def()
    assert [j.name for j in repo.get_all_jobs()] == v1
    monkeypatch.setenv("DATABASE_URL", seeded_db)
    with scoped_definitions_load_context(DefinitionsLoadType.INITIALIZATION):  # a reload reads the table again
        assert [j.name for j in defs().get_repository_def().get_all_jobs()] == [RETENTION_JOB]
    # and so does a load outside any Dagster process
    assert [j.name for j in defs().get_repository_def().get_all_jobs()] == [RETENTION_JOB]


def test_compensation_job_reverses_the_edges() -> None:
    from lifecycle_dagster.location.job_factory import build_compensation_job

    job = build_compensation_job(_fixture("diamond"))
    assert job.name == "diamond__v1__compensate"
    assert _upstreams(job) == {
        "undo_d": [],
        "undo_b": ["undo_d"],
        "undo_c": ["undo_d"],
        "undo_a": ["undo_b", "undo_c"],
    }
    assert job.graph.node_named("undo_a").definition.name == "diamond__v1__UNDO__a"
    chain = build_compensation_job(_fixture("lifecycle_v1"))
    assert chain.metadata["undo_order"].text == "integrity, value_realization, target_design, qualify, discover"


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("no_such_module_xyz:registry", "ModuleNotFoundError"),
        ("json:dumps", "TypeError"),  # a function that needs arguments
        ("lifecycle_dagster.agents:Task", "TypeError"),
    ],
)
def test_a_bad_agents_registry_fails_the_load_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, ref: str, why: str
) -> None:
    """Not every definition skipped with a warning (a location that loads with no jobs): the load
    itself fails, with one error naming LIFECYCLE_DAGSTER_AGENTS and its value; even with no row."""
    from lifecycle_dagster.location.resources import AgentsSettingError

    monkeypatch.setenv("LIFECYCLE_DAGSTER_AGENTS", ref)
    for snapshot in (json.dumps([_fixture("lifecycle_v1"), _fixture("diamond")]), "[]"):
        with pytest.raises(AgentsSettingError) as err:
            definitions_from_snapshot(snapshot)
        assert f"LIFECYCLE_DAGSTER_AGENTS={ref!r} names no usable agent registry" in str(err.value)
        assert why in str(err.value)
    with pytest.raises(AgentsSettingError):
        build_jobs([_fixture("lifecycle_v1")])
    monkeypatch.delenv("LIFECYCLE_DAGSTER_AGENTS")
    jobs, skipped = build_jobs([_fixture("lifecycle_v1")])
    assert len(jobs) == 2 and skipped == []
