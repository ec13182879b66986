"""Tracing is configured only by the standard ``OTEL_*`` variables: which exporters they ask for, and
with none set the API's no-op tracer (the SDK not even imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle_dagster.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _settings(**otel: str) -> Settings:
    return Settings(database_url=None, data_dir=Path("/x"), dagster_home=Path("/x/h"), otel=otel)


@pytest.mark.parametrize(
    ("otel", "exporters"),
    [
        ({}, ()),
        ({"OTEL_SERVICE_NAME": "svc"}, ()),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": " Console , otlp,console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ("otlp",)),
        # the traces protocol wins over the general one
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ("otlp",),
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("console",)),
    ],
)
def test_the_exporters_the_otel_variables_ask_for(otel: dict[str, str], exporters: tuple[str, ...]) -> None:
    assert _settings(**otel).traces_exporters == exporters


@pytest.mark.parametrize(
    ("otel", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin': unknown exporter 'zipkin'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'"),
    ],
)
def test_a_bad_otel_setting_is_named(otel: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(**otel).traces_exporters  # noqa: B018


_PROBE = """
import logging, sys
logging.basicConfig()
from opentelemetry import trace
from lifecycle_dagster import tracing
with tracing.span("stage x", attributes={"lifecycle.stage": "x"}) as span:
    current = tracing.current_trace_parent()
print(tracing.configure(), type(trace.get_tracer_provider()).__name__, type(tracing.tracer()).__name__,
      span is trace.INVALID_SPAN, current, "opentelemetry.sdk" in sys.modules)
"""


def _probe(**otel: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(otel, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)


def test_with_no_otel_variable_the_tracer_is_the_no_op_one() -> None:
    done = _probe()
    assert done.stdout.split() == ["False", "ProxyTracerProvider", "ProxyTracer", "True", "None", "False"]


def test_a_bad_otel_setting_leaves_tracing_off_and_says_why() -> None:
    done = _probe(OTEL_TRACES_EXPORTER="zipkin")
    assert done.stdout.split() == ["False", "ProxyTracerProvider", "ProxyTracer", "True", "None", "False"]
    assert "traces are off: OTEL_TRACES_EXPORTER='zipkin': unknown exporter 'zipkin'" in done.stderr
