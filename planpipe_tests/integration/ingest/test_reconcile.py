"""Lag reconciliation on the real broker and PostgreSQL, with a real `planpipe agent` publishing.

The window is set by lag samples while the agent's records are on their way: reconciliation must
judge only what has settled (never a record merely in flight), be exact over the settled window,
and still fail on a record on the topic that no agent captured.
"""

import time
from pathlib import Path

import psycopg
from confluent_kafka import Producer

from planpipe.db.migrate import migrate
from planpipe.ingest.engine import IngestEngine
from planpipe.ingest.lag import group_lag
from planpipe.ingest.reconcile import Reconciliation, reconcile, record_lag_sample
from planpipe.kafka_config import producer_config
from planpipe.settings import Settings
from planpipe_tests.integration.agent.conftest import AgentProcess, captured, write_plans
from planpipe_tests.integration.routing.kafka_read import end_offsets, read_all

AGENT = "rec-agent"


def _tick(settings: Settings) -> None:
    """What the lag sensor does each tick."""
    lags = group_lag(settings, settings.consumer_group, settings.topic)
    record_lag_sample(settings.pg_dsn, settings.consumer_group, settings.topic, lags)


def _ingest(settings: Settings) -> None:
    engine = IngestEngine(settings)
    try:
        assert engine.run(until_caught_up=True, max_seconds=60).caught_up
    finally:
        engine.close()


def _wait_checkpoint(settings: Settings, expected_captured: int, timeout_s: float = 30.0) -> None:
    """Until the agent wrote a checkpoint at the topic's current end offsets with this count."""
    on_topic = sum(end_offsets(settings, settings.topic).values())
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                """SELECT captured FROM planpipe.capture_checkpoints WHERE agent = %s AND topic = %s
                   AND (SELECT sum(h) FROM unnest(high_watermarks) h) = %s ORDER BY taken_at DESC LIMIT 1""",
                (AGENT, settings.topic, on_topic),
            ).fetchone()
            if row is not None and row[0] == expected_captured:
                return
            time.sleep(0.1)
    raise AssertionError(f"no checkpoint of {expected_captured} at {on_topic} records on the topic")


def _hourly_count_reported(settings: Settings, expected: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT sum(published) FROM planpipe.capture_counts WHERE agent = %s AND topic = %s",
                (AGENT, settings.topic),
            ).fetchone()
            if row is not None and row[0] == expected:
                return
            time.sleep(0.1)
    raise AssertionError(f"the agent never reported {expected} captured")


def _judged(outcome: Reconciliation) -> tuple[int, int, int, int | None, int, int | None]:
    return (
        outcome.produced,
        outcome.consumed,
        outcome.lag_delta,
        outcome.captured,
        outcome.consumer_divergence,
        outcome.capture_divergence,
    )


def test_reconciliation_judges_settled_windows_only_and_fails_on_a_record_no_agent_captured(
    settings: Settings, tmp_path: Path
) -> None:
    migrate(settings.pg_dsn)
    config = tmp_path / "agent.toml"
    config.write_text("snapshot_interval_s = 0.3\nreport_interval_s = 0.3\n")
    log = tmp_path / "postgresql.json"
    write_plans(log, range(40))  # captured before the first sample: not the window's
    agent = AgentProcess(settings, log, tmp_path / "state", AGENT, ["--config", str(config)]).start()
    try:
        agent.wait_until(lambda h: captured(h, settings.topic) == 40, what="40 captured")
        _wait_checkpoint(settings, 40)
        _tick(settings)  # the window's start: 40 behind, nothing moving
        _tick(settings)

        write_plans(log, range(40, 70))
        agent.wait_until(lambda h: captured(h, settings.topic) == 70, what="70 captured")
        _ingest(settings)
        # 20 more reach the topic and are counted right before a sample: in flight for the group.
        write_plans(log, range(70, 90))
        agent.wait_until(lambda h: captured(h, settings.topic) == 90, what="90 captured")
        _hourly_count_reported(settings, 90)
        _tick(settings)
        in_flight = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic)
        # Only the first sample is settled: nothing to judge yet (the hourly counts included 40
        # records from before the window and the last sample's 20 were not consumed).
        assert not in_flight.settled and in_flight.ok, in_flight.as_dict()
        assert (in_flight.samples, in_flight.settled_samples) == (3, 1)

        _ingest(settings)
        _wait_checkpoint(settings, 90)
        _tick(settings)
        _tick(settings)
        settled = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic)
        assert settled.settled and settled.ok, settled.as_dict()
        assert _judged(settled) == (50, 90, -40, 50, 0, 0), settled.as_dict()

        # A copy of an agent's record on the topic (a duplicate no agent captured): the check fails.
        copy = read_all(settings, settings.topic)[0]
        producer = Producer(producer_config(settings))
        producer.produce(settings.topic, copy.value, key=copy.key, partition=copy.partition)
        assert producer.flush(10) == 0
        _ingest(settings)
        _wait_checkpoint(settings, 90)  # the agent, idle, still counts 90 at the new end offsets
        _tick(settings)
        _tick(settings)
        duplicate = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic)
        assert duplicate.settled and not duplicate.ok
        assert _judged(duplicate) == (51, 91, -40, 50, 0, -1), duplicate.as_dict()
    finally:
        agent.stop()
