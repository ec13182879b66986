"""Traces (OpenTelemetry) through real runs, recorded with the SDK's in-memory exporter: one trace
per execution (its root stored on the execution row and carried by its tasks), a span per stage
attempt, per agent call and per undo with their attributes, and the ``traceparent`` an http agent
receives."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from psycopg.types.json import Jsonb

from lifecycle_dagster import tracing
from lifecycle_dagster.agents import (
    AgentBadRequest,
    AgentOverloaded,
    AgentRegistry,
    CompensationTask,
    Task,
    default_registry,
)
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_compensation_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import install, rows, run, send_json

REPO = Path(__file__).resolve().parents[2]
ACME = json.loads((REPO / "examples/acme.json").read_text())
FAST = {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.02, "jitter": "none"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this test, kept in memory (an SDK provider given to lifecycle_dagster.tracing)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


def _named(spans: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def _root(db: str, eid: str, spans: InMemorySpanExporter) -> ReadableSpan:
    """The execution's one root span, checked against the traceparent stored on its row."""
    [root] = _named(spans, "execution ")
    assert root.parent is None and root.context is not None
    [row] = rows(db, "SELECT trace_parent FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert row["trace_parent"] == _traceparent(root)
    return root


def _traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent naming ``span``."""
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{int(span.context.trace_flags):02x}"


def _parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def test_one_trace_per_execution_a_span_per_stage_and_agent_call(
    seeded_db: str, instance: Any, spans: InMemorySpanExporter
) -> None:
    result, eid = run(seeded_db, instance, "lifecycle_v1", default_registry(), ACME)
    assert result.success
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished if s.context is not None}) == 1
    root = _root(seeded_db, eid, spans)
    assert root.name == "execution lifecycle_v1"
    assert dict(root.attributes or {}) == {
        "lifecycle.execution_id": eid,
        "lifecycle.workflow": "lifecycle_v1",
        "lifecycle.version": 1,
        "dagster.run_id": result.run_id,
    }
    stages = {s.name.removeprefix("stage "): s for s in _named(spans, "stage ")}
    assert len(stages) == len(_named(spans, "stage "))  # one attempt each
    logs = rows(seeded_db, query("stage_logs"), execution_id=eid)
    assert sorted(stages) == sorted(r["stage_id"] for r in logs)
    agents = {_parent_id(s): s for s in _named(spans, "agent ")}
    assert len(agents) == len(stages)  # one agent call under each stage span
    for stage_id, span in stages.items():
        attributes = dict(span.attributes or {})
        assert _parent_id(span) == _span_id(root)
        assert {k: attributes[k] for k in ("lifecycle.execution_id", "lifecycle.workflow", "lifecycle.version")} == {
            "lifecycle.execution_id": eid,
            "lifecycle.workflow": "lifecycle_v1",
            "lifecycle.version": 1,
        }
        assert attributes["lifecycle.stage"] == stage_id and attributes["lifecycle.attempt"] == 1
        assert attributes["lifecycle.outcome"] == "completed" and "lifecycle.error_code" not in attributes
        assert attributes["dagster.run_id"] == result.run_id
        assert isinstance(attributes["lifecycle.capability"], str) and attributes["lifecycle.capability"]
        agent = agents[_span_id(span)]
        assert agent.name == f"agent {attributes['lifecycle.agent']}"
        assert dict(agent.attributes or {})["lifecycle.outcome"] == "completed"
    # the tasks carry the execution's trace to a worker
    [row] = rows(seeded_db, "SELECT trace_parent FROM workflow_executions WHERE id = %(e)s", e=eid)
    tasks = rows(seeded_db, "SELECT trace_parent FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid)
    assert len(tasks) == len(stages) and {t["trace_parent"] for t in tasks} == {row["trace_parent"]}


class Flaky:
    """Overloaded on its first call, then answers."""

    name = "worker"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, task: Task) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise AgentOverloaded("busy")
        return {"summary": "worked"}


class Undoable:
    """Answers; its undo voids nothing and says so."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": f"{task.stage_id} done"}

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        return {"summary": f"undid {task.stage_id}", "void": []}


class Refuses:
    """Fails for good (a bad request: not retried)."""

    name = "worker"

    def run(self, task: Task) -> dict[str, Any]:
        raise AgentBadRequest("refused")


