"""Retry policy of a stage and the capped, jittered backoff delay.

Delay after the failed attempt ``attempt`` (1-based)::

    raw   = min(max_delay_s, base_delay_s * multiplier ** (attempt - 1))
    none  : raw
    full  : u * raw                      (AWS "full jitter")
    equal : raw / 2 + u * raw / 2        (AWS "equal jitter")

where ``u`` is a uniform draw in [0, 1) passed in by the caller, so that the Python function and
the SQL function ``lifecycle.retry_delay`` can be compared exactly (both use the C library's
``log`` and ``pow``). Jitter modes: Marc Brooker, "Exponential Backoff And Jitter", AWS
Architecture Blog, 2015. The exponent is clamped before ``pow`` is called: once
``(attempt - 1) * ln(multiplier) >= ln(max_delay_s) - ln(base_delay_s)`` the delay is the cap, so no
attempt number up to 2**31 - 1 (or beyond) overflows or leaves [0, max_delay_s].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lifecycle_dagster.core.dag import Dag, RetrySpec

#: the policy of a stage that says nothing (the runbook's retry_stage defaults to 3 attempts)
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 1.0
DEFAULT_MAX_DELAY_S = 60.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_JITTER = "full"
#: no wait or timeout is applied for longer than a year, whatever a policy says (a policy's cap may
#: be huge, but a not-before time must stay a timestamp and a sleep a valid length)
MAX_WAIT_S = 31_536_000.0


@dataclass(frozen=True)
class RetryPolicy:
    """A resolved policy: every field set. Delays in seconds."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: str = DEFAULT_JITTER
    non_retryable: tuple[str, ...] = ()

    def delay(self, attempt: int, u: float) -> float:
        """The wait (seconds) after failed attempt ``attempt`` with uniform draw ``u``."""
        return retry_delay(attempt, self.base_delay_s, self.max_delay_s, self.multiplier, self.jitter, u)


def resolve_policy(dag: Dag, stage_id: str) -> RetryPolicy:
    """The stage's ``retry`` over the DAG's ``defaults.retry`` over the built-in defaults.

    When only ``base_delay_s`` is raised above the built-in cap, the cap follows it (a policy
    never has ``max_delay_s < base_delay_s``).
    """
    merged: dict[str, object] = {}
    for spec in (dag.default_retry, dag.stage(stage_id).retry):
        if spec is None:
            continue
        for key in RetrySpec.__dataclass_fields__:
            value = getattr(spec, key)
            if value is not None:
                merged[key] = value
    policy = RetryPolicy(
        max_attempts=int(merged.get("max_attempts", DEFAULT_MAX_ATTEMPTS)),  # type: ignore[call-overload]
        base_delay_s=float(merged.get("base_delay_s", DEFAULT_BASE_DELAY_S)),  # type: ignore[arg-type]
        max_delay_s=float(merged.get("max_delay_s", DEFAULT_MAX_DELAY_S)),  # type: ignore[arg-type]
        multiplier=float(merged.get("multiplier", DEFAULT_MULTIPLIER)),  # type: ignore[arg-type]
        jitter=str(merged.get("jitter", DEFAULT_JITTER)),
        non_retryable=tuple(merged.get("non_retryable", ())),  # type: ignore[arg-type]
    )
    if policy.max_delay_s < policy.base_delay_s and "max_delay_s" not in merged:
        policy = RetryPolicy(**{**policy.__dict__, "max_delay_s": policy.base_delay_s})
    return policy


def retry_delay(
    attempt: int, base_delay_s: float, max_delay_s: float, multiplier: float, jitter: str, u: float
) -> float:
    """Capped, jittered exponential backoff (see the module docstring), in seconds.

    Raises:
        ValueError: ``attempt < 1``, a negative base or cap, ``multiplier < 1``, an unknown
            jitter mode, or ``u`` outside [0, 1).
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not (math.isfinite(base_delay_s) and math.isfinite(max_delay_s)) or base_delay_s < 0 or max_delay_s < 0:
        raise ValueError(f"delays must be finite and >= 0, got base {base_delay_s}, cap {max_delay_s}")
    if not multiplier >= 1 or not math.isfinite(multiplier):
        raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier}")
    if not 0.0 <= u < 1.0:  # also refuses NaN
        raise ValueError(f"u must be in [0, 1), got {u}")
    exponent = float(attempt - 1)
    if base_delay_s == 0.0 or max_delay_s == 0.0:
        raw = 0.0
    elif base_delay_s >= max_delay_s:
        raw = max_delay_s
    elif multiplier == 1.0 or exponent == 0.0:
        raw = base_delay_s
    elif exponent * math.log(multiplier) >= math.log(max_delay_s) - math.log(base_delay_s):
        raw = max_delay_s  # clamped: pow() is never called with an exponent that could overflow
    else:
        raw = min(max_delay_s, base_delay_s * math.pow(multiplier, exponent))
    if jitter == "none":
        return raw
    if jitter == "full":
        return u * raw
    if jitter == "equal":
        return raw / 2.0 + u * raw / 2.0
    raise ValueError(f"jitter must be one of none, full, equal; got {jitter!r}")
