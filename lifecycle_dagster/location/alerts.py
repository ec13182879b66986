"""``lifecycle_alert_sensor``: POSTs the alert outbox (``lifecycle.alerts``) to
``LIFECYCLE_DAGSTER_ALERT_URL``.

Alerts are recorded by the database in the transaction of the event that causes them (a breaker
opened, a compensation failed, an execution failed: the trigger ``workflow_events_alert``), or by
``lifecycle.alerts_scan``, which this sensor calls first on each tick (a queue whose oldest pending
task waited ``LIFECYCLE_DAGSTER_ALERT_QUEUE_AGE_S`` seconds). Each event has one alert, by its
unique key. A tick then claims the due unsent alerts one at a time (a lease of :data:`LEASE_S`
seconds: another sensor skips it, a sender that died leaves it due again when the lease ends),
POSTs each as JSON (:data:`POST_TIMEOUT_S`), and records it sent (a 2xx answer) or failed, due
again after a capped exponential backoff (:func:`backoff_s`). A failing alert waits for its own
backoff and never holds back the others.

Delivery is at least once, deduplicated by key: the alert is recorded sent only after the receiver
answered, so a crash between the answer and the record sends it once more; the payload carries the
key as ``dedup_key`` (and the header ``Idempotency-Key``) for receivers that drop repeats.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg
import httpx

from lifecycle_dagster.core.retry import retry_delay
from lifecycle_dagster.location.sensors import sensor_interval_s
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import Connection, connect, resolve_dsn
from lifecycle_dagster.store.transitions import ClaimedAlert, alert_failed, alert_sent, alerts_claim, alerts_scan

#: seconds a POST may take
POST_TIMEOUT_S = 10.0
#: seconds a claimed alert is held by its sender (longer than a POST may take)
LEASE_S = 60.0
#: alerts sent per tick at most, and the seconds a tick spends sending (a sensor tick must end well
#: within Dagster's 60 s gRPC timeout); the rest wait for the next tick
TICK_BATCH = 50
TICK_BUDGET_S = 30.0
#: backoff after failed attempt n: min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1)), equal jitter
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 900.0

log = logging.getLogger(__name__)


def backoff_s(attempts: int, u: float) -> float:
    """Seconds until an alert that failed its ``attempts``-th try is due again (``u`` in [0, 1)):
    10 s, 20 s, 40 s ... capped at 15 min, each between half and all of that (equal jitter)."""
    return retry_delay(max(attempts, 1), BACKOFF_BASE_S, BACKOFF_MAX_S, 2.0, "equal", u)


@dataclass
class AlertTick:
    """What one tick did: ``recorded`` queue alerts, the keys ``sent``, and ``failed`` as
    ``{key: error}``."""

    recorded: int = 0
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def post_alert(client: httpx.Client, url: str, alert: ClaimedAlert) -> str | None:
    """POST ``alert.payload`` as JSON to ``url``; None when the receiver answered 2xx, else the error
    in words (status and the start of the body, or the transport error)."""
    try:
        response = client.post(url, json=alert.payload, headers={"Idempotency-Key": alert.key})
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.is_success:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


def send_alerts(
    dsn: str,
    url: str,
    *,
    queue_age_s: float,
    now: Callable[[], datetime] | None = None,
    transport: httpx.BaseTransport | None = None,
    u: Callable[[], float] = random.random,
) -> AlertTick:
    """One tick (see the module docstring). ``now`` gives the clock (default: the real one; tests
    pass their own), ``transport`` the HTTP transport (default: the network).

    Raises:
        psycopg.Error: the database could not be reached (nothing was sent this tick).
        ValueError: ``queue_age_s`` is not a number > 0.
    """
    clock = now or (lambda: datetime.now(UTC))
    tick = AlertTick()
    deadline = time.monotonic() + TICK_BUDGET_S
    with connect(dsn) as conn, httpx.Client(timeout=POST_TIMEOUT_S, transport=transport) as client:
        tick.recorded = alerts_scan(conn, threshold_s=queue_age_s, now=clock())
        while len(tick.sent) + len(tick.failed) < TICK_BATCH and time.monotonic() < deadline:
            claimed = alerts_claim(conn, limit=1, lease_s=LEASE_S, now=clock())
            if not claimed:
                break
            _send_one(conn, client, url, claimed[0], tick, clock, u)
    return tick


def _send_one(
    conn: Connection,
    client: httpx.Client,
    url: str,
    alert: ClaimedAlert,
    tick: AlertTick,
    clock: Callable[[], datetime],
    u: Callable[[], float],
) -> None:
    """POST one claimed alert and record the outcome in ``tick`` and the database."""
    error = post_alert(client, url, alert)
    if error is None:
        alert_sent(conn, alert_id=alert.id, now=clock())
        tick.sent.append(alert.key)
        return
    delay = backoff_s(alert.attempts, u())
    alert_failed(conn, alert_id=alert.id, error=error, delay_s=delay, now=clock())
    tick.failed[alert.key] = error
    log.warning("alert %s: attempt %d failed (%s); again in %.0f s", alert.key, alert.attempts, error, delay)


def alert_sensor(url: str) -> dg.SensorDefinition:
    """The alert sensor POSTing to ``url`` (every 10 s at least; ``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S``
    overrides it)."""

    @dg.sensor(
        name="lifecycle_alert_sensor",
        minimum_interval_seconds=sensor_interval_s(10),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="POSTs alerts (breaker opened, compensation failed, execution failed, queue backing up).",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        tick = send_alerts(resolve_dsn(), url, queue_age_s=Settings.from_env().alert_queue_age_s)
        for key, error in tick.failed.items():
            context.log.warning(f"alert {key}: not delivered ({error}); retried after a backoff")
        return dg.SkipReason(
            f"{len(tick.sent)} alert(s) sent, {len(tick.failed)} failed, {tick.recorded} queue alert(s) recorded"
        )

    return _sensor
