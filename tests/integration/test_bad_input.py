"""Bad input (issue 8): malformed definitions, contexts and agent outputs.

Each case gets a clear error at the boundary it crosses (``publish`` / ``validate`` and the DAG
validator, a direct INSERT, ``build_job``, ``run`` / ``start --context``, the stage runtime for
python and http agents, the task-queue SQL functions for queue agents) that names what is wrong and
where, of the right type or exit code, and leaves no partial rows: the five tables are counted
before and after, and a bad output ends its stage failed with the error recorded and nothing else
half-written. Last, random mutations of valid documents go through both DAG validators (Python and
SQL), which must agree. Real Postgres and real Dagster throughout; big payloads are built once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, Task
from lifecycle_dagster.cli.main import main
from lifecycle_dagster.core.dag import MAX_EDGES, MAX_STAGES, DagValidationError, validate_dag
from lifecycle_dagster.core.payload import MAX_JSON_DEPTH, check_output
from lifecycle_dagster.core.retry import RetryPolicy, retry_delay
from lifecycle_dagster.engine.stage import StageFailed, StageSpec, run_stage
from lifecycle_dagster.location.job_factory import build_compensation_job, build_job, build_jobs, capability_pool
from lifecycle_dagster.settings import DEFAULT_MAX_OUTPUT_BYTES
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.versions import DefinitionFileError, checked_for_publishing, read_definition_file

from helpers import TESTS, events, install, rows, run, send_json

TABLES = ("workflow_definitions", "workflow_executions", "workflow_execution_logs", "workflow_events", "task_queue")
ID_RULE = "id must match ^[a-z][a-z0-9_]{0,62}$"
MB20 = 20 * 1024 * 1024
#: bytes of {"blob": <20 MiB of x>} as JSON
BLOB_SIZE = MB20 + len(json.dumps({"blob": ""}))


# =============================================================================================
# helpers
# =============================================================================================


def counts(dsn: str) -> dict[str, int]:
    """Rows of each of the five tables."""
    found: dict[str, int] = {}
    with connect(dsn) as conn:
        for table in TABLES:
            row = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table))).fetchone()
            assert row is not None
            found[table] = int(row["n"])
    return found


@contextlib.contextmanager
def no_new_rows(dsn: str) -> Iterator[None]:
    """Assert that the block leaves the five tables exactly as many rows as it found."""
    before = counts(dsn)
    yield
    assert counts(dsn) == before


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def nested(levels: int, leaf: Any = None) -> Any:
    """``levels`` arrays, one in the other (built without recursion)."""
    value: Any = [] if leaf is None else [leaf]
    for _ in range(levels - 1):
        value = [value]
    return value


@functools.cache
def deep_text(levels: int) -> str:
    """The JSON text of ``{"deep": <levels arrays>}`` (so the document is levels + 1 deep)."""
    return '{"deep": ' + "[" * levels + "]" * levels + "}"


@functools.cache
def big_string() -> str:
    return "x" * MB20


@pytest.fixture(scope="module")
def shared_db(server_dsn: str, template_db: str) -> Iterator[str]:
    """One migrated database shared by the cases that need no Dagster run (each installs its own
    workflow and agents; each counts the rows before and after itself)."""
    name = f"ld_bad_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    params = conninfo.conninfo_to_dict(server_dsn)
    params["dbname"] = name
    yield conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def shared(shared_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", shared_db)
    return shared_db


# =============================================================================================
# Definitions: the validator, `validate` / `publish`, a direct INSERT, build_job
# =============================================================================================


def _st(**kw: Any) -> dict[str, Any]:
    return {"id": "a", "capability": "work", **kw}


def _chain(n: int) -> list[dict[str, Any]]:
    return [{"id": f"s{i}", "capability": "work", **({"next": [f"s{i + 1}"]} if i + 1 < n else {})} for i in range(n)]


@dataclass(frozen=True)
class DefCase:
    """A bad dag_schema: the problem the validators report (code, path, a fragment of the message).
    ``sql``: ``"same"`` (the database reports it too), ``"driver"`` (jsonb cannot hold it: the
    INSERT fails in Postgres's JSON parser), ``"yaml"`` (not JSON at all: only a YAML file has it)."""

    id: str
    dag: Callable[[], dict[str, Any]]
    code: str
    path: str
    fragment: str
    sql: str = "same"


DEF_CASES = [
    DefCase(
        "stages_not_an_array", lambda: {"stages": "a"}, "wrong_type", "stages", "stages must be an array, got a string"
    ),
    DefCase(
        "stage_not_an_object",
        lambda: {"stages": [7]},
        "wrong_type",
        "stages[0]",
        "stages[0]: a stage must be an object, got a number",
    ),
    DefCase(
        "capability_a_number",
        lambda: {"stages": [_st(capability=3)]},
        "wrong_type",
        "stages[0].capability",
        "stage 'a': capability must be a string, got a number",
    ),
    DefCase(
        "next_a_string",
        lambda: {"stages": [_st(next="b")]},
        "wrong_type",
        "stages[0].next",
        "stage 'a': next must be an array, got a string",
    ),
    DefCase(
        "edges_an_object",
        lambda: {"stages": [_st()], "edges": {}},
        "wrong_type",
        "edges",
        "edges must be an array, got an object",
    ),
    DefCase(
        "capability_nul",
        lambda: {"stages": [_st(capability="wo\0rk")]},
        "bad_value",
        "stages[0].capability",
        "stage 'a': capability must not contain a NUL character",
        "driver",
    ),
    DefCase(
        "key_nul",
        lambda: {"stages": [_st(**{"x\0": 1})]},
        "unknown_key",
        "stages[0].x\0",
        "stage 'a': unknown key 'x\\x00'",
        "driver",
    ),
    DefCase(
        "capability_surrogate",
        lambda: {"stages": [_st(capability="wo\ud800rk")]},
        "bad_value",
        "stages[0].capability",
        "stage 'a': capability must not contain a lone UTF-16 surrogate",
        "driver",
    ),
    DefCase(
        "description_surrogate",
        lambda: {"stages": [_st(description="\udfff")]},
        "bad_value",
        "stages[0].description",
        "description must not contain a lone UTF-16 surrogate",
        "driver",
    ),
    DefCase(
        "id_surrogate",
        lambda: {"stages": [_st(id="a\ud800")]},
        "bad_stage_id",
        "stages[0].id",
        f"{ID_RULE}, got 'a\\ud800'",
        "driver",
    ),
    DefCase(
        "key_surrogate",
        lambda: {"stages": [_st(**{"\udc00": 1})]},
        "unknown_key",
        "stages[0].\udc00",
        "unknown key '\\udc00'",
        "driver",
    ),
    DefCase(
        "id_64_bytes",
        lambda: {"stages": [_st(id="a" * 64)]},
        "bad_stage_id",
        "stages[0].id",
        f"{ID_RULE}, got '{'a' * 64}'",
    ),
    DefCase(
        "id_multibyte", lambda: {"stages": [_st(id="étape")]}, "bad_stage_id", "stages[0].id", f"{ID_RULE}, got 'étape'"
    ),
    DefCase(
        "id_emoji",
        lambda: {"stages": [_st(id="launch_🚀")]},
        "bad_stage_id",
        "stages[0].id",
        f"{ID_RULE}, got 'launch_🚀'",
    ),
    DefCase(
        "id_uppercase",
        lambda: {"stages": [_st(id="Discover")]},
        "bad_stage_id",
        "stages[0].id",
        f"{ID_RULE}, got 'Discover'",
    ),
    DefCase(
        "id_trailing_newline",
        lambda: {"stages": [_st(id="a\n")]},
        "bad_stage_id",
        "stages[0].id",
        f"{ID_RULE}, got 'a\\n'",
    ),
    DefCase("id_a_number", lambda: {"stages": [_st(id=7)]}, "bad_stage_id", "stages[0].id", f"{ID_RULE}, got a number"),
    DefCase(
        "max_attempts_negative",
        lambda: {"stages": [_st(retry={"max_attempts": -1})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "retry.max_attempts must be an integer from 1 to 1000, got -1",
    ),
    DefCase(
        "max_attempts_zero",
        lambda: {"stages": [_st(retry={"max_attempts": 0})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "retry.max_attempts must be an integer from 1 to 1000, got 0",
    ),
    DefCase(
        "max_attempts_fractional",
        lambda: {"stages": [_st(retry={"max_attempts": 2.5})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "got 2.5",
    ),
    DefCase(
        "max_attempts_1001",
        lambda: {"stages": [_st(retry={"max_attempts": 1001})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "got 1001",
    ),
    DefCase(
        "max_attempts_huge",
        lambda: {"stages": [_st(retry={"max_attempts": 10**30})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "got 10000000000000000000...",
    ),
    DefCase(
        "max_attempts_a_string",
        lambda: {"stages": [_st(retry={"max_attempts": "3"})]},
        "wrong_type",
        "stages[0].retry.max_attempts",
        "retry.max_attempts must be a number, got a string",
    ),
    DefCase(
        "max_attempts_a_boolean",
        lambda: {"stages": [_st(retry={"max_attempts": True})]},
        "wrong_type",
        "stages[0].retry.max_attempts",
        "got a boolean",
    ),
    DefCase(
        "max_attempts_nan",
        lambda: {"stages": [_st(retry={"max_attempts": float("nan")})]},
        "bad_value",
        "stages[0].retry.max_attempts",
        "got nan",
        "yaml",
    ),
    DefCase(
        "base_delay_infinite",
        lambda: {"stages": [_st(retry={"base_delay_s": float("inf")})]},
        "bad_value",
        "stages[0].retry.base_delay_s",
        "retry.base_delay_s must be a number a double can hold (finite, and not so small that it rounds to 0), got inf",
        "yaml",
    ),
    DefCase(
        "base_delay_negative",
        lambda: {"stages": [_st(retry={"base_delay_s": -1})]},
        "bad_value",
        "stages[0].retry.base_delay_s",
        "retry.base_delay_s must be >= 0, got -1",
    ),
    DefCase(
        "cap_below_base",
        lambda: {"stages": [_st(retry={"base_delay_s": 10, "max_delay_s": 1})]},
        "bad_value",
        "stages[0].retry.max_delay_s",
        "retry.max_delay_s (1) must be >= retry.base_delay_s (10)",
    ),
    DefCase(
        "multiplier_below_one",
        lambda: {"stages": [_st(retry={"multiplier": 0.5})]},
        "bad_value",
        "stages[0].retry.multiplier",
        "retry.multiplier must be >= 1, got 0.5",
    ),
    DefCase(
        "jitter_unknown",
        lambda: {"stages": [_st(retry={"jitter": "sometimes"})]},
        "bad_value",
        "stages[0].retry.jitter",
        "retry.jitter must be one of none, full, equal, got 'sometimes'",
    ),
    DefCase(
        "non_retryable_empty",
        lambda: {"stages": [_st(retry={"non_retryable": [""]})]},
        "bad_value",
        "stages[0].retry.non_retryable[0]",
        "retry.non_retryable[0] is empty",
    ),
    DefCase(
        "retry_unknown_key",
        lambda: {"stages": [_st(retry={"max_retries": 3})]},
        "unknown_key",
        "stages[0].retry.max_retries",
        "unknown key 'retry.max_retries'",
    ),
    DefCase(
        "defaults_retry_negative",
        lambda: {"stages": [_st()], "defaults": {"retry": {"max_attempts": -3}}},
        "bad_value",
        "defaults.retry.max_attempts",
        "defaults: retry.max_attempts must be an integer from 1 to 1000, got -3",
    ),
    DefCase(
        "timeout_zero",
        lambda: {"stages": [_st(timeout_s=0)]},
        "bad_value",
        "stages[0].timeout_s",
        "stage 'a': timeout_s must be > 0, got 0",
    ),
    DefCase(
        "timeout_negative",
        lambda: {"stages": [_st(timeout_s=-5)]},
        "bad_value",
        "stages[0].timeout_s",
        "timeout_s must be > 0, got -5",
    ),
    DefCase(
        "timeout_a_string",
        lambda: {"stages": [_st(timeout_s="60")]},
        "wrong_type",
        "stages[0].timeout_s",
        "timeout_s must be a number, got a string",
    ),
    DefCase(
        "unknown_next",
        lambda: {"stages": [_st(next=["b"])]},
        "unknown_stage",
        "stages[0].next[0]",
        "stage 'a': edge to unknown stage 'b'",
    ),
    DefCase(
        "edge_to_unknown",
        lambda: {"stages": [_st()], "edges": [{"from": "a", "to": "zz"}]},
        "unknown_stage",
        "edges[0].to",
        "edges[0] (from 'a' to 'zz'): unknown stage 'zz'",
    ),
    DefCase(
        "edge_from_a_number",
        lambda: {"stages": [_st()], "edges": [{"from": 1, "to": "a"}]},
        "wrong_type",
        "edges[0].from",
        "from must be a stage id, got a number",
    ),
    DefCase(
        "self_loop",
        lambda: {"stages": [_st(next=["a"])]},
        "self_loop",
        "stages[0].next[0]",
        "stage 'a': edge to itself (next[0])",
    ),
    DefCase(
        "cycle",
        lambda: {"stages": [_st(next=["b"]), _st(id="b", next=["a"])]},
        "cycle",
        "stages[0]",
        "cycle: a -> b -> a (stages 'a', 'b')",
    ),
    DefCase(
        "duplicate_stage",
        lambda: {"stages": [_st(), _st()]},
        "duplicate_stage",
        "stages[1]",
        "stage 'a': declared 2 times (stages[0], stages[1])",
    ),
    DefCase("empty_dag", lambda: {"stages": []}, "empty_dag", "stages", "workflow DAG: stages is missing or empty"),
    DefCase("no_stages", lambda: {"on_failure": "hold"}, "empty_dag", "stages", "stages is missing or empty"),
    DefCase(
        "on_failure_unknown",
        lambda: {"stages": [_st()], "on_failure": "explode"},
        "bad_value",
        "on_failure",
        "on_failure must be one of compensate, hold, got 'explode'",
    ),
    DefCase(
        "top_level_unknown_key",
        lambda: {"stages": [_st()], "stage": []},
        "unknown_key",
        "stage",
        "workflow DAG: unknown key 'stage'",
    ),
    DefCase(
        "deep_description",
        lambda: {"stages": [_st(description=nested(200))]},
        "wrong_type",
        "stages[0].description",
        "description must be a string, got an array",
    ),
    DefCase(
        "schedule_bad_cron",
        lambda: {"stages": [_st()], "schedule": {"cron": "0 24 * * *"}},
        "bad_value",
        "schedule.cron",
        "workflow DAG: schedule.cron '0 24 * * *' is not a valid cron: the hour field '24' is not *, a number"
        " from 0 to 23",
    ),
    DefCase(
        "schedule_unknown_timezone",
        lambda: {"stages": [_st()], "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Atlantis"}},
        "bad_value",
        "schedule.timezone",
        "workflow DAG: schedule.timezone must be an IANA time zone name (Europe/Berlin, UTC...), got 'Europe/Atlantis'",
    ),
    DefCase(
        "too_many_stages",
        lambda: {"stages": _chain(MAX_STAGES + 1)},
        "bad_value",
        "stages",
        f"workflow DAG: stages has {MAX_STAGES + 1} entries, over the limit of {MAX_STAGES}",
    ),
    DefCase(
        "too_many_edges",
        lambda: {"stages": _chain(3), "edges": [{"from": "s0", "to": "s1"}] * MAX_EDGES},
        "bad_value",
        "edges",
        f"the DAG has {MAX_EDGES + 2} edge entries (edges and next), over the limit of {MAX_EDGES}",
    ),
]


def _write(case: DefCase, tmp_path: Path, name: str = "wf") -> Path:
    doc = {"name": name, **case.dag()}
    if case.sql == "yaml":
        path = tmp_path / "wf.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    else:
        path = tmp_path / "wf.json"
        path.write_text(json.dumps(doc), encoding="utf-8")  # ASCII: NUL and surrogates escaped
    return path


@pytest.mark.parametrize("case", DEF_CASES, ids=[c.id for c in DEF_CASES])
def test_a_bad_definition_is_refused_everywhere_naming_what_and_where(
    shared: str, tmp_path: Path, case: DefCase
) -> None:
    dag = case.dag()
    # 1. the validator: the problem, where, and the rule
    problems = validate_dag(dag)
    found = [p for p in problems if p.code == case.code and p.path == case.path]
    assert found, [(p.code, p.path, p.message) for p in problems]
    assert any(case.fragment in p.message for p in found), [p.message for p in found]
    assert all("\0" not in p.message and "\n" not in p.message for p in problems)
    for p in problems:
        p.message.encode("utf-8")  # printable and storable: no lone surrogate left in a message

    path = _write(case, tmp_path)
    with no_new_rows(shared):
        # 2. validate FILE: exit 1 with the message, and publish FILE: exit 1, nothing stored
        checked = _cli("validate", "--offline", str(path))
        assert checked.exit_code == 1, checked.output
        assert case.fragment in checked.output
        published = _cli("publish", str(path))
        assert published.exit_code == 1, published.output
        assert case.fragment in published.output
        assert "Traceback" not in published.output

        # 3. a direct INSERT, whoever sends it
        with psycopg.connect(shared, autocommit=True) as conn:
            insert = (
                "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('wf', 1, %s, true)"
            )
            if case.sql == "same":
                with pytest.raises(psycopg.errors.CheckViolation) as err:
                    conn.execute(insert, (Jsonb(dag),))
                assert err.value.diag.constraint_name == "workflow_definitions_dag_valid"
                assert case.fragment in (err.value.diag.message_primary or "")
                assert f"[{case.code} at {case.path}]" in (err.value.diag.message_detail or "")
            elif case.sql == "driver":  # jsonb cannot hold NUL or a lone surrogate: Postgres's parser says so
                with pytest.raises(psycopg.DataError) as derr:
                    conn.execute(insert, (Jsonb(dag),))
                assert "\\u0000 cannot be converted to text" in str(derr.value) or "surrogate" in str(derr.value)

    # 4. build_job on such a row (a snapshot, a fixture): the same problems, never a Dagster error
    with pytest.raises(DagValidationError) as built:
        build_job({"id": str(uuid.uuid4()), "name": "wf", "version": 1, "description": None, "dag_schema": dag})
    assert case.fragment in str(built.value)


def test_a_definition_nested_10k_deep_is_refused_by_every_door(shared: str, tmp_path: Path) -> None:
    stages = json.dumps({"stages": [_st()]})[:-1]
    path = tmp_path / "deep.json"
    path.write_text(stages + ', "name": "wf", "note": ' + deep_text(10_000) + "}", encoding="utf-8")
    with no_new_rows(shared):
        with pytest.raises(DefinitionFileError, match="nested too deeply to read"):
            read_definition_file(path)
        for command in ("validate", "publish"):
            result = _cli(command, str(path))
            assert result.exit_code == 1 and f"{path}: nested too deeply to read" in result.output
        # jsonb holds it; the validator does not descend into it (no valid DAG is over 5 levels deep)
        with psycopg.connect(shared, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(
                "INSERT INTO workflow_definitions (name, dag_schema) VALUES ('wf', %s::jsonb)",
                (stages + ', "note": ' + deep_text(10_000) + "}",),
            )
        assert err.value.diag.constraint_name == "workflow_definitions_dag_valid"
        assert "workflow wf v1 has 1 problem: workflow DAG: unknown key 'note'" in (
            err.value.diag.message_primary or ""
        )


def test_a_definition_of_20_mb_is_refused(shared: str, tmp_path: Path) -> None:
    dag = {"stages": [_st(description=big_string())]}
    assert validate_dag(dag) == []  # each key is valid: the size is what is wrong
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"name": "wf", **dag}), encoding="utf-8")
    with no_new_rows(shared):
        with pytest.raises(DefinitionFileError, match=r"the definition is \d+ bytes, over the 8388608-byte limit"):
            checked_for_publishing(read_definition_file(path))
        result = _cli("publish", str(path))
        assert result.exit_code == 1 and "over the 8388608-byte limit" in result.output
        with psycopg.connect(shared, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute("INSERT INTO workflow_definitions (name, dag_schema) VALUES ('wf', %s)", (Jsonb(dag),))
        assert "workflow wf v1: dag_schema is" in (err.value.diag.message_primary or "")
        assert "over the 8388608-byte limit (lifecycle.max_payload_bytes)" in (err.value.diag.message_primary or "")


@pytest.mark.parametrize(
    ("number", "at"),
    [
        ("1e-400", "retry.base_delay_s"),  # > 0 as numeric, 0 as a double: retry_stage failed on it
        ("1e400", "retry.max_delay_s"),  # was refused "must be >= 0": the wrong reason
        ("-1e-400", "timeout_s"),
        ("1e-400", "retry.multiplier"),
    ],
)
def test_a_dag_number_a_double_cannot_hold_is_refused_by_sql_with_the_reason(
    shared: str, number: str, at: str
) -> None:
    """Written by SQL, 1e-400 and 1e400 stay as written (jsonb numbers are numeric); every reader
    casts them to double precision. Python's JSON readers round them (0.0, inf) before its
    validator sees them; an inf is refused with the same reason."""
    field = at.split(".")[-1]
    value = f'{{"{field}": {number}}}' if "." not in at else f'{{"retry": {{"{field}": {number}}}}}'
    stage = json.dumps({"id": "a", "capability": "work"})[:-1] + ", " + value[1:]
    with (
        no_new_rows(shared),
        psycopg.connect(shared, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation) as err,
    ):
        conn.execute(
            "INSERT INTO workflow_definitions (name, dag_schema) VALUES ('wf', %s::jsonb)",
            ('{"stages": [' + stage + "]}",),
        )
    message = err.value.diag.message_primary or ""
    reason = "must be a number a double can hold (finite, and not so small that it rounds to 0)"
    assert f"stage 'a': {at} {reason}, got " in message, message
    assert f"[bad_value at stages[0].{at}]" in (err.value.diag.message_detail or "")
    if number == "1e400":  # Python reads it as inf: the same reason
        [problem] = validate_dag(json.loads('{"stages": [' + stage + "]}"))
        assert problem.message == f"stage 'a': {at} {reason}, got inf"


@pytest.mark.parametrize(
    ("number", "at"),
    [("1e-400", "retry.base_delay_s"), ("1e400", "retry.max_delay_s"), ("-1e-400", "timeout_s"), ("0.0e-400", "")],
)
def test_a_definition_file_holding_a_number_a_double_cannot_hold_gets_the_databases_reason(
    shared: str, tmp_path: Path, number: str, at: str
) -> None:
    """Read from a file, 1e-400 was 0.0 for `validate` and `publish` ("must be > 0", or accepted
    where 0 is allowed) while the database refuses it as a number a double cannot hold: now every
    door gives the database's reason, naming the number as written. 0.0e-400 is a true 0."""
    if not at:
        stage = json.dumps({"id": "a", "capability": "work", "retry": {"base_delay_s": 0}})
        stage = stage.replace(": 0}", f": {number}}}")
    else:
        field = at.split(".")[-1]
        value = f'{{"{field}": {number}}}' if "." not in at else f'{{"retry": {{"{field}": {number}}}}}'
        stage = json.dumps({"id": "a", "capability": "work"})[:-1] + ", " + value[1:]
    path = tmp_path / "wf.json"
    path.write_text('{"name": "wf", "stages": [' + stage + "]}", encoding="utf-8")
    reason = "must be a number a double can hold (finite, and not so small that it rounds to 0)"
    with no_new_rows(shared):
        checked = _cli("validate", "--offline", str(path))
        if not at:
            assert checked.exit_code == 0, checked.output
            return
        assert checked.exit_code == 1
        assert f"stage 'a': {at} {reason}, got {number}" in checked.output, checked.output
        published = _cli("publish", str(path))
        assert published.exit_code == 1
        assert f"stage 'a': {at} {reason}, got {number}" in published.output, published.output


def test_a_definition_file_holding_an_out_of_range_number_outside_the_dag_checks_is_refused_before_writing(
    shared: str, tmp_path: Path
) -> None:
    """A number no DAG rule looks at (the top-level description may not hold one; a stage's
    description must be a string) still never reaches the database as JSON's Infinity."""
    from lifecycle_dagster.core.payload import check_output
    from lifecycle_dagster.store.versions import strict_json

    doc = strict_json('{"x": [1, {"y": 1e-400}]}', exact_numbers=True)
    assert check_output(doc, what="the definition") == (
        "the definition holds 1e-400 at $.x[1].y: a number a double cannot hold"
    )
    assert strict_json('{"x": 1e-400}') == {"x": 0.0}  # contexts: read as Python reads JSON


def _deep_doc(kind: str) -> str:
    if kind == "arrays":
        return '{"deep": ' + "[" * 101 + "]" * 101 + "}"
    if kind == "keys":
        return '{"a": {"b c": {"é🚀\\n": ' + "[" * 98 + "]" * 98 + "}}}"
    if kind == "objects_in_an_array":
        return '{"x": [1, {"y": ' + '{"k": ' * 99 + "1" + "}" * 99 + "}]}"
    return '{"short": [1], "long": ' + "[" * 100 + "]" * 100 + "}"


@pytest.mark.parametrize("kind", ["arrays", "keys", "objects_in_an_array", "second_key"])
def test_the_database_names_the_json_path_of_a_too_deep_payload_as_python_does(shared: str, kind: str) -> None:
    text = _deep_doc(kind)
    python = check_output(json.loads(text), limit=10**9, what="the context")
    assert python is not None and " levels deep (objects and arrays) at $" in python
    with psycopg.connect(shared, autocommit=True) as conn:
        row = conn.execute("SELECT lifecycle.payload_problem(%s::jsonb, 'the context') AS p", (text,)).fetchone()
    assert row is not None and row[0] == python


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a" * 64, "64 bytes"),
        ("étape", "multi-byte"),
        ("wf_🚀", "emoji"),
        ("Lifecycle", "uppercase"),
        ("wf__x", "double underscore"),
        ("wf_", "trailing underscore"),
        ("1wf", "leading digit"),
        ("wf-x", "hyphen (not a Dagster name)"),
    ],
)
def test_a_bad_workflow_name_is_refused(shared: str, tmp_path: Path, name: str, why: str) -> None:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"name": name, "stages": [_st()]}), encoding="utf-8")
    rule = "must match ^[a-z][a-z0-9_]{0,62}$"
    with no_new_rows(shared):
        result = _cli("publish", str(path))
        assert result.exit_code == 1, (why, result.output)
        assert f"invalid workflow name {name!r}: it {rule}, without __ and not ending in _" in result.output
        with psycopg.connect(shared, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(
                "INSERT INTO workflow_definitions (name, dag_schema) VALUES (%s, %s)",
                (name, Jsonb({"stages": [_st()]})),
            )
        assert err.value.diag.constraint_name == "workflow_definitions_name_valid"
    # a row built by hand (a snapshot, a fixture) with such a name: a ValueError naming it, not Dagster's error
    row = {"id": "x", "name": name, "version": 1, "description": None, "dag_schema": {"stages": [_st()]}}
    with pytest.raises(ValueError) as bad:
        build_job(row)
    assert f"not a usable workflow_definitions row: name {name!r} {rule} without __" in str(bad.value)
    assert build_jobs([row])[1][0].name == name


@pytest.mark.parametrize("version", [0, -1, "1", 1.5, True, None])
def test_a_bad_version_in_a_row_is_a_value_error(version: Any) -> None:
    row = {"id": "x", "name": "wf", "version": version, "description": None, "dag_schema": {"stages": [_st()]}}
    with pytest.raises(ValueError, match=r"not a usable workflow_definitions row: version .* must be an integer >= 1"):
        build_job(row)
    jobs, skipped = build_jobs([row])
    assert jobs == [] and len(skipped) == 1 and "must be an integer >= 1" in skipped[0].error


class Echo:
    """Returns what ``make`` makes of its task."""

    def __init__(self, name: str, make: Callable[[Task], Any]) -> None:
        self.name = name
        self.make = make

    def run(self, task: Task) -> Any:
        return self.make(task)


def test_names_of_63_bytes_emoji_capabilities_and_agent_names_run_end_to_end(
    db: str, instance: Any, tmp_path: Path
) -> None:
    """The longest valid names, and capabilities and agent names that are not identifiers (emoji,
    spaces, 200 characters), work all the way through Dagster and Postgres: job, ops, pools, tags."""
    name = "w" * 63
    first, second = "a" * 63, "b" + "_" * 61 + "z"
    spaced, emoji = "lead scoring", "launch 🚀 " + "é" * 190
    agent_a, agent_b = "Agent 🚀 " + "x" * 100, "Ägent\tB"
    path = tmp_path / "wf.json"
    dag = {"stages": [{"id": first, "capability": spaced, "next": [second]}, {"id": second, "capability": emoji}]}
    path.write_text(json.dumps({"name": name, **dag}), encoding="utf-8")
    result = _cli("publish", str(path), "--activate")
    assert result.exit_code == 0, result.output
    assert f"published {name} v1 and activated it" in result.output
    with connect(db) as conn:
        for capability, agent in ((spaced, agent_a), (emoji, agent_b)):
            a = conn.execute("INSERT INTO agents (name) VALUES (%s) RETURNING id", (agent,)).fetchone()
            assert a is not None
            conn.execute(
                "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration', %s)",
                (a["id"], Jsonb({"capability": capability})),
            )
    job = build_job(rows(db, "SELECT * FROM workflow_definitions")[0])
    ops = [n.definition for n in job.graph.nodes]
    assert job.name == f"{name}__v1"
    assert sorted(op.name for op in ops) == [f"{name}__v1__{first}", f"{name}__v1__{second}"]
    assert {op.pool for op in ops} == {"lifecycle_lead%20scoring", capability_pool(emoji)}
    assert " " not in capability_pool(emoji) and capability_pool("opportunity") == "lifecycle_opportunity"
    registry = AgentRegistry([Echo(agent_a, lambda t: {"summary": "a"}), Echo(agent_b, lambda t: {"summary": "b"})])
    outcome, eid = run(db, instance, name, registry, {"customer": "ACME 🚀"})
    assert outcome.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "completed"}]
    assert [
        r["name"]
        for r in rows(db, "SELECT a.name FROM task_queue t JOIN agents a ON a.id = t.agent_id ORDER BY t.created_at")
    ] == [agent_a, agent_b]
    assert [s for t, s, _ in events(db, eid) if t == "stage_completed"] == [first, second]


def test_capabilities_with_whitespace_no_longer_break_the_code_location() -> None:
    """A capability with a space made an invalid Dagster pool name: build_job raised Dagster's
    DagsterInvalidDefinitionError, which build_jobs did not catch, so the whole code location
    failed to load. Its pool name is now percent-encoded."""
    row = {
        "id": "x",
        "name": "wf",
        "version": 1,
        "description": None,
        "dag_schema": {"stages": [{"id": "a", "capability": "lead\u3000scoring\n"}]},
    }
    jobs, skipped = build_jobs([row])
    assert skipped == [] and [j.name for j in jobs] == ["wf__v1", "wf__v1__compensate"]
    assert capability_pool("lead\u3000scoring\n") == "lifecycle_lead%E3%80%80scoring%0A"
    assert capability_pool("50%") == "lifecycle_50%25"


def test_dags_at_the_limits_build_quickly() -> None:
    """500 stages in a chain (Dagster's own graph walk recurses along it) and 5000 edges: valid,
    and both jobs build in seconds (they took minutes, or hit RecursionError, past ~1000 stages)."""
    chain = {"stages": _chain(MAX_STAGES)}
    rng = random.Random(5)
    pairs = {(i, i + 1) for i in range(199)}
    while len(pairs) < MAX_EDGES:
        a = rng.randrange(199)
        pairs.add((a, rng.randrange(a + 1, 200)))
    dense = {
        "stages": [_st(id=f"s{i}") for i in range(200)],
        "edges": [{"from": f"s{a}", "to": f"s{b}"} for a, b in sorted(pairs)],
    }
    for dag in (chain, dense):
        assert validate_dag(dag) == []
        t0 = time.monotonic()
        row = {"id": "x", "name": "wf", "version": 1, "description": None, "dag_schema": dag}
        assert len(build_job(row).graph.nodes) == len(dag["stages"])
        assert len(build_compensation_job(row).graph.nodes) == len(dag["stages"])
        assert time.monotonic() - t0 < 15


# =============================================================================================
# Contexts: run / start --context FILE, and a direct INSERT into workflow_executions
# =============================================================================================

CTX_CASES: list[tuple[str, Callable[[], str | bytes], str]] = [
    ("an_array", lambda: "[1, 2]", "the context must be a JSON object"),
    ("a_string", lambda: '"ACME"', "the context must be a JSON object"),
    ("nan", lambda: '{"customer": NaN}', "not valid JSON: NaN is not JSON"),
    (
        "nul_in_a_value",
        lambda: '{"customer": {"name": "AC\\u0000ME"}}',
        "the context contains a NUL character at $.customer.name",
    ),
    (
        "nul_in_a_key",
        lambda: '{"cust\\u0000omer": 1}',
        'the context contains a NUL character at the key $["cust\\u0000omer"]',
    ),
    (
        "lone_surrogate",
        lambda: '{"notes": ["ok", "\\ud800"]}',
        "the context contains a lone UTF-16 surrogate at $.notes[1]",
    ),
    ("nested_10k", lambda: deep_text(10_000), "not valid JSON"),
    ("nested_101", lambda: deep_text(MAX_JSON_DEPTH), f"the context is nested more than {MAX_JSON_DEPTH} levels deep"),
    (
        "twenty_mb",
        lambda: json.dumps({"blob": big_string()}),
        f"the context is {BLOB_SIZE} bytes, over the 8388608-byte limit",
    ),
    ("not_utf8", lambda: b'{"customer": "\xff"}', "not valid JSON"),
    ("truncated", lambda: '{"customer": ', "not valid JSON"),
]


@pytest.mark.parametrize("command", ["run", "start"])
@pytest.mark.parametrize(("case", "content", "fragment"), CTX_CASES, ids=[c[0] for c in CTX_CASES])
def test_a_bad_context_file_is_refused_before_any_row(
    shared: str,
    dagster_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
    case: str,
    content: Callable[[], str | bytes],
    fragment: str,
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    f = tmp_path / "ctx.json"
    data = content()
    f.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    with no_new_rows(shared):
        result = _cli(command, "lifecycle_v1", "--context", str(f))
        assert result.exit_code == 1, result.output  # a bad file is the work failing (cli.py's convention)
        assert f"{f}: " in result.output and fragment in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["run", "start"])
def test_context_usage_errors_exit_2(shared: str, command: str, tmp_path: Path) -> None:
    with no_new_rows(shared):
        missing = _cli(command, "lifecycle_v1", "--context", str(tmp_path / "nope.json"))
        assert missing.exit_code == 2 and "does not exist" in missing.output
        absent = _cli(command, "lifecycle_v1")
        assert absent.exit_code == 2 and "Missing option '--context'" in absent.output


_names = itertools.count()


@dataclass(frozen=True)
class Workflow:
    """A workflow of its own in the shared database: stage a (capability ``work<n>``, agent
    ``Bad <n>``) then stage b (``more<n>``, ``Good <n>``), one attempt each."""

    name: str
    definition_id: str
    work: str
    bad: str
    good: str


def _workflow(dsn: str, bad_kind: str = "python", **defaults: Any) -> Workflow:
    n = next(_names)
    wf = Workflow(f"wf{n}_{uuid.uuid4().hex[:6]}", "", f"work{n}", f"Bad {n}", f"Good {n}")
    dag = {
        "stages": [{"id": "a", "capability": wf.work, "next": ["b"]}, {"id": "b", "capability": f"more{n}"}],
        "defaults": {"retry": {"max_attempts": 1}, **defaults},
    }
    install(dsn, wf.name, dag, {wf.work: wf.bad, f"more{n}": wf.good})
    with connect(dsn) as conn:
        conn.execute("UPDATE agents SET kind = %s WHERE name = %s", (bad_kind, wf.bad))
        row = conn.execute("SELECT id FROM workflow_definitions WHERE name = %s", (wf.name,)).fetchone()
    assert row is not None
    return Workflow(wf.name, str(row["id"]), wf.work, wf.bad, wf.good)


@pytest.mark.parametrize(
    ("case", "value", "error", "fragment"),
    [
        ("an_array", lambda: "[1]", psycopg.errors.CheckViolation, "workflow_executions_context_is_object"),
        (
            "nul",
            lambda: '{"a": "x\\u0000"}',
            psycopg.errors.UntranslatableCharacter,
            "\\u0000 cannot be converted to text",
        ),
        ("lone_surrogate", lambda: '{"a": "\\ud800"}', psycopg.errors.InvalidTextRepresentation, "surrogate"),
        ("nan", lambda: '{"a": NaN}', psycopg.errors.InvalidTextRepresentation, 'Token "NaN" is invalid'),
        (
            "nested_10k",
            lambda: deep_text(10_000),
            psycopg.errors.CheckViolation,
            "workflow_executions: the context is nested more than 100 levels deep",
        ),
        (
            "nested_101",
            lambda: deep_text(MAX_JSON_DEPTH),
            psycopg.errors.CheckViolation,
            "the context is nested more than 100 levels deep",
        ),
        (
            "twenty_mb",
            lambda: json.dumps({"blob": big_string()}),
            psycopg.errors.CheckViolation,
            "over the 8388608-byte limit (lifecycle.max_payload_bytes)",
        ),
    ],
)
def test_a_bad_context_inserted_directly_is_refused(
    shared: str, case: str, value: Callable[[], str], error: type[Exception], fragment: str
) -> None:
    wf = _workflow(shared)
    with psycopg.connect(shared, autocommit=True) as conn:
        with no_new_rows(shared), pytest.raises(error) as err:
            conn.execute(
                "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
                " VALUES (%s, 'pending', %s::jsonb)",
                (wf.definition_id, value()),
            )
        assert fragment in str(err.value)
        # an UPDATE of a stored execution's context to one of them changes nothing either
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, context) VALUES (%s, '{\"a\": 1}') RETURNING id",
            (wf.definition_id,),
        ).fetchone()
        assert e is not None
        with no_new_rows(shared), pytest.raises(error):
            conn.execute("UPDATE workflow_executions SET context = %s::jsonb WHERE id = %s", (value(), e[0]))
    assert rows(shared, "SELECT context FROM workflow_executions WHERE id = %(e)s", e=e[0]) == [{"context": {"a": 1}}]


def test_a_context_at_the_depth_limit_runs(db: str, instance: Any) -> None:
    """100 levels is allowed, and the engine reads it back. (A context inserted 10k levels deep made
    the stage op crash with a RecursionError after its execution had moved to in_progress, leaving
    it there: such a context is now refused on insert.)"""
    install(db, "wf", {"stages": [_st()]}, {"work": "Echo"})
    context = {"deep": nested(MAX_JSON_DEPTH - 1)}
    assert check_output(context, what="the context") is None
    echo = Echo("Echo", lambda t: {"summary": "ok", "same": dict(t.context) == context})
    outcome, _ = run(db, instance, "wf", AgentRegistry([echo]), context)
    assert outcome.success
    assert rows(db, "SELECT output_data FROM workflow_execution_logs") == [
        {"output_data": {"summary": "ok", "same": True}}
    ]


# =============================================================================================
# Agent outputs: python agents (the runtime), http agents, queue agents (the SQL protocol)
# =============================================================================================


def _nul_key(_: Task) -> Any:
    return {"summary": "x", "k\0": 1}


OUTPUT_CASES: list[tuple[str, Callable[[Task], Any], str]] = [
    ("a_list", lambda t: ["not", "an", "object"], "agent returned list, not a JSON object"),
    ("a_string", lambda t: "done", "agent returned str, not a JSON object"),
    ("none", lambda t: None, "agent returned NoneType, not a JSON object"),
    (
        "nul_in_a_value",
        lambda t: {"summary": "x", "rows": [{"v": "a\0b"}]},
        "agent output contains a NUL character at $.rows[0].v",
    ),
    ("nul_in_a_key", _nul_key, 'agent output contains a NUL character at the key $["k\\u0000"]'),
    (
        "lone_surrogate",
        lambda t: {"summary": "x", "v": "\udcff"},
        "agent output contains a lone UTF-16 surrogate at $.v",
    ),
    ("nan", lambda t: {"summary": "x", "score": float("nan")}, "agent output is not JSON: nan at $.score"),
    ("infinity", lambda t: {"summary": "x", "score": float("-inf")}, "agent output is not JSON: -inf at $.score"),
    ("a_set", lambda t: {"summary": "x", "v": {1, 2}}, "agent output is not JSON: set at $.v"),
    ("nested_10k", lambda t: {"summary": "x", "v": nested(10_000)}, "agent output is nested more than 100 levels deep"),
    (
        "nested_101",
        lambda t: {"summary": "x", "v": nested(MAX_JSON_DEPTH)},
        "agent output is nested more than 100 levels deep (objects and arrays) at $.v[0]",
    ),
    (
        "twenty_mb",
        lambda t: {"summary": "x", "blob": big_string()},
        f"agent output is {MB20 + len(json.dumps({'summary': 'x', 'blob': ''}))} bytes, over the 8388608-byte limit",
    ),
    (
        "bad_artifacts",
        lambda t: {"summary": "x", "artifacts": [{"kind": 1}]},
        'agent output: "artifacts" must be a list',
    ),
]


def _run_stage_a(dsn: str, wf: Workflow, registry: AgentRegistry) -> StageFailed:
    """Stage a's one attempt, through the runtime a stage op runs (its own execution)."""
    spec = StageSpec(
        definition_id=wf.definition_id, stage_id="a", capability=wf.work, policy=RetryPolicy(max_attempts=1)
    )
    with connect(dsn) as conn, pytest.raises(StageFailed) as failed:
        run_stage(conn, spec, run_id=str(uuid.uuid4()), attempt=1, registry=registry, context={})
    return failed.value


def _assert_failed_cleanly(dsn: str, eid: str, fragment: str, code: str = "bad_output") -> None:
    """Stage a failed with the error recorded (log, task, events, execution); b never started;
    nothing completed, nothing left pending or running."""
    [log] = rows(
        dsn,
        "SELECT stage_id, status, output_data, error_message FROM workflow_execution_logs WHERE execution_id = %(e)s",
        e=eid,
    )
    assert (log["stage_id"], log["status"], log["output_data"]) == ("a", "failed", None)
    assert fragment in log["error_message"]
    tasks = rows(
        dsn,
        "SELECT task_type, status, output_data, error_message FROM task_queue WHERE workflow_execution_id = %(e)s",
        e=eid,
    )
    assert [(t["task_type"], t["status"], t["output_data"]) for t in tasks] == [("a", "failed", None)]
    assert fragment in tasks[0]["error_message"]
    [execution] = rows(dsn, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert execution["status"] == "failed" and execution["error_message"].startswith("stage a failed: ")
    kinds = [(t, s) for t, s, _ in events(dsn, eid)]
    assert ("stage_completed", "a") not in kinds and not any(s == "b" for _, s in kinds)
    [failed] = [m for t, _, m in events(dsn, eid) if t == "stage_failed"]
    assert failed["error_code"] == code and fragment in failed["error"]


@pytest.mark.parametrize(("case", "make", "fragment"), OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_a_bad_python_agent_output_fails_its_stage_cleanly(
    shared: str, case: str, make: Callable[[Task], Any], fragment: str
) -> None:
    wf = _workflow(shared)
    registry = AgentRegistry([Echo(wf.bad, make), Echo(wf.good, lambda t: {"summary": "never called"})])
    failed = _run_stage_a(shared, wf, registry)
    assert failed.code == "bad_output" and f"{wf.bad}: {fragment}" in str(failed)
    _assert_failed_cleanly(shared, failed.execution_id, f"{wf.bad}: {fragment}")


def test_a_bad_output_through_dagster(db: str, instance: Any) -> None:
    """The same, end to end in a Dagster run: the run fails, stage b never runs."""
    wf = _workflow(db)
    registry = AgentRegistry(
        [Echo(wf.bad, lambda t: {"v": nested(10_000)}), Echo(wf.good, lambda t: {"summary": "ok"})]
    )
    outcome, eid = run(db, instance, wf.name, registry)
    assert not outcome.success
    _assert_failed_cleanly(db, eid, f"{wf.bad}: agent output is nested more than 100 levels deep")
    [failure] = outcome.get_step_failure_events()
    assert "agent output is nested more than 100 levels deep" in failure.step_failure_data.error.message


def test_an_output_the_database_refuses_is_a_bad_output_too(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Python limit raised but not the database's, the database refuses the output in the
    transaction that would complete the stage: the runtime records a bad output (it crashed with a
    traceback, leaving the stage in_progress)."""
    monkeypatch.setenv("LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES", str(64 * 1024 * 1024))
    wf = _workflow(db)
    big = {"summary": "x", "blob": "y" * (DEFAULT_MAX_OUTPUT_BYTES + 1)}
    registry = AgentRegistry([Echo(wf.bad, lambda t: big), Echo(wf.good, lambda t: {"summary": "ok"})])
    failed = _run_stage_a(db, wf, registry)
    _assert_failed_cleanly(db, failed.execution_id, f"{wf.bad}: stage a: stage output is")
    assert "over the 8388608-byte limit (lifecycle.max_payload_bytes)" in str(failed)
    # the database's limit is a setting: raised, the same output completes
    dbname = conninfo.conninfo_to_dict(db)["dbname"]
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET lifecycle.max_payload_bytes = '67108864'").format(
                sql.Identifier(str(dbname))
            )
        )
    spec = StageSpec(
        definition_id=wf.definition_id, stage_id="a", capability=wf.work, policy=RetryPolicy(max_attempts=1)
    )
    with connect(db) as conn:
        done = run_stage(conn, spec, run_id=str(uuid.uuid4()), attempt=1, registry=registry, context={})
    assert done.execution_status == "in_progress" and done.output == big


class _Reply(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.server.reply  # type: ignore[attr-defined]
        send_json(self, status, body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[ThreadingHTTPServer]:
    """A local HTTP agent; each test sets ``server.reply = (status, body)``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Reply)
    server.reply = (200, b"{}")  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _http_workflow(dsn: str, server: ThreadingHTTPServer) -> Workflow:
    wf = _workflow(dsn, bad_kind="http")
    with connect(dsn) as conn:
        conn.execute(
            "UPDATE agents SET config = %s WHERE name = %s",
            (Jsonb({"url": f"http://127.0.0.1:{server.server_address[1]}/task", "timeout_s": 30}), wf.bad),
        )
    return wf


HTTP_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("not_json", lambda: b"<html>oops</html>", "answered 200 with a body that is not JSON"),
    ("not_utf8", lambda: b'{"summary": "\xff"}', "answered 200 with a body that is not JSON"),
    ("an_array", lambda: b"[1, 2]", "agent returned list, not a JSON object"),
    ("nan", lambda: b'{"summary": "x", "score": NaN}', "agent output is not JSON: nan at $.score"),
    ("nul", lambda: b'{"summary": "x", "v": "\\u0000"}', "agent output contains a NUL character at $.v"),
    ("nested_10k", lambda: deep_text(10_000).encode(), "answered 200 with JSON nested too deeply to decode"),
    (
        "twenty_mb",
        lambda: json.dumps({"blob": big_string()}).encode(),
        f"agent output is {BLOB_SIZE} bytes, over the 8388608-byte limit",
    ),
]


@pytest.mark.parametrize(("case", "body", "fragment"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_a_bad_http_agent_reply_fails_its_stage_cleanly(
    shared: str, http_server: ThreadingHTTPServer, case: str, body: Callable[[], bytes], fragment: str
) -> None:
    http_server.reply = (200, body())  # type: ignore[attr-defined]
    wf = _http_workflow(shared, http_server)
    failed = _run_stage_a(shared, wf, AgentRegistry())
    assert failed.code == "bad_output" and fragment in str(failed)
    _assert_failed_cleanly(shared, failed.execution_id, fragment)


def test_a_bad_http_reply_through_dagster(db: str, instance: Any, http_server: ThreadingHTTPServer) -> None:
    http_server.reply = (200, b"<html>oops</html>")  # type: ignore[attr-defined]
    wf = _http_workflow(db, http_server)
    outcome, eid = run(db, instance, wf.name, AgentRegistry([Echo(wf.good, lambda t: {"summary": "ok"})]))
    assert not outcome.success
    _assert_failed_cleanly(db, eid, "answered 200 with a body that is not JSON")


# ---- queue agents: the SQL protocol --------------------------------------------------------


def _queue_task(dsn: str) -> tuple[str, str, int]:
    """(execution id, task id, lease token) of a claimed task of a queue agent, in an execution
    driven by hand."""
    wf = _workflow(dsn, bad_kind="queue")
    with connect(dsn) as conn:
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'in_progress') RETURNING id",
            (wf.definition_id,),
        ).fetchone()
        assert e is not None
        started = conn.execute("SELECT * FROM lifecycle.stage_start(%s, 'a', %s)", (e["id"], wf.work)).fetchone()
        assert started is not None and started["agent_kind"] == "queue"
        claimed = conn.execute("SELECT * FROM lifecycle.task_claim('w1', %s, 1, 30)", (wf.bad,)).fetchone()
        assert claimed is not None and claimed["task_id"] == started["task_id"]
    return str(e["id"]), str(claimed["task_id"]), int(claimed["lease_token"])


def _task(dsn: str, task: str) -> dict[str, Any]:
    return rows(
        dsn,
        "SELECT status, lease_token, error_code, retryable, retry_after_s, output_data, lease_expires_at,"
        " error_message FROM task_queue WHERE id = %(t)s",
        t=task,
    )[0]


QUEUE_OUTPUT_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("an_array", lambda: Jsonb([1, 2]), "output must be a JSON object, got array"),
    ("a_string", lambda: Jsonb("done"), "output must be a JSON object, got string"),
    ("a_json_null", lambda: Jsonb(None), "output must be a JSON object, got null"),
    ("sql_null", lambda: None, "output must be a JSON object, got NULL"),
    ("nested_10k", lambda: deep_text(10_000), "output is nested more than 100 levels deep"),
    ("nested_101", lambda: deep_text(MAX_JSON_DEPTH), "output is nested more than 100 levels deep"),
    (
        "twenty_mb",
        lambda: json.dumps({"blob": big_string()}),
        f"output is {BLOB_SIZE} bytes, over the 8388608-byte limit",
    ),
]


@pytest.mark.parametrize(("case", "output", "fragment"), QUEUE_OUTPUT_CASES, ids=[c[0] for c in QUEUE_OUTPUT_CASES])
def test_a_queue_worker_bad_output_is_refused_and_fails_the_task(
    shared: str, case: str, output: Callable[[], Any], fragment: str
) -> None:
    eid, task, token = _queue_task(shared)
    before = counts(shared)
    with connect(shared) as conn:
        status = conn.execute(
            "SELECT lifecycle.task_complete(%s, %s, %s::jsonb) AS s", (task, token, output())
        ).fetchone()
    assert status is not None
    assert status["s"] == "refused_bad_output"  # a status code; the reason is in the task and the event
    # the task failed with bad_output (the waiting stage op retries or fails the stage at once);
    # the stage is not completed, nothing else moved, one task_result_refused event says why
    t = _task(shared, task)
    assert t["error_message"].startswith(f"task {task} (stage a): ") and fragment in t["error_message"]
    assert (t["status"], t["error_code"], t["retryable"], t["output_data"]) == ("failed", "bad_output", True, None)
    assert rows(
        shared, "SELECT status, output_data FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
    ) == [{"status": "in_progress", "output_data": None}]
    assert rows(shared, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "in_progress"}]
    assert counts(shared) == {**before, "workflow_events": before["workflow_events"] + 1}
    [refused] = [m for k, _, m in events(shared, eid) if k == "task_result_refused"]
    assert refused["error_code"] == "bad_output" and fragment in refused["reason"]


