"""A CI-sized run of the runbook's replay test (`planpipe loadtest`) on the real broker, database and Redis:
2x a stated rate, the lag sensor's scaling rule up to its limit and back down, a broker outage in the
middle (producer spool; the agent lane's spool, then Redis), the ingest breaker shedding only `low` under
the breached p95, nothing lost or twice."""

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from planpipe.loadtest.runner import Loadtest, LoadtestConfig
from planpipe.settings import Settings
from planpipe.stack import redis as redis_stack

# Scaled down from the runbook's sizes so the whole run stays well under a minute: one more ingest run
# per 25 behind (the sensor's 20,000; with 100, a loaded CI run never reached the limit), 1 s sensor
# ticks, runs end after 2 s idle, the breaker opens on the first breached batch (the runbook's 60 s
# would outlast the run), small pinned batches so the outage's backlog spans several of them, a 1 s
# producer cool-down, and an agent lane whose spool limit (20 rows) the outage passes.
CI = LoadtestConfig(
    rate=40.0, factor=2.0, duration_s=12.0, max_runs=2, lag_per_run=25, sensor_interval_s=1.0, idle_s=2.0,
    breaker_window_s=0.0, outage_s=2.0, producer_cooldown_s=1.0, batch_max_messages=100, settle_timeout_s=60.0,
    agent_rate=10.0, agent_spool_rows=20,
)  # fmt: skip


@pytest.fixture
def redis_url(stack_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """A real redis-server of this test's own."""
    if not shutil.which("redis-server"):
        subprocess.run([str(redis_stack.INSTALL_SCRIPT)], check=True, stdin=subprocess.DEVNULL, timeout=600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(os.environ.get("PLANPIPE_REDIS_PORT") or probe.getsockname()[1])
    server = replace(stack_settings, home=tmp_path / "redis-home", redis_port=port,
                     redis_url=f"redis://127.0.0.1:{port}/0", redis_external=False)  # fmt: skip
    redis_stack.start(server)
    try:
        yield server.redis_url
    finally:
        redis_stack.stop(server)


def test_replay_at_twice_the_rate_with_a_broker_outage(stack_settings: Settings, redis_url: str) -> None:
    summary = Loadtest(replace(stack_settings, redis_url=redis_url), CI).run()
    verdicts = summary["verdicts"]
    assert isinstance(verdicts, dict)
    assert verdicts == dict.fromkeys(verdicts, True), summary
    assert {"redis_engaged", "agent_lane_complete", "spool_engaged", "scaled_down"} <= set(verdicts)
    assert summary["injected"] == summary["published"]
    assert summary["max_concurrent_runs"] == 2
    assert isinstance(summary["spooled"], int) and summary["spooled"] > 0
    assert isinstance(summary["dropped_low"], int) and summary["dropped_low"] == summary["missing_low"]
    assert summary["missing_other"] == 0 and summary["duplicates"] == 0
