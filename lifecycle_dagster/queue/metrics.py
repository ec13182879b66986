"""The Prometheus figures of one ``agent serve`` worker (:class:`~lifecycle_dagster.queue.worker.Worker`).

Each worker has its own ``CollectorRegistry`` (``WorkerMetrics.registry``), so several workers can
run in one process; ``agent serve --metrics-port N`` serves it. Labels: ``agent`` (the agent's
name), ``capability`` (the task's), ``outcome``; no task or execution id. Names, units and labels:
``docs/observability.md#metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lifecycle_dagster.store.metrics import DURATION_BUCKETS_S

#: how a claimed task ended for this worker
OUTCOMES = ("completed", "failed", "refused", "stopped", "not_recorded")


class WorkerMetrics:
    """Counters, histograms and a gauge of one worker, in a registry of their own."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claimed = Counter(
            "lifecycle_worker_tasks_claimed", "Tasks this worker claimed.", ["agent", "capability"], registry=r
        )
        self.finished = Counter(
            "lifecycle_worker_tasks_finished",
            "Claimed tasks by how they ended: completed, failed (the failure recorded), refused (the "
            "result came too late), stopped (lease lost or handed back: nothing recorded), "
            "not_recorded (the database could not be reached).",
            ["agent", "capability", "outcome"],
            registry=r,
        )
        self.claim_to_complete = Histogram(
            "lifecycle_worker_task_claim_to_complete_seconds",
            "Seconds from a task's claim to its result recorded (completed or failed).",
            ["agent", "capability"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.agent_call = Histogram(
            "lifecycle_worker_agent_call_duration_seconds",
            "Seconds the agent ran on a task, by outcome: ok (an output) or error (an agent stopped "
            "because the task is no longer this worker's is not counted).",
            ["agent", "capability", "outcome"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.leases_lost = Counter(
            "lifecycle_worker_leases_lost",
            "Leases a heartbeat found lost (reaped or the task cancelled): the agent was stopped.",
            ["agent", "capability"],
            registry=r,
        )
        self.in_flight = Gauge(
            "lifecycle_worker_tasks_in_flight", "Tasks this worker is running now.", ["agent"], registry=r
        )
        self.in_flight.labels(agent)  # present (0) before the first claim

    def task_claimed(self, capability: str | None) -> None:
        """A task was claimed: counted, and in flight until :meth:`task_ended`."""
        self.claimed.labels(self.agent, capability or "").inc()
        self.in_flight.labels(self.agent).inc()

    def agent_ran(self, capability: str | None, seconds: float, ok: bool) -> None:
        """The agent ran ``seconds`` on a task and gave an output (``ok``) or an error."""
        self.agent_call.labels(self.agent, capability or "", "ok" if ok else "error").observe(seconds)

    def task_ended(self, capability: str | None, outcome: str, claim_to_result_s: float | None) -> None:
        """A claimed task ended with ``outcome`` (one of :data:`OUTCOMES`); ``claim_to_result_s``
        when its result was recorded."""
        self.finished.labels(self.agent, capability or "", outcome).inc()
        if claim_to_result_s is not None:
            self.claim_to_complete.labels(self.agent, capability or "").observe(claim_to_result_s)
        self.in_flight.labels(self.agent).dec()

    def lease_lost(self, capability: str | None) -> None:
        """A heartbeat found the task's lease lost."""
        self.leases_lost.labels(self.agent, capability or "").inc()
