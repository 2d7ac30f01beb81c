"""`planpipe demo`: the main job without the webserver — daemon, capture agent and demo traffic, then a JSON summary."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from planpipe.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    import dagster as dg

# How long the agent may take to publish the last plans the traffic made PostgreSQL log.
AGENT_CATCH_UP_S = 60.0
# Demo traffic starts once the standing ingest run consumes (the daemon's first sensor tick and a run's
# start-up take ~30 s): records published before would wait for it and read as an SLA breach.
CONSUMER_WAIT_S = 120.0
# How long the demo waits after the traffic for a settled lag sample: two quiet sensor ticks, the
# last after the 60 s a replay transaction unsettles (the last replay follows the traffic by ~20 s).
SETTLED_AFTER_S = 120.0


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    p = sub.add_parser("demo", help="run the Dagster daemon with demo traffic for a while and print a JSON summary")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of demo traffic (default 120)")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between capture cycles")
    p.add_argument("--settle", type=float, default=120.0, help="max seconds to wait for runs to finish afterwards")
    p.set_defaults(handler=_demo)


def dagster_environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(settings.dagster_home)
    env["PLANPIPE_DAGSTER_PG_DSN"] = settings.dagster_pg_dsn
    env.setdefault("PLANPIPE_MAX_INGEST_RUNS", "2")
    return env


def _venv_tool(name: str) -> str:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


def start_daemon(settings: Settings, log: Path, workspace: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [_venv_tool("dagster-daemon"), "run", "-w", str(workspace)],
        env=dagster_environment(settings),
        cwd=REPO_ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _total_lag(settings: Settings, group: str, topic: str) -> int | None:
    from planpipe.ingest.lag import LagUnavailable, group_lag

    try:
        return sum(p.lag for p in group_lag(settings, group, topic, timeout_s=10.0))
    except LagUnavailable:
        return None


def _runs_since(settings: Settings, since: datetime) -> list[Any]:
    import dagster as dg

    os.environ["PLANPIPE_DAGSTER_PG_DSN"] = settings.dagster_pg_dsn
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        return list(instance.get_runs(dg.RunsFilter(created_after=since)))
    finally:
        instance.dispose()


def _check_outcomes(settings: Settings, run_ids: list[str]) -> Counter[str]:
    import dagster as dg

    outcomes: Counter[str] = Counter()
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        for run_id in run_ids:
            for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
                data = entry.dagster_event.event_specific_data  # type: ignore[union-attr]
                verdict = "passed" if data.passed else "failed"  # type: ignore[union-attr]
                outcomes[verdict] += 1
                outcomes[f"{data.check_name}:{verdict}"] += 1  # type: ignore[union-attr]
    finally:
        instance.dispose()
    return outcomes


def _count(conn: psycopg.Connection[tuple[object, ...]], sql: str, since: datetime) -> int:
    if conn.execute("SELECT to_regclass(%s)", (sql.split("FROM ")[1].split()[0],)).fetchone() == (None,):
        return 0
    row = conn.execute(sql, (since,)).fetchone()
    return int(row[0] or 0) if row else 0  # type: ignore[call-overload]


def _findings(conn: psycopg.Connection[tuple[object, ...]], since: datetime) -> list[dict[str, object]]:
    if conn.execute("SELECT to_regclass('planpipe.plan_regressions')").fetchone() == (None,):
        return []
    rows = conn.execute(
        """SELECT id, cluster_id, query_hash, kind, severity, status, left(baseline_fingerprint, 12),
                  left(new_fingerprint, 12), length(diff_markdown)
           FROM planpipe.plan_regressions WHERE last_detected >= %s ORDER BY id""",
        (since,),
    ).fetchall()
    keys = ("id", "cluster_id", "query_hash", "kind", "severity", "status", "baseline", "new", "diff_chars")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _evaluate_checks(instance: "dg.DagsterInstance") -> None:
    for job in ("sla_check_job", "lag_reconciliation_job"):
        try:
            from planpipe.defs.definitions import defs

            result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
        except Exception as error:  # the summary still reports whatever else ran
            print(f"planpipe demo: final {job} run failed to start: {error}", file=sys.stderr)
            continue
        print(f"planpipe demo: final {job} run {result.run_id}: success={result.success}", file=sys.stderr)


def _wait_settled_since(settings: Settings, since: datetime, timeout_s: float) -> None:
    """Until a lag sample taken after `since` is settled: the reconciled window then ends after the traffic."""
    from planpipe.ingest.reconcile import latest_settled

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = latest_settled(settings.pg_dsn, settings.consumer_group, settings.topic)
        if latest is not None and latest > since:
            return
        time.sleep(5)
    print(f"planpipe demo: no settled lag sample after the traffic within {timeout_s:.0f} s", file=sys.stderr)


def _regression_materializations(settings: Settings, since: datetime) -> list[dict[str, object]]:
    """What the plan_regressions asset showed in Dagster: per materialization, its findings and plots."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        records = instance.fetch_materializations(dg.AssetKey("plan_regressions"), limit=50).records
        shown: list[dict[str, object]] = []
        for record in records:
            if record.timestamp < since.timestamp() or record.asset_materialization is None:
                continue
            metadata = record.asset_materialization.metadata
            shown.append({
                "run_id": record.run_id,
                "open_findings": metadata["open_findings"].value if "open_findings" in metadata else None,
                "has_report": "report" in metadata,
                "plots": sorted(key for key in metadata if key.startswith("p50_ms")),
            })  # fmt: skip
        return shown
    finally:
        instance.dispose()


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe import stack
    from planpipe.demo import supervise
    from planpipe.demo.agent import start_demo_agent
    from planpipe.demo.codeserver import start_code_server
    from planpipe.demo.traffic import DEMO_CLUSTER, run_traffic
    from planpipe.ingest.lag import LagUnavailable, group_lag

    supervise.children_get_default_signals()  # before the first child: they inherit it
    stack.up(settings)
    since = datetime.now(UTC)
    code_server = start_code_server(settings, dagster_environment(settings), settings.home / "demo-code-server.log")
    agent = start_demo_agent(settings, DEMO_CLUSTER, settings.home / "demo-agent.log")
    daemon = start_daemon(settings, settings.home / "demo-daemon.log", code_server.workspace)
    print(f"planpipe agent for {DEMO_CLUSTER} tails {agent.log.directory} (log: {agent.output}); dagster-daemon "
          f"started (log: {settings.home / 'demo-daemon.log'}, code server: {code_server.log}); "
          f"traffic for {args.duration:.0f}s", file=sys.stderr)  # fmt: skip
    instance = supervise.open_instance(settings)
    stopped = None
    traffic = None
    agent_exit = None
    try:
        with supervise.interrupt_on_termination():
            traffic = run_traffic(
                settings, duration_s=args.duration, interval_s=args.interval, wait_for_consumer_s=CONSUMER_WAIT_S
            )
            traffic_ended = datetime.now(UTC)
            agent.wait_caught_up(AGENT_CATCH_UP_S)
            deadline = time.monotonic() + args.settle
            # Let the sensors see the last traffic and the runs they launch finish. Ingest runs are
            # long-lived (they linger caught up, PLANPIPE_INGEST_IDLE_S): settled means no lag on the
            # topic, the DLQ replayed, every other run finished; ingest runs are then stopped gracefully.
            time.sleep(min(30.0, args.settle))
            while time.monotonic() < deadline:
                runs = _runs_since(settings, since)
                others_done = all(run.is_finished for run in runs if run.job_name != "ingest_job")
                drained = _total_lag(settings, settings.consumer_group, settings.topic) == 0
                dlq_done = _total_lag(settings, settings.replay_group, settings.dlq_topic) == 0
                if runs and others_done and drained and dlq_done:
                    break
                time.sleep(5)
            # The SLA checks run every 5 minutes and at the end of each ingest run, lag reconciliation
            # hourly; a short demo may see none, so it evaluates them once over what it ingested (a run in
            # the UI like any other), reconciliation once a sample after the traffic has settled.
            _wait_settled_since(settings, traffic_ended, SETTLED_AFTER_S)
            _evaluate_checks(instance)
    except KeyboardInterrupt:
        print("planpipe demo: interrupted, stopping runs and the daemon", file=sys.stderr)
    finally:
        with supervise.shielded():
            # The agent first (it flushes and reports its counts), then runs (they end CANCELED), then the daemon.
            agent_exit = agent.stop()
            stopped = supervise.stop(
                daemon, code_server=code_server.process, instance=instance, first_signal=signal.SIGTERM
            )
            instance.dispose()
    runs = _runs_since(settings, since)
    by_job: Counter[str] = Counter(f"{run.job_name}:{run.status.value}" for run in runs)
    failed = [f"{run.job_name}:{run.run_id}" for run in runs if run.status.value == "FAILURE"]
    checks = _check_outcomes(settings, [run.run_id for run in runs])
    with psycopg.connect(settings.pg_dsn) as conn:
        ingested = _count(conn, "SELECT sum(valid) FROM planpipe.ingest_batches WHERE committed_at >= %s", since)
        replayed = _count(conn, "SELECT count(*) FROM planpipe.dlq_replays WHERE replayed_at >= %s", since)
        parked = _count(conn, "SELECT count(*) FROM planpipe.dlq_parked WHERE parked_at >= %s", since)
        findings = _findings(conn, since)
    try:
        lags = group_lag(settings, settings.consumer_group, settings.topic, timeout_s=10.0)
        final_lag: dict[str, int] | str = {str(p.partition): p.lag for p in lags}
    except LagUnavailable as error:
        final_lag = f"unavailable: {error}"
    captured = agent.as_dict(agent_exit)
    from planpipe.ingest.reconcile import reconcile

    reconciliation = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic).as_dict()
    summary = {
        "duration_s": args.duration,
        "traffic": traffic.as_dict() if traffic is not None else None,
        "agent": captured,
        # What the agent captured and made durable in Kafka (acknowledged, or spooled and since delivered).
        "published": captured["captured"],
        "ingested": ingested,
        "replayed": replayed,
        "parked": parked,
        "findings": findings,
        "open_findings": sum(1 for f in findings if f["status"] == "open"),
        "plan_regressions_materializations": _regression_materializations(settings, since),
        "failed_runs": failed,
        "final_lag": final_lag,
        "final_lag_total": sum(final_lag.values()) if isinstance(final_lag, dict) else None,
        "runs_launched": len(runs),
        "runs_by_job_and_status": dict(sorted(by_job.items())),
        "checks_passed": checks["passed"],
        "checks_failed": checks["failed"],
        "checks_by_name": {k: v for k, v in sorted(checks.items()) if ":" in k},
        # lag_reconciliation's window (settled lag samples) and counts, as the check judged them.
        "reconciliation": reconciliation,
        "stop": stopped.as_dict() if stopped is not None else None,
        # names kept for existing readers
        "envelopes_ingested": ingested,
        "dlq_replayed": replayed,
        "dlq_parked": parked,
        "regression_findings": len(findings),
    }
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0 if not failed else 1


def run_traffic_in_background(settings: Settings, interval_s: float = 3.0) -> tuple[threading.Thread, threading.Event]:
    """For `planpipe dev`: demo traffic beside the webserver until the returned event is set
    (its plans reach Kafka through the agent `planpipe dev` supervises)."""
    from planpipe.demo.traffic import run_traffic

    stop = threading.Event()
    thread = threading.Thread(
        target=run_traffic, args=(settings,),
        kwargs={"interval_s": interval_s, "stop": stop, "wait_for_consumer_s": CONSUMER_WAIT_S},
        name="planpipe-demo-traffic", daemon=True,
    )  # fmt: skip
    thread.start()
    return thread, stop