def _two_stages(db: str) -> None:
    install(
        db,
        "wf",
        {
            "stages": [{"id": "prep", "capability": "prep", "next": ["work"]}, {"id": "work", "capability": "work"}],
            "defaults": {"retry": FAST},
        },
        {"prep": "preparer", "work": "worker"},
    )


def test_a_retried_stage_gives_two_attempt_spans_in_the_trace(
    db: str, instance: Any, spans: InMemorySpanExporter
) -> None:
    _two_stages(db)
    result, eid = run(db, instance, "wf", AgentRegistry([Undoable("preparer"), Flaky()]))
    assert result.success
    root = _root(db, eid, spans)
    work = sorted((s for s in _named(spans, "stage work")), key=lambda s: dict(s.attributes or {})["lifecycle.attempt"])
    assert [dict(s.attributes or {})["lifecycle.attempt"] for s in work] == [1, 2]
    assert [dict(s.attributes or {})["lifecycle.outcome"] for s in work] == ["retrying", "completed"]
    assert dict(work[0].attributes or {})["lifecycle.error_code"] == "overloaded"
    assert [s.status.status_code for s in work] == [StatusCode.ERROR, StatusCode.UNSET]
    assert {_parent_id(s) for s in work} == {_span_id(root)}
    calls = [s for s in _named(spans, "agent worker")]
    assert sorted(_parent_id(s) for s in calls) == sorted(_span_id(s) for s in work)
    assert sorted(dict(s.attributes or {})["lifecycle.outcome"] for s in calls) == ["completed", "failed"]


def test_a_compensation_run_continues_the_execution_trace(db: str, instance: Any, spans: InMemorySpanExporter) -> None:
    _two_stages(db)
    registry = AgentRegistry([Undoable("preparer"), Refuses()])
    forward, eid = run(db, instance, "wf", registry)
    assert not forward.success
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'test')", (eid,))
        row = conn.execute(query("active_definition_by_name"), {"name": "wf"}).fetchone()
    assert row is not None
    comp = build_compensation_job(dict(row)).execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )
    assert comp.success and comp.run_id != forward.run_id
    root = _root(db, eid, spans)  # still one root: the compensation run read it from the row
    [undo] = _named(spans, "undo ")  # 'work' never completed: nothing to undo there
    attributes = dict(undo.attributes or {})
    assert undo.name == "undo prep" and undo.context is not None and root.context is not None
    assert undo.context.trace_id == root.context.trace_id and _parent_id(undo) == _span_id(root)
    assert attributes["dagster.run_id"] == comp.run_id and attributes["lifecycle.outcome"] == "compensated"
    assert attributes["lifecycle.execution_id"] == eid and attributes["lifecycle.agent"] == "preparer"
    [call] = [s for s in _named(spans, "agent ") if _parent_id(s) == _span_id(undo)]
    assert call.name == "agent preparer"
    [failed] = _named(spans, "stage work")
    assert dict(failed.attributes or {})["lifecycle.outcome"] == "failed"
    assert dict(failed.attributes or {})["lifecycle.error_code"] == "bad_request"


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.traceparents.append(self.headers.get("traceparent"))  # type: ignore[attr-defined]
        send_json(self, 200, json.dumps({"summary": "done over http"}).encode())

    def log_message(self, *args: Any) -> None:
        pass


def test_an_http_agent_receives_the_traceparent_of_its_call(
    db: str, instance: Any, spans: InMemorySpanExporter
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.traceparents = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        install(db, "wf", {"stages": [{"id": "a", "capability": "remote"}]}, {"remote": "Remote"})
        with connect(db) as conn:
            conn.execute(
                "UPDATE agents SET kind = 'http', config = %s WHERE name = 'Remote'",
                (Jsonb({"url": f"http://127.0.0.1:{server.server_address[1]}/task"}),),
            )
        result, eid = run(db, instance, "wf", AgentRegistry())
    finally:
        server.shutdown()
    assert result.success
    root = _root(db, eid, spans)
    [call] = _named(spans, "agent Remote")
    assert call.context is not None and root.context is not None
    assert call.context.trace_id == root.context.trace_id
    assert server.traceparents == [_traceparent(call)]  # type: ignore[attr-defined]
