"""Unit tests use no database and start no Dagster process: asking for a database fixture fails."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server_dsn() -> str:
    pytest.fail("a unit test asked for a database: move it to tests/sql, tests/integration or tests/e2e")
