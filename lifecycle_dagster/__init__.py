"""lifecycle-dagster: multi-stage agent workflows kept in Postgres, run as Dagster jobs.

``lifecycle_dagster.defs`` is the code location's ``Definitions`` (for ``dagster ... -m
lifecycle_dagster``), imported on first access: ``import lifecycle_dagster`` alone, or a module of
it such as the pure DAG model or the queue worker, loads neither Dagster nor the job factory.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from lifecycle_dagster.location.definitions import defs

        return defs
    raise AttributeError(f"module 'lifecycle_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "defs"})
