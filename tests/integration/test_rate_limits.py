"""Rate limits (issue 19, docs/rate-limits.md) on a real Postgres: the token bucket under
contention from separate connections, claims that take only the tasks they have tokens for,
real `agent serve` workers and stage ops sharing one agent's limit, a stage that waits for a token
(not an attempt, not a failure, none of its timeout), config refused when written, and
`lifecycle-dagster limits`.

The bound checked: over every window [t_i, t_j] between two calls, the calls in it are at most
``per_s * (t_j - t_i) + burst`` (every window W, 1 s and the whole run included: the worst window
starts and ends at a call). With the bucket's own clock (``taken_at``) it holds exactly; with the
time an agent notes when it is called, a call may be noted a little after its token (a loaded
host), so those windows are allowed :data:`LATE_CALLS` more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb
from rate_agents import AGENT, Recording

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.cli.main import main
from lifecycle_dagster.core.retry import RetryPolicy
from lifecycle_dagster.engine import stage
from lifecycle_dagster.engine.stage import StageSpec, StageStopped, run_stage
from lifecycle_dagster.store.db import connect

from agents_for_tests import Ok
from helpers import events, install, rows

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
#: calls a window of agent-noted times may hold beyond the bound (noted up to ~100 ms late at 20/s)
LATE_CALLS = 2


def _excess(times: list[float], per_s: float, burst: float) -> float:
    """The most calls any window [t_i, t_j] holds beyond ``per_s * (t_j - t_i) + burst``."""
    times = sorted(times)
    worst = float("-inf")
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (per_s * (times[j] - start) + burst))
    return worst


def _install(db: str, *, kind: str = "python", **rate_limit: float) -> tuple[str, str]:
    """A one-stage workflow ``rl_wf`` (stage ``s``, capability ``rl``) served by ``RL Agent``
    with ``config.rate_limit`` (none when empty); returns (definition id, agent id)."""
    install(db, "rl_wf", {"stages": [{"id": "s", "capability": "rl"}]}, {"rl": AGENT})
    config = {"rate_limit": rate_limit} if rate_limit else {}
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = %s, config = %s WHERE name = %s", (kind, Jsonb(config), AGENT))
        d = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'rl_wf'").fetchone()
        a = conn.execute("SELECT id FROM agents WHERE name = %s", (AGENT,)).fetchone()
    assert d is not None and a is not None
    return str(d["id"]), str(a["id"])


def _backlog(db: str, definition_id: str, n: int) -> None:
    """``n`` pending tasks of stage ``s``, one per in-progress execution (as the runbook enqueues)."""
    with connect(db) as conn:
        for _ in range(n):
            e = conn.execute(
                "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
                " VALUES (%s, 'in_progress', '{}') RETURNING id",
                (definition_id,),
            ).fetchone()
            assert e is not None
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 's', 'pending')",
                (e["id"],),
            )
            conn.execute(
                "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, 's', %s)",
                (e["id"], Jsonb({"context": {}})),
            )


# -- (a) the bucket ------------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_refills_at_its_rate(db: str) -> None:
    def take(n: int, at: float) -> tuple[int, float]:
        with connect(db) as conn:
            row = conn.execute(
                "SELECT granted, wait_s FROM lifecycle.rate_take('agent:x', 2, 3, %s, %s)",
                (n, T0 + timedelta(seconds=at)),
            ).fetchone()
        assert row is not None
        return int(row["granted"]), round(float(row["wait_s"]), 6)

    assert take(5, 0) == (3, 0.5)  # the burst, then half a second until the next token
    assert take(1, 0.25) == (0, 0.25)  # half a token
    assert take(1, 0.1) == (0, 0.25)  # a clock that went back refills nothing
    assert take(5, 1.5) == (3, 0.5)  # 3 tokens after 1.5 s, never more than the burst
    assert take(0, 100) == (0, 0)  # a peek: full again
    [bucket] = rows(db, "SELECT tokens, taken, updated_at FROM lifecycle.rate_buckets WHERE key = 'agent:x'")
    assert bucket == {"tokens": 3.0, "taken": 6, "updated_at": T0 + timedelta(seconds=100)}
    with connect(db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue, match="per_s in"):
        conn.execute("SELECT * FROM lifecycle.rate_take('agent:x', 'NaN', 3)")


def test_rate_take_under_contention_stays_within_the_bound(db: str) -> None:
    """Six connections take tokens as fast as they can for 4 s (a barrier starts them together):
    every window holds at most r·W + b grants by the bucket's clock, and the total reaches 90% of
    the rate."""
    per_s, burst, takers, run_s = 20.0, 5.0, 6, 4.0
    barrier = threading.Barrier(takers)
    granted: list[datetime] = []
    lock = threading.Lock()

    def taker() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            barrier.wait()
            end = time.monotonic() + run_s
            while time.monotonic() < end:
                g, wait_s, at = conn.execute(
                    "SELECT granted, wait_s, taken_at FROM lifecycle.rate_take('agent:contended', %s, %s)",
                    (per_s, burst),
                ).fetchone() or (0, 0.01, None)
                if g:
                    with lock:
                        granted.append(at)
                else:
                    time.sleep(min(float(wait_s), 0.02))

    threads = [threading.Thread(target=taker) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [(at - granted[0]).total_seconds() for at in sorted(granted)]
    assert _excess(times, per_s, burst) <= 1e-9
    assert len(times) >= 0.9 * per_s * run_s
    [row] = rows(db, "SELECT taken FROM lifecycle.rate_buckets WHERE key = 'agent:contended'")
    assert row["taken"] == len(times)


# -- claims --------------------------------------------------------------------------------------


def test_a_claim_takes_only_the_tasks_it_has_tokens_for(db: str) -> None:
    definition_id, agent_id = _install(db, kind="queue", per_s=2, burst=3)
    _backlog(db, definition_id, 10)

    def claim(at: float) -> int:
        with connect(db) as conn:
            return len(
                conn.execute(
                    "SELECT * FROM lifecycle.task_claim('w', %s, 10, 30, %s)", (AGENT, T0 + timedelta(seconds=at))
                ).fetchall()
            )

    assert [claim(0), claim(0.4), claim(1.0)] == [3, 0, 2]
    with connect(db) as conn:
        wait = conn.execute("SELECT lifecycle.rate_wait(%s, %s) AS s", (AGENT, T0 + timedelta(seconds=1.25))).fetchone()
    assert wait is not None and round(wait["s"], 6) == 0.25
    # a capability limit too: both must give a token, and the agent's is given back when the
    # capability's refuses
    with connect(db) as conn:
        conn.execute("UPDATE agents SET config = %s WHERE id = %s", (Jsonb({"rate_limit": {"per_s": 100}}), agent_id))
        assert conn.execute("SELECT lifecycle.capability_limit_set('rl', 1, 1) AS s").fetchone() == {"s": "set"}
    assert claim(10) == 1
    [bucket] = rows(db, "SELECT taken FROM lifecycle.rate_buckets WHERE key = %(k)s", k=f"agent:{agent_id}")
    assert bucket["taken"] == 3 + 2 + 1


# -- (b) workers and stage ops on one limited agent ------------------------------------------------


def _serve(db: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": db, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    cli = str(Path(sys.executable).parent / "lifecycle-dagster")
    args = ["agent", "serve", "--agent", AGENT, "--registry", "rate_agents:registry", "--concurrency", "4"]
    return subprocess.Popen(
        [cli, *args, "--max-task-s", "0", "--poll-s", "1", "--grace-s", "5"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _ops(db: str, spec: StageSpec, stop: threading.Event, errors: list[BaseException]) -> None:
    """One stage op after another (each its own execution) until ``stop``."""
    registry = AgentRegistry([Recording("op")])
    try:
        with connect(db) as conn:
            while not stop.is_set():
                run_stage(conn, spec, run_id=str(uuid.uuid4()), attempt=1, registry=registry, context={})
    except BaseException as exc:
        errors.append(exc)


def test_workers_and_stage_ops_share_one_agent_limit(db: str) -> None:
    """Two `agent serve` processes (4 slots each) on a backlog of 300 tasks, joined once they call
    the agent by three threads running stage ops, all calling one agent limited to 20/s (burst 5),
    together for 6 s: no window holds more than the limit allows, and the calls reach 90% of it."""
    per_s, burst = 20.0, 5.0
    definition_id, _ = _install(db, per_s=per_s, burst=burst)
    with connect(db) as conn:
        conn.execute("CREATE TABLE rl_calls (at timestamptz DEFAULT clock_timestamp(), who text, execution_id uuid)")
    _backlog(db, definition_id, 300)
    spec = StageSpec(definition_id=definition_id, stage_id="s", capability="rl", policy=RetryPolicy(max_attempts=1))
    stop, errors = threading.Event(), []
    workers = [_serve(db) for _ in range(2)]
    ops = [threading.Thread(target=_ops, args=(db, spec, stop, errors)) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while not rows(db, "SELECT 1 FROM rl_calls LIMIT 1") and time.monotonic() < deadline:
            time.sleep(0.1)  # the workers are up (they import Dagster first): the ops join them
        for t in ops:
            t.start()
        time.sleep(6.0)
    finally:
        stop.set()
        for t in ops:
            t.join(30)
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(30)
    assert errors == []
    calls = rows(db, "SELECT extract(epoch FROM at)::float8 AS t, who FROM rl_calls ORDER BY at")
    times = [c["t"] - calls[0]["t"] for c in calls]
    by_worker = [c["t"] - calls[0]["t"] for c in calls if c["who"] != "op"]
    assert by_worker and len(by_worker) < len(times)  # both paths called the agent
    excess = _excess(times, per_s, burst)
    one_s = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    rate = (len(times) - burst) / times[-1]
    print(
        f"calls {len(times)} in {times[-1]:.2f} s ({len(by_worker)} by workers): {rate:.2f}/s; "
        f"busiest 1 s: {one_s}; worst window excess {excess:.2f}"
    )
    assert excess <= LATE_CALLS
    assert one_s <= per_s + burst + LATE_CALLS
    assert rate >= 0.9 * per_s
    # from the workers' first call on, with the backlog still large, they keep the rate too
    since = [u for u in times if u >= by_worker[0]]
    assert (len(since) - 1) / (times[-1] - by_worker[0]) >= 0.9 * per_s


# -- (c) waiting for a token ----------------------------------------------------------------------


def test_a_stage_waiting_for_a_token_is_not_an_attempt_and_uses_none_of_its_timeout(db: str) -> None:
    definition_id, agent_id = _install(db, per_s=0.5, burst=1)
    with connect(db) as conn:  # the one token is gone: the next is 2 s away
        conn.execute("SELECT * FROM lifecycle.rate_take(%s, 0.5, 1)", (f"agent:{agent_id}",))
    spec = StageSpec(definition_id=definition_id, stage_id="s", capability="rl", timeout_s=1.0)
    t0 = time.monotonic()
    with connect(db) as conn:
        done = run_stage(conn, spec, run_id="r1", attempt=1, registry=AgentRegistry([Ok(AGENT)]), context={})
    assert time.monotonic() - t0 >= 1.5
    assert (done.execution_status, done.attempt, done.output["attempt"]) == ("completed", 1, 1)
    kinds = [k for k, _, _ in events(db, done.execution_id)]
    assert kinds.count("stage_rate_limited") == 1 and "stage_retrying" not in kinds
    [limited] = [m for k, _, m in events(db, done.execution_id) if k == "stage_rate_limited"]
    assert (limited["agent"], limited["scope"], limited["attempt"]) == (AGENT, "agent", 1)
    assert 1.0 < limited["wait_s"] <= 2.0
    [log] = rows(db, "SELECT attempt_number, status FROM workflow_execution_logs WHERE stage_id = 's'")
    assert log == {"attempt_number": 1, "status": "completed"}


def test_a_stage_waiting_for_a_token_stops_when_its_execution_is_cancelled(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage, "RATE_SLEEP_MAX_S", 0.2)
    definition_id, agent_id = _install(db, per_s=0.01, burst=1)  # after the first call: 100 s to wait
    with connect(db) as conn:
        conn.execute("SELECT * FROM lifecycle.rate_take(%s, 0.01, 1)", (f"agent:{agent_id}",))
    spec = StageSpec(definition_id=definition_id, stage_id="s", capability="rl")

    def cancel_soon() -> None:
        time.sleep(1.0)
        with connect(db) as conn:
            conn.execute("SELECT lifecycle.execution_cancel(id, 'enough', false) FROM workflow_executions")

    threading.Thread(target=cancel_soon, daemon=True).start()
    t0 = time.monotonic()
    with connect(db) as conn, pytest.raises(StageStopped, match="refused_execution_stopped"):
        run_stage(conn, spec, run_id="r1", attempt=1, registry=AgentRegistry([Ok(AGENT)]), context={})
    assert time.monotonic() - t0 < 5.0


# -- (d) config checked when written ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_limit", "fragment"),
    [
        ({"per_s": 0}, "per_s: 0 is out of range"),
        ({"per_s": -1}, "per_s: -1 is out of range"),
        ({"per_s": "5"}, 'per_s must be a number, got "5"'),
        ({"per_s": 5, "burst": 0.5}, "burst: 0.5 is out of range"),
        ('{"per_s": 1e400}', "per_s: 1000000000000000000000000000000000000000 is out of range"),
        ({"burst": 5}, "per_s is required"),
        ({"per_s": 5, "per_min": 1}, "unknown key(s) per_min; known: per_s, burst"),
        (5, "must be a JSON object"),
    ],
)
def test_a_bad_rate_limit_is_refused_naming_the_agent_and_the_field(db: str, rate_limit: Any, fragment: str) -> None:
    _install(db)
    with connect(db) as conn, pytest.raises(psycopg.errors.CheckViolation) as refused:
        conn.execute(
            "UPDATE agents SET config = jsonb_build_object('rate_limit', %s::jsonb) WHERE name = %s",
            (rate_limit if isinstance(rate_limit, str) else json.dumps(rate_limit), AGENT),
        )
    assert str(refused.value).startswith(f"agent {AGENT}: config.rate_limit ")
    assert fragment in str(refused.value)


def test_good_rate_limits_are_taken_and_a_bad_capability_limit_is_refused(db: str) -> None:
    _install(db)
    with connect(db) as conn:
        for good in ({"per_s": 0.5}, {"per_s": 20, "burst": 5}, None):
            conn.execute("UPDATE agents SET config = %s WHERE name = %s", (Jsonb({"rate_limit": good}), AGENT))
        with pytest.raises(psycopg.errors.CheckViolation, match=r"capability rl: rate_limit burst: 0 is out of range"):
            conn.execute("SELECT lifecycle.capability_limit_set('rl', 5, 0)")


# -- (e) lifecycle-dagster limits ------------------------------------------------------------------


def test_the_limits_command_shows_each_limit_and_its_use(db: str) -> None:
    definition_id, agent_id = _install(db, per_s=20, burst=5)
    with connect(db) as conn:
        conn.execute("SELECT * FROM lifecycle.rate_take(%s, 20, 5, 2)", (f"agent:{agent_id}",))
    spec = StageSpec(definition_id=definition_id, stage_id="s", capability="rl")
    with connect(db) as conn:
        run_stage(conn, spec, run_id="r1", attempt=1, registry=AgentRegistry([Ok(AGENT)]), context={})
    runner = CliRunner()
    result = runner.invoke(main, ["limits", "--capability", "rl", "--per-s", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["changed"] == {"capability": "rl", "status": "set", "per_s": 2.0, "burst": None}
    by_scope = {r["scope"]: r for r in doc["limits"]}
    assert by_scope["agent"]["name"] == AGENT and by_scope["agent"]["taken"] == 3
    assert (by_scope["agent"]["per_s"], by_scope["agent"]["burst"], by_scope["agent"]["calls_60s"]) == (20, 5, 1)
    assert 2 <= by_scope["agent"]["tokens"] <= 5
    assert (by_scope["capability"]["name"], by_scope["capability"]["burst"], by_scope["capability"]["tokens"]) == (
        "rl",
        2,
        2,
    )
    table = runner.invoke(main, ["limits"], catch_exceptions=False)
    assert table.exit_code == 0 and "SCOPE" in table.output and AGENT in table.output
    bad = runner.invoke(main, ["limits", "--capability", "rl", "--per-s", "0"])
    assert bad.exit_code == 1 and "capability rl: rate_limit per_s: 0 is out of range" in bad.output
    cleared = runner.invoke(main, ["limits", "--capability", "rl", "--clear", "--json"], catch_exceptions=False)
    assert json.loads(cleared.output)["changed"]["status"] == "cleared"
