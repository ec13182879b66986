"""Write ``results.json``, ``results.md`` and the PNG plots from one run's results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import write_json


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) for every target of issue 7 that this run measured."""
    s = r["sections"]
    rows: list[tuple[str, str, str, bool | None]] = []
    if "overhead" in s:
        o = s["overhead"]
        rows.append(("lifecycle / bare Dagster job, median run time", _f(o["ratio_of_medians"], 2), "≤ 1.15",
                     o["ratio_of_medians"] <= 1.15))  # fmt: skip
    if "queue" in s:
        q = s["queue"]
        rows.append(("4 agent workers / raw SKIP LOCKED loop (4 processes), synchronous_commit off",
                     _f(q["four_workers_vs_raw"], 2), "≥ 0.50", q["four_workers_vs_raw"] >= 0.5))  # fmt: skip
        durable = q["four_workers_vs_raw_durable"]
        rows.append(("the same with durable commits (fsync-bound on this machine's shared disk)",
                     _f(durable, 2), "≥ 0.50", durable >= 0.5))  # fmt: skip
        lat = next(x for x in q["pickup_latency_ms"] if x["mode"] == "listen")
        rows.append(("enqueue → pickup p50 / p99, LISTEN/NOTIFY (ms)", f"{_f(lat['median'], 1)} / {_f(lat['p99'], 1)}",
                     "≤ 10 / ≤ 50", lat["median"] <= 10 and lat["p99"] <= 50))  # fmt: skip
    if "history" in s:
        h = s["history"]
        top = h["levels"][-1]["history_events"]
        rows.append((f"audit feed p99 at {top:,} events (ms)", _f(h["feed_p99_ms_at_largest"], 2), "≤ 10",
                     h["feed_p99_ms_at_largest"] <= 10))  # fmt: skip
        rows.append(("claim p99, largest / smallest history", _f(h["claim_p99_growth"], 2), "flat (≤ 2)",
                     h["claim_p99_growth"] <= 2))  # fmt: skip
        rows.append(("compensation, largest / smallest history", _f(h["compensation_growth"], 2), "flat (≤ 2)",
                     h["compensation_growth"] <= 2))  # fmt: skip
    if "sensors" in s:
        for p in s["sensors"]["phases"]:
            worst = p["insert_to_created_s"]["max"]
            rows.append((f"pending row → run created, max (s), {p['phase']} (interval {p['sensor_interval_s']} s)",
                         _f(worst, 1), f"≤ {p['target_s']}", worst <= p["target_s"]))  # fmt: skip
            worst = p["failure_to_compensation_created_s"]["max"]
            rows.append((f"run failure → compensation run created, max (s), {p['phase']} (reconciler "
                         f"{p['reconciler_interval_s']} s)", _f(worst, 1), f"≤ {p['failure_target_s']}",
                         worst <= p["failure_target_s"]))  # fmt: skip
    if "peers" in s and "batch" in s["peers"]:
        b = s["peers"]["batch"]
        dbos = s["peers"]["systems"].get("dbos", {}).get("sequential", {}).get("rate_per_s")
        best = _best_trial(b)
        if best is not None and dbos is not None:
            rows.append((f"batch mode in process (batches of {best['batch_size']}) / DBOS 1 client, executions/s",
                         f"{_f(best['rate_per_s'], 1)} / {_f(dbos, 1)}", "≥ 1",
                         best["rate_per_s"] >= dbos))  # fmt: skip
        for d in b.get("daemon") or []:
            p99 = d["latency_s"]["p99"]
            rows.append((f"batch mode with the daemon ({d['batch_setting']}), {d['executions']:,} rows inserted at "
                         "once: p99 insert → completed (s)", _f(p99, 1), f"≤ {_f(b['target_daemon_p99_s'], 0)}",
                         d["finished"] and p99 <= b["target_daemon_p99_s"]))  # fmt: skip
    return rows


def _best_trial(b: dict[str, Any]) -> dict[str, Any] | None:
    """The in-process batch trial of the best batch size."""
    size = b["in_process"]["best_batch_size"]
    return next((t for t in b["in_process"]["trials"] if t["batch_size"] == size), None)


