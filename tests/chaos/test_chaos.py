"""Fault injection: many lifecycle executions (python, http and queue agents) under kill -9 of
queue workers and Dagster run workers, a Postgres restart, pg_terminate_backend of random sessions,
agents that hang, return garbage or 10 MB or fail half their calls, and cancels, publishes and
reconciler runs concurrent with it all. After each scenario the invariant checker
(lifecycle_dagster.store.invariants, plus ``chaos_world.effects_after_attempt``) must report nothing
within a bounded time once the faults stop, and every execution must end as its plan says
(:func:`expect`): faults with attempts left (worker kills, lost connections, restarts) cost retries,
never an execution.

Scale with ``pytest tests/chaos --chaos-scale N`` (executions and faults times N). Each scenario's
figures (executions, faults injected, time to quiesce, violations, outcomes) are printed at the end
of the run and written to tests/chaos/results/scale<N>/<scenario>.json.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chaos_world import KIND, STAGES, Cluster, Figures, World, chaos_dag, record, running

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

BAD = ("hang", "garbage", "huge", "flaky", "fail")
#: modes that fail every attempt of their stage (by timeout, a refused reply, or for good)
FATAL = frozenset({"hang", "garbage", "huge", "fail"})
#: attempts of each stage of the chaos DAG
MAX_ATTEMPTS = int(chaos_dag()["defaults"]["retry"]["max_attempts"])
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def quiesce_bound_s(scale: int) -> float:
    """How long the executions of a scenario may take to come to rest once its faults stopped."""
    return 150.0 + 30.0 * scale


def _plans(n: int, rng: random.Random, **modes: list[str]) -> list[dict[str, str]]:
    """``n`` plans; each stage's mode drawn from ``modes[stage]`` (default ok)."""
    return [{s: rng.choice(modes.get(s, ["ok"])) for s in STAGES} for _ in range(n)]


def drive(
    world: World,
    figures: Figures,
    ids: list[str],
    injectors: list[tuple[str, float, Callable[[], int | bool]]],
    budget_s: float,
    stop_when: Callable[[], bool] | None = None,
) -> None:
    """Inject faults (``(kind, every_s, inject)``; ``inject`` says how many it injected) while the
    executions ``ids`` run, until none of them is pending or in progress (or ``stop_when`` says so),
    or ``budget_s`` passed."""
    last = {kind: 0.0 for kind, _, _ in injectors}
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        for kind, every_s, inject in injectors:
            if time.monotonic() - last[kind] >= every_s:
                last[kind] = time.monotonic()
                n = int(inject())
                if n:
                    figures.fault(kind, n)
        running_now = world.statuses(ids)
        if stop_when is not None and stop_when():
            break
        if stop_when is None and not (running_now.get("pending", 0) + running_now.get("in_progress", 0)):
            break
        time.sleep(0.2)


def limited(inject: Callable[[], int | bool], at_most: int) -> Callable[[], int]:
    """``inject``, injecting at most ``at_most`` faults in all."""
    done = {"n": 0}

    def once() -> int:
        if done["n"] >= at_most:
            return 0
        n = int(inject())
        done["n"] += n
        return n

    return once


def must_end(plan: dict[str, str], on_failure: str = "compensate") -> str:
    """The status an execution with ``plan`` ends in when no fault hits it: ``rolled_back`` (or
    ``failed`` under ``on_failure: hold``) when a stage fails every attempt, else ``completed``."""
    if any(mode in FATAL for mode in plan.values()):
        return "failed" if on_failure == "hold" else "rolled_back"
    return "completed"


