"""Where the database and the Dagster home are, from the environment.

``DATABASE_URL``
    libpq URI of the orchestration database (e.g. a Supabase connection string). Unset: the
    embedded PostgreSQL server of :mod:`lifecycle_dagster.embedded` is used.
``LIFECYCLE_DAGSTER_DATA_DIR``
    folder for the embedded server's data and the default Dagster home
    (default: the user data dir, e.g. ``~/.local/share/lifecycle-dagster``).
``DAGSTER_HOME``
    Dagster's instance folder (default: ``<data dir>/dagster_home``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

#: the database the embedded server holds the orchestration schema in
EMBEDDED_DATABASE = "lifecycle"
#: the schema Dagster's own tables live in, inside the orchestration database
DAGSTER_SCHEMA = "dagster"


@dataclass(frozen=True)
class Settings:
    """Resolved configuration; see the module docstring for the variables."""

    database_url: str | None
    data_dir: Path
    dagster_home: Path
    #: True when DAGSTER_HOME was not set: the tool owns the home and rewrites its dagster.yaml
    dagster_home_managed: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment (see the module docstring)."""
        data_dir = (
            Path(
                os.environ.get("LIFECYCLE_DAGSTER_DATA_DIR")
                or platformdirs.user_data_dir("lifecycle-dagster", appauthor=False)
            )
            .expanduser()
            .resolve()
        )
        home = os.environ.get("DAGSTER_HOME")
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=data_dir,
            dagster_home=Path(home).expanduser().resolve() if home else data_dir / "dagster_home",
            dagster_home_managed=not home,
        )

    @property
    def embedded(self) -> bool:
        """True when no ``DATABASE_URL`` is set and the embedded server is used."""
        return self.database_url is None

    @property
    def pgdata(self) -> Path:
        """The embedded server's data folder."""
        return self.data_dir / "pgdata"