def _batch_md(pe: dict[str, Any]) -> list[str]:
    """Batch mode beside DBOS and one run per execution (section 5)."""
    b = pe["batch"]
    la = b["load_average"]
    out = [
        "",
        f"### Batch mode (issue 18): {b['executions']:,} executions, many per Dagster run",
        "",
        "Latency: from each row's insert (`created_at`) to the commit of its `workflow_completed` event "
        "(`pg_xact_commit_timestamp`); executions/s: executions / (first insert → last completion). The other "
        "systems' latency is one execution's call time (their clients run one after the other).",
        "",
        "| system | executions/s | latency p50 / p99 | |",
        "|---|---|---|---|",
    ]
    for t in b["in_process"]["trials"]:
        lat = t["latency_s"]
        best = " (best)" if t["batch_size"] == b["in_process"]["best_batch_size"] else ""
        out.append(
            f"| lifecycle-dagster batch, in process, batches of {t['batch_size']}{best} | "
            f"**{_f(t['rate_per_s'], 1)}** | "
            f"{_f(lat['median'], 1)} / {_f(lat['p99'], 1)} s | {len(t['batches'])} run(s) of "
            f"{_f(sum(t['run_s']) / len(t['run_s']), 1)} s, {t.get('step_retries', 0)} step retries; CPU: this "
            f"process {_f(t['client_cpu_s'], 1)} s, Postgres {_f(t['postgres_cpu_s'], 1)} s |"
        )
    for d in b["daemon"]:
        out.append(
            f"| lifecycle-dagster batch, `dagster-daemon` (`LIFECYCLE_DAGSTER_BATCH={d['batch_setting']}`, sensors "
            f"{d['sensor_interval_s']} s, dequeue {d['dequeue_interval_s']} s) | **{_f(d['rate_per_s'], 1)}** | "
            f"{_f(d['latency_s']['median'], 1)} / {_f(d['latency_s']['p99'], 1)} s | {d['completed']:,} of "
            f"{d['executions']:,} completed; runs (size: created after insert, created → started, run time, "
            "step retries): "
            + "; ".join(
                f"{r['size']}: {_f(r['created_after_insert_s'], 1)} s, {_f(r['created_to_started_s'], 1)} s, "
                f"{_f(r['started_to_ended_s'], 1)} s, {r['step_retries']} ({r['status']})"
                for r in d.get("runs") or []
            )
            + " |"
        )
    for name, label in (("dbos", "DBOS"), ("lifecycle-dagster", "lifecycle-dagster, one run per execution")):
        sysr = pe["systems"].get(name)
        if not sysr:
            continue
        for key, clients in (("sequential", "1 client"), ("concurrent_4", "4 clients")):
            r_ = sysr[key]
            out.append(
                f"| {label}, {clients} | {_f(r_['rate_per_s'], 1)} | {_f(r_['latency_ms']['median'], 0)} / "
                f"{_f(r_['latency_ms']['p99'], 0)} ms (per execution) | {r_['executions']} executions |"
            )
    out += [
        "",
        "Load average (1, 5, 15 min): "
        + "; ".join(f"{k.replace('_', ' ')} {', '.join(f'{x:.2f}' for x in v)}" for k, v in la.items())
        + ".",
    ]
    for d in b["daemon"]:
        act = d.get("database_activity") or {}
        if act.get("top"):
            out += [
                "",
                f"What the daemon run's database did (`LIFECYCLE_DAGSTER_BATCH={d['batch_setting']}`; pg_stat_activity "
                f"sampled every 0.1 s, {act['samples']} samples; active backends by statement and wait):",
                "",
                "| samples | wait | statement |",
                "|---|---|---|",
            ]
            out += [f"| {t['samples']} | {t['wait']} | `{t['statement']}` |" for t in act["top"][:8]]
    p = b.get("profile")
    if p:
        tr = p["trial"]
        sp = p["profile_s"]
        out += [
            "",
            f"Where the time of an in-process batch run goes: one more trial ({p['executions']:,} executions, "
            f"batches of {p['batch_size']}: {_f(tr['rate_per_s'], 1)}/s under the profilers), pyinstrument "
            "(`profile_batch.txt`): "
            f"{_f(sp['total_s'], 1)} s in all, lifecycle_dagster {_f(sp['ours_s'], 1)} s of which waiting for "
            f"psycopg (SQL) {_f(sp['ours_psycopg_s'], 1)} s, Dagster and the rest {_f(sp['dagster_s'], 1)} s. "
            "Per statement (pg_stat_statements, nested included; ms per execution):",
            "",
            "| ms / execution | calls / execution | top level | statement |",
            "|---|---|---|---|",
        ]
        n = max(1, p["executions"])
        out += [
            f"| {_f(t['ms'] / n, 2)} | {_f(t['calls'] / n, 3)} | {'yes' if t['toplevel'] else ''} | "
            f"`{t['query'][:90]}` |"
            for t in p["top_statements"][:12]
        ]
        out += [
            "",
            "Per function (pg_stat_user_functions, `track_functions = 'all'`; ms per execution):",
            "",
            "| function | calls / execution | self ms / execution | total ms / execution |",
            "|---|---|---|---|",
        ]
        out += [
            f"| `{f['function']}` | {_f(f['calls'] / n, 1)} | {_f(f['self_ms'] / n, 2)} | {_f(f['total_ms'] / n, 2)} |"
            for f in p["functions_by_self_time"][:12]
        ]
    return out