def expect(
    world: World, figures: Figures, plans: dict[str, tuple[dict[str, str], str]], *, lost_leases: bool = False
) -> None:
    """Compare how each execution ended with how it must end (``plans``: ``{id: (plan, on_failure)}``)
    and record the counts. An execution the suite cancelled ends ``rolled_back`` (cancel with
    compensation) or ``cancelled``. Otherwise it ends as :func:`must_end` says, unless a fault
    explains another end, which is listed in ``figures.excused``: its Dagster run's worker was killed
    (the reconciler rolls it back); a stage lost all its attempts to the reaper taking them back from
    workers the suite killed (``lost_leases``: from any worker, as terminated sessions stop
    heartbeats); or a ``flaky`` stage failed every attempt. Anything else is a mismatch."""
    runs_known = {r for r in world.killed_runs if r}
    for o in world.outcomes(list(plans)):
        plan, on_failure = plans[o["id"]]
        must = must_end(plan, on_failure)
        if o["id"] in world.cancelled:
            must = "rolled_back" if world.cancelled[o["id"]] else "cancelled"
        figures.expected[must] = figures.expected.get(must, 0) + 1
        if o["status"] == must:
            continue
        reaps = o["any_reaps"] if lost_leases else o["reaps"]
        why = []
        if {o["dagster_run_id"], o["compensation_run_id"]} & runs_known:
            why.append("its run worker was killed")
        if o["status"] == "rolled_back" and "attempts exhausted" in str(o["error_message"]):
            why += [f"stage {s} lost {n} attempts to the reaper" for s, n in reaps.items() if n >= MAX_ATTEMPTS]
            why += [f"flaky stage {s} failed {MAX_ATTEMPTS} times" for s, m in plan.items() if m == "flaky"]
        line = f"{o['id']}: {o['status']}, not {must} ({o['error_message']}; plan {plan}; reaps {reaps})"
        (figures.excused if why else figures.mismatches).append(line + (f": {'; '.join(why)}" if why else ""))
    if world.unknown_run_kills and figures.mismatches:  # a kill whose run was not known yet: excuse that many
        n = min(world.unknown_run_kills, len(figures.mismatches))
        figures.excused += [m + ": a run worker was killed before its run was known" for m in figures.mismatches[:n]]
        del figures.mismatches[:n]


def finish(
    world: World,
    figures: Figures,
    plans: dict[str, tuple[dict[str, str], str]],
    t0: float,
    *,
    lost_leases: bool = False,
) -> None:
    """Wait for rest, record the figures, and require zero violations and every execution of
    ``plans`` ending as it must (:func:`expect`)."""
    ids = list(plans)
    figures.executions = len(ids)
    figures.quiesce_s, found = world.quiesce(quiesce_bound_s(figures.scale))
    figures.violations = [f"{v.rule}: {v.message}" for v in found]
    figures.outcomes = world.statuses(ids)
    figures.notes = world.errors(ids)
    expect(world, figures, plans, lost_leases=lost_leases)
    figures.duration_s = round(time.monotonic() - t0, 1)
    if figures.quiesce_s is not None:
        figures.quiesce_s = round(figures.quiesce_s, 1)
    record(figures)
    print(f"\n{figures}")
    assert not found, "\n".join(figures.violations[:30]) + "\n" + world.daemon_log_tail()
    # every undo here can succeed (the python agent's; http and queue agents have none to run)
    assert "compensation_failed" not in figures.outcomes, figures.notes
    assert not figures.mismatches, (
        f"{len(figures.mismatches)} of {len(ids)} executions did not end as they must "
        f"(expected {figures.expected}, got {figures.outcomes}):\n" + "\n".join(figures.mismatches[:30])
    )
    assert sum(figures.outcomes.values()) == len(ids), figures.outcomes
    # the side effects the effect rule checks were recorded: one at least per python or queue stage
    # of each completed execution
    missing = world.completed_without_effects(ids, [s for s in STAGES if KIND[s] != "http"])
    assert not missing, f"completed executions without the side effects of their stages: {missing[:10]}"


def planned(
    ids: list[str], plans: list[dict[str, str]], on_failure: str = "compensate"
) -> dict[str, tuple[dict[str, str], str]]:
    """``{execution id: (plan, on_failure)}`` of executions started from ``plans``."""
    assert len(ids) == len(plans)
    return {eid: (plan, on_failure) for eid, plan in zip(ids, plans, strict=True)}


# ---------------------------------------------------------------------------------------------
# scenarios sharing one deployment (they run in this order)


