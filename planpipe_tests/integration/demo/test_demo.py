"""Smoke test of the main job without the webserver: capture agent, daemon, sensors, runs, DLQ replay, checks.

The demo's plans take the production path: auto_explain logs them, the `planpipe agent` the demo
supervises tails the server's log directory and publishes them; no file in between."""

import json
import os
import subprocess
import sys

import psycopg
import pytest

from planpipe.demo.traffic import DEMO_CLUSTER
from planpipe.settings import Settings

pytestmark = pytest.mark.slow


def _demo_executions(settings: Settings) -> int:
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(executions), 0) FROM planpipe.plan_baselines WHERE cluster_id = %s", (DEMO_CLUSTER,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_planpipe_demo_runs_the_whole_loop(stack_settings: Settings) -> None:
    executions_before = _demo_executions(stack_settings)
    logs = [stack_settings.home / "demo-daemon.log", stack_settings.home / "demo-code-server.log"]
    offsets = {log: log.stat().st_size if log.exists() else 0 for log in logs}
    env = dict(os.environ, PLANPIPE_INGEST_MAX_SECONDS="60")
    completed = subprocess.run(
        [sys.executable, "-m", "planpipe.cli", "demo", "--duration", "50", "--interval", "2", "--settle", "240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.stdout.strip(), completed.stderr[-3000:]
    summary = json.loads(completed.stdout)
    print(json.dumps(summary, indent=2))
    assert completed.returncode == 0, (summary["failed_runs"], completed.stderr[-2000:])
    jobs = summary["runs_by_job_and_status"]
    # Long-lived ingest runs are stopped gracefully when the demo ends: SUCCESS or CANCELED, never FAILURE.
    assert any(key.startswith(("ingest_job:SUCCESS", "ingest_job:CANCELED")) for key in jobs), jobs
    assert any(key.startswith("dlq_replay_job:SUCCESS") for key in jobs), jobs
    assert not any(key.endswith(":FAILURE") for key in jobs), jobs
    # Every statement the workload ran was logged by auto_explain and published by the agent (the first
    # start of its state on a shared log may also find older plans), which stopped cleanly, never restarted.
    agent = summary["agent"]
    assert agent["captured"] >= summary["traffic"]["statements_run"] > 0, agent
    assert summary["published"] == agent["captured"] and agent["dropped"] == 0
    assert (agent["exit_code"], agent["restarts"]) == (0, 0), agent
    # The agent's count reconciles with the baseline store: each captured plan is one execution of the demo cluster.
    assert _demo_executions(stack_settings) - executions_before == agent["captured"]
    assert summary["envelopes_ingested"] > 0
    assert summary["dlq_replayed"] >= 1  # the legacy-agent envelopes, corrected
    assert summary["dlq_parked"] >= 1  # the broken ones
    assert summary["checks_passed"] > 0
    # Reconciled over settled lag samples only: exact, so it passes (records in flight are never judged).
    assert "lag_reconciliation:failed" not in summary["checks_by_name"], summary["reconciliation"]
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    assert summary["failed_runs"] == []
    assert summary["final_lag_total"] == 0, summary["final_lag"]  # everything published was ingested
    assert summary["ingested"] >= summary["published"]  # plus the replayed envelopes
    # the daemon's whole tree stopped by itself or on the first signal: no escalation needed
    assert summary["stop"]["escalated_to_sigkill"] == 0, summary["stop"]
    # One code server serves the whole demo: the daemon does not replace one of its own every minute,
    # each replaced one logging "No heartbeat received in 20 seconds, shutting down".
    for log, offset in offsets.items():
        with log.open("rb") as handle:
            handle.seek(offset)
            assert b"No heartbeat received" not in handle.read(), log
