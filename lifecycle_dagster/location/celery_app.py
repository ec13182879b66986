"""The Celery app of lifecycle-dagster's Celery workers (``LIFECYCLE_DAGSTER_EXECUTOR=celery``).

Start a worker with the same environment as the code server and the daemon (``DATABASE_URL``,
``DAGSTER_HOME``, ``LIFECYCLE_DAGSTER_EXECUTOR=celery``, ``LIFECYCLE_DAGSTER_CELERY_*``,
``LIFECYCLE_DAGSTER_AGENTS``)::

    celery -A lifecycle_dagster.location.celery_app worker --loglevel INFO -n w1@%h

The app is dagster-celery's (its ``execute_plan`` task runs one step; ``execute_job`` and
``resume_job`` serve dagster-celery's ``CeleryRunLauncher``), configured from the same settings
as the executor of the jobs (:func:`lifecycle_dagster.location.executors.celery_config`): the
broker and backend of ``LIFECYCLE_DAGSTER_CELERY_BROKER`` / ``_BACKEND`` (dagster-celery's
defaults otherwise) and the Celery settings of ``LIFECYCLE_DAGSTER_CELERY_CONFIG`` over ours
(``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1``). So no
``dagster_celery_config`` module, ``-y`` file or run config has to repeat them.

Importing this module needs the ``[celery]`` extra (dagster-celery).
"""

from __future__ import annotations

from typing import Any

from dagster._core.execution.retries import RetryMode
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from lifecycle_dagster.location.executors import CELERY_DEFAULTS
from lifecycle_dagster.settings import Settings


def app_args(settings: Settings | None = None) -> dict[str, Any]:
    """The arguments of the Celery app: what ``celery_executor`` builds in a run worker from the
    same settings (``settings``: default ``Settings.from_env()``).

    Raises:
        ValueError: ``LIFECYCLE_DAGSTER_CELERY_CONFIG`` is not a JSON object.
    """
    settings = settings or Settings.from_env()
    executor = CeleryExecutor(  # type: ignore[no-untyped-call]
        retries=RetryMode(RetryMode.DISABLED),
        broker=settings.celery_broker,
        backend=settings.celery_backend,
        config_source={**CELERY_DEFAULTS, **settings.celery_config},
    )
    return dict(executor.app_args())  # type: ignore[no-untyped-call]


#: the worker's app (``celery -A lifecycle_dagster.location.celery_app worker``)
app = make_app(app_args())  # type: ignore[no-untyped-call]
execute_plan = create_task(app)  # type: ignore[no-untyped-call]
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