def test_queue_workers_killed_at_every_point(shared_world: World, chaos_scale: int) -> None:
    """kill -9 of `agent serve` workers: while a claim is in flight, mid-task, and after the agent
    returned but before the result is recorded. Killed workers are restarted."""
    world, rng, t0 = shared_world, random.Random(1), time.monotonic()
    figures = Figures("worker_kills", chaos_scale)
    n = 6 * chaos_scale
    plans = _plans(n, rng, c=["slow", "slow", "pause_after_return", "ok"])
    plans[0]["c"] = "pause_after_return"
    ids = world.start_executions(plans)
    drive(
        world,
        figures,
        ids,
        [
            ("kill_worker_mid_task", 2.0, limited(world.kill_worker_mid_task, 3 * chaos_scale)),
            ("kill_worker_after_return", 0.5, lambda: world.kill_worker_after_return(timeout_s=0)),
            ("kill_worker_before_claim", 3.0, limited(world.kill_worker_before_claim, 3 * chaos_scale)),
        ],
        budget_s=90 + 30 * chaos_scale,
    )
    finish(world, figures, planned(ids, plans), t0)
    assert figures.faults.get("kill_worker_mid_task", 0) >= 1
    assert figures.faults.get("kill_worker_after_return", 0) >= 1
    assert figures.faults.get("kill_worker_before_claim", 0) >= 1


def test_dagster_run_workers_killed_mid_stage(shared_world: World, chaos_scale: int) -> None:
    """kill -9 of Dagster run workers while a stage (or an undo) runs: the reconciler finds the lost
    executions (their heartbeat stops) and compensation completes, run workers of compensation runs
    included."""
    world, rng, t0 = shared_world, random.Random(2), time.monotonic()
    figures = Figures("run_worker_kills", chaos_scale)
    n = 6 * chaos_scale
    plans = _plans(n, rng, a=["slow", "ok"], d=["slow", "fail", "fail"])
    ids = world.start_executions(plans, undo={"a": "slow"})  # compensation runs take a while: killable
    drive(
        world,
        figures,
        ids,
        [
            ("kill_run_worker", 2.5, limited(world.kill_run_worker, 3 * chaos_scale)),
            ("kill_compensation_run_worker", 0.5, limited(world.kill_compensation_run_worker, chaos_scale)),
        ],
        budget_s=90 + 30 * chaos_scale,
        stop_when=lambda: world.statuses(ids).keys() <= {"completed", "rolled_back", "compensation_failed"},
    )
    finish(world, figures, planned(ids, plans), t0)
    assert figures.faults.get("kill_run_worker", 0) >= 1
    assert figures.faults.get("kill_compensation_run_worker", 0) >= 1


def test_random_sessions_terminated(shared_world: World, chaos_scale: int) -> None:
    """pg_terminate_backend of random sessions of the database (stage ops, heartbeats, sensors,
    queue workers and their listeners) every second while executions run."""
    world, rng, t0 = shared_world, random.Random(3), time.monotonic()
    figures = Figures("terminate_backends", chaos_scale)
    n = 6 * chaos_scale
    plans = _plans(n, rng, a=["ok", "slow"], b=["ok", "slow"], c=["ok", "slow"])
    ids = world.start_executions(plans)
    drive(
        world,
        figures,
        ids,
        [("pg_terminate_backend", 1.0, lambda: world.terminate_backends(2))],
        budget_s=60 + 30 * chaos_scale,
    )
    finish(world, figures, planned(ids, plans), t0, lost_leases=True)
    assert figures.faults_total >= 1


