"""Every setting of the product, from the environment, in one object.

``DATABASE_URL``
    libpq URI of the orchestration database (e.g. a Supabase connection string). Every process
    that touches the database must see it (code server, daemon, run, step and Celery workers).
    Unset: the embedded PostgreSQL server of :mod:`lifecycle_dagster.store.embedded` is used, but
    only where that is safe (see ``LIFECYCLE_DAGSTER_EMBEDDED``); any other process stops with an
    error naming the variable instead of starting a private, empty server.
``LIFECYCLE_DAGSTER_EMBEDDED``
    ``1`` lets a process without ``DATABASE_URL`` start (or attach to) the embedded server. Without
    it, only the ``lifecycle-dagster`` command (which owns the server's lifetime and passes
    ``DATABASE_URL`` to the Dagster processes it starts) and a process whose stdin is a terminal
    may; ``0`` forbids it even there.
``LIFECYCLE_DAGSTER_DATA_DIR``
    folder for the embedded server's data and the default Dagster home
    (default: the user data dir, e.g. ``~/.local/share/lifecycle-dagster``).
``DAGSTER_HOME``
    Dagster's instance folder (default: ``<data dir>/dagster_home``).
``LIFECYCLE_DAGSTER_AGENTS``
    ``MODULE:FUNCTION`` returning the code location's agent registry (default: the five built-in).
``LIFECYCLE_DAGSTER_WEBSERVER_URL``
    a running Dagster webserver that ``publish --activate`` / ``activate`` ask to reload.
``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S``
    seconds between every sensor's ticks (integer >= 1; default: each sensor's own).
``LIFECYCLE_DAGSTER_HEARTBEAT_S``
    seconds between a running stage op's heartbeats (default 5).
``LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S``
    seconds without a heartbeat after which the reconciler fails an execution (default 120).
``LIFECYCLE_DAGSTER_QUEUE_WAIT_S``
    seconds a stage without a timeout waits for its queue task (default 3600).
``LIFECYCLE_DAGSTER_MAX_TASK_S``
    seconds an ``agent serve`` worker lets its agent run on one task at most, whatever the
    stage's timeout (default: ``LIFECYCLE_DAGSTER_QUEUE_WAIT_S``; ``--max-task-s`` overrides it).
``LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES``
    the largest stage output stored, in bytes (default 8 MiB).
``LIFECYCLE_DAGSTER_ALERT_URL``
    where ``lifecycle_alert_sensor`` POSTs alerts (JSON with a Slack-compatible ``text``, e.g. a
    Slack incoming webhook URL); unset: the code location has no alert sensor (alerts are still
    recorded in ``lifecycle.alerts``).
``LIFECYCLE_DAGSTER_ALERT_QUEUE_AGE_S``
    seconds a queue's oldest pending task may wait before a ``queue_stale`` alert (default 600).
``LIFECYCLE_DAGSTER_LOG_FORMAT``
    ``text`` (default) or ``json`` (one JSON object per line) for ``agent serve`` and the code
    location's own loggers (``lifecycle_dagster.*``); ``agent serve --log-format`` overrides it.
``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    OpenTelemetry traces (:mod:`lifecycle_dagster.tracing`), on only when one of them is set:
    ``OTEL_TRACES_EXPORTER`` is a comma-separated list of ``console`` (spans as JSON on stdout) and
    ``otlp`` (OTLP over HTTP/protobuf), or ``none``; an endpoint alone means ``otlp``.
    ``OTEL_SDK_DISABLED=true`` turns tracing off. The SDK reads the other standard variables itself
    (``OTEL_SERVICE_NAME``, default ``lifecycle-dagster``; ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``, ``..._TIMEOUT``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``);
    ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` may only be ``http/protobuf``.
``LIFECYCLE_DAGSTER_RETENTION``
    how long finished executions are kept: a duration of at least 1 hour (``90d``, ``12h``, ``2w``;
    default ``90d``), after which the code location's daily ``lifecycle_retention_schedule`` removes
    them (docs/retention.md); ``off``: no schedule (``lifecycle-dagster prune`` still works).
``LIFECYCLE_DAGSTER_BATCH``
    the batch of every definition whose DAG sets no ``batch`` key: ``N`` or ``N/S``, at most ``N``
    executions (an integer from 1 to 10000) per batch, waiting at most ``S`` seconds (a number from
    0 to 3600, default 5) for it to fill, e.g. ``500/2``; ``off`` or unset: no default (such a
    definition is not batched). A DAG's own ``batch`` object wins; ``"batch": null`` counts as
    no key (:attr:`lifecycle_dagster.core.dag.Dag.batch` is None for both).
``LIFECYCLE_DAGSTER_EXECUTOR``
    the Dagster executor of every generated job (forward and compensation): ``in_process`` (the
    default, UI launches included), ``multiprocess``, ``celery`` (dagster-celery: the ``[celery]``
    extra), ``k8s`` (``dagster_k8s.k8s_job_executor``: the ``[k8s]`` extra), or
    ``MODULE:ATTRIBUTE`` naming any ``ExecutorDefinition``. Read when jobs are built: every process
    that builds them (code server, daemon, run and step workers, Celery workers) must see the same
    value, like ``DATABASE_URL`` (see :mod:`lifecycle_dagster.location.executors`).
``LIFECYCLE_DAGSTER_CELERY_BROKER``
    the Celery broker URL (e.g. ``redis://host:6379/0``) of the ``celery`` executor and of the
    workers of :mod:`lifecycle_dagster.location.celery_app` (default: dagster-celery's,
    ``pyamqp://guest@$DAGSTER_CELERY_BROKER_HOST:5672//``).
``LIFECYCLE_DAGSTER_CELERY_BACKEND``
    the Celery result backend URL (default ``rpc://``).
``LIFECYCLE_DAGSTER_CELERY_CONFIG``
    a JSON object of further Celery settings for the executor and the workers alike, over ours
    (``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier`` 1), e.g.
    ``{"broker_transport_options": {"visibility_timeout": 7200}}``.

Each number is read when it is used and a bad value raises ``ValueError`` naming the variable,
so one bad setting stops only what needs it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import platformdirs

#: the database the embedded server holds the orchestration schema in
EMBEDDED_DATABASE = "lifecycle"
#: the schema Dagster's own tables live in, inside the orchestration database
DAGSTER_SCHEMA = "dagster"
#: the largest stage output stored, in bytes (the database's own limit is the same by default)
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024
#: how long a stage with no timeout waits for its queue task, in seconds
DEFAULT_QUEUE_WAIT_S = 3600.0
#: how long a queue's oldest pending task may wait before an alert, in seconds
DEFAULT_ALERT_QUEUE_AGE_S = 600.0
#: how long finished executions are kept by default (``LIFECYCLE_DAGSTER_RETENTION``)
DEFAULT_RETENTION = timedelta(days=90)
#: the shortest retention horizon accepted (a younger finished execution may still be looked at)
MIN_RETENTION = timedelta(hours=1)
#: the log formats of ``LIFECYCLE_DAGSTER_LOG_FORMAT`` and ``agent serve --log-format``
LOG_FORMATS = ("text", "json")
#: the bounds of ``LIFECYCLE_DAGSTER_BATCH``: those of a DAG's ``batch`` (the same constants of
#: :mod:`lifecycle_dagster.core.dag_batch`; this lowest layer cannot import them, a test pins them)
BATCH_MAX_EXECUTIONS = 10000
BATCH_MAX_WAIT_S = 3600.0
#: the wait of ``LIFECYCLE_DAGSTER_BATCH=N`` (no ``/S``), in seconds
BATCH_DEFAULT_WAIT_S = 5.0


#: the units a duration may use, in seconds
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: the longest duration accepted, in days (100 years)
MAX_DURATION_DAYS = 36500

_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"90d"`` -> 90 days: a whole number (at most 9 digits) and one unit of :data:`DURATION_UNITS`
    (``s``, ``m``, ``h``, ``d``, ``w``), case-insensitive, at most :data:`MAX_DURATION_DAYS` days.

    Raises:
        ValueError: anything else (the message quotes the text and shows the form).
    """
    m = _DURATION.match(text.lower()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a duration: {text!r} (a whole number and a unit s, m, h, d or w, e.g. 90d, 12h, 30m)")
    seconds = int(m.group(1)) * DURATION_UNITS[m.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise ValueError(f"duration too long: {text!r} (at most {MAX_DURATION_DAYS}d)")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact form of ``value`` in the largest unit that divides it (``90d``, ``36h``)."""
    seconds = int(value.total_seconds())
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_BATCH = re.compile(r"^\s*([0-9]{1,9})\s*(?:/\s*([0-9]{1,9}(?:\.[0-9]{1,9})?|\.[0-9]{1,9})\s*)?$")


def parse_batch(text: str) -> tuple[int, float]:
    """``"500/2"`` -> ``(500, 2.0)``, ``"500"`` -> ``(500, 5.0)``: ``N`` or ``N/S``, at most ``N``
    executions per batch (an integer from 1 to :data:`BATCH_MAX_EXECUTIONS`) and at most ``S``
    seconds of wait (digits with an optional decimal point, from 0 to :data:`BATCH_MAX_WAIT_S`;
    default :data:`BATCH_DEFAULT_WAIT_S`), blanks around either ignored. The pair is a DAG's
    ``batch`` (``core.dag.Batch(*pair)``).

    Raises:
        ValueError: anything else (the message quotes the text and shows the form).
    """
    m = _BATCH.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"not a batch: {text!r} (N or N/S: at most N executions, waiting at most S seconds, e.g. 500/2)"
        )
    most = int(m.group(1))
    wait = float(m.group(2)) if m.group(2) is not None else BATCH_DEFAULT_WAIT_S
    if not 1 <= most <= BATCH_MAX_EXECUTIONS:
        raise ValueError(f"batch size out of range: {text!r} (N must be an integer from 1 to {BATCH_MAX_EXECUTIONS})")
    if not 0 <= wait <= BATCH_MAX_WAIT_S:
        raise ValueError(f"batch wait out of range: {text!r} (S must be a number from 0 to {BATCH_MAX_WAIT_S:g})")
    return most, wait


@dataclass(frozen=True)
class Settings:
    """Resolved configuration; see the module docstring for the variables."""

    database_url: str | None
    data_dir: Path
    dagster_home: Path
    #: True when DAGSTER_HOME was not set: the tool owns the home and rewrites its dagster.yaml
    dagster_home_managed: bool = True
    #: the raw ``LIFECYCLE_DAGSTER_*`` values, parsed by the properties below when used
    env: Mapping[str, str] = field(default_factory=dict)
    #: the raw ``OTEL_*`` values (OpenTelemetry's own variables; see :attr:`traces_exporters`)
    otel: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment (see the module docstring)."""
        data_dir = (
            Path(
                os.environ.get("LIFECYCLE_DAGSTER_DATA_DIR")
                or platformdirs.user_data_dir("lifecycle-dagster", appauthor=False)
            )
            .expanduser()
            .resolve()
        )
        home = os.environ.get("DAGSTER_HOME")
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=data_dir,
            dagster_home=Path(home).expanduser().resolve() if home else data_dir / "dagster_home",
            dagster_home_managed=not home,
            env={k: v for k, v in os.environ.items() if k.startswith("LIFECYCLE_DAGSTER_")},
            otel={k: v for k, v in os.environ.items() if k.startswith("OTEL_")},
        )

    def _text(self, name: str) -> str | None:
        return (self.env.get(f"LIFECYCLE_DAGSTER_{name}") or "").strip() or None

    def _number(self, name: str, default: float, *, integer: bool = False, minimum: float = 0.0) -> float:
        """``LIFECYCLE_DAGSTER_<name>`` as a finite number > ``minimum`` (>= for integers), else ``default``.

        Raises:
            ValueError: the value is not such a number (the message names the variable).
        """
        raw = self._text(name)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (value < minimum if integer else value <= minimum):
            kind = f"an integer >= {minimum:g}" if integer else f"a number > {minimum:g}"
            raise ValueError(f"LIFECYCLE_DAGSTER_{name} must be {kind}, got {raw!r}")
        return value

    @property
    def agents(self) -> str | None:
        """``LIFECYCLE_DAGSTER_AGENTS``: the registry reference, or None for the built-in agents."""
        return self._text("AGENTS")

    @property
    def webserver_url(self) -> str | None:
        """``LIFECYCLE_DAGSTER_WEBSERVER_URL``, or None."""
        return self._text("WEBSERVER_URL")

    @property
    def sensor_interval_s(self) -> int | None:
        """``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S`` (an integer >= 1), or None for each sensor's own."""
        if self._text("SENSOR_INTERVAL_S") is None:
            return None
        return int(self._number("SENSOR_INTERVAL_S", 0, integer=True, minimum=1))

    @property
    def heartbeat_s(self) -> float:
        """``LIFECYCLE_DAGSTER_HEARTBEAT_S`` in seconds (default 5)."""
        return self._number("HEARTBEAT_S", 5.0)

    @property
    def heartbeat_timeout_s(self) -> float:
        """``LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S`` in seconds (default 120)."""
        return self._number("HEARTBEAT_TIMEOUT_S", 120.0)

    @property
    def queue_wait_s(self) -> float:
        """``LIFECYCLE_DAGSTER_QUEUE_WAIT_S`` in seconds (default 3600)."""
        return self._number("QUEUE_WAIT_S", DEFAULT_QUEUE_WAIT_S)

    @property
    def max_task_s(self) -> float:
        """``LIFECYCLE_DAGSTER_MAX_TASK_S`` in seconds (default: :attr:`queue_wait_s`, which no
        stage op without a timeout waits longer than)."""
        return self._number("MAX_TASK_S", self.queue_wait_s)

    @property
    def max_output_bytes(self) -> int:
        """``LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES`` (default 8 MiB)."""
        return int(self._number("MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES, integer=True, minimum=1))

    @property
    def alert_url(self) -> str | None:
        """``LIFECYCLE_DAGSTER_ALERT_URL``, or None (no alert sensor)."""
        return self._text("ALERT_URL")

    @property
    def alert_queue_age_s(self) -> float:
        """``LIFECYCLE_DAGSTER_ALERT_QUEUE_AGE_S`` in seconds (default 600)."""
        return self._number("ALERT_QUEUE_AGE_S", DEFAULT_ALERT_QUEUE_AGE_S)

    @property
    def log_format(self) -> str:
        """``LIFECYCLE_DAGSTER_LOG_FORMAT``: ``text`` (default) or ``json``.

        Raises:
            ValueError: another value (the message names the variable).
        """
        value = (self._text("LOG_FORMAT") or "text").lower()
        if value not in LOG_FORMATS:
            raise ValueError(f"LIFECYCLE_DAGSTER_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
        return value

    @property
    def traces_exporters(self) -> tuple[str, ...]:
        """The span exporters ``OTEL_*`` asks for, each ``console`` or ``otlp``; empty: tracing off.

        Raises:
            ValueError: ``OTEL_TRACES_EXPORTER`` names another exporter, or an OTLP protocol other
                than ``http/protobuf`` is asked for (the message names the variable).
        """
        text = {k: v.strip() for k, v in self.otel.items() if v.strip()}
        if text.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return ()
        listed = text.get("OTEL_TRACES_EXPORTER")
        if listed is not None:
            names = tuple(dict.fromkeys(n.strip().lower() for n in listed.split(",") if n.strip()))
            unknown = [n for n in names if n not in ("console", "otlp", "none")]
            if unknown:
                raise ValueError(
                    f"OTEL_TRACES_EXPORTER={listed!r}: unknown exporter {unknown[0]!r} (use console, otlp or none)"
                )
            names = tuple(n for n in names if n != "none")
        else:
            endpoint = text.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or text.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            names = ("otlp",) if endpoint else ()
        protocols = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        var = next((v for v in protocols if v in text), None)
        if "otlp" in names and var is not None and text[var] != "http/protobuf":
            raise ValueError(f"{var}={text[var]!r}: only http/protobuf is supported (OTLP over HTTP)")
        return names

    @property
    def executor(self) -> str:
        """``LIFECYCLE_DAGSTER_EXECUTOR`` (default ``in_process``), as written."""
        return self._text("EXECUTOR") or "in_process"

    @property
    def celery_broker(self) -> str | None:
        """``LIFECYCLE_DAGSTER_CELERY_BROKER``, or None for dagster-celery's default."""
        return self._text("CELERY_BROKER")

    @property
    def celery_backend(self) -> str | None:
        """``LIFECYCLE_DAGSTER_CELERY_BACKEND``, or None for dagster-celery's default (``rpc://``)."""
        return self._text("CELERY_BACKEND")

    @property
    def celery_config(self) -> dict[str, object]:
        """``LIFECYCLE_DAGSTER_CELERY_CONFIG`` decoded (default ``{}``).

        Raises:
            ValueError: not a JSON object (the message names the variable).
        """
        raw = self._text("CELERY_CONFIG")
        if raw is None:
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"LIFECYCLE_DAGSTER_CELERY_CONFIG must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"LIFECYCLE_DAGSTER_CELERY_CONFIG must be a JSON object, got {raw!r}")
        return value

    @property
    def retention(self) -> timedelta | None:
        """``LIFECYCLE_DAGSTER_RETENTION``: the horizon (default 90 days), or None for ``off``.

        Raises:
            ValueError: not ``off`` nor a duration of at least 1 hour (the message names the variable).
        """
        raw = self._text("RETENTION")
        if raw is None:
            return DEFAULT_RETENTION
        if raw.lower() == "off":
            return None
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            raise ValueError(f"LIFECYCLE_DAGSTER_RETENTION must be off or a duration such as 90d: {exc}") from None
        if value < MIN_RETENTION:
            raise ValueError(f"LIFECYCLE_DAGSTER_RETENTION must be at least 1h, got {raw!r}")
        return value

    @property
    def batch(self) -> tuple[int, float] | None:
        """``LIFECYCLE_DAGSTER_BATCH``: the default batch ``(max_executions, max_wait_s)`` of a
        definition whose DAG sets no ``batch`` key (:func:`parse_batch`), or None (unset, ``off``).

        Raises:
            ValueError: not ``off`` nor ``N`` or ``N/S`` in range (the message names the variable).
        """
        raw = self._text("BATCH")
        if raw is None or raw.lower() == "off":
            return None
        try:
            return parse_batch(raw)
        except ValueError as exc:
            raise ValueError(f"LIFECYCLE_DAGSTER_BATCH must be off, N or N/S such as 500/2: {exc}") from None

    @property
    def batch_concurrency(self) -> int:
        """``LIFECYCLE_DAGSTER_BATCH_CONCURRENCY``: at most this many calls of one agent a batch run's
        stage op makes at once (default 8; docs/batches.md)."""
        return int(self._number("BATCH_CONCURRENCY", 8, integer=True, minimum=1))

    @property
    def embedded_allowed(self) -> bool | None:
        """``LIFECYCLE_DAGSTER_EMBEDDED``: True (``1``), False (``0``), or None when unset (each
        process decides: see :func:`lifecycle_dagster.store.db.resolve_dsn`).

        Raises:
            ValueError: another value (the message names the variable).
        """
        raw = self._text("EMBEDDED")
        if raw is None:
            return None
        if raw not in ("0", "1"):
            raise ValueError(f"LIFECYCLE_DAGSTER_EMBEDDED must be 0 or 1, got {raw!r}")
        return raw == "1"

    @property
    def embedded(self) -> bool:
        """True when no ``DATABASE_URL`` is set and the embedded server is used."""
        return self.database_url is None

    @property
    def pgdata(self) -> Path:
        """The embedded server's data folder."""
        return self.data_dir / "pgdata"
