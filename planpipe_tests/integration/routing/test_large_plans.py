"""Large plans end to end on the real broker: one size limit from the contract to Parquet and PostgreSQL.

A plan of ~5 MiB and one of exactly PLANPIPE_MAX_PLAN_BYTES go through `planpipe
publish`, the topics and the ingest engine into Parquet and the baseline tables;
one byte more is dead-lettered whole with its reason; a reject too large even for
the DLQ arrives truncated with its size and sha256; a record Kafka refuses is an
error (exit code, counter), never a success.
"""

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import msgspec
import polars as pl
import psycopg
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource  # type: ignore[attr-defined]

from planpipe.dlq import H_FIELD, H_ORIGINAL_SHA256, H_ORIGINAL_SIZE, H_REASON, H_STAGE, H_TRUNCATED
from planpipe.ingest import parquet_sink
from planpipe.ingest.engine import IngestEngine
from planpipe.kafka_config import FETCH_MAX_BYTES, producer_config, size_limits
from planpipe.plans.fingerprint import fingerprint
from planpipe.routing.cli import EXIT_UNDELIVERABLE
from planpipe.routing.metrics import REGISTRY
from planpipe.routing.publish import publish_file
from planpipe.settings import Settings
from planpipe.stack import kafka
from planpipe_tests.integration.routing.kafka_read import read_all
from planpipe_tests.integration.routing.test_publish import run_cli, write_jsonl
from planpipe_tests.integration.workload import QUERIES, capture_plans, create_workload

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def join_plan(stack_settings: Settings) -> dict[str, object]:
    """The top node of a real EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) of a join, captured live."""
    create_workload(stack_settings.pg_dsn)
    captured = json.loads(capture_plans(stack_settings.pg_dsn)["q_join"])
    assert "q_join" in QUERIES
    node: dict[str, object] = captured[0]["Plan"]
    return node


