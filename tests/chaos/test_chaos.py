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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chaos_world import BATCH_SIZE, KIND, STAGES, Cluster, Figures, World, chaos_dag, record, running

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
    world: World,
    figures: Figures,
    plans: dict[str, tuple[dict[str, str], str]],
    *,
    lost_leases: bool = False,
    strict: Mapping[str, str] | None = None,
) -> None:
    """Compare how each execution ended with how it must end (``plans``: ``{id: (plan, on_failure)}``)
    and record the counts. An execution the suite cancelled ends ``rolled_back`` (cancel with
    compensation) or ``cancelled``. Otherwise it ends as :func:`must_end` says, unless a fault
    explains another end, which is listed in ``figures.excused``: its Dagster run's worker was killed
    (the reconciler rolls it back); a stage lost all its attempts to the reaper taking them back from
    workers the suite killed (``lost_leases``: from any worker, as terminated sessions stop
    heartbeats); or a ``flaky`` stage failed every attempt. Anything else is a mismatch.
    ``strict``: ``{id: status}`` of executions a fault sent to that end whatever their plan (the
    members a killed batch run held: ``rolled_back``); nothing excuses another end."""
    runs_known = {r for r in world.killed_runs if r}
    strict = strict or {}
    unexcused: list[str] = []
    for o in world.outcomes(list(plans)):
        plan, on_failure = plans[o["id"]]
        must = must_end(plan, on_failure)
        if o["id"] in world.cancelled:
            must = "rolled_back" if world.cancelled[o["id"]] else "cancelled"
        if o["id"] in strict:
            must = strict[o["id"]]
        figures.expected[must] = figures.expected.get(must, 0) + 1
        if o["status"] == must:
            continue
        if o["id"] in strict:
            unexcused.append(
                f"{o['id']}: {o['status']}, not {must} ({o['error_message']}; plan {plan}): a fault sent it there"
            )
            continue
        reaps = o["any_reaps"] if lost_leases else o["reaps"]
        why = []
        if {o["dagster_run_id"], o["compensation_run_id"]} & runs_known:
            why.append("its run worker was killed")
        message = str(o["error_message"])
        if o["status"] == "rolled_back" and "attempts exhausted" in message:
            why += [f"stage {s} lost {n} attempts to the reaper" for s, n in reaps.items() if n >= MAX_ATTEMPTS]
        # a flaky stage fails half its calls: all its attempts, one time in 2**MAX_ATTEMPTS (the
        # reaper's "attempts exhausted", or the op's last attempt "(attempt N of N)")
        if o["status"] == "rolled_back" and (
            "attempts exhausted" in message or f"(attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS})" in message
        ):
            why += [
                f"flaky stage {s} failed {MAX_ATTEMPTS} times"
                for s, m in plan.items()
                if m == "flaky" and ("attempts exhausted" in message or f"stage {s} failed" in message)
            ]
        line = f"{o['id']}: {o['status']}, not {must} ({o['error_message']}; plan {plan}; reaps {reaps})"
        (figures.excused if why else figures.mismatches).append(line + (f": {'; '.join(why)}" if why else ""))
    if world.unknown_run_kills and figures.mismatches:  # a kill whose run was not known yet: excuse that many
        n = min(world.unknown_run_kills, len(figures.mismatches))
        figures.excused += [m + ": a run worker was killed before its run was known" for m in figures.mismatches[:n]]
        del figures.mismatches[:n]
    figures.mismatches += unexcused


def finish(
    world: World,
    figures: Figures,
    plans: dict[str, tuple[dict[str, str], str]],
    t0: float,
    *,
    lost_leases: bool = False,
    strict: Mapping[str, str] | None = None,
) -> None:
    """Wait for rest, record the figures, and require zero violations and every execution of
    ``plans`` ending as it must (:func:`expect`, ``strict`` included)."""
    ids = list(plans)
    figures.executions = len(ids)
    figures.quiesce_s, found = world.quiesce(quiesce_bound_s(figures.scale))
    figures.violations = [f"{v.rule}: {v.message}" for v in found]
    figures.outcomes = world.statuses(ids)
    figures.notes += world.errors(ids)
    expect(world, figures, plans, lost_leases=lost_leases, strict=strict)
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
# batch runs (sql/schema/17_batches.sql): one Dagster run carries BATCH_SIZE executions

