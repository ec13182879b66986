"""The database collector's families from its running totals: cumulative buckets, sums, outcomes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lifecycle_dagster.store.metrics import _attempt_families


def test_buckets_are_cumulative_and_outcomes_and_retries_are_counted() -> None:
    bounds = (1.0, 10.0)
    totals = {
        # (workflow, version, stage, capability, agent, outcome, bucket): [attempts, seconds]
        ("wf", "1", "s", "cap", "a", "completed", 0): [2.0, 1.5],  # <= 1 s
        ("wf", "1", "s", "cap", "a", "retrying", 1): [1.0, 4.0],  # (1, 10]
        ("wf", "1", "s", "cap", "b", "failed", 2): [1.0, 30.0],  # > 10 s: +Inf only
        ("wf", "1", "s", "cap", "b", "failed", None): [1.0, 0.0],  # never started: no duration
    }
    registry = CollectorRegistry()

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return _attempt_families(totals, bounds)  # type: ignore[arg-type]

    registry.register(Fixed())  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    stage = (("stage", "s"), ("version", "1"), ("workflow", "wf"))

    def bucket(le: str) -> float:
        return samples[("lifecycle_stage_attempt_duration_seconds_bucket", tuple(sorted((*stage, ("le", le)))))]

    assert (bucket("1.0"), bucket("10.0"), bucket("+Inf")) == (2, 3, 4)
    assert samples[("lifecycle_stage_attempt_duration_seconds_count", stage)] == 4
    assert samples[("lifecycle_stage_attempt_duration_seconds_sum", stage)] == 35.5
    failed = tuple(sorted((*stage, ("agent", "b"), ("outcome", "failed"))))
    assert samples[("lifecycle_stage_outcomes_total", failed)] == 2  # the one that never started too
    assert samples[("lifecycle_stage_retries_total", stage)] == 1
    task = (("agent", "b"), ("capability", "cap"))
    assert samples[("lifecycle_task_claim_to_complete_seconds_count", task)] == 1
