"""The local stack is real: a Kafka broker with consumer groups, a PostgreSQL server, Dagster on PostgreSQL."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from planpipe.kafka_config import consumer_config, producer_config
from planpipe.settings import Settings
from planpipe.stack.kafka import topic_configs


def _produce(settings: Settings, count: int, partitions: int) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 50}))
    payload = b'{"plan": "' + b"x" * 2000 + b'"}'
    for i in range(count):
        producer.produce(settings.topic, value=payload, key=f"standard:q{i}".encode(), partition=i % partitions)
    assert producer.flush(30) == 0


def test_produce_consume_commit_and_exact_lag(settings: Settings) -> None:
    partitions = settings.partitions
    _produce(settings, 600, partitions)  # batched (linger) and zstd-compressed on the wire
    consumer = Consumer(consumer_config(settings, settings.consumer_group))
    consumer.subscribe([settings.topic])
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 250 and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=50, timeout=1.0):
            assert message.error() is None
            seen += 1
            consumer.store_offsets(message)
    consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(settings.topic, p) for p in range(partitions)], timeout=10)
    consumer.close()

    lag = 0
    committed_total = 0
    for tp in committed:
        low, high = consumer_watermarks(settings, tp.partition)
        assert high == 100  # 600 messages round-robin over 6 partitions
        offset = tp.offset if tp.offset >= 0 else low
        committed_total += offset
        lag += high - offset
    assert committed_total == seen
    assert lag == 600 - seen


def consumer_watermarks(settings: Settings, partition: int) -> tuple[int, int]:
    probe = Consumer(consumer_config(settings, settings.consumer_group + "-probe"))
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(settings.topic, partition), timeout=10)
        return int(low), int(high)
    finally:
        probe.close()


def test_topics_have_runbook_settings(settings: Settings) -> None:
    from confluent_kafka.admin import ConfigResource

    from planpipe.stack.kafka import admin

    client = admin(settings)
    metadata = client.list_topics(timeout=10).topics
    for topic, expected in topic_configs(settings).items():
        assert len(metadata[topic].partitions) == settings.partitions
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        actual = client.describe_configs([resource])[resource].result(10)
        for key, value in expected.items():
            assert actual[key].value == value, (topic, key)
    assert topic_configs(settings)[settings.topic]["compression.type"] == "zstd"
    assert topic_configs(settings)[settings.topic]["retention.ms"] == str(7 * 24 * 3600 * 1000)


def test_schema_is_migrated(pg: psycopg.Connection[tuple[object, ...]]) -> None:
    tables = {
        row[0] for row in pg.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'planpipe'")
    }
    assert {"query_catalog", "plan_catalog", "plan_baselines", "plan_rollups_hourly", "consumer_offsets",
            "ingest_batches", "schema_migrations"} <= tables  # fmt: skip
    indexes = {row[0] for row in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'planpipe'")}
    assert "plan_baselines_query_version" in indexes
    libraries = pg.execute("SHOW shared_preload_libraries").fetchone()
    assert libraries is not None and "auto_explain" in str(libraries[0])


def test_migrations_are_idempotent(stack_settings: Settings) -> None:
    from planpipe.db.migrate import applied_versions, discover, migrate

    assert migrate(stack_settings.pg_dsn) == []
    assert applied_versions(stack_settings.pg_dsn) == [m.version for m in discover()]


def test_dagster_instance_uses_postgres(stack_settings: Settings) -> None:
    code = (
        "from dagster import DagsterInstance; i = DagsterInstance.get();"
        "print(type(i.run_storage).__name__, type(i.event_log_storage).__name__, type(i.schedule_storage).__name__)"
    )
    env = dict(os.environ, DAGSTER_HOME=str(stack_settings.dagster_home),
               PLANPIPE_DAGSTER_PG_DSN=stack_settings.dagster_pg_dsn)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]


def _planpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planpipe.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _stack_processes(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(home) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_up_twice_down_and_up_again(tmp_path: Path) -> None:
    """A separate stack on its own ports: up is idempotent, down leaves nothing, up after down keeps data."""
    home = tmp_path / "home"
    env = dict(os.environ, PLANPIPE_HOME=str(home), PLANPIPE_KAFKA_PORT="39292", PLANPIPE_PG_PORT="55632",
               PLANPIPE_PARTITIONS="2")  # fmt: skip
    env.pop("PLANPIPE_KAFKA_BOOTSTRAP", None)
    env.pop("PLANPIPE_PG_DSN", None)
    try:
        first = _planpipe(env, "up", "--json")
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["bootstrap_servers"] == "127.0.0.1:39292"
        assert report["topics"] == {"query-plans": 2, "query-plans.dlq": 2}
        pids_before = {p.pid for p in _stack_processes(home)}

        second = _planpipe(env, "up", "--json")
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["migrations_applied"] == []
        assert {p.pid for p in _stack_processes(home)} == pids_before

        status = _planpipe(env, "status", "--json")
        assert status.returncode == 0
        assert json.loads(status.stdout)["kafka"]["answering"] is True

        with psycopg.connect(report["pg_dsn"], autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.kept (x int)")

        assert _planpipe(env, "down").returncode == 0
        assert _stack_processes(home) == []
        assert _planpipe(env, "status").returncode == 1

        again = _planpipe(env, "up", "--json")
        assert again.returncode == 0, again.stderr
        with psycopg.connect(report["pg_dsn"], autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('public.kept') IS NOT NULL").fetchone() == (True,)
    finally:
        _planpipe(env, "down")
    assert _stack_processes(home) == []
