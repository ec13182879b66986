"""The ``lifecycle-dagster`` command: one module per command group, shared helpers in ``common``."""