@pytest.mark.parametrize(
    ("case", "output", "error", "fragment"),
    [
        ("nul", {"summary": "a\0b"}, psycopg.errors.UntranslatableCharacter, "\\u0000 cannot be converted to text"),
        ("lone_surrogate", {"summary": "\ud800"}, psycopg.errors.InvalidTextRepresentation, "surrogate"),
        ("nan", {"score": float("nan")}, psycopg.errors.InvalidTextRepresentation, 'Token "NaN" is invalid'),
    ],
)
def test_a_queue_worker_output_jsonb_cannot_hold_changes_nothing(
    shared: str, case: str, output: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    _, task, token = _queue_task(shared)
    before, state = counts(shared), _task(shared, task)
    with connect(shared) as conn, pytest.raises(error) as err:
        conn.execute("SELECT lifecycle.task_complete(%s, %s, %s)", (task, token, Jsonb(output)))
    assert fragment in str(err.value)
    assert counts(shared) == before and _task(shared, task) == state  # still the worker's to fail or complete


@pytest.mark.parametrize("lease", [float("nan"), 0.0, -30.0, float("inf"), 1e12])
def test_bad_leases_are_refused_naming_the_argument(shared: str, lease: float) -> None:
    _, task, token = _queue_task(shared)
    before, state = counts(shared), _task(shared, task)
    with connect(shared) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as beat:
            conn.execute("SELECT lifecycle.task_heartbeat(%s, %s, %s)", (task, token, lease))
        assert "lifecycle.task_heartbeat: p_lease_s must be a number of seconds in (0, 31536000]" in str(beat.value)
        with pytest.raises(psycopg.errors.InvalidParameterValue) as claim:
            conn.execute("SELECT * FROM lifecycle.task_claim('w2', 'nobody', 1, %s)", (lease,))
        assert "lifecycle.task_claim: p_limit must be >= 1 and p_lease_s a number of seconds" in str(claim.value)
    assert counts(shared) == before and _task(shared, task) == state


@pytest.mark.parametrize(
    ("hint", "stored"),
    [(float("nan"), None), (-5.0, None), (float("inf"), 31536000.0), (1e300, 31536000.0), (2.5, 2.5), (0.0, 0.0)],
)
def test_a_workers_retry_hint_is_normalised(shared: str, hint: float, stored: float | None) -> None:
    _, task, token = _queue_task(shared)
    with connect(shared) as conn:
        status = conn.execute(
            "SELECT lifecycle.task_fail(%s, %s, 'busy', 'overloaded', true, %s) AS s", (task, token, hint)
        ).fetchone()
    assert status == {"s": "failed"}
    assert _task(shared, task)["retry_after_s"] == stored


def test_a_queue_agents_bad_output_fails_the_waiting_stage_at_once(db: str, instance: Any) -> None:
    """End to end: the stage op waits for its queue task; a worker (any language: plain SQL) hands
    in an output nested 10k levels deep. The stage fails with bad_output in moments: before, the
    completion raised in the worker's call and the stage op waited for the lease to expire."""
    wf = _workflow(db, bad_kind="queue", timeout_s=60)
    done = threading.Event()
    answers: list[str] = []

    def worker() -> None:
        with connect(db) as conn:
            while not done.is_set():
                claimed = conn.execute(
                    "SELECT * FROM lifecycle.task_claim('sql-worker', %s, 1, 300)", (wf.bad,)
                ).fetchone()
                if claimed is None:
                    time.sleep(0.05)
                    continue
                answer = conn.execute(
                    "SELECT lifecycle.task_complete(%s, %s, %s::jsonb) AS s",
                    (claimed["task_id"], claimed["lease_token"], deep_text(10_000)),
                ).fetchone()
                answers.append(str(answer["s"]) if answer else "")
                return

    thread = threading.Thread(target=worker)
    thread.start()
    t0 = time.monotonic()
    try:
        outcome, eid = run(db, instance, wf.name, AgentRegistry([Echo(wf.good, lambda t: {"summary": "ok"})]))
    finally:
        done.set()
        thread.join(30)
    assert time.monotonic() - t0 < 30  # not the lease (300 s) nor the stage timeout (60 s)
    assert not outcome.success
    assert answers == ["refused_bad_output"]
    _assert_failed_cleanly(db, eid, "output is nested more than 100 levels deep")


@pytest.mark.parametrize(
    ("door", "statement"),
    [
        ("lifecycle.stage_start", "SELECT * FROM lifecycle.stage_start(%(e)s, 'nope', %(c)s)"),
        (
            "a stage log",
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%(e)s, 'nope', 'pending')",
        ),
        (
            "a task (the runbook's section 7)",
            "INSERT INTO task_queue (workflow_execution_id, task_type) VALUES (%(e)s, 'nope')",
        ),
        ("current_stage", "UPDATE workflow_executions SET current_stage = 'nope' WHERE id = %(e)s"),
    ],
)
def test_an_unknown_stage_id_is_refused_at_every_door(shared: str, door: str, statement: str) -> None:
    wf = _workflow(shared)
    with connect(shared) as conn:
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'in_progress') RETURNING id",
            (wf.definition_id,),
        ).fetchone()
        assert e is not None
        with no_new_rows(shared), pytest.raises(psycopg.errors.CheckViolation) as err:
            conn.execute(statement, {"e": e["id"], "c": wf.work})
    assert f"stage nope is not a stage of the DAG that execution {e['id']} runs" in str(err.value), door
    assert rows(shared, "SELECT current_stage FROM workflow_executions WHERE id = %(e)s", e=e["id"]) == [
        {"current_stage": None}
    ]


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("", psycopg.errors.CheckViolation, "agents_name_not_blank"),
        ("   ", psycopg.errors.CheckViolation, "agents_name_not_blank"),
        ("Agent\0X", psycopg.DataError, "NUL"),
    ],
)
def test_a_bad_agent_name_is_refused(shared: str, name: str, error: type[Exception], fragment: str) -> None:
    before = rows(shared, "SELECT count(*) AS n FROM agents")
    with connect(shared) as conn, pytest.raises(error) as err:
        conn.execute("INSERT INTO agents (name) VALUES (%s)", (name,))
    assert fragment in str(err.value)
    assert rows(shared, "SELECT count(*) AS n FROM agents") == before