#: the plans of a batch's members, by the fault its run gets (one a member: BATCH_SIZE of them)
BATCH_PLANS: dict[str, list[dict[str, str]]] = {
    # every stage but the http one slow, so the kill lands while attempts run
    "kill": [{"a": "slow", "b": "ok", "c": "slow", "d": "slow"}] * BATCH_SIZE,
    # all slow; one member flaky: it leaves the batch to retry (resumed alone) amid lost connections
    "terminate": [{"a": "slow", "b": "slow", "c": "slow", "d": "slow"}] * (BATCH_SIZE - 1)
    + [{"a": "slow", "b": "flaky", "c": "slow", "d": "slow"}],
    # two members cancelled mid-batch (one with compensation, one without); one fails for good
    "cancel": [{"a": "slow", "b": "ok", "c": "slow", "d": "slow"}] * (BATCH_SIZE - 1)
    + [{"a": "slow", "b": "ok", "c": "slow", "d": "fail"}],
    # no fault injected (batched by the launch sensor itself): one fails for good, one is flaky
    "quiet": [
        {"a": "ok", "b": "ok", "c": "ok", "d": "ok"},
        {"a": "ok", "b": "ok", "c": "ok", "d": "fail"},
        {"a": "flaky", "b": "ok", "c": "ok", "d": "ok"},
        {"a": "ok", "b": "ok", "c": "slow", "d": "ok"},
    ],
}
#: the order of the chaos DAG's stages (b and c run side by side)
RANK = {"a": 0, "b": 1, "c": 1, "d": 2}


@dataclass
class BatchTarget:
    """A batch the suite formed, the fault its run gets (``role``), and what was done to it."""

    batch_id: str
    role: str
    ids: list[str]
    #: per fault, in order: the earliest stage whose attempts may be running when it lands
    stages: list[str] = field(default_factory=lambda: ["a"])
    #: cancel: whether each cancel compensates, in order
    compensate: list[bool] = field(default_factory=list)
    run_id: str | None = None
    done: int = 0
    last: float = 0.0
    note: str = ""


