"""``python -m bench [--quick] [--only SECTIONS]``: run the benchmarks, write ``bench/results/``.

Sections: overhead, queue, history, sensors, peers, retention (see README, "Benchmarks"). Everything runs on a
throwaway PostgreSQL cluster started here (``bench/pg.py``) and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.pg import Cluster, cluster

SECTIONS = ("overhead", "queue", "history", "sensors", "peers", "retention")


@dataclass
class Context:
    """What every section gets: the cluster, its databases, a Dagster home, where results go."""

    cluster: Cluster
    quick: bool
    out_dir: Path
    admin_dsn: str
    app_db: str
    app_dsn: str
    dagster_db: str
    dagster_home: Path
    work: Path
    notes: list[str] = field(default_factory=list)


def _prepare(c: Cluster, quick: bool, out_dir: Path) -> Context:
    from lifecycle_dagster.location.instance import prepare_home

    admin = c.dsn()
    with common.connect(admin) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    app_dsn = c.create_db("bench_app")
    common.prepare_app_db(app_dsn)
    dagster_dsn = c.create_db("bench_dagster")
    work = Path(tempfile.mkdtemp(prefix="bench-work-"))
    home = prepare_home(work / "dagster_home", dagster_dsn)
    os.environ["DATABASE_URL"] = app_dsn
    os.environ["DAGSTER_HOME"] = str(home)
    return Context(c, quick, out_dir, admin, "bench_app", app_dsn, "bench_dagster", home, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small scales: a smoke run of a few minutes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results"), help="results folder")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": common.machine(),
        "load_average_at_start": common.load_average(),
        "cpu_busy_at_start": round(common.cpu_busy_fraction(2.0), 3),
        "sections": {},
        "seconds": {},
        "errors": {},
    }
    with cluster() as c:
        results["postgres"] = c.server_version()
        ctx = _prepare(c, args.quick, out_dir)
        for name in SECTIONS:
            if name not in only:
                continue
            print(f"== {name}", flush=True)
            t = time.monotonic()
            try:
                module = __import__(f"bench.{name}_bench", fromlist=["run"])
                results["sections"][name] = module.run(ctx)
            except Exception as exc:  # one failed section must not lose the others' figures
                traceback.print_exc()
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
            results["seconds"][name] = round(time.monotonic() - t, 1)
            print(f"   {name}: {results['seconds'][name]} s", flush=True)
    results["load_average_at_end"] = common.load_average()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results["notes"] = ctx.notes
    from bench import report

    report.write(results, out_dir)
    print(f"results in {out_dir} ({results['total_seconds']} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