# =============================================================================================
# Retry settings beyond the DAG: retry_delay (Python and SQL), retry_stage
# =============================================================================================

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((0, 1.0, 10.0, 2.0, "full", 0.5), "attempt must be >= 1, got 0"),
        ((-1, 1.0, 10.0, 2.0, "full", 0.5), "attempt must be >= 1, got -1"),
        ((1, NAN, 10.0, 2.0, "full", 0.5), "delays must be finite and >= 0"),
        ((1, -1.0, 10.0, 2.0, "full", 0.5), "delays must be finite and >= 0"),
        ((1, 1.0, INF, 2.0, "full", 0.5), "delays must be finite and >= 0"),
        ((1, 1.0, 10.0, 0.5, "full", 0.5), "multiplier must be"),
        ((1, 1.0, 10.0, NAN, "full", 0.5), "multiplier must be"),
        ((1, 1.0, 10.0, INF, "full", 0.5), "multiplier must be"),
        ((1, 1.0, 10.0, 2.0, "sometimes", 0.5), "jitter must be one of none, full, equal; got"),
        ((1, 1.0, 10.0, 2.0, "full", 1.0), "u must be in [0, 1)"),
        ((1, 1.0, 10.0, 2.0, "full", NAN), "u must be in [0, 1)"),
    ],
)
def test_bad_retry_delay_arguments_are_refused_alike_in_python_and_sql(
    shared: str, args: tuple[Any, ...], fragment: str
) -> None:
    with pytest.raises(ValueError) as py:
        retry_delay(*args)
    assert fragment in str(py.value)
    with (
        psycopg.connect(shared, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidParameterValue) as db_err,
    ):
        conn.execute("SELECT lifecycle.retry_delay(%s, %s, %s, %s, %s, %s)", args)
    assert fragment in str(db_err.value)


