"""Soak: steady traffic through ingest and DLQ replay while a broker restarts and an ingest run is kill -9'd.

At the end, per partition, every committed record of the topic is in Parquet
exactly once or was dead-lettered by ingest with its source offset; PostgreSQL
executions match Parquet; lag is drained. About four minutes; `planpipe demo
--duration 1800` is the long version with the whole Dagster deployment.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from planpipe.contract import Envelope, encode_envelope
from planpipe.dlq import H_SOURCE_OFFSET, H_SOURCE_PARTITION, H_SOURCE_TOPIC, H_STAGE, header_map
from planpipe.ingest import parquet_sink
from planpipe.ingest.lag import group_lag
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.settings import Settings
from planpipe_tests.integration.workload import capture_plans, create_workload, settings_env

TRAFFIC_S = float(os.environ.get("PLANPIPE_SOAK_SECONDS", "150"))


def _envelope(plans: dict[str, str], prefix: str, n: int, rng: random.Random) -> Envelope:
    name = sorted(plans)[n % len(plans)]
    return Envelope(
        query_hash=f"{name}-{n % 5}",
        execution_timestamp=time.time(),
        cluster_id=f"{prefix}-{n % 3}",
        plan_text=plans[name],
        actual_rows=rng.randint(0, 10_000),
        total_time_ms=round(rng.uniform(0.1, 50.0), 3),
        query_type="SELECT",
        trace_id=f"soak-{n}",
        published_at=time.time(),
    )


class Traffic(threading.Thread):
    """Envelopes at a steady pace; every 50th has its time as a string (the replay corrects it),
    every 200th is not JSON at all (parked)."""

    def __init__(self, settings: Settings, plans: dict[str, str], prefix: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.plans, self.prefix = settings, plans, prefix
        self.stop = threading.Event()
        self.sent = 0
        self.undelivered = 0

    def run(self) -> None:
        producer = Producer(producer_config(self.settings))
        rng = random.Random(5)

        def report(error: object, _message: object) -> None:
            if error is not None:
                self.undelivered += 1

        while not self.stop.is_set():
            for _ in range(10):
                n = self.sent
                envelope = encode_envelope(_envelope(self.plans, self.prefix, n, rng))
                if n % 200 == 199:
                    envelope = b"{not json " + str(n).encode()
                elif n % 50 == 49:
                    envelope = envelope.replace(b'"total_time_ms":', b'"total_time_ms":"', 1).replace(
                        b',"query_type"', b'","query_type"', 1
                    )
                producer.produce(self.settings.topic, key=f"standard:soak-{n % 40}".encode(), value=envelope,
                                 on_delivery=report)  # fmt: skip
                self.sent += 1
            producer.poll(0)
            self.stop.wait(0.1)
        assert producer.flush(120) == 0


def _cli(settings: Settings, *args: str, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "planpipe.cli", *args], env=settings_env(settings), stdout=handle, stderr=handle
    )


def _committed_records(settings: Settings) -> set[tuple[int, int]]:
    """Every record of the topic a read_committed consumer sees, as (partition, offset)."""
    consumer = Consumer(consumer_config(settings, f"soak-audit-{uuid.uuid4().hex[:6]}"))
    partitions = consumer.list_topics(settings.topic, timeout=10).topics[settings.topic].partitions
    consumer.assign([TopicPartition(settings.topic, p, 0) for p in partitions])
    highs = {p: consumer.get_watermark_offsets(TopicPartition(settings.topic, p), timeout=10)[1] for p in partitions}
    seen: set[tuple[int, int]] = set()
    done: set[int] = set()
    deadline = time.monotonic() + 120
    while len(done) < len(partitions) and time.monotonic() < deadline:
        for message in consumer.consume(500, 1.0):
            if message.error() is None:
                seen.add((int(message.partition() or 0), int(message.offset() or 0)))
        for tp in consumer.position([TopicPartition(settings.topic, p) for p in partitions]):
            if tp.offset >= highs[tp.partition] or highs[tp.partition] == 0:
                done.add(tp.partition)
    consumer.close()
    assert len(done) == len(partitions), "audit read did not reach the end of every partition"
    return seen


def _dead_lettered_by_ingest(settings: Settings) -> Counter[tuple[int, int]]:
    consumer = Consumer(consumer_config(settings, f"soak-dlq-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe([settings.dlq_topic])
    found: Counter[tuple[int, int]] = Counter()
    idle_until = time.monotonic() + 10
    while time.monotonic() < idle_until:
        messages = consumer.consume(500, 1.0)
        if messages:
            idle_until = time.monotonic() + 5
        for message in messages:
            if message.error() is not None:
                continue
            headers = header_map(message.headers())
            if headers.get(H_STAGE) == "ingest" and headers.get(H_SOURCE_TOPIC) == settings.topic:
                found[(int(headers[H_SOURCE_PARTITION]), int(headers[H_SOURCE_OFFSET]))] += 1
    consumer.close()
    return found


@pytest.mark.slow
def test_soak_with_replays_a_broker_restart_and_a_killed_ingest_run(
    stack_settings: Settings, settings: Settings, tmp_path: Path
) -> None:
    from planpipe.stack import kafka

    create_workload(stack_settings.pg_dsn)
    plans = capture_plans(stack_settings.pg_dsn)
    prefix = settings.consumer_group.rsplit("-", 1)[-1]
    log = tmp_path / "soak.log"
    traffic = Traffic(settings, plans, prefix)
    traffic.start()
    started = time.monotonic()
    faults: list[str] = []
    ingest = _cli(settings, "ingest", "--quiet", log=log)
    replays = 0
    killed = restarted = False
    try:
        while time.monotonic() - started < TRAFFIC_S:
            time.sleep(5)
            elapsed = time.monotonic() - started
            if not killed and elapsed > TRAFFIC_S * 0.25:
                os.kill(ingest.pid, signal.SIGKILL)
                ingest.wait()
                faults.append(f"kill -9 ingest at {elapsed:.0f}s")
                ingest = _cli(settings, "ingest", "--quiet", log=log)
                killed = True
            elif not restarted and elapsed > TRAFFIC_S * 0.5:
                kafka.stop(stack_settings)
                time.sleep(2)
                kafka.start(stack_settings)
                faults.append(f"broker restart at {elapsed:.0f}s")
                restarted = True
            elif int(elapsed) % 30 < 5:
                replay = _cli(settings, "replay", "--max-seconds", "15", "--quiet", log=log)
                assert replay.wait(120) == 0, log.read_text()[-3000:]
                replays += 1
            assert ingest.poll() is None, f"the ingest run ended: {log.read_text()[-3000:]}"
    finally:
        traffic.stop.set()
        traffic.join(180)
    # Stop the run (SIGTERM is a clean stop), drain, replay what the drain dead-lettered, drain again.
    os.kill(ingest.pid, signal.SIGTERM)
    assert ingest.wait(60) == 0, log.read_text()[-3000:]
    for step in (("ingest", "--until-caught-up"), ("replay",), ("ingest", "--until-caught-up")):
        process = _cli(settings, *step, "--max-seconds", "240", "--quiet", log=log)
        assert process.wait(300) == 0, log.read_text()[-3000:]
        replays += step == ("replay",)

    committed = _committed_records(settings)
    frame = parquet_sink.scan(settings.parquet_dir).collect()
    in_parquet = Counter(zip(frame["kafka_partition"].to_list(), frame["kafka_offset"].to_list(), strict=True))
    dead = _dead_lettered_by_ingest(settings)
    duplicated = {k: n for k, n in in_parquet.items() if n > 1}
    lost = committed - set(in_parquet) - set(dead)
    unexpected = set(in_parquet) - committed
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(executions), 0) FROM planpipe.plan_baselines WHERE cluster_id LIKE %s",
            (prefix + "-%",),
        ).fetchone()
    executions = int(str(row[0])) if row else -1
    print(
        f"soak: sent {traffic.sent}, committed records {len(committed)}, parquet {frame.height}, "
        f"dead-lettered by ingest {sum(dead.values())}, replays {replays}, faults {faults}, "
        f"lost {len(lost)}, duplicated {len(duplicated)}"
    )
    assert traffic.undelivered == 0
    assert killed and restarted
    assert not lost, sorted(lost)[:20]
    assert not duplicated, sorted(duplicated.items())[:20]
    assert not unexpected
    assert executions == frame.height
    # Corrected envelopes came back through the replay and were ingested; only the unparseable ones are missing.
    unparseable = sum(1 for n in range(traffic.sent) if n % 200 == 199)
    assert frame.height == traffic.sent - unparseable
    assert {p.partition: p.lag for p in group_lag(settings, settings.consumer_group, settings.topic)} == {
        p: 0 for p in range(settings.partitions)
    }
