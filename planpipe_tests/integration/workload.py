"""Real plans from the test PostgreSQL server, and envelopes built from them."""

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from planpipe.contract import Envelope, encode_envelope
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.settings import Settings

SCHEMA = "pp_workload"

QUERIES = {
    "q_point": "SELECT * FROM pp_workload.accounts WHERE aid = 42",
    "q_range": "SELECT count(*) FROM pp_workload.accounts WHERE aid BETWEEN 100 AND 5000",
    "q_join": """SELECT b.bid, sum(a.abalance) FROM pp_workload.accounts a
                 JOIN pp_workload.branches b ON a.bid = b.bid GROUP BY b.bid""",
    "q_sort": "SELECT * FROM pp_workload.accounts ORDER BY abalance DESC LIMIT 20",
    "q_filter": "SELECT * FROM pp_workload.accounts WHERE abalance > 100 AND filler LIKE 'x%'",
    "q_exists": """SELECT * FROM pp_workload.branches b
                   WHERE EXISTS (SELECT 1 FROM pp_workload.accounts a WHERE a.bid = b.bid AND a.aid < 50)""",
}


def create_workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.branches (bid int PRIMARY KEY, bbalance int, filler text)")
        conn.execute(
            f"CREATE TABLE {SCHEMA}.accounts (aid int PRIMARY KEY, bid int REFERENCES {SCHEMA}.branches, "
            "abalance int, filler text)"
        )
        conn.execute(f"INSERT INTO {SCHEMA}.branches SELECT g, 0, 'b' FROM generate_series(1, 10) g")
        conn.execute(
            f"INSERT INTO {SCHEMA}.accounts SELECT g, 1 + g % 10, (g * 7919) % 1000, 'x' || g "
            "FROM generate_series(1, 20000) g"
        )
        conn.execute(f"ANALYZE {SCHEMA}.branches")
        conn.execute(f"ANALYZE {SCHEMA}.accounts")


def capture_plans(dsn: str) -> dict[str, str]:
    """query name → EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) text, captured live."""
    plans = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, sql in QUERIES.items():
            row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()
            assert row is not None
            plans[name] = json.dumps(row[0])
    return plans


@dataclass(frozen=True)
class Published:
    valid: list[Envelope]
    malformed: list[bytes]


def make_envelopes(
    plans: dict[str, str], count: int, cluster_prefix: str, clusters: int = 2, seed: int = 7
) -> list[Envelope]:
    rng = random.Random(seed)
    names = sorted(plans)
    base = 1_790_000_000.0
    envelopes = []
    for i in range(count):
        name = names[i % len(names)]
        envelopes.append(
            Envelope(
                query_hash=f"{name}-{i % 3}",
                execution_timestamp=base + i,
                cluster_id=f"{cluster_prefix}-{i % clusters}",
                plan_text=plans[name],
                actual_rows=rng.randint(0, 5000),
                total_time_ms=round(rng.uniform(0.05, 80.0), 3),
                query_type="SELECT",
                trace_id=f"trace-{i}",
            )
        )
    return envelopes


MALFORMED: list[bytes] = [
    b"",
    b"{not json",
    b'{"query_hash": "q", "cluster_id": "c"}',
    b'{"query_hash": "q", "execution_timestamp": 1.0, "cluster_id": "c", "plan_text": "[{}]", '
    b'"actual_rows": -5, "total_time_ms": 1.0}',
    b'{"query_hash": "q", "execution_timestamp": 1.0, "cluster_id": "c", "plan_text": "not a plan", '
    b'"actual_rows": 5, "total_time_ms": 1.0}',
    b'{"query_hash": "q", "execution_timestamp": "yesterday", "cluster_id": "c", "plan_text": "[]", '
    b'"actual_rows": 5, "total_time_ms": 1.0}',
]


def publish(settings: Settings, envelopes: list[Envelope], malformed: list[bytes] = (), seed: int = 3) -> None:  # type: ignore[assignment]
    producer = Producer(producer_config(settings))
    items: list[tuple[bytes, bytes]] = [(f"standard:{e.query_hash}".encode(), encode_envelope(e)) for e in envelopes]
    items += [(b"standard:malformed", raw) for raw in malformed]
    random.Random(seed).shuffle(items)
    for key, value in items:
        producer.produce(settings.topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(60) == 0


def consume_all(settings: Settings, topic: str, expected: int, timeout_s: float = 60) -> list[Any]:
    import time

    consumer = Consumer(consumer_config(settings, f"reader-{os.urandom(4).hex()}"))
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        out += [m for m in consumer.consume(100, 1.0) if m.error() is None]
    # linger briefly to catch any unexpected extras
    out += [m for m in consumer.consume(100, 2.0) if m.error() is None]
    consumer.close()
    return out


def partition_lag(settings: Settings) -> dict[int, int]:
    """High watermark minus the group's committed offset, from the real broker."""
    consumer = Consumer(consumer_config(settings, settings.consumer_group))
    try:
        metadata = consumer.list_topics(settings.topic, timeout=10).topics[settings.topic]
        tps = [TopicPartition(settings.topic, p) for p in metadata.partitions]
        lag = {}
        for tp in consumer.committed(tps, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            lag[tp.partition] = high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a `planpipe` subprocess see exactly these settings."""
    return dict(
        os.environ,
        PLANPIPE_HOME=str(settings.home),
        PLANPIPE_KAFKA_PORT=str(settings.kafka_port),
        PLANPIPE_PG_PORT=str(settings.pg_port),
        PLANPIPE_TOPIC=settings.topic,
        PLANPIPE_DLQ_TOPIC=settings.dlq_topic,
        PLANPIPE_CONSUMER_GROUP=settings.consumer_group,
        PLANPIPE_REPLAY_GROUP=settings.replay_group,
        PLANPIPE_DATA_DIR=str(settings.data_dir),
        PLANPIPE_SPOOL_PATH=str(settings.spool_path),
    )


def iter_json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            yield msgspec.json.decode(line)