@pytest.mark.parametrize(
    "args",
    [
        (2**31 - 1, 1.0, 60.0, 2.0, "none", 0.0),
        (1000, 1e-300, 1e308, 1e308, "equal", 0.999),
        (3, 1e300, 1e308, 1.0000001, "full", 0.5),
        (50, 0.0, 0.0, 1.0, "none", 0.0),
    ],
)
def test_huge_and_tiny_retry_settings_give_the_same_finite_delay(shared: str, args: tuple[Any, ...]) -> None:
    python = retry_delay(*args)
    with psycopg.connect(shared, autocommit=True) as conn:
        row = conn.execute("SELECT lifecycle.retry_delay(%s, %s, %s, %s, %s, %s)", args).fetchone()
    assert row is not None and row[0] == python
    assert 0.0 <= python <= args[2]


@pytest.mark.parametrize("max_attempts", [0, -1, None])
def test_retry_stage_refuses_a_bad_max_attempts(shared: str, max_attempts: int | None) -> None:
    eid, _, _ = _queue_task(shared)
    [log] = rows(shared, "SELECT id FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
    before = counts(shared)
    with connect(shared) as conn, pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        conn.execute("SELECT retry_stage(%s, %s)", (log["id"], max_attempts))
    assert "retry_stage: p_max_attempts must be >= 1" in str(err.value)
    assert counts(shared) == before


# =============================================================================================
# Property: random mutations of valid documents, through both validators
# =============================================================================================

BAD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    0.5,
    2.5,
    3.0,
    1000,
    1001,
    1e308,
    10**30,
    "",
    "x",
    "full",
    "a" * 63,
    "a" * 64,
    "étape",
    "🚀",
    "Discover",
    "a\n",
    [],
    {},
    ["zz"],
    ["a", "a"],
    {"nested": [[[[]]]]},
]
STAGE_KEYS = ["id", "capability", "next", "description", "retry", "timeout_s", "compensate", "extra"]
RETRY_KEYS = ["max_attempts", "base_delay_s", "max_delay_s", "multiplier", "jitter", "non_retryable", "oops"]


