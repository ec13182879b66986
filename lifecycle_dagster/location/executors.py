"""The Dagster executor of every generated job, chosen by ``LIFECYCLE_DAGSTER_EXECUTOR``.

``in_process`` (the default: one process runs every step, for UI launches too), ``multiprocess``
(a process per step), ``celery`` (dagster-celery's ``celery_executor``: steps go to Celery workers,
see :mod:`lifecycle_dagster.location.celery_app`; the ``[celery]`` extra), ``k8s``
(``dagster_k8s.k8s_job_executor``: a Kubernetes job per step; the ``[k8s]`` extra), or
``MODULE:ATTRIBUTE`` naming any :class:`dagster.ExecutorDefinition`.

The executor is set on the job (``executor_def``), never in run config: the sensors, the CLI and
the examples write no ``execution:`` block, so the run config they produce is valid under every
choice. The Celery executor is configured here, from ``LIFECYCLE_DAGSTER_CELERY_BROKER`` /
``_BACKEND`` / ``_CONFIG``: the broker and backend as environment references (read in the run
worker; never copied into a job or run snapshot). The choice is read when jobs are built, so every
process that builds them (code server, daemon, run, step and Celery workers) must see the same
environment, like ``DATABASE_URL``: the same environment gives the same job.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import dagster as dg

from lifecycle_dagster.settings import Settings

#: the variable that chooses the executor
EXECUTOR_ENV = "LIFECYCLE_DAGSTER_EXECUTOR"
#: the Celery settings every lifecycle worker and run worker use unless LIFECYCLE_DAGSTER_CELERY_CONFIG
#: says otherwise: a step's message is acknowledged when the step ends, so a worker killed mid-step
#: leaves it to be delivered again (at once when only its pool process died; after the broker's
#: visibility timeout when the whole worker died), and a worker reserves one step at a time
CELERY_DEFAULTS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}
#: the choices by name, and what to install for each (None: part of dagster)
NAMED = {
    "in_process": ("dagster", "in_process_executor", None),
    "multiprocess": ("dagster", "multiprocess_executor", None),
    "celery": ("dagster_celery", "celery_executor", "pip install 'lifecycle-dagster[celery]'"),
    "k8s": ("dagster_k8s", "k8s_job_executor", "pip install 'lifecycle-dagster[k8s]'"),
}


class ExecutorSettingError(ValueError):
    """``LIFECYCLE_DAGSTER_EXECUTOR`` names no usable executor (the message names the variable, its
    value and what to install): the code location loads no job until it is fixed."""


def celery_config(settings: Settings | None = None) -> dict[str, Any]:
    """The ``celery_executor`` config of every job: ``broker`` / ``backend`` as references to
    ``LIFECYCLE_DAGSTER_CELERY_BROKER`` / ``_BACKEND`` when set (dagster-celery's defaults
    otherwise), ``config_source``: :data:`CELERY_DEFAULTS` under ``LIFECYCLE_DAGSTER_CELERY_CONFIG``.

    Raises:
        ValueError: ``LIFECYCLE_DAGSTER_CELERY_CONFIG`` is not a JSON object.
    """
    settings = settings or Settings.from_env()
    config: dict[str, Any] = {"config_source": {**CELERY_DEFAULTS, **settings.celery_config}}
    if settings.celery_broker:
        config["broker"] = {"env": "LIFECYCLE_DAGSTER_CELERY_BROKER"}
    if settings.celery_backend:
        config["backend"] = {"env": "LIFECYCLE_DAGSTER_CELERY_BACKEND"}
    return config


def _resolve(choice: str) -> object:
    """The object a choice names: a name of :data:`NAMED` or ``MODULE:ATTRIBUTE``.

    Raises:
        ExecutorSettingError: unknown name, or the module or attribute cannot be found.
    """
    if choice in NAMED:
        module, attribute, install = NAMED[choice]
        try:
            return getattr(importlib.import_module(module), attribute)
        except ImportError as exc:
            raise ExecutorSettingError(
                f"{EXECUTOR_ENV}={choice!r} needs the package {module} ({install}): {exc}"
            ) from exc
    if ":" not in choice:
        raise ExecutorSettingError(
            f"{EXECUTOR_ENV}={choice!r} is not one of {', '.join(NAMED)} nor MODULE:ATTRIBUTE "
            "naming an ExecutorDefinition"
        )
    try:
        return pkgutil.resolve_name(choice)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ExecutorSettingError(
            f"{EXECUTOR_ENV}={choice!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc


def executor_def(settings: Settings | None = None) -> dg.ExecutorDefinition:
    """The executor of every generated job (see the module docstring); a pure function of the
    environment (``settings``: default ``Settings.from_env()``).

    Raises:
        ExecutorSettingError: the value is unknown, its package is not installed (the message says
            what to install), or it names something that is not an ExecutorDefinition, or the
            Celery settings are not usable.
    """
    settings = settings or Settings.from_env()
    choice = settings.executor
    found = _resolve(choice)
    if not isinstance(found, dg.ExecutorDefinition):
        raise ExecutorSettingError(
            f"{EXECUTOR_ENV}={choice!r} names a {type(found).__name__}, not a dagster ExecutorDefinition"
        )
    if choice != "celery":
        return found
    try:
        config = celery_config(settings)
    except ValueError as exc:
        raise ExecutorSettingError(f"{EXECUTOR_ENV}='celery': {exc}") from exc
    # a fixed config and an empty schema: a run config's `execution:` block is refused, not ignored
    return found.configured(lambda _run_config: config, name="celery", config_schema={})
