"""The executor of every generated job (LIFECYCLE_DAGSTER_EXECUTOR), the run config the examples
carry, and a process without DATABASE_URL (no database needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config

from lifecycle_dagster.location.executors import ExecutorSettingError, executor_def
from lifecycle_dagster.location.job_factory import build_compensation_job, build_job
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import process_kind

REPO = Path(__file__).resolve().parents[2]
ROW = {
    "id": "00000000-0000-4000-8000-000000000001",
    "name": "wf",
    "version": 1,
    "description": None,
    "dag_schema": {"stages": [{"id": "a", "capability": "opportunity", "next": ["b"]}, {"id": "b", "capability": "x"}]},
}


def _settings(**env: str) -> Settings:
    return Settings(database_url=None, data_dir=Path("/nonexistent"), dagster_home=Path("/nonexistent"), env=env)


def _accepts(job: dg.JobDefinition, run_config: dict[str, object]) -> bool:
    return bool(validate_config(job.run_config_schema.config_type, run_config).success)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "in_process"),
        ("multiprocess", "multiprocess"),
        ("celery", "celery"),
        ("dagster:multiprocess_executor", "multiprocess"),
    ],
)
def test_every_job_gets_the_executor_of_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, name: str
) -> None:
    if value is None:
        monkeypatch.delenv("LIFECYCLE_DAGSTER_EXECUTOR", raising=False)
    else:
        monkeypatch.setenv("LIFECYCLE_DAGSTER_EXECUTOR", value)
    jobs = [build_job(ROW), build_compensation_job(ROW)]
    assert [j.executor_def.name for j in jobs] == [name, name]
    # what the sensors, the CLI and the examples write (no `execution:` block) is valid under every choice
    example = yaml.safe_load((REPO / "examples" / "acme_run.yaml").read_text())
    assert all(_accepts(j, {}) and _accepts(j, example) for j in jobs)


def test_the_celery_executor_is_configured_from_the_settings_not_the_run_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_EXECUTOR", "celery")
    monkeypatch.setenv("LIFECYCLE_DAGSTER_CELERY_BROKER", "redis://:secret@broker.example:6379/0")
    monkeypatch.setenv("LIFECYCLE_DAGSTER_CELERY_CONFIG", '{"broker_transport_options": {"visibility_timeout": 7200}}')
    job = build_job(ROW)
    assert not _accepts(job, {"execution": {"config": {"broker": "redis://elsewhere"}}})  # refused, not ignored
    from dagster._serdes import serialize_value

    snapshot = serialize_value(job.get_job_snapshot())
    assert "secret" not in snapshot and "broker.example" not in snapshot  # read in the run worker, never stored
    from lifecycle_dagster.location.executors import celery_config

    assert celery_config() == {
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_transport_options": {"visibility_timeout": 7200},
        },
        "broker": {"env": "LIFECYCLE_DAGSTER_CELERY_BROKER"},
    }


def test_the_same_environment_gives_the_same_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_EXECUTOR", "celery")
    first, second = build_job(ROW), build_job(ROW)
    assert first.get_job_snapshot_id() == second.get_job_snapshot_id()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EXECUTOR": "threads"},
            "LIFECYCLE_DAGSTER_EXECUTOR='threads' is not one of in_process, multiprocess, celery, k8s",
        ),
        (
            {"EXECUTOR": "k8s"},
            "LIFECYCLE_DAGSTER_EXECUTOR='k8s' needs the package dagster_k8s (pip install 'lifecycle-dagster[k8s]')",
        ),
        (
            {"EXECUTOR": "no_such_module_xyz:executor"},
            "LIFECYCLE_DAGSTER_EXECUTOR='no_such_module_xyz:executor' cannot be",
        ),
        (
            {"EXECUTOR": "dagster:job"},
            "LIFECYCLE_DAGSTER_EXECUTOR='dagster:job' names a function, not a dagster Executor",
        ),
        (
            {"EXECUTOR": "celery", "CELERY_CONFIG": "[1]"},
            "LIFECYCLE_DAGSTER_EXECUTOR='celery': LIFECYCLE_DAGSTER_CELERY_CONFIG must be a JSON object",
        ),
    ],
)
def test_a_bad_setting_names_the_variable(env: dict[str, str], message: str) -> None:
    if env["EXECUTOR"] == "k8s":
        try:
            import dagster_k8s  # noqa: F401
        except ImportError:
            pass
        else:
            return  # installed here: nothing to refuse
    with pytest.raises(ExecutorSettingError) as err:
        executor_def(_settings(**{f"LIFECYCLE_DAGSTER_{k}": v for k, v in env.items()}))
    assert str(err.value).startswith(message), str(err.value)


def test_the_run_config_example_carries_the_acme_context_inline() -> None:
    """examples/acme_run.yaml holds examples/acme.json's context (no relative context_file: each
    worker would read it from its own directory)."""
    config = yaml.safe_load((REPO / "examples" / "acme_run.yaml").read_text())
    assert config == {
        "resources": {
            "lifecycle_request": {"config": {"context": json.loads((REPO / "examples" / "acme.json").read_text())}}
        }
    }


def test_a_process_without_database_url_and_no_terminal_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LIFECYCLE_DAGSTER_EMBEDDED")}
    env["LIFECYCLE_DAGSTER_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-c", "from lifecycle_dagster.store.db import resolve_dsn; resolve_dsn()"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "DatabaseUrlMissing: DATABASE_URL is not set in this non-interactive process" in proc.stderr
    assert "set DATABASE_URL on every worker" in proc.stderr
    assert "lifecycle-dagster dev` / `lifecycle-dagster run`" in proc.stderr
    assert not (tmp_path / "data").exists()  # no private server, not even its folder


def test_the_message_names_the_kind_of_process() -> None:
    assert (
        process_kind(["/venv/bin/celery", "-A", "lifecycle_dagster.location.celery_app", "worker"]) == "Celery worker"
    )
    assert process_kind(["/venv/bin/dagster", "api", "execute_run", "{}"]) == "Dagster run worker"
    assert process_kind(["/venv/bin/dagster", "api", "execute_step", "{}"]) == "Dagster step worker"
    assert (
        process_kind(["/venv/bin/dagster", "code-server", "start", "-m", "lifecycle_dagster"]) == "Dagster code server"
    )
    assert process_kind(["python", "-c", "..."]) == "non-interactive"
