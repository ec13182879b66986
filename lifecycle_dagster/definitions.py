"""The code location's entry point, the module ``workspace.yaml`` and ``[tool.dagster]`` name:
``defs``, built in :mod:`lifecycle_dagster.location.definitions`."""

from lifecycle_dagster.location.definitions import defs

__all__ = ["defs"]