def test_cancels_publishes_and_reconcilers_amid_faults(shared_world: World, chaos_scale: int) -> None:
    """Cancels (with and without compensation), publishes of new versions (activated) and extra
    reconciler ticks, concurrent with worker kills and terminated sessions; held executions
    (on_failure: hold) fail and stay failed."""
    world, rng, t0 = shared_world, random.Random(4), time.monotonic()
    figures = Figures("concurrent_ops", chaos_scale)
    n = 6 * chaos_scale
    plans = _plans(n, rng, a=["ok", "slow"], c=["slow", "ok"], d=["ok", "slow"])
    ids = world.start_executions(plans)
    expected = planned(ids, plans)
    held = _plans(chaos_scale, rng, d=["fail"])
    ids += (held_ids := world.start_executions(held, workflow="chaos_hold"))
    expected |= planned(held_ids, held, "hold")
    version = world.publish(f"chaos v{t0:.0f}")  # the running v1 executions stay pinned to v1
    figures.fault("publish")
    later = _plans(chaos_scale, rng)
    ids += (later_ids := world.start_executions(later, version=version))  # runs once the location reloads
    expected |= planned(later_ids, later)
    to_cancel = list(ids[: 2 * chaos_scale])
    rng.shuffle(to_cancel)

    def cancel() -> bool:
        if not to_cancel:
            return False
        return world.cancel(to_cancel.pop(), compensate=rng.random() < 0.5)

    def publish() -> bool:
        if figures.faults.get("publish", 0) >= 1 + chaos_scale:
            return False
        world.publish(f"chaos {time.monotonic():.3f}")
        return True

    drive(
        world,
        figures,
        ids,
        [
            ("cancel", 1.0, cancel),
            ("publish", 4.0, publish),
            ("reconcile", 2.0, lambda: world.reconcile_now() >= 0),
            ("kill_worker_mid_task", 5.0, world.kill_worker_mid_task),
            ("pg_terminate_backend", 3.0, lambda: world.terminate_backends(1)),
        ],
        budget_s=90 + 30 * chaos_scale,
    )
    finish(world, figures, expected, t0, lost_leases=True)
    assert figures.faults.get("cancel", 0) >= 1 and figures.faults.get("publish", 0) >= 2


def test_agents_that_hang_return_garbage_or_10_mb_or_fail_half_their_calls(
    shared_world: World, chaos_scale: int
) -> None:
    """Every bad behaviour on every agent kind: python (in the run worker, with a timeout), http and
    queue (a worker process)."""
    world, rng, t0 = shared_world, random.Random(5), time.monotonic()
    figures = Figures("bad_agents", chaos_scale)
    plans: list[dict[str, str]] = []
    for _ in range(chaos_scale):
        for i, mode in enumerate(BAD):
            # each bad mode once on each kind: b (http) and c (queue) run after a; a and d are python
            plans.append({"a": "ok", "b": mode, "c": BAD[(i + 2) % len(BAD)], "d": "ok"})
            plans.append({"a": mode if i % 2 else "ok", "b": "ok", "c": "ok", "d": "ok" if i % 2 else mode})
    rng.shuffle(plans)
    for p in plans:
        for stage, mode in p.items():
            if mode in BAD:
                figures.fault(f"{mode}_{KIND[stage]}")
    ids = world.start_executions(plans)
    drive(world, figures, ids, [], budget_s=120 + 40 * chaos_scale)
    finish(world, figures, planned(ids, plans), t0)


# ---------------------------------------------------------------------------------------------
# a deployment on a Postgres cluster of its own, restarted mid-run


@pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 server binaries not installed")
def test_postgres_restarted_mid_run(chaos_scale: int, tmp_path: Path) -> None:
    """The whole database server, durable (fsync on), restarts while executions run: first an
    immediate shutdown (a crash: the server recovers from its WAL), then a fast one, and so on
    (``1 + scale`` restarts); workers, sensors and stage ops reconnect, listeners LISTEN again, and
    every execution completes (its stages had attempts left)."""
    rng, t0 = random.Random(6), time.monotonic()
    figures = Figures("postgres_restart", chaos_scale)
    cluster = Cluster(PG_BIN, durable=True)
    try:
        cluster.init()
        assert cluster.settings() == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        with running(World(cluster.dsn, tmp_path, template=None)) as world:
            n = 6 * chaos_scale
            plans = _plans(n, rng, a=["slow", "ok"], c=["slow", "ok"], d=["slow", "ok"])
            ids = world.start_executions(plans)
            restarts = {"n": 0}

            def restart() -> bool:
                if restarts["n"] >= 1 + chaos_scale or not world.statuses(ids).get("in_progress"):
                    return False
                mode = "fast" if restarts["n"] % 2 else "immediate"
                cluster.restart(mode)
                restarts["n"] += 1
                figures.fault(f"postgres_restart_{mode}")
                return False  # counted above, by mode

            drive(world, figures, ids, [("postgres_restart", 2.0, restart)], budget_s=90 + 40 * chaos_scale)
            finish(world, figures, planned(ids, plans), t0, lost_leases=True)
    finally:
        cluster.destroy()
    assert figures.faults.get("postgres_restart_immediate", 0) >= 1
    assert figures.faults.get("postgres_restart_fast", 0) >= 1