def _bases() -> list[dict[str, Any]]:
    cases = json.loads((TESTS / "dag_cases.json").read_text(encoding="utf-8"))
    fixture = json.loads((TESTS / "fixtures" / "lifecycle_v1.json").read_text(encoding="utf-8"))
    return [fixture["dag_schema"], *(c["dag"] for c in cases if c["valid"])]


def _mutate(doc: dict[str, Any], rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    stages = doc.get("stages") if isinstance(doc.get("stages"), list) else []
    ids = [s.get("id") for s in stages if isinstance(s, dict)] or ["a"]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        stage = rng.choice(stages) if stages and rng.random() < 0.95 else None
        if op == 0 and isinstance(stage, dict):
            stage[rng.choice(STAGE_KEYS)] = copy.deepcopy(rng.choice(BAD_VALUES))
        elif op == 1 and isinstance(stage, dict):
            retry = stage.setdefault("retry", {})
            if isinstance(retry, dict):
                retry[rng.choice(RETRY_KEYS)] = copy.deepcopy(rng.choice(BAD_VALUES))
        elif op == 2 and isinstance(stage, dict) and stage:
            del stage[rng.choice(list(stage))]
        elif op == 3 and stages:
            stages.append(copy.deepcopy(rng.choice(stages)))  # a duplicate id
        elif op == 4 and stages:
            stages.pop(rng.randrange(len(stages)))
        elif op == 5 and isinstance(doc.setdefault("edges", []), list):
            doc["edges"].append({"from": rng.choice(ids), "to": rng.choice([*ids, "zz", 7])})
        elif op == 6 and len(ids) >= 2 and isinstance(stage, dict):
            stage.setdefault("next", []).append(ids[0])  # often a cycle back to the first stage
        elif op == 7:
            doc["stages"] = copy.deepcopy(rng.choice([[], "stages", None, {}, [7]]))
        elif op == 8:
            doc[rng.choice(["on_failure", "defaults", "context", "extra"])] = copy.deepcopy(rng.choice(BAD_VALUES))
        elif op == 9:
            doc["defaults"] = {
                "retry": {rng.choice(RETRY_KEYS): copy.deepcopy(rng.choice(BAD_VALUES))},
                "timeout_s": rng.choice(BAD_VALUES),
            }
        elif op == 10 and isinstance(stage, dict):
            stage["id"] = rng.choice(["a" * 63, "a" * 64, "é", "🚀", "Stage", "s_1", "x"])
        elif op == 11:
            doc["edges"] = copy.deepcopy(rng.choice([{}, "e", [{"from": ids[0]}], [{"from": ids[0], "to": ids[0]}]]))
    return json.loads(json.dumps(doc))


def _sql_problems(conn: psycopg.Connection[Any], dag: Any) -> list[tuple[str, tuple[str, ...], str, str]]:
    return [
        (r[0], tuple(sorted(r[1])), r[2], r[3])
        for r in conn.execute(
            "SELECT code, stages, path, message FROM lifecycle.dag_validate(%s)", (Jsonb(dag),)
        ).fetchall()
    ]


def test_random_mutations_python_and_sql_agree_and_valid_means_buildable(shared: str) -> None:
    rng = random.Random(8)
    bases = _bases()
    docs = [_mutate(rng.choice(bases), rng) for _ in range(300)]
    # the limits, exactly at and just past them
    docs += [
        {"stages": _chain(MAX_STAGES)},
        {"stages": _chain(MAX_STAGES + 1)},
        {"stages": [*_chain(MAX_STAGES), "junk"]},
        {"stages": _chain(2), "edges": [{"from": "s0", "to": "s1"}] * (MAX_EDGES - 1)},
        {"stages": _chain(2), "edges": [{"from": "s0", "to": "s1"}] * MAX_EDGES},
        {"stages": _chain(MAX_STAGES + 1), "edges": [{}] * MAX_EDGES},
    ]
    valid = 0
    with psycopg.connect(shared, autocommit=True) as conn:
        for dag in docs:
            python = [(p.code, tuple(sorted(p.stages)), p.path, p.message) for p in validate_dag(dag)]
            assert Counter(_sql_problems(conn, dag)) == Counter(python), json.dumps(dag)[:2000]
            if not python:
                valid += 1
                row = {"id": "x", "name": "wf", "version": 1, "description": None, "dag_schema": dag}
                build_job(row)  # valid means buildable: never a Dagster error
                build_compensation_job(row)
    assert 10 <= valid < len(docs)  # both sides of the line were exercised