def large_plan(node: dict[str, object], size: int, tag: str) -> str:
    """An EXPLAIN JSON document of exactly `size` UTF-8 bytes, laid out as PostgreSQL prints it:
    an Append over copies of a real join, one per partition `{tag}_{i}`, then whitespace."""

    def document(count: int) -> str:
        children = [{**node, "Parent Relationship": "Member", "Alias": f"{tag}_{i}"} for i in range(count)]
        root = {"Node Type": "Append", "Parallel Aware": False, "Async Capable": False, "Plans": children}
        return json.dumps([{"Plan": root, "Planning Time": 0.5, "Execution Time": 12.5}], indent=2)

    per_child = len(document(2)) - len(document(1))
    count = max(1, (size - len(document(0))) // per_child)
    text = document(count)
    while len(text.encode()) > size:
        count -= 1
        text = document(count)
    padded = text[:-1] + " " * (size - len(text.encode())) + text[-1]  # inside the top-level array
    assert len(padded.encode()) == size
    return padded


def envelope(query_hash: str, cluster_id: str, plan_text: str) -> bytes:
    body = {
        "query_hash": query_hash,
        "execution_timestamp": 1_790_000_000.0,
        "cluster_id": cluster_id,
        "plan_text": plan_text,
        "actual_rows": 10,
        "total_time_ms": 12.5,
        "trace_id": f"trace-{query_hash}",
    }
    return msgspec.json.encode(body)


def undeliverable(destination: str) -> float:
    return REGISTRY.get_sample_value("explain_router_undeliverable_total", {"destination": destination}) or 0.0


def set_max_message_bytes(settings: Settings, topic: str, value: int) -> None:
    client = kafka.admin(settings)
    entry = ConfigEntry("max.message.bytes", str(value), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    for future in client.incremental_alter_configs([resource]).values():
        future.result(30)
    # The broker applies it asynchronously: wait until it reads back.
    deadline = time.monotonic() + 30
    while max_message_bytes(settings, topic) != value:
        assert time.monotonic() < deadline, f"{topic}: max.message.bytes never became {value}"
        time.sleep(0.1)


def max_message_bytes(settings: Settings, topic: str) -> int:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    client = kafka.admin(settings)  # kept alive until the future resolves
    described = client.describe_configs([resource])[resource].result(30)
    return int(described["max.message.bytes"].value)


def test_plans_up_to_the_limit_reach_parquet_and_postgresql_and_one_byte_more_the_dlq(
    settings: Settings, join_plan: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = settings.max_plan_bytes
    assert limit == 8 * MIB  # the documented default, end to end
    cluster = f"large-{settings.consumer_group.rsplit('-', 1)[-1]}"
    # Aliases carry the test's id: fingerprints (and so plan_catalog rows) are this test's own.
    plans = {
        "q-large-5mib": large_plan(join_plan, 5 * MIB, f"{cluster}_five"),
        "q-large-at-limit": large_plan(join_plan, limit, f"{cluster}_limit"),
    }
    over = large_plan(join_plan, limit + 1, f"{cluster}_over")
    lines = [envelope(h, cluster, p) for h, p in plans.items()] + [envelope("q-large-over", cluster, over)]
    # Escaped quotes and newlines make each envelope larger than its plan, and larger than 1 MB.
    assert all(len(line) > len(plans.get(h, over)) for line, h in zip(lines, [*plans, "over"], strict=True))
    source = tmp_path / "large.jsonl"
    write_jsonl(source, lines)

    assert run_cli(["publish", "--file", str(source), "--json"], settings) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["published_total"] == 2
    assert summary["dead_lettered"] == {"plan_too_large": 1}
    assert (summary["undeliverable"], summary["still_spooled"]) == (0, 0)

    on_topic = read_all(settings, settings.topic)
    assert sorted(r.value for r in on_topic) == sorted(lines[:2])  # original bytes, untouched
    dead = read_all(settings, settings.dlq_topic)
    assert len(dead) == 1
    assert dead[0].value == lines[2]  # the whole reject, not truncated
    assert dead[0].headers[H_REASON] == "plan_too_large"
    assert dead[0].headers[H_FIELD] == "plan_text"
    assert dead[0].headers[H_STAGE] == "router"
    assert H_TRUNCATED not in dead[0].headers

    engine = IngestEngine(settings)
    try:
        run = engine.run(until_caught_up=True, max_seconds=180)
    finally:
        engine.close()
    assert run.caught_up, run.as_dict()
    assert (run.consumed, run.valid, run.dlq) == (2, 2, 0)

    frame = parquet_sink.scan(settings.parquet_dir).filter(pl.col("cluster_id") == cluster).collect()
    stored = dict(zip(frame["query_hash"], frame["plan_text"], strict=True))
    assert stored == plans  # byte for byte
    fingerprints = {h: fingerprint(p) for h, p in plans.items()}
    assert dict(zip(frame["query_hash"], frame["fingerprint"], strict=True)) == fingerprints

    with psycopg.connect(settings.pg_dsn) as conn:
        baselines = conn.execute(
            "SELECT query_hash, fingerprint, executions FROM planpipe.plan_baselines WHERE cluster_id = %s",
            (cluster,),
        ).fetchall()
        assert sorted(baselines) == sorted((h, f, 1) for h, f in fingerprints.items())
        for query_hash, fp in fingerprints.items():
            row = conn.execute(
                "SELECT octet_length(sample_plan_text), md5(sample_plan_text) FROM planpipe.plan_catalog "
                "WHERE fingerprint = %s",
                (fp,),
            ).fetchone()
            plan = plans[query_hash]
            assert row == (len(plan.encode()), hashlib.md5(plan.encode()).hexdigest())


def test_a_reject_too_large_for_the_dlq_arrives_truncated_with_size_and_sha256(
    settings: Settings, tmp_path: Path
) -> None:
    # A smaller limit keeps the test quick; the topics were created for the default one.
    small = replace(settings, max_plan_bytes=64 * 1024)
    limits = size_limits(small)
    garbage = b"{" + b"x" * (limits.max_envelope_bytes + 5 * 1024)  # not even JSON, and too big
    source = tmp_path / "huge.jsonl"
    write_jsonl(source, [garbage])

    report = publish_file(small, source, flush_timeout_s=60)
    assert report.dead_lettered == {"plan_too_large": 1}
    assert report.undeliverable == 0

    dead = read_all(settings, settings.dlq_topic)
    assert len(dead) == 1
    record = dead[0]
    assert record.value == garbage[: limits.max_envelope_bytes]
    assert record.headers[H_REASON] == "plan_too_large"
    assert H_FIELD not in record.headers  # the envelope, not one field, is over the limit
    assert record.headers[H_TRUNCATED] == "1"
    assert record.headers[H_ORIGINAL_SIZE] == str(len(garbage))
    assert record.headers[H_ORIGINAL_SHA256] == hashlib.sha256(garbage).hexdigest()
    assert read_all(settings, settings.topic) == []


def test_a_record_kafka_refuses_is_never_a_success(
    settings: Settings, join_plan: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A topic whose max.message.bytes someone set too low: the broker refuses a valid plan.
    # (Far below the plan's size: zstd shrinks a repetitive plan many times on the wire.)
    set_max_message_bytes(settings, settings.topic, 1024)
    line = envelope("q-refused", "refused", large_plan(join_plan, 2 * MIB, "refused"))
    source = tmp_path / "refused.jsonl"
    write_jsonl(source, [line])
    before = undeliverable("topic")

    assert run_cli(["publish", "--file", str(source), "--json"], settings) == EXIT_UNDELIVERABLE
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["published_total"], summary["undeliverable"], summary["still_spooled"]) == (0, 1, 0)
    assert "refused by Kafka for good" in captured.err
    assert undeliverable("topic") == before + 1
    assert read_all(settings, settings.topic) == []

    # ensure_topics raises the topic back to the limit; then the same file goes through.
    kafka.ensure_topics(settings)
    assert max_message_bytes(settings, settings.topic) == size_limits(settings).max_batch_bytes
    assert run_cli(["publish", "--file", str(source)], settings) == 0
    assert [r.value for r in read_all(settings, settings.topic)] == [line]


def test_ensure_topics_raises_a_smaller_limit_and_keeps_a_larger_one(settings: Settings) -> None:
    needed = size_limits(settings).max_batch_bytes
    set_max_message_bytes(settings, settings.topic, 1_048_588)
    set_max_message_bytes(settings, settings.dlq_topic, 2 * needed)

    kafka.ensure_topics(settings)

    assert max_message_bytes(settings, settings.topic) == needed
    assert max_message_bytes(settings, settings.dlq_topic) == 2 * needed


def test_a_record_larger_than_the_consumer_fetch_sizes_arrives_whole(settings: Settings) -> None:
    # The consumer asks for little per fetch (memory); the broker still returns a larger first
    # batch whole. Random bytes do not compress: on the wire the batch is ~the record.
    limits = size_limits(settings)
    big = os.urandom(limits.max_envelope_bytes)
    assert len(big) > 8 * FETCH_MAX_BYTES
    producer = Producer(producer_config(settings))
    for value in (b"before", big, b"after"):
        producer.produce(settings.topic, value=value, partition=0)
    assert producer.flush(30) == 0

    assert [r.value for r in read_all(settings, settings.topic)] == [b"before", big, b"after"]
