"""Routing guide dimensions on the real broker and database: clusters of a region publish to that
region's topics and only that region's ingest stores them; a plan slower than 3 x its query's
baseline p95 (read from PostgreSQL) is routed critical."""

import json
import time
from pathlib import Path

import msgspec
import polars as pl
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from planpipe.contract import Envelope, encode_envelope
from planpipe.ingest.engine import IngestEngine
from planpipe.kafka_config import consumer_config
from planpipe.routing.candidates import baseline_p95
from planpipe.routing.publish import PlanPublisher
from planpipe.settings import Settings
from planpipe.stack import kafka
from planpipe.topology import load_topology, region_settings
from planpipe_tests.integration.workload import capture_plans, create_workload


def _clusters_on(settings: Settings, topic: str) -> list[str]:
    """Every record's cluster id, read by assignment (no group join) up to the high watermark."""
    consumer = Consumer(consumer_config(settings, "unused", **{"enable.partition.eof": True}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        wanted = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p, high in wanted.items() if high > 0])
        clusters: list[str] = []
        done = {p for p, high in wanted.items() if high == 0}
        deadline = time.monotonic() + 30
        while len(done) < len(wanted) and time.monotonic() < deadline:
            for message in consumer.consume(100, 1.0):
                error, value = message.error(), message.value()
                if error is None and value is not None:
                    clusters.append(json.loads(value)["cluster_id"])
                elif error is not None and error.code() == KafkaError._PARTITION_EOF:
                    done.add(message.partition())
        return clusters
    finally:
        consumer.close()


def _ingest(settings: Settings) -> int:
    engine = IngestEngine(settings, max_messages=100)
    try:
        return engine.run(until_caught_up=True, max_seconds=60).valid
    finally:
        engine.close()


def test_regions_have_their_own_topics_and_latency_outliers_go_critical(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology_file = tmp_path / "topology.json"
    topology_file.write_text(json.dumps({"regions": {"eu": {"clusters": ["eu-*"]}}}))
    monkeypatch.setenv("PLANPIPE_TOPOLOGY_FILE", str(topology_file))
    eu = region_settings(settings, "eu", load_topology(settings))
    kafka.ensure_topics(eu)

    create_workload(settings.pg_dsn)
    plan = next(iter(capture_plans(settings.pg_dsn).values()))
    template = Envelope(
        query_hash="q-topology", execution_timestamp=1_790_000_000.0, cluster_id="eu-1", plan_text=plan,
        actual_rows=10, total_time_ms=10.0, query_type="SELECT",
    )  # fmt: skip
    envelopes = [
        msgspec.structs.replace(template, execution_timestamp=template.execution_timestamp + i,
                                cluster_id="eu-1" if i % 2 else "us-1", total_time_ms=10.0 + i % 5)
        for i in range(60)
    ]  # fmt: skip
    publisher = PlanPublisher(settings)
    for envelope in envelopes:
        publisher.submit_raw(encode_envelope(envelope))
    publisher.submit_raw(b'{"cluster_id": "eu-9", "query_hash": "broken"}')  # a reject from the region
    report = publisher.close(30)
    assert sum(report.published.values()) == 60 and sum(report.dead_lettered.values()) == 1

    assert set(_clusters_on(settings, settings.topic)) == {"us-1"}
    assert len(_clusters_on(settings, eu.topic)) == 30
    assert _clusters_on(settings, eu.dlq_topic) == ["eu-9"]  # the reject stayed in its region

    assert _ingest(eu) == 30
    # The region's ingest read only its topic and stored its clusters in its own directory.
    stored = pl.read_parquet(list(eu.parquet_dir.rglob("*.parquet")))["cluster_id"].unique().to_list()
    assert stored == ["eu-1"] and not settings.parquet_dir.exists()

    # A baseline now exists (30 executions of 10-14 ms): a 60 ms plan is > 3 x its p95.
    p95 = baseline_p95(settings.pg_dsn)
    assert 10.0 <= p95[("eu-1", "q-topology")] <= 15.0
    publisher = PlanPublisher(settings)
    slow = publisher.submit_raw(encode_envelope(msgspec.structs.replace(template, total_time_ms=60.0)))
    usual = publisher.submit_raw(encode_envelope(msgspec.structs.replace(template, total_time_ms=20.0)))
    publisher.close(30)
    assert getattr(slow, "route", None) == "critical" and getattr(slow, "priority", None) == "critical"
    assert getattr(usual, "route", None) == "baseline"
