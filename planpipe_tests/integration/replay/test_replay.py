"""DLQ replay against the real broker and PostgreSQL: corrections, parking, exactly-once, kill -9."""

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from planpipe.contract import Envelope, EnvelopeDecoder, Reason, encode_envelope
from planpipe.db.migrate import migrate
from planpipe.dlq import DeadLetter
from planpipe.ingest.lag import group_lag
from planpipe.ingest.reconcile import reconcile, record_lag_sample
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.messaging.headers import (
    H_CORRECTION_RULE,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_TOPIC,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_TRACE_ID,
    header_map,
)
from planpipe.replay import cli as replay_cli
from planpipe.replay.engine import ReplaySummary, run_replay
from planpipe.routing.router import Router, RoutingConfig
from planpipe.settings import Settings
from planpipe_tests.integration.workload import capture_plans, consume_all, create_workload, settings_env

DECODER = EnvelopeDecoder()


@pytest.fixture(scope="session")
def real_plans(stack_settings: Settings) -> dict[str, str]:
    create_workload(stack_settings.pg_dsn)
    return capture_plans(stack_settings.pg_dsn)


@pytest.fixture
def replay_settings(settings: Settings) -> Settings:
    migrate(settings.pg_dsn)  # the session stack applied the migrations older than 003_replay
    return settings


@dataclass
class Crafted:
    """A DLQ record as the ingest engine writes it, and what the replay should make of it."""

    value: bytes
    reason: Reason | str
    source_offset: int
    expect_rules: tuple[str, ...] | None  # None: parked
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int = 0

    def dlq_headers(self, source_topic: str) -> list[tuple[str, bytes]]:
        if not isinstance(self.reason, Reason):  # a reason the replay does not know
            return [*self.headers, ("planpipe-reason", self.reason.encode()), (H_SOURCE_TOPIC, source_topic.encode()),
                    (H_SOURCE_PARTITION, b"0"), (H_SOURCE_OFFSET, str(self.source_offset).encode())]  # fmt: skip
        letter = DeadLetter(
            value=self.value, key=b"standard:whatever", reason=self.reason, field=None, detail="crafted",
            stage="ingest", source_topic=source_topic, source_partition=0, source_offset=self.source_offset,
            original_headers=self.headers,
        )  # fmt: skip
        return letter.headers()


def _enc(doc: dict[str, Any]) -> bytes:
    return msgspec.json.encode(doc)


def crafted_letters(plans: dict[str, str], tag: str) -> list[Crafted]:
    plan_text = plans["q_join"]
    plan_json = json.loads(plans["q_point"])

    def base(name: str, **overrides: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "query_hash": f"{tag}-{name}",
            "execution_timestamp": 1_790_000_000.5,
            "cluster_id": f"{tag}-c1",
            "plan_text": plan_text,
            "actual_rows": 10,
            "total_time_ms": 3.25,
            "trace_id": f"trace-{name}",
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not None}

    legacy = {"queryHash": f"{tag}-legacy", "ts": 1_790_000_000.5, "clusterId": f"{tag}-c1", "planText": plan_text,
              "rows": 10, "durationMs": 3.25}  # fmt: skip
    composed = {"query_id": f"{tag}-composed", "timestamp": 1_790_000_000_500, "plan": plan_json, "rows": "10",
                "total_time_s": "0.00325", "trace_id": "trace-composed"}  # fmt: skip
    cluster_header = [("cluster-id", f"{tag}-c2".encode()), (H_TRACE_ID, b"trace-header")]
    letters = [
        Crafted(_enc(legacy), Reason.UNKNOWN_FIELD, 1, ("legacy_field_names",)),
        Crafted(_enc(base("strings", actual_rows="10", total_time_ms="3.25")), Reason.WRONG_TYPE, 2,
                ("numeric_strings",)),
        Crafted(_enc(base("seconds", total_time_ms=None, total_time_s=0.00325)), Reason.UNKNOWN_FIELD, 3,
                ("total_time_seconds",)),
        Crafted(_enc(base("millis", execution_timestamp=1_790_000_000_500)), Reason.OUT_OF_RANGE, 4,
                ("timestamp_milliseconds",)),
        Crafted(_enc(base("cluster", cluster_id=None, trace_id=None)), Reason.MISSING_FIELD, 5,
                ("cluster_id_from_header",), cluster_header),
        Crafted(_enc(base("planjson", plan_text=plan_json)), Reason.WRONG_TYPE, 6, ("plan_text_serialized",)),
        Crafted(_enc(composed), Reason.UNKNOWN_FIELD, 7,
                ("legacy_field_names", "total_time_seconds", "timestamp_milliseconds", "cluster_id_from_header",
                 "numeric_strings", "plan_text_serialized"), cluster_header),
        # uncorrectable
        Crafted(b"{not json", Reason.MALFORMED_JSON, 20, None),
        Crafted(b"", Reason.EMPTY, 21, None),
        Crafted(_enc(base("nocluster", cluster_id=None)), Reason.MISSING_FIELD, 22, None),
        Crafted(_enc(base("badplan", plan_text="not a plan")), Reason.PLAN_UNPARSEABLE, 23, None),
        Crafted(_enc(base("negative", actual_rows=-5)), Reason.OUT_OF_RANGE, 24, None),
        Crafted(_enc(base("mystery")), "mystery_reason", 25, None),
    ]  # fmt: skip
    for i, letter in enumerate(letters):
        letter.partition = i % 6  # every DLQ partition gets records
    return letters


