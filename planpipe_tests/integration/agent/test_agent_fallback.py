"""The fallback chain on the real broker, PostgreSQL and Redis: spool, then Redis, then back to Kafka.

Nothing lost, nothing doubled, order per key kept, across a Kafka outage, a
Redis restart in the middle of it, a drain killed between Kafka and Redis, and
TTL expiry (counted as drops, in the agent's health and in PostgreSQL).
"""

import collections
import re
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from planpipe.health.broker import FallbackMode
from planpipe.health.fallback import publish_mode
from planpipe.settings import Settings
from planpipe.stack import kafka
from planpipe.stack import redis as redis_stack
from planpipe_tests.integration.agent.conftest import captured, write_plans
from planpipe_tests.integration.routing.kafka_read import read_all

KEYS = 7
_OFFSET = re.compile(r"@(\d+)#")


def _with_redis(settings: Settings, redis_server: Settings) -> Settings:
    return replace(settings, redis_url=redis_server.redis_url, redis_port=redis_server.redis_port)


def _dropped(health: dict[str, Any], topic: str) -> int:
    counts: dict[str, dict[str, int]] = health.get("counts") or {}
    return counts.get(topic, {}).get("dropped", 0)


def _assert_once_in_order(settings: Settings, expected: int) -> None:
    records = read_all(settings, settings.topic)
    ids = collections.Counter(r.headers["planpipe-capture-id"] for r in records)
    doubled = [cid for cid, n in ids.items() if n > 1]
    assert not doubled, f"published twice: {doubled[:5]}"
    assert len(ids) == expected, f"{expected - len(ids)} missing"
    by_key: dict[bytes | None, list[int]] = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        match = _OFFSET.search(record.headers["planpipe-capture-id"])
        assert match is not None
        by_key[record.key].append(int(match.group(1)))
    for key, offsets in by_key.items():
        assert offsets == sorted(offsets), f"key {key!r} out of log order"


def _pg_counts(settings: Settings, agent: str) -> tuple[int, int]:
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(published), 0), coalesce(sum(dropped), 0) FROM planpipe.capture_counts"
            " WHERE agent = %s AND topic = %s",
            (agent, settings.topic),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_kafka_outage_goes_to_spool_then_redis_and_survives_a_redis_restart(
    private_broker: Settings, redis_server: Settings, agent_factory: Any, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    settings = _with_redis(
        replace(private_broker, topic=f"agent-fb-{suffix}", dlq_topic=f"agent-fb-{suffix}.dlq"), redis_server
    )
    kafka.start(settings)  # a failed earlier run may have left it stopped
    kafka.ensure_topics(settings)
    log = tmp_path / "postgresql.json"
    agent = agent_factory(
        f"fallback-{suffix}",
        log=log,
        settings=settings,
        args=["--batch-size", "20", "--spool-max-rows", "60", "--cooldown", "1", "--mode-refresh", "1"],
    )
    write_plans(log, range(0, 100), keys=KEYS)
    agent.start().wait_until(lambda h: captured(h, settings.topic) >= 100, what="100 captured")

    kafka.stop(settings)
    write_plans(log, range(100, 200), keys=KEYS)
    health = agent.wait_until(
        lambda h: captured(h, settings.topic) >= 200 and h["redis_pending"], what="spool, then Redis"
    )
    assert health["spool_depth"] >= 60, health  # the spool took its share before Redis did
    assert health["status"] == "degraded"

    # Redis restarts while it holds the newest records: the agent waits for it, then goes on.
    redis_stack.stop(redis_server)
    write_plans(log, range(200, 260), keys=KEYS)
    time.sleep(1.5)
    assert captured(agent.health() or {}, settings.topic) == 200
    redis_stack.start(redis_server)
    agent.wait_until(lambda h: captured(h, settings.topic) >= 260, what="Redis back")

    # Kafka back: the spool drains first, then Redis; then batches go straight to Kafka again.
    kafka.start(settings)
    agent.wait_until(
        lambda h: not h["redis_pending"] and h["spool_depth"] == 0 and h["breaker"] == "closed",
        timeout_s=120,
        what="spool and Redis drained",
    )
    write_plans(log, range(260, 300), keys=KEYS)
    agent.wait_until(lambda h: captured(h, settings.topic) >= 300, what="300 captured")
    assert agent.stop() == 0
    _assert_once_in_order(settings, 300)
    assert _pg_counts(settings, f"fallback-{suffix}") == (300, 0)


def test_redis_ttl_expiry_counts_drops_and_a_killed_drain_doubles_nothing(
    settings: Settings, redis_server: Settings, agent_factory: Any, tmp_path: Path
) -> None:
    settings = _with_redis(settings, redis_server)
    name = f"ttl-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "postgresql.json"
    args = ["--batch-size", "10", "--mode-refresh", "0.5"]
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        # What the broker-health sensor does after URP > 5 for > 2 min.
        publish_mode(conn, settings.kafka_bootstrap, FallbackMode.REDIS, "test: cluster degraded")
        try:
            agent = agent_factory(name, log=log, settings=settings, args=[*args, "--redis-ttl", "1"])
            write_plans(log, range(0, 30))
            health = agent.start().wait_until(
                lambda h: _dropped(h, settings.topic) >= 30, timeout_s=30, what="TTL expiry"
            )
            assert captured(health, settings.topic) == 30
            assert agent.stop() == 0

            agent.args = [*args, "--redis-ttl", "600"]
            write_plans(log, range(30, 80))
            agent.start(PLANPIPE_FAULT_KILL_AT="drain_before_delete:1")
            agent.wait_until(lambda h: captured(h, settings.topic) >= 80 and h["redis_pending"], what="in Redis")
            publish_mode(conn, settings.kafka_bootstrap, FallbackMode.KAFKA, "test: healthy")
            assert agent.wait_exit() == -9  # killed after Kafka took the drained batch, before Redis forgot it
        finally:
            publish_mode(conn, settings.kafka_bootstrap, FallbackMode.KAFKA, "test: healthy")

    health = agent.start().wait_until(lambda h: h["status"] == "ok" and not h["redis_pending"], what="drained")
    assert health["recovery"]["redis_duplicates_removed"] == 50, health["recovery"]
    assert agent.stop() == 0
    _assert_once_in_order(settings, 50)
    assert _pg_counts(settings, name) == (80, 30)
