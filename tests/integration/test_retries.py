"""Retries with capped backoff, error classes, timeouts and payload safety, through real runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from lifecycle_dagster.agents import (
    AgentBadRequest,
    AgentError,
    AgentOverloaded,
    AgentRateLimited,
    AgentRegistry,
    Task,
)
from lifecycle_dagster.core.retry import retry_delay
from lifecycle_dagster.store.db import connect

from agents_for_tests import Ok, Sleeper
from helpers import events, install, rows, run

FAST = {"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.2, "multiplier": 2, "jitter": "none"}


def _dag(retry: dict[str, Any] | None = None, timeout_s: float | None = None, **stage: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"id": "work", "capability": "work", **stage}
    if timeout_s is not None:
        s["timeout_s"] = timeout_s
    dag: dict[str, Any] = {"stages": [{"id": "prep", "capability": "prep", "next": ["work"]}, s]}
    dag["defaults"] = {"retry": retry or FAST}
    return dag


class Flaky:
    """Fails with ``errors`` in turn, then succeeds; records the attempts it saw."""

    name = "worker"

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.seen: list[int] = []

    def run(self, task: Task) -> dict[str, Any]:
        self.seen.append(task.attempt)
        if self.errors:
            raise self.errors.pop(0)
        return {"summary": "worked", "attempt": task.attempt}


def _setup(db: str, dag: dict[str, Any]) -> None:
    install(db, "wf", dag, {"prep": "preparer", "work": "worker"})


def _registry(agent: Any) -> AgentRegistry:
    return AgentRegistry([Ok("preparer"), agent])


def _work_log(db: str, eid: str) -> dict[str, Any]:
    [log] = rows(
        db,
        "SELECT status, attempt_number, error_message, started_at, not_before, output_data"
        " FROM workflow_execution_logs WHERE execution_id = %(e)s AND stage_id = 'work'",
        e=eid,
    )
    return log


def _tasks(db: str, eid: str) -> list[tuple[int, str]]:
    return [
        (r["attempt"], r["status"])
        for r in rows(
            db,
            "SELECT attempt, status FROM task_queue WHERE workflow_execution_id = %(e)s AND task_type = 'work'"
            " ORDER BY attempt",
            e=eid,
        )
    ]


def test_fails_twice_then_succeeds(db: str, instance: Any) -> None:
    _setup(db, _dag())
    agent = Flaky(AgentOverloaded("busy"), RuntimeError("connection reset"))
    result, eid = run(db, instance, "wf", _registry(agent))
    assert result.success
    assert agent.seen == [1, 2, 3]
    log = _work_log(db, eid)
    assert (log["status"], log["attempt_number"], log["output_data"]["attempt"]) == ("completed", 3, 3)
    assert _tasks(db, eid) == [(1, "failed"), (2, "failed"), (3, "completed")]
    work = [(t, m) for t, s, m in events(db, eid) if s == "work"]
    assert [t for t, _ in work] == [
        "stage_started",
        "stage_retrying",
        "stage_started",
        "stage_retrying",
        "stage_started",
        "stage_completed",
    ]
    assert [m["attempt"] for t, m in work if t == "stage_started"] == [1, 2, 3]
    r1, r2 = (m for t, m in work if t == "stage_retrying")
    assert (r1["attempt"], r1["failed_attempt"], r1["error_code"], r1["error_class"]) == (
        2,
        1,
        "overloaded",
        "AgentOverloaded",
    )
    assert r1["error"] == "worker: busy"
    assert (r2["attempt"], r2["error_code"], r2["error_class"]) == (3, "agent_crashed", "AgentCrashed")
    assert "connection reset" in r2["error"]
    # the waits follow the policy (jitter none: 0.05 then 0.1 s)
    assert [r1["delay_s"], r2["delay_s"]] == [
        retry_delay(1, 0.05, 0.2, 2, "none", 0),
        retry_delay(2, 0.05, 0.2, 2, "none", 0),
    ]
    starts = rows(
        db,
        "SELECT \"timestamp\" AS t FROM workflow_events WHERE execution_id = %(e)s AND stage_id = 'work'"
        " AND event_type IN ('stage_retrying', 'stage_started') ORDER BY id",
        e=eid,
    )
    gaps = [(starts[i + 1]["t"] - starts[i]["t"]).total_seconds() for i in (1, 3)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 2
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "completed"}]


def test_attempts_run_out(db: str, instance: Any) -> None:
    _setup(db, _dag())
    agent = Flaky(*(AgentOverloaded(f"busy {i}") for i in range(10)))
    result, eid = run(db, instance, "wf", _registry(agent))
    assert not result.success
    assert agent.seen == [1, 2, 3]
    log = _work_log(db, eid)
    assert (log["status"], log["attempt_number"]) == ("failed", 3)
    assert log["error_message"] == "worker: busy 2 (attempt 3 of 3)"
    assert _tasks(db, eid) == [(1, "failed"), (2, "failed"), (3, "failed")]
    kinds = [t for t, s, _ in events(db, eid) if s == "work"]
    assert kinds.count("stage_started") == 3 and kinds.count("stage_retrying") == 2
    assert kinds[-2:] == ["stage_failed", "workflow_failed"]
    ex = rows(db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex == [{"status": "failed", "error_message": "stage work failed: worker: busy 2 (attempt 3 of 3)"}]


@pytest.mark.parametrize(
    ("error", "dag_retry", "code"),
    [
        (AgentBadRequest("field x is required"), FAST, "bad_request"),
        (AgentError("integrity_failed", "totals differ"), FAST, "integrity_failed"),
        (AgentRateLimited("slow down"), {**FAST, "non_retryable": ["rate_limited"]}, "rate_limited"),
    ],
)
def test_non_retryable_fails_on_the_first_attempt(
    db: str, instance: Any, error: AgentError, dag_retry: dict[str, Any], code: str
) -> None:
    _setup(db, _dag(dag_retry))
    agent = Flaky(error, error)
    result, eid = run(db, instance, "wf", _registry(agent))
    assert not result.success
    assert agent.seen == [1]
    assert _tasks(db, eid) == [(1, "failed")]
    failed = [m for t, s, m in events(db, eid) if t == "stage_failed"]
    assert [m["error_code"] for m in failed] == [code]


def test_retry_after_hint_is_honoured_within_the_cap(db: str, instance: Any) -> None:
    _setup(db, _dag({**FAST, "max_delay_s": 0.3}))
    agent = Flaky(AgentRateLimited("429", retry_after_s=0.25), AgentRateLimited("429", retry_after_s=30))
    result, eid = run(db, instance, "wf", _registry(agent))
    assert result.success
    delays = [m["delay_s"] for t, _, m in events(db, eid) if t == "stage_retrying"]
    assert delays == [0.25, 0.3]


def test_timeout_retries_then_fails_and_no_work_continues(db: str, instance: Any, tmp_path: Path) -> None:
    _setup(db, _dag({**FAST, "max_attempts": 2}, timeout_s=0.3))
    marker = tmp_path / "marker"
    result, eid = run(db, instance, "wf", _registry(Sleeper(marker, 60)))
    assert not result.success
    assert _tasks(db, eid) == [(1, "failed"), (2, "failed")]
    log = _work_log(db, eid)
    assert log["status"] == "failed"
    assert "no result within the stage timeout of 0.3 s" in log["error_message"]
    codes = [m.get("error_code") for t, _, m in events(db, eid) if t in ("stage_retrying", "stage_failed")]
    assert codes == ["timeout", "timeout"]
    # both attempts started, were cut short (no marker: a 60 s sleep never ended) and left no process
    pids = [int((tmp_path / f"pid-{attempt}").read_text()) for attempt in (1, 2)]
    assert not marker.exists()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_timeout_does_not_cut_a_fast_agent(db: str, instance: Any) -> None:
    _setup(db, _dag(timeout_s=5))
    result, eid = run(db, instance, "wf", _registry(Ok("worker")))
    assert result.success
    assert _work_log(db, eid)["status"] == "completed"


class Returns:
    name = "worker"

    def __init__(self, value: Any, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def run(self, task: Task) -> Any:
        if self.error:
            raise self.error
        return self.value


@pytest.mark.parametrize(
    ("agent", "fragment"),
    [
        (Returns({"summary": "x", "v": "a\x00b"}), "contains a NUL character"),
        (Returns({"summary": "x", "v": "\ud800"}), "lone UTF-16 surrogate"),
        (Returns({"summary": "x", "v": float("nan")}), "not JSON"),
        (Returns({"summary": "x", "v": {1, 2}}), "not JSON"),
        (Returns(["not", "an", "object"]), "agent returned list, not a JSON object"),
        (Returns({"summary": "x", "blob": "y" * 2_000_000}), "over the 1000000-byte limit"),
        (Returns(None, AgentError("weird", "bad\x00text \ud800 end")), "bad\\x00text \\ud800 end"),
    ],
)
def test_unstorable_payloads_end_in_a_terminal_state_with_a_clear_error(
    db: str, instance: Any, monkeypatch: pytest.MonkeyPatch, agent: Any, fragment: str
) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES", "1000000")
    _setup(db, _dag({**FAST, "max_attempts": 2}))
    result, eid = run(db, instance, "wf", _registry(agent))
    assert not result.success
    log = _work_log(db, eid)
    assert log["status"] == "failed" and log["output_data"] is None
    assert fragment in log["error_message"]
    assert all(status == "failed" for _, status in _tasks(db, eid))
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "failed"}]


def test_a_failure_to_record_the_retry_fails_the_attempt_once(db: str, instance: Any) -> None:
    """A database error while recording a retry never turns into a hot re-run loop."""
    _setup(db, _dag())
    with connect(db) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_retrying() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.event_type = 'stage_retrying' THEN RAISE EXCEPTION 'disk full (simulated by a trigger)'; END IF;"
            " RETURN NEW; END $$; CREATE TRIGGER refuse_retrying BEFORE INSERT ON workflow_events"
            " FOR EACH ROW EXECUTE FUNCTION refuse_retrying()"
        )
    agent = Flaky(*(AgentOverloaded("busy") for _ in range(10)))
    result, _ = run(db, instance, "wf", _registry(agent))
    assert not result.success
    assert agent.seen == [1]
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    assert "could not record the retry of attempt 1" in failures[0].event_specific_data.error.message
    assert "disk full" in failures[0].event_specific_data.error.message
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 0


def test_no_child_process_is_used_without_a_timeout(db: str, instance: Any) -> None:
    """Agents without a timeout run in the op's own process (cheap, and they may share state)."""

    class Pid:
        name = "worker"

        def run(self, task: Task) -> dict[str, Any]:
            return {"summary": "pid", "pid": os.getpid()}

    _setup(db, _dag())
    result, eid = run(db, instance, "wf", _registry(Pid()))
    assert result.success
    assert _work_log(db, eid)["output_data"]["pid"] == os.getpid()
