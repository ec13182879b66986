"""Traces leave the processes as configured by ``OTEL_*`` alone: ``lifecycle-dagster run`` with the
console exporter prints one trace with a span per stage; with OTLP/HTTP, a receiver written here
gets the run's spans and those of an ``agent serve`` worker in the same trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import connect

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ["discover", "qualify", "target_design", "value_realization", "integrity"]
pytestmark = pytest.mark.slow


def _env(dsn: str, home: Path, **otel: str) -> dict[str, str]:
    """The environment of a command of this checkout, with only the given ``OTEL_*`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "DATABASE_URL": dsn, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO), **otel}


def _run_acme(dsn: str, home: Path, **otel: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "lifecycle-dagster"), "run", "lifecycle_v1", "--context", "examples/acme.json"],
        cwd=REPO,
        env=_env(dsn, home, **otel),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed from a line ``{`` to a line ``}`` (the console exporter's spans)."""
    found: list[dict[str, Any]] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if line == "{":
            block = []
        if block is not None:
            block.append(line)
            if line == "}":
                found.append(json.loads("\n".join(block)))
                block = None
    return found


def test_run_with_the_console_exporter_prints_one_trace_with_a_span_per_stage(
    seeded_db: str, dagster_home: Path
) -> None:
    done = _run_acme(seeded_db, dagster_home, OTEL_TRACES_EXPORTER="console")
    assert "status: completed" in done.stdout
    spans = _json_objects(done.stdout)
    assert len({s["context"]["trace_id"] for s in spans}) == 1
    [root] = [s for s in spans if s["name"] == "execution lifecycle_v1"]
    assert root["parent_id"] is None
    stages = [s for s in spans if s["name"].startswith("stage ")]
    assert sorted(s["name"] for s in stages) == sorted(f"stage {s}" for s in STAGES)
    assert {s["parent_id"] for s in stages} == {root["context"]["span_id"]}
    assert {s["attributes"]["lifecycle.outcome"] for s in stages} == {"completed"}
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"lifecycle-dagster"}


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP (protobuf) trace receiver: POST /v1/traces."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.server.spans.append(  # type: ignore[attr-defined]
                        {
                            "service": resource["service.name"],
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.spans = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_run_and_its_queue_worker_send_one_trace_over_otlp_http(
    seeded_db: str, dagster_home: Path, collector: ThreadingHTTPServer, tmp_path: Path
) -> None:
    with connect(seeded_db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue', config = %s WHERE name = 'Design Agent'", (Jsonb({}),))
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    spans: list[dict[str, Any]] = collector.spans  # type: ignore[attr-defined]
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [str(BIN / "lifecycle-dagster"), "agent", "serve", "--agent", "Design Agent", "--poll-s", "0.2"],
            env=_env(seeded_db, dagster_home, OTEL_SERVICE_NAME="design-worker", **otel),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _run_acme(seeded_db, dagster_home, **otel)
            deadline = time.monotonic() + 30
            while not any(s["service"] == "design-worker" for s in spans) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
    assert len({s["trace_id"] for s in spans}) == 1, spans
    [root] = [s for s in spans if s["name"] == "execution lifecycle_v1"]
    assert root["parent"] == "" and root["service"] == "lifecycle-dagster"
    stages = {s["name"].removeprefix("stage "): s for s in spans if s["name"].startswith("stage ")}
    assert sorted(stages) == sorted(STAGES) and {s["parent"] for s in stages.values()} == {root["span_id"]}
    [served] = [s for s in spans if s["service"] == "design-worker"]
    assert served["name"] == "worker Design Agent" and served["parent"] == root["span_id"]
    assert served["attributes"]["lifecycle.stage"] == "target_design"
    for key in ("lifecycle.execution_id", "lifecycle.workflow", "lifecycle.version"):
        assert served["attributes"][key] == root["attributes"][key]
    assert served["attributes"]["lifecycle.outcome"] == "completed"
