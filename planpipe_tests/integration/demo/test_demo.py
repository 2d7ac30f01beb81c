"""Smoke test of the main job without the webserver: daemon, sensors, runs, DLQ replay, checks."""

import json
import os
import subprocess
import sys

import pytest

from planpipe.settings import Settings

pytestmark = pytest.mark.slow


def test_planpipe_demo_runs_the_whole_loop(stack_settings: Settings) -> None:
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
    assert summary["traffic"]["captured"] > 0
    assert summary["envelopes_ingested"] > 0
    assert summary["dlq_replayed"] >= 1  # the legacy-agent envelopes, corrected
    assert summary["dlq_parked"] >= 1  # the broken ones
    assert summary["checks_passed"] > 0
    assert summary["failed_runs"] == []
    assert summary["final_lag_total"] == 0, summary["final_lag"]  # everything published was ingested
    assert summary["ingested"] >= summary["published"]  # plus the replayed envelopes
    # the daemon's whole tree stopped by itself or on the first signal: no escalation needed
    assert summary["stop"]["escalated_to_sigkill"] == 0, summary["stop"]