def markdown(r: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    s = r["sections"]
    m = r["machine"]
    out = [
        "# Benchmark results",
        "",
        f"{r['date']}, {'quick (smoke) run' if r['quick'] else 'full run'}, {r['total_seconds']:.0f} s. Machine: "
        f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, PostgreSQL {r.get('postgres')} "
        f"(a throwaway cluster started by the harness). Load average at start "
        f"{', '.join(f'{x:.2f}' for x in r['load_average_at_start'])}, CPU busy {r['cpu_busy_at_start']:.0%} "
        f"before starting; at the end {', '.join(f'{x:.2f}' for x in r['load_average_at_end'])}.",
        "",
        "## Targets",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} | {_yes(d)} |" for a, b, c, d in targets(r)]
    if r.get("errors"):
        out += ["", "Sections that failed: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    if "overhead" in s:
        o = s["overhead"]
        st = o["statements_per_stage"]
        pl = o["profile_ms_per_run_lifecycle"]
        pb = o["profile_ms_per_run_bare"]
        out += [
            "",
            "## 1. Overhead (execute_in_process, in-process executor, same dagster-postgres instance)",
            "",
            f"{o['runs_each']} runs of each, interleaved. Median ms (p90): bare job {_f(o['bare_ms']['median'])} "
            f"({_f(o['bare_ms']['p90'])}), lifecycle job {_f(o['lifecycle_ms']['median'])} "
            f"({_f(o['lifecycle_ms']['p90'])}); ratio of medians **{_f(o['ratio_of_medians'], 2)}** "
            f"(median of pairwise ratios {_f(o['median_pair_ratio'], 2)}); bookkeeping "
            f"**{_f(o['bookkeeping_ms_per_stage'])} ms per stage**.",
            "",
            "| per stage | value |",
            "|---|---|",
            f"| our statements sent (round trips) | {_f(st['ours_round_trips'])} |",
            f"| our statements executed (with those inside our SQL functions and triggers) | {_f(st['ours_all'])} |",
            f"| our statements' execution time in Postgres (ms) | {_f(st['ours_exec_ms'], 2)} |",
            f"| Dagster storage round trips, lifecycle job / bare job | {_f(st['dagster_round_trips_lifecycle'])} / "
            f"{_f(st['dagster_round_trips_bare'])} |",
            "",
            f"Profile (pyinstrument, {o['profile_runs']} runs of each, ms per run): lifecycle job "
            f"{_f(pl['total_ms'])} = lifecycle_dagster {_f(pl['ours_ms'])} (of which psycopg: connect and SQL round "
            f"trips {_f(pl['ours_psycopg_ms'])}) + Dagster {_f(pl['dagster_ms'])}; bare job {_f(pb['total_ms'])} "
            f"(all Dagster). In lifecycle_dagster: "
            + ", ".join(
                f"{k[5:-3]} {_f(v)}"
                for k, v in pl.items()
                if k.startswith("ours_") and k not in ("ours_ms", "ours_psycopg_ms")
            )
            + ". The statements taking the most time, per stage:",
            "",
            "| ms | calls | top level | statement |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {_f(t['ms_per_stage'], 2)} | {_f(t['calls_per_stage'], 1)} | {'yes' if t['toplevel'] else ''} | "
            f"`{t['query'][:90]}` |"
            for t in o["top_statements_per_stage"][:8]
        ]
    if "queue" in s:
        q = s["queue"]
        cells = q["cells"]
        rates = {(m["kind"], m["workers"], m["commit"]): m["rate_per_s"] for m in q["mean_rate_per_s"]}
        stage = {(c["workers"], c["commit"]): c for c in cells if c["kind"] == "stage" and c["repeat"] == 0}
        out += [
            "",
            "## 2. Task queue",
            "",
            "| commits | workers (processes) | raw SKIP LOCKED loop, tasks/s | `agent serve` workers, stage tasks/s "
            "| ratio | the repeats (raw; workers) |",
            "|---|---|---|---|---|---|",
        ]
        for w, commit in sorted(stage, key=lambda k: (k[1] != "async", k[0])):
            r_ = rates.get(("raw", w, commit))
            a_ = rates[("stage", w, commit)]
            reps = "; ".join(
                ", ".join(
                    _f(c["rate_per_s"], 0)
                    for c in cells
                    if c["kind"] == k and c["workers"] == w and c["commit"] == commit
                )
                for k in ("raw", "stage")
            )
            label = "synchronous_commit off" if commit == "async" else "durable"
            out.append(f"| {label} | {w} | {_f(r_, 0)} | {_f(a_, 0)} | {_f(a_ / r_ if r_ else None, 2)} | {reps} |")
        bare = next((c for c in cells if c["kind"] == "bare"), None)
        out.append("")
        if bare:
            out.append(
                f"\nTasks of no execution (the protocol alone), 4 workers: {_f(bare['rate_per_s'], 0)}/s. "
                "CPU per task with 4 workers (stage tasks): workers "
                f"{_f(stage.get((4, 'async'), {}).get('worker_cpu_ms_per_task'), 2)}"
                f" ms, Postgres {_f(stage.get((4, 'async'), {}).get('postgres_cpu_ms_per_task'), 2)} ms."
            )
        out.append(
            "pgbench -N (simple-update transactions/s): "
            + ", ".join(f"{p['commit']}, {p['clients']} client(s) {_f(p['tps'], 0)}" for p in q["pgbench"])
            + "."
        )
        out += ["", "| enqueue → pickup (ms) | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
        for lat in q["pickup_latency_ms"]:
            label = "LISTEN/NOTIFY" if lat["mode"] == "listen" else "polling alone (every 1 s)"
            out.append(
                f"| {label} | {lat['n']} | {_f(lat['median'], 1)} | {_f(lat['p90'], 1)} | {_f(lat['p99'], 1)} |"
                f" {_f(lat['max'], 1)} |"
            )
        out += ["", "| table after the queue cells | live | dead | total size |", "|---|---|---|---|"]
        out += [
            f"| {t['table']} | {t['live']} | {t['dead']} | {t['total_bytes'] / 1024:,.0f} KiB |"
            for t in q["tables_after"]
        ]
        if q.get("top_statements_per_task_4_workers"):
            out += ["", "Statements taking the most time per task (4 workers):", "",
                    "| ms | calls | statement |", "|---|---|---|"]  # fmt: skip
            out += [
                f"| {_f(t['ms_per_task'], 3)} | {_f(t['calls_per_task'], 2)} | `{t['query'][:90]}` |"
                for t in q["top_statements_per_task_4_workers"][:6]
            ]
    if "history" in s:
        h = s["history"]
        out += [
            "",
            "## 3. Scaling with history",
            "",
            "| events (tasks) of history | feed p50 / p99 | enqueue p99 | claim p99 | complete p99 "
            "| compensation median |",
            "|---|---|---|---|---|---|",
        ]

        def row(level: dict[str, Any], label: str) -> str:
            return (
                f"| {label} | {_f(level['feed_ms']['median'], 2)} / {_f(level['feed_ms']['p99'], 2)} | "
                f"{_f(level['enqueue_ms']['p99'], 2)} | {_f(level['claim_ms']['p99'], 2)} | "
                f"{_f(level['complete_ms']['p99'], 2)} | {_f(level['compensation_ms']['median'], 1)} |"
            )

        for level in h["levels"]:
            out.append(row(level, f"{level['counts']['events']:,} ({level['counts']['tasks']:,})"))
        wi = h["largest_with_stage_log_index"]
        out.append(row(wi, f"{wi['counts']['events']:,}, with an index on task_queue (stage_log_id)"))
        out += [
            "",
            "All in ms. Compensation: lifecycle_v1 with stage 4 failing, stages 3..1 undone "
            "(perform_workflow_compensation and each undo as the compensation job's ops run them, without Dagster).",
            "",
            "| stages in the chain | undone | compensation (ms) | per undone stage (ms) | forward run (ms) |",
            "|---|---|---|---|---|",
        ]
        for c in h["compensation_by_stages"]:
            undone = f"{c['undone']} of {c['to_undo']}" + ("" if c["finished"] else " (stopped: time budget)")
            out.append(
                f"| {c['stages']} | {undone} | {_f(c['compensation_ms']['median'], 0)} | "
                f"{_f(c['compensation_ms_per_undone_stage']['median'], 1)} | {_f(c['forward_ms']['median'], 0)} |"
            )
        if h.get("compensation_by_stages_exponent") is not None:
            out.append(f"\nCompensation time grows as stages^{_f(h['compensation_by_stages_exponent'], 1)} "
                       "between the two largest chains that finished.")  # fmt: skip
    if "sensors" in s:
        out += [
            "",
            "## 4. Sensors (dagster-daemon running)",
            "",
            "| phase | intervals (s): launch / failure / reconciler / dequeue | insert → run created median / max | "
            "created → started median / max | run failure → compensation run created median / max "
            "(failure → compensating, compensating → run) |",
            "|---|---|---|---|---|",
        ]
        for p in s["sensors"]["phases"]:
            a, b, c = p["insert_to_created_s"], p["created_to_started_s"], p["failure_to_compensation_created_s"]
            out.append(
                f"| {p['phase']} | {p['sensor_interval_s']} / {p['failure_sensor_interval_s']} / "
                f"{p['reconciler_interval_s']} / {p['dequeue_interval_s']} | "
                f"{_f(a['median'])} / {_f(a['max'])} (n {a['n']}) | {_f(b['median'])} / {_f(b['max'])} | "
                f"{_f(c['median'])} / {_f(c['max'])} (n {c['n']}; {_f(p['failure_to_compensating_s']['median'])} + "
                f"{_f(p['compensating_to_run_created_s']['median'])}) |"
            )
    if "peers" in s:
        pe = s["peers"]
        out += [
            "",
            "## 5. Peers (the same 5-stage lifecycle, no-op stages, same Postgres)",
            "",
            "| system | executions/s, 1 client | executions/s, 4 clients | median ms per execution (1 client) | "
            "undo variant: stages undone | |",
            "|---|---|---|---|---|---|",
        ]
        for name, sysr in pe["systems"].items():
            outcome = sysr["undo"]["outcome"] or {}
            undone = ", ".join(outcome.get("undone") or []) or "none"
            out.append(
                f"| {name} | {_f(sysr['sequential']['rate_per_s'], 2)} | {_f(sysr['concurrent_4']['rate_per_s'], 2)} | "
                f"{_f(sysr['sequential']['latency_ms']['median'], 0)} | {undone} | {outcome.get('status', '')} |"
            )
        out += ["", "How each expresses the undo:", ""]
        out += [f"- **{k}**: {v}." for k, v in pe["expressed"].items()]
        if "batch" in pe:
            out += _batch_md(pe)
    if "retention" in s:
        from bench.retention_bench import phase_rows

        out += ["", "## 6. Retention: claims while a history is pruned", "", *phase_rows(s["retention"])]
    if r.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(out) + "\n"


def plots(r: dict[str, Any], out_dir: Path) -> list[str]:
    """Draw the PNG plots of the sections present; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["sections"]
    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if "overhead" in s:
        o = s["overhead"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.boxplot([o["raw_ms"]["bare"], o["raw_ms"]["lifecycle"]])
        ax.set_xticks([1, 2], ["bare Dagster job", "lifecycle job"])
        ax.set_ylabel("run time (ms)")
        ax.set_title(f"5 stages, in-process: ratio of medians {o['ratio_of_medians']:.2f}")
        save(fig, "overhead.png")
    if "queue" in s:
        q = s["queue"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, commit, label in (
            ("raw", "async", "raw SKIP LOCKED loop, synchronous_commit off"),
            ("stage", "async", "agent serve workers, synchronous_commit off"),
            ("raw", "durable", "raw loop, durable"),
            ("stage", "durable", "agent serve workers, durable"),
        ):
            pts = sorted(
                (m["workers"], m["rate_per_s"])
                for m in q["mean_rate_per_s"]
                if m["kind"] == kind and m["commit"] == commit
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if commit == "async" else "--",
                    label=label)  # fmt: skip
        for p in q["pgbench"]:
            if p["clients"] == 4:
                ax.axhline(p["tps"], ls=":", color="grey")
                ax.text(1, p["tps"], f"pgbench -N, 4 clients, {p['commit']}", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("tasks (transactions) per second")
        ax.legend(fontsize=8)
        save(fig, "queue_throughput.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for lat in q["pickup_latency_ms"]:
            xs = sorted(lat["raw_ms"])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label="LISTEN/NOTIFY" if lat["mode"] == "listen" else "polling alone (1 s)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("enqueue → pickup (ms)")
        ax.set_ylabel("fraction of tasks")
        ax.legend(fontsize=8)
        save(fig, "pickup_latency.png")
    if "history" in s:
        h = s["history"]
        ev = [lv["counts"]["events"] for lv in h["levels"]]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("feed_ms", "audit feed"), ("enqueue_ms", "enqueue"), ("claim_ms", "claim"),
                           ("complete_ms", "complete")):  # fmt: skip
            a1.plot(ev, [lv[key]["p99"] for lv in h["levels"]], marker="o", label=label)
        a1.set_xscale("log")
        a1.set_xlabel("events of history")
        a1.set_ylabel("p99 (ms)")
        a1.legend(fontsize=8)
        a2.plot(ev, [lv["compensation_ms"]["median"] for lv in h["levels"]], marker="o", label="as shipped")
        wi = h["largest_with_stage_log_index"]
        a2.plot([wi["counts"]["events"]], [wi["compensation_ms"]["median"]], marker="s", ls="",
                label="with index on task_queue (stage_log_id)")  # fmt: skip
        a2.set_xscale("log")
        a2.set_xlabel("events of history")
        a2.set_ylabel("compensation, 3 stages undone (ms)")
        a2.legend(fontsize=8)
        save(fig, "history.png")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        cs = h["compensation_by_stages"]
        fin = [c for c in cs if c["finished"]]
        ax.plot([c["stages"] for c in fin], [c["compensation_ms"]["median"] for c in fin], marker="o",
                label="compensation (finished)")  # fmt: skip
        ax.plot([c["stages"] for c in cs], [c["forward_ms"]["median"] for c in cs], marker="^", label="forward run")
        for c in cs:
            if not c["finished"]:
                secs = c["compensation_ms"]["median"] / 1000
                note = f"stopped after {secs:.0f} s\n({c['undone']} of {c['to_undo']} undone)"
                ax.annotate(note, (c["stages"], c["compensation_ms"]["median"]), fontsize=7, ha="right",
                            xytext=(-8, -4), textcoords="offset points", va="top")  # fmt: skip
                ax.plot([c["stages"]], [c["compensation_ms"]["median"]], marker="x", color="red")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stages in the chain")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
        save(fig, "compensation_stages.png")
    if "sensors" in s:
        phases = s["sensors"]["phases"]
        keys = [("insert_to_created_s", "insert → created"), ("created_to_started_s", "created → started"),
                ("failure_to_compensation_created_s", "failure → comp. created")]  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(phases)
        for i, p in enumerate(phases):
            xs = [k + i * width for k in range(len(keys))]
            ax.bar(xs, [p[k]["median"] for k, _ in keys], width, label=f"{p['phase']} median")
            ax.scatter(xs, [p[k]["max"] for k, _ in keys], marker="_", s=200, color="black")
        ax.set_xticks([k + width * (len(phases) - 1) / 2 for k in range(len(keys))], [lbl for _, lbl in keys])
        ax.set_ylabel("seconds (bar: median, dash: max)")
        ax.legend(fontsize=8)
        save(fig, "sensors.png")
    if "peers" in s:
        pe = s["peers"]["systems"]
        names = list(pe)
        fig, ax = plt.subplots(figsize=(8.5 if "batch" in s["peers"] else 6, 4))
        xs = list(range(len(names)))
        ax.bar([x - 0.2 for x in xs], [pe[n]["sequential"]["rate_per_s"] for n in names], 0.4, label="1 client")
        ax.bar([x + 0.2 for x in xs], [pe[n]["concurrent_4"]["rate_per_s"] for n in names], 0.4, label="4 clients")
        labels = list(names)
        b = s["peers"].get("batch")
        if b:
            best = _best_trial(b)
            extra = [("batch\nin process", best["rate_per_s"] if best else None)]
            extra += [(f"batch\ndaemon {d['batch_setting']}", d["rate_per_s"]) for d in b["daemon"]]
            for i, (label, rate) in enumerate(extra):
                ax.bar([len(names) + i], [rate or 0], 0.4, color="tab:green", label="batch mode" if i == 0 else None)
                labels.append(label)
            xs = list(range(len(labels)))
        ax.set_xticks(xs, labels)
        ax.set_yscale("log")
        ax.set_ylabel("executions per second (5 stages)")
        ax.legend(fontsize=8)
        save(fig, "peers.png")
    return made


def write(results: dict[str, Any], out_dir: Path) -> None:
    """results.json (raw samples included), results.md and the plots."""
    results["plots"] = plots(results, out_dir)
    write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(markdown(results), encoding="utf-8")