def put_on_dlq(settings: Settings, letters: list[Crafted]) -> list[tuple[int, int]]:
    """Produce in order; returns each letter's (partition, offset) on the DLQ."""
    producer = Producer(producer_config(settings))
    coords: list[tuple[int, int]] = []

    def delivered(error: Any, message: Message) -> None:
        assert error is None, error
        coords.append((message.partition() or 0, message.offset() or 0))

    for letter in letters:
        headers: list[tuple[str, str | bytes | None]] = [*letter.dlq_headers(settings.topic)]
        producer.produce(settings.dlq_topic, value=letter.value, key=b"standard:x", headers=headers,
                         partition=letter.partition, on_delivery=delivered)  # fmt: skip
        producer.flush(30)  # one at a time: delivery order = letter order
    assert len(coords) == len(letters)
    return coords


def committed_equals_high_watermarks(settings: Settings) -> dict[int, tuple[int, int]]:
    consumer = Consumer(consumer_config(settings, settings.replay_group))
    try:
        partitions = consumer.list_topics(settings.dlq_topic, timeout=10).topics[settings.dlq_topic].partitions
        tps = [TopicPartition(settings.dlq_topic, p) for p in partitions]
        out = {}
        for tp in consumer.committed(tps, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            out[tp.partition] = (tp.offset if tp.offset >= 0 else low, high)
        return out
    finally:
        consumer.close()


def read_topic(settings: Settings, expected: int, *, isolation: str = "read_committed") -> list[Message]:
    if isolation == "read_committed":
        return consume_all(settings, settings.topic, expected, timeout_s=30)
    consumer = Consumer(consumer_config(settings, f"reader-uncommitted-{settings.replay_group}",
                                        **{"isolation.level": isolation}))  # fmt: skip
    consumer.subscribe([settings.topic])
    out: list[Message] = []
    idle = 0
    while idle < 3:
        batch = [m for m in consumer.consume(100, 1.0) if m.error() is None]
        out += batch
        idle = 0 if batch else idle + 1
    consumer.close()
    return out


def parked_rows(settings: Settings) -> dict[tuple[int, int], tuple[Any, ...]]:
    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute(
            """SELECT dlq_partition, dlq_offset, value, reason, why, source_topic, source_offset, rules_applied
               FROM planpipe.dlq_parked WHERE dlq_topic = %s""",
            (settings.dlq_topic,),
        ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def replay_rows(settings: Settings) -> dict[tuple[int, int], tuple[Any, ...]]:
    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute(
            """SELECT dlq_partition, dlq_offset, outcome, rules, new_key, source_offset
               FROM planpipe.dlq_replays WHERE dlq_topic = %s""",
            (settings.dlq_topic,),
        ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def test_replay_corrects_parks_and_is_exactly_once(replay_settings: Settings, real_plans: dict[str, str]) -> None:
    settings = replay_settings
    tag = settings.replay_group.rsplit("-", 1)[-1]
    letters = crafted_letters(real_plans, tag)
    # The DLQ is at-least-once: an ingest crash may dead-letter one source record twice.
    duplicate = Crafted(letters[1].value, Reason.WRONG_TYPE, letters[1].source_offset, ("numeric_strings",),
                        partition=3)  # fmt: skip
    coords = put_on_dlq(settings, [*letters, duplicate])
    by_coords = dict(zip(coords, [*letters, duplicate], strict=True))
    correctable = [c for c, x in zip(coords, letters, strict=False) if x.expect_rules is not None]
    parked = [c for c, x in zip(coords, letters, strict=False) if x.expect_rules is None]

    summary = run_replay(settings, max_seconds=90)
    assert summary.caught_up
    assert (summary.consumed, summary.republished, summary.parked, summary.duplicates) == (
        len(letters) + 1, len(correctable), len(parked), 1
    )  # fmt: skip
    assert summary.by_rule == {
        "legacy_field_names": 2, "numeric_strings": 2, "total_time_seconds": 2, "timestamp_milliseconds": 2,
        "cluster_id_from_header": 2, "plan_text_serialized": 2,
    }  # fmt: skip
    assert summary.by_reason["unknown_field"] == {"consumed": 3, "republished": 3}
    assert summary.by_reason["wrong_type"] == {"consumed": 3, "republished": 2, "duplicate": 1}
    assert summary.by_reason["mystery_reason"] == {"consumed": 1, "parked": 1}

    # Exactly one corrected envelope per correctable DLQ record, decodable, keyed by the router.
    router = Router(RoutingConfig(sample_rate_pct=100))
    out = read_topic(settings, len(correctable))
    assert len(out) == len(correctable)
    seen = {}
    for message in out:
        meta = header_map(message.headers())
        envelope = DECODER.decode(message.value())
        dlq = (int(meta[H_DLQ_PARTITION]), int(meta[H_DLQ_OFFSET]))
        assert meta[H_DLQ_TOPIC] == settings.dlq_topic
        crafted = by_coords[dlq]
        assert tuple(meta[H_CORRECTION_RULE].split(",")) == crafted.expect_rules
        assert (meta[H_SOURCE_TOPIC], meta[H_SOURCE_PARTITION], meta[H_SOURCE_OFFSET]) == (
            settings.topic, "0", str(crafted.source_offset)
        )  # fmt: skip
        assert message.key() == router.route_envelope(envelope).key
        if envelope.query_hash.endswith("-cluster"):
            assert envelope.cluster_id == f"{tag}-c2" and meta[H_TRACE_ID] == "trace-header"
        elif envelope.query_hash.endswith("-legacy"):
            assert H_TRACE_ID not in meta  # nothing to keep, nothing invented
        else:
            assert meta[H_TRACE_ID] in {f"trace-{envelope.query_hash.rsplit('-', 1)[-1]}", "trace-header"}
        # Every correction lands on the same values the well-formed envelope would have had.
        assert (envelope.execution_timestamp, envelope.actual_rows, envelope.total_time_ms) == (
            1_790_000_000.5, 10, 3.25
        ), envelope  # fmt: skip
        seen[dlq] = envelope
    # Of two copies of one source record, whichever is read first is republished (partitions
    # interleave freely), the other is recorded as its duplicate.
    original, copy = coords[1], coords[-1]
    (republished_copy,) = set(seen) & {original, copy}
    assert set(seen) - {original, copy} == set(correctable) - {original}
    assert json.loads(seen[correctable[-1]].plan_text) == json.loads(real_plans["q_point"])

    rows = parked_rows(settings)
    assert sorted(rows) == sorted(parked)
    for dlq, (value, reason, why, source_topic, source_offset, _rules) in rows.items():
        crafted = by_coords[dlq]
        assert bytes(value) == crafted.value  # original bytes, untouched
        assert reason == str(crafted.reason) and why
        assert (source_topic, source_offset) == (settings.topic, crafted.source_offset)
    replays = replay_rows(settings)
    assert {c for c, r in replays.items() if r[0] == "republished"} == set(seen)
    assert [c for c, r in replays.items() if r[0] == "duplicate"] == [({original, copy} - {republished_copy}).pop()]

    offsets = committed_equals_high_watermarks(settings)
    assert all(committed == high for committed, high in offsets.values()), offsets
    assert sum(high for _, high in offsets.values()) == len(letters) + 1

    # Second run: the DLQ offsets advanced with the transaction, so nothing is consumed again.
    again = run_replay(settings, max_seconds=60)
    assert again.caught_up and (again.consumed, again.republished, again.parked) == (0, 0, 0)
    assert len(read_topic(settings, len(correctable))) == len(correctable)
    assert parked_rows(settings) == rows and replay_rows(settings) == replays


def test_a_new_replay_group_republishes_nothing_twice(replay_settings: Settings, real_plans: dict[str, str]) -> None:
    """Another group re-reading the whole DLQ skips what the first group handled."""
    from dataclasses import replace

    settings = replay_settings
    letters = crafted_letters(real_plans, settings.replay_group.rsplit("-", 1)[-1])
    put_on_dlq(settings, letters)
    first = run_replay(settings, max_seconds=90)
    correctable = sum(x.expect_rules is not None for x in letters)
    assert first.republished == correctable
    second = run_replay(replace(settings, replay_group=settings.replay_group + "-again"), max_seconds=90)
    assert (second.consumed, second.duplicates, second.republished, second.parked) == (len(letters), len(letters), 0, 0)
    assert len(read_topic(settings, correctable)) == correctable


def _replay_subprocess(settings: Settings, fault: str, *extra: str) -> "subprocess.CompletedProcess[str]":
    env = settings_env(settings)
    # A killed member keeps its partitions until its session expires: keep that short here.
    env.update(PLANPIPE_CONSUMER__SESSION_TIMEOUT_MS="8000", PLANPIPE_CONSUMER__HEARTBEAT_INTERVAL_MS="2000",
               PLANPIPE_FAULT_KILL_AT=fault)  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "planpipe.replay.cli", "replay", "--quiet", "--max-seconds", "90", *extra],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize("fault", ["replay_after_produce", "replay_before_commit", "replay_before_commit:2"])
def test_kill_9_before_the_transaction_commits(
    replay_settings: Settings, real_plans: dict[str, str], fault: str
) -> None:
    settings = replay_settings
    tag = settings.replay_group.rsplit("-", 1)[-1]
    plan = real_plans["q_range"]
    letters = [
        Crafted(_enc({"queryHash": f"{tag}-k{i}", "execution_timestamp": 1_790_000_000.0 + i, "cluster_id": "c",
                      "plan_text": plan, "actual_rows": i, "total_time_ms": 1.0}),
                Reason.UNKNOWN_FIELD, 100 + i, ("legacy_field_names",), partition=i % 6)
        for i in range(24)
    ] + [Crafted(b"{broken", Reason.MALFORMED_JSON, 200 + i, None, partition=i % 6) for i in range(6)]  # fmt: skip
    put_on_dlq(settings, letters)
    correctable = 24

    crashed = _replay_subprocess(settings, fault, "--max-messages", "8")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    # The killed run did produce: its records sit in an open transaction on the topic.
    assert len(read_topic(settings, 1, isolation="read_uncommitted")) >= 1

    summary = run_replay(settings, max_seconds=120)
    assert summary.caught_up

    committed = read_topic(settings, correctable)
    dlq_coords = Counter((header_map(m.headers())[H_DLQ_PARTITION], header_map(m.headers())[H_DLQ_OFFSET])
                         for m in committed)  # fmt: skip
    assert len(committed) == correctable and set(dlq_coords.values()) == {1}
    assert sorted(DECODER.decode(m.value()).query_hash for m in committed) == sorted(f"{tag}-k{i}" for i in range(24))
    # Aborted copies exist (read_uncommitted sees them); read_committed consumers never do.
    assert len(read_topic(settings, correctable, isolation="read_uncommitted")) > correctable

    assert len(parked_rows(settings)) == 6
    assert Counter(r[0] for r in replay_rows(settings).values()) == {"republished": correctable}
    offsets = committed_equals_high_watermarks(settings)
    assert all(c == h for c, h in offsets.values()), offsets
    assert run_replay(settings, max_seconds=60).consumed == 0


def test_cli_replay_and_parked_listing(
    replay_settings: Settings, real_plans: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = replay_settings
    letters = crafted_letters(real_plans, settings.replay_group.rsplit("-", 1)[-1])
    put_on_dlq(settings, letters)
    parser = argparse.ArgumentParser()
    replay_cli.add_parsers(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["replay", "--max-seconds", "90", "--quiet"])
    assert args.handler(args, settings) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == set(ReplaySummary().as_dict())
    assert summary["parked"] == sum(x.expect_rules is None for x in letters)

    args = parser.parse_args(["dlq", "parked", "--limit", "3"])
    assert args.handler(args, settings) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 3 and {row["dlq_topic"] for row in listed} == {settings.dlq_topic}
    args = parser.parse_args(["dlq", "parked", "--reason", "malformed_json"])
    assert args.handler(args, settings) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["preview"] == "{not json" and row["size"] == 9 and "not a JSON object" in row["why"]


def test_replayed_envelopes_reach_the_baselines(replay_settings: Settings, real_plans: dict[str, str]) -> None:
    """Full loop: ingest rejects legacy envelopes to the DLQ, replay corrects them, ingest accepts them."""
    from planpipe.ingest.engine import IngestEngine

    settings = replay_settings
    tag = settings.replay_group.rsplit("-", 1)[-1]
    good = Envelope(query_hash=f"{tag}-ok", execution_timestamp=1_790_000_000.0, cluster_id=f"{tag}-c",
                    plan_text=real_plans["q_sort"], actual_rows=20, total_time_ms=2.0)  # fmt: skip
    legacy = [_enc({"queryHash": f"{tag}-old{i}", "ts": 1_790_000_000_000 + i, "clusterId": f"{tag}-c",
                    "plan": json.loads(real_plans["q_sort"]), "rows": "20", "durationMs": "2.5"})
              for i in range(5)]  # fmt: skip
    producer = Producer(producer_config(settings))
    for value in [encode_envelope(good), *legacy]:
        producer.produce(settings.topic, key=b"standard:x", value=value, headers=[(H_TRACE_ID, b"t")])
    assert producer.flush(30) == 0

    def ingest() -> int:
        engine = IngestEngine(settings, max_messages=100)
        try:
            return engine.run(until_caught_up=True, max_seconds=90).dlq
        finally:
            engine.close()

    grace = timedelta(seconds=1)  # the replay is over before the samples are taken: no need for the default

    def tick() -> None:  # what the lag sensor records
        lags = group_lag(settings, settings.consumer_group, settings.topic)
        record_lag_sample(settings.pg_dsn, settings.consumer_group, settings.topic, lags)

    tick()
    tick()  # nothing moved since the first: a settled bound
    assert ingest() == len(legacy)
    summary = run_replay(settings, max_seconds=90)
    assert (summary.republished, summary.parked) == (len(legacy), 0)
    assert ingest() == 0  # the corrected envelopes do not come back
    time.sleep(grace.total_seconds())  # a sample within the grace after a replay transaction is not settled
    tick()
    tick()
    # The replay's transaction marker takes an offset of each partition it wrote to; no consumer sees it,
    # so reconciliation subtracts it instead of reporting it as a record lost between Kafka and ingest.
    on_topic = read_topic(settings, 1 + 2 * len(legacy))
    landed = {m.partition() for m in on_topic if H_DLQ_TOPIC in header_map(m.headers())}
    outcome = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic, grace=grace)
    assert outcome.settled, outcome.as_dict()
    published = 1 + len(legacy)
    assert (outcome.consumed, outcome.lag_delta, outcome.replayed) == (published + len(legacy), -published, len(legacy))
    assert outcome.unseen_offsets == len(landed) >= 1
    assert outcome.produced == len(legacy) + outcome.unseen_offsets
    assert outcome.consumer_divergence == 0, outcome.as_dict()
    with psycopg.connect(settings.pg_dsn) as conn:
        stored = conn.execute(
            "SELECT query_hash, executions, total_time_sum FROM planpipe.plan_baselines WHERE cluster_id = %s",
            (f"{tag}-c",),
        ).fetchall()
    assert sorted(stored) == sorted([(f"{tag}-ok", 1, 2.0)] + [(f"{tag}-old{i}", 1, 2.5) for i in range(5)])
