"""lifecycle-dagster: multi-stage agent workflows kept in Postgres, run as Dagster jobs.

Importing the package exposes the code location's ``defs`` (for ``dagster ... -m
lifecycle_dagster``); building it reads the database only when Dagster loads the location.
"""

from lifecycle_dagster.definitions import defs

__all__ = ["defs"]
