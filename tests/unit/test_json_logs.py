"""The JSON log format (lifecycle_dagster.core.logs): one object per line, the call's fields, the
current OpenTelemetry span's trace id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from lifecycle_dagster.core.logs import configure


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    log = configure("json", logger="lifecycle_dagster.test_logs", stream=out)
    yield out
    for h in list(log.handlers):
        log.removeHandler(h)
    log.propagate = True


def test_a_line_is_one_json_object_with_the_fields_given(stream: io.StringIO) -> None:
    log = logging.getLogger("lifecycle_dagster.test_logs")
    fields = {"execution_id": "e1", "stage": "s", "attempt": 2, "task_id": "t1"}
    log.info("task %s: %s", "t1", "completed", extra=fields)
    log.warning("multi\nline", extra={"execution_id": None})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message", "execution_id", "stage", "attempt", "task_id")} == {
        "level": "INFO",
        "logger": "lifecycle_dagster.test_logs",
        "message": "task t1: completed",
        "execution_id": "e1",
        "stage": "s",
        "attempt": 2,
        "task_id": "t1",
    }
    assert first["ts"].endswith("+00:00") and "trace_id" not in first
    assert second["message"] == "multi\nline" and "execution_id" not in second


def test_the_current_span_gives_the_trace_id(stream: io.StringIO) -> None:
    from opentelemetry import trace

    ctx = trace.SpanContext(trace_id=0xABC, span_id=0x1, is_remote=False)
    with trace.use_span(trace.NonRecordingSpan(ctx)):
        logging.getLogger("lifecycle_dagster.test_logs").info("inside a span")
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["trace_id"] == f"{0xABC:032x}"


def test_configuring_twice_keeps_one_handler_and_a_bad_format_is_refused(stream: io.StringIO) -> None:
    log = configure("json", logger="lifecycle_dagster.test_logs", stream=stream)
    log.info("once")
    assert len(stream.getvalue().splitlines()) == 1
    with pytest.raises(ValueError, match="log format must be json or text, got 'xml'"):
        configure("xml")