def test_batch_runs_under_run_worker_kills_lost_connections_and_cancels(shared_world: World, chaos_scale: int) -> None:
    """Executions run in batch runs (``chaos_batch``: its DAG's ``batch`` key; batches formed by the
    suite with lifecycle.batch_form, or by the launch sensor, and launched by the sensor with run
    key ``batch:<id>``) while their runs get faults: kill -9 of a batch run's worker mid-stage (the
    reconciler fails every execution it held and they are rolled back), pg_terminate_backend of a
    batch run's op connection mid-stage (the op runs the stage again, adopting the attempts in
    progress: the batch goes on and its run succeeds), and cancels of single members while their
    batch runs (only that member stops). Per batch of each fault, ``scale`` batches; the members
    of the batches the sensor forms get no fault. Each member must end as its plan says, the
    members a killed run held ``rolled_back`` whatever their plan; each batch run not killed must
    succeed (a member failing, retrying or cancelled never fails its batch's op).

    It found a defect, fixed since (test_findings.py::
    test_a_batch_member_waiting_for_its_resume_run_is_not_failed_as_lost): a member that left its
    batch to retry was rolled back as lost when its resume run waited in the run queue past the
    heartbeat timeout."""
    world, rng, t0 = shared_world, random.Random(7), time.monotonic()
    figures = Figures("batch_runs", chaos_scale)
    targets: list[BatchTarget] = []
    expected: dict[str, tuple[dict[str, str], str]] = {}
    for _ in range(chaos_scale):
        for role in ("kill", "terminate", "cancel"):
            plans = [dict(p) for p in BATCH_PLANS[role]]
            batch_id, ids = world.start_batch(plans)
            expected |= planned(ids, plans)
            targets.append(
                BatchTarget(
                    batch_id,
                    role,
                    ids,
                    stages=sorted(rng.choices(("a", "c", "d"), k=2), key=RANK.__getitem__),  # kill: the first
                    compensate=rng.sample([True, False], 2),
                )
            )
    quiet = [dict(p) for _ in range(chaos_scale) for p in BATCH_PLANS["quiet"]]
    quiet_ids = world.start_executions(quiet, workflow="chaos_batch", atomic=True)
    expected |= planned(quiet_ids, quiet)
    ids = list(expected)
    held: dict[str, str] = {}  # the live members a killed run held: they must be rolled back
    left_held: list[str] = []  # members that had left the killed run's batch but were still bound to it

    def on_batches(
        role: str, at_most: int, every_s: float, act: Callable[[BatchTarget, set[str]], bool]
    ) -> Callable[[], int]:
        """Inject ``act`` into the batches of ``role`` whose run has attempts running at the
        fault's stage or later, at most ``at_most`` times each, ``every_s`` seconds apart."""

        def inject() -> int:
            n = 0
            for t in targets:
                if t.role != role or t.done >= at_most or time.monotonic() - t.last < every_s:
                    continue
                t.run_id = t.run_id or world.batch_run(t.batch_id)
                busy = world.busy_stages(t.run_id) if t.run_id else set()
                # the fault lands once the run's attempts reached its stage (or a later one)
                if not busy or max(RANK[s] for s in busy) < RANK[t.stages[min(t.done, len(t.stages) - 1)]]:
                    continue
                if act(t, busy):
                    t.done, t.last, n = t.done + 1, time.monotonic(), n + 1
            return n

        return inject

    def kill(t: BatchTarget, busy: set[str]) -> bool:
        assert t.run_id is not None
        if not world.kill_run(t.run_id):
            return False
        for m in world.run_members(t.run_id):  # what the dead run held (its sessions are gone)
            if m["live"]:
                held[m["id"]] = "rolled_back"
            else:
                left_held.append(f"{m['id']} (left: {m['left_reason']})")
        t.note = f"killed at stage(s) {', '.join(sorted(busy))} holding {sum(1 for i in t.ids if i in held)}"
        return True

    def terminate(t: BatchTarget, busy: set[str]) -> bool:
        assert t.run_id is not None
        if not world.terminate_run_connection(t.run_id):
            return False
        t.note += f"{', ' if t.note else 'op connection lost at stage(s) '}{'/'.join(sorted(busy))}"
        return True

    def cancel(t: BatchTarget, busy: set[str]) -> bool:
        assert t.run_id is not None
        live = [
            m["id"] for m in world.run_members(t.run_id) if m["live"] and "fail" not in expected[m["id"]][0].values()
        ]
        if not live:
            return False
        victim, compensate = rng.choice(live), t.compensate[t.done]
        if not world.cancel(victim, compensate=compensate):
            return False
        t.note += f"{'; ' if t.note else ''}{victim[:8]} cancelled at {'/'.join(sorted(busy))}" + (
            "" if compensate else " (no compensation)"
        )
        return True

    drive(
        world,
        figures,
        ids,
        [
            ("kill_batch_run_worker", 0.3, on_batches("kill", 1, 0.0, kill)),
            ("terminate_batch_op_connection", 0.3, on_batches("terminate", 2, 2.0, terminate)),
            ("cancel_batch_member", 0.3, on_batches("cancel", 2, 0.5, cancel)),
        ],
        budget_s=90 + 30 * chaos_scale,
    )
    batches = world.batches_of(ids)
    retries = {t.run_id: world.op_retries(t.run_id) for t in targets if t.role == "terminate" and t.run_id}
    figures.notes += [
        f"{t.role} batch {t.batch_id[:8]} (run {(t.run_id or '-')[:8]}): {t.note or 'no fault'}" for t in targets
    ]
    figures.notes += [
        f"op retries in the runs that lost their op connection: {sum(sum(r.values()) for r in retries.values())}"
    ]
    figures.notes += [f"left the killed run's batch before the kill: {m}" for m in left_held]
    finish(world, figures, expected, t0, strict=held)
    # every execution ran in a batch run; the sensor batched the quiet ones by BATCH_SIZE
    in_batches = {eid: b for b in batches.values() for eid in b["members"]}
    assert set(in_batches) == set(ids), f"executions outside any batch: {set(ids) - set(in_batches)}"
    assert all(b["run_id"] for b in batches.values()), f"batches never bound to a run: {batches}"
    assert len({in_batches[e]["run_id"] for e in quiet_ids}) == chaos_scale, (
        "the sensor batched the quiet ones otherwise"
    )
    # the faults happened: each kill batch's run killed holding members, a member of each cancel
    # batch cancelled (two, unless the batch ended first), the op connection of each terminate
    # batch's run lost (and an op ran again)
    done = {role: [t.done for t in targets if t.role == role] for role in ("kill", "terminate", "cancel")}
    assert done["kill"] == [1] * chaos_scale and len(held) >= chaos_scale, figures.notes
    assert min(done["terminate"]) >= 1 and min(done["cancel"]) >= 1, (done, figures.notes)
    assert any(retries.values()), f"no op ran again after its connection was lost: {retries}"
    # a member failing, retrying, being cancelled, or its op losing its connection never failed a
    # batch run: only the killed ones failed
    killed = {t.run_id for t in targets if t.role == "kill"}
    statuses = {b["run_id"]: world.run_status(b["run_id"]) for b in batches.values()}
    failed = {run: st for run, st in statuses.items() if st != "SUCCESS" and run not in killed}
    assert not failed, f"batch runs not killed that did not succeed: {failed}"


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
