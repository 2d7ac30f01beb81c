"""A CI-sized run of the runbook's replay test (`planpipe loadtest`) on the real broker and database:
2x a stated rate, the lag sensor's scaling rule up to its limit and back down, a broker outage in the
middle (spool), the ingest breaker shedding only `low` under the breached p95, nothing lost or twice."""

from planpipe.loadtest.runner import Loadtest, LoadtestConfig
from planpipe.settings import Settings

# Scaled down from the runbook's sizes so the whole run stays well under a minute: one more ingest run
# per 100 behind (the sensor's 20,000), 1 s sensor ticks, runs end after 2 s idle, the breaker opens
# on the first breached batch (the runbook's 60 s would outlast the run), small pinned batches so the
# outage's backlog spans several of them, and a 1 s producer cool-down.
CI = LoadtestConfig(
    rate=40.0, factor=2.0, duration_s=14.0, max_runs=2, lag_per_run=100, sensor_interval_s=1.0, idle_s=2.0,
    breaker_window_s=0.0, outage_s=2.0, producer_cooldown_s=1.0, batch_max_messages=100, settle_timeout_s=60.0,
)  # fmt: skip


def test_replay_at_twice_the_rate_with_a_broker_outage(stack_settings: Settings) -> None:
    summary = Loadtest(stack_settings, CI).run()
    verdicts = summary["verdicts"]
    assert isinstance(verdicts, dict)
    assert verdicts == dict.fromkeys(verdicts, True), summary
    assert summary["injected"] == summary["published"]
    assert summary["max_concurrent_runs"] == 2
    assert isinstance(summary["spooled"], int) and summary["spooled"] > 0
    assert isinstance(summary["dropped_low"], int) and summary["dropped_low"] == summary["missing_low"]
    assert summary["missing_other"] == 0 and summary["duplicates"] == 0
