"""Integrity in operation, on the real broker and PostgreSQL: offset gaps, poison records, faults, lock wait.

Each test is a way the running system once broke: ingestion stalled after the
first transactional DLQ replay (offset gaps), one NUL character blocked a
partition forever, a read-only database or a restarted broker ended the run, and
a table lock went unmeasured.
"""

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import polars as pl
import psycopg
import pytest
from confluent_kafka import Producer

from planpipe.contract import Envelope, encode_envelope
from planpipe.dlq import H_REASON, H_SOURCE_OFFSET, H_SOURCE_PARTITION, header_map
from planpipe.ingest import parquet_sink
from planpipe.ingest.engine import IngestEngine, RunSummary
from planpipe.ingest.lag import group_lag
from planpipe.kafka_config import producer_config
from planpipe.settings import Settings
from planpipe_tests.integration.workload import (
    capture_plans,
    consume_all,
    create_workload,
    make_envelopes,
    settings_env,
)


@pytest.fixture(scope="module")
def real_plans(stack_settings: Settings) -> dict[str, str]:
    create_workload(stack_settings.pg_dsn)
    return capture_plans(stack_settings.pg_dsn)


def _prefix(settings: Settings) -> str:
    return settings.consumer_group.rsplit("-", 1)[-1]


def _key(envelope: Envelope) -> bytes:
    return f"standard:{envelope.query_hash}".encode()


def _ingest(settings: Settings, max_seconds: float = 120, **options: int) -> RunSummary:
    engine = IngestEngine(settings, **options)  # type: ignore[arg-type]
    try:
        return engine.run(until_caught_up=True, max_seconds=max_seconds)
    finally:
        engine.close()


def _parquet(settings: Settings) -> pl.DataFrame:
    return parquet_sink.scan(settings.parquet_dir).collect()


def _stored_executions(settings: Settings) -> int:
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(executions), 0) FROM planpipe.plan_baselines WHERE cluster_id LIKE %s",
            (_prefix(settings) + "-%",),
        ).fetchone()
    assert row is not None
    return int(row[0])


# -- offsets with gaps --------------------------------------------------------------------------------


def test_transaction_markers_and_aborted_records_neither_stall_nor_leak(
    settings: Settings, real_plans: dict[str, str]
) -> None:
    """Committed and aborted transactions interleaved with plain producers on the same partitions."""
    envelopes = make_envelopes(real_plans, 240, _prefix(settings))
    plain = Producer(producer_config(settings))
    transactional = Producer(producer_config(settings, **{"transactional.id": f"test-tx-{uuid.uuid4().hex}"}))
    transactional.init_transactions(30)
    committed: list[Envelope] = []
    for start in range(0, len(envelopes), 20):
        chunk = envelopes[start : start + 20]
        for envelope in chunk[:5]:
            plain.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
        plain.flush(30)
        transactional.begin_transaction()
        for envelope in chunk[5:12]:
            transactional.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
        transactional.commit_transaction(30)
        transactional.begin_transaction()
        for envelope in chunk[12:]:
            transactional.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
        transactional.flush(30)
        transactional.abort_transaction(30)
        committed += chunk[:12]

    first = _ingest(settings, max_messages=50)
    assert first.caught_up, first
    assert first.stale_batches == 0
    frame = _parquet(settings)
    assert frame.height == len(committed)
    assert frame.select(["kafka_partition", "kafka_offset"]).n_unique() == len(committed)
    assert sorted(frame["trace_id"]) == sorted(str(e.trace_id) for e in committed)  # and no aborted one
    assert _stored_executions(settings) == len(committed)
    # A trailing commit marker is not backlog: the group's lag as the sensor reads it is zero.
    assert {p.partition: p.lag for p in group_lag(settings, settings.consumer_group, settings.topic)} == {
        p: 0 for p in range(settings.partitions)
    }

    # The next transactional write (the replay job's pattern) is ingested by a fresh run, not fenced out.
    more = make_envelopes(real_plans, 30, _prefix(settings), seed=11)
    more = [
        Envelope(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "trace_id": f"more-{i}"})
        for i, e in enumerate(more)
    ]
    transactional.begin_transaction()
    for envelope in more:
        transactional.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
    transactional.commit_transaction(30)
    second = _ingest(settings, max_messages=50)
    assert second.caught_up and second.stale_batches == 0
    assert second.valid == len(more)
    assert _parquet(settings).height == len(committed) + len(more)
    assert _stored_executions(settings) == len(committed) + len(more)


# -- no poison batch ------------------------------------------------------------------------------------


def _raw(envelope: Envelope, **replace: bytes) -> bytes:
    raw = encode_envelope(envelope)
    for old, new in replace.items():
        raw = raw.replace(old.encode(), new, 1)
    return raw


def test_nul_characters_and_duplicate_keys_are_dead_lettered_and_the_batch_commits(
    settings: Settings, real_plans: dict[str, str]
) -> None:
    envelopes = make_envelopes(real_plans, 60, _prefix(settings))
    sample = envelopes[0]
    hostile = [
        encode_envelope(sample).replace(sample.cluster_id.encode(), sample.cluster_id.encode() + b"\\u0000", 1),
        encode_envelope(sample).replace(b'"query_hash":"', b'"query_hash":"\\u0000', 1),
        encode_envelope(Envelope(**{**{f: getattr(sample, f) for f in sample.__struct_fields__},
                                    "query_text": "select '\x00'"})),
        # A \u0000 escape inside the plan JSON: valid envelope JSON, a NUL once the plan is parsed.
        encode_envelope(Envelope(**{**{f: getattr(sample, f) for f in sample.__struct_fields__},
                                    "plan_text": sample.plan_text.replace('"Plan"', '"Plan\\u0000"', 1)})),
        encode_envelope(sample)[:-1] + b',"cluster_id":"other"}',
    ]  # fmt: skip
    producer = Producer(producer_config(settings))
    for i, envelope in enumerate(envelopes):
        producer.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope), partition=i % 2)
        if i % 12 == 0 and hostile:
            producer.produce(settings.topic, key=b"standard:hostile", value=hostile.pop(), partition=i % 2)
    assert not hostile
    producer.flush(30)

    summary = _ingest(settings)
    assert summary.caught_up
    assert (summary.valid, summary.dlq) == (len(envelopes), 5)
    assert _parquet(settings).height == len(envelopes)
    assert _stored_executions(settings) == len(envelopes)
    dead = consume_all(settings, settings.dlq_topic, 5)
    reasons = sorted(header_map(m.headers())[H_REASON] for m in dead)
    assert reasons == ["duplicate_key"] + ["nul_character"] * 4


@contextmanager
def _rejecting_query_text(dsn: str, marker: str) -> Iterator[None]:
    """A real constraint the contract does not know: PostgreSQL refuses rows whose query_text holds `marker`."""
    name = f"test_reject_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"ALTER TABLE planpipe.query_catalog ADD CONSTRAINT {name} "
            f"CHECK (query_text IS NULL OR strpos(query_text, '{marker}') = 0) NOT VALID"
        )
        try:
            yield
        finally:
            conn.execute(f"ALTER TABLE planpipe.query_catalog DROP CONSTRAINT {name}")


def test_records_a_sink_refuses_are_isolated_and_the_rest_commits(
    settings: Settings, real_plans: dict[str, str]
) -> None:
    marker = f"refused-{uuid.uuid4().hex[:6]}"
    envelopes = make_envelopes(real_plans, 200, _prefix(settings))
    refused_at = {17, 18, 111}
    fields = Envelope.__struct_fields__
    envelopes = [
        Envelope(**{**{f: getattr(e, f) for f in fields}, "query_hash": f"{marker}-{i}", "query_text": marker})
        if i in refused_at
        else e
        for i, e in enumerate(envelopes)
    ]
    producer = Producer(producer_config(settings))
    for envelope in envelopes:
        producer.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
    producer.flush(30)

    with _rejecting_query_text(settings.pg_dsn, marker):
        summary = _ingest(settings, max_messages=100)
    assert summary.caught_up
    assert summary.sink_rejected == len(refused_at)
    assert summary.valid == len(envelopes) - len(refused_at)
    frame = _parquet(settings)
    assert frame.height == len(envelopes) - len(refused_at)
    assert not frame.filter(pl.col("query_text") == marker).height  # no row of a never-committed record
    assert _stored_executions(settings) == len(envelopes) - len(refused_at)
    dead = consume_all(settings, settings.dlq_topic, len(refused_at))
    assert len(dead) == len(refused_at)
    for message in dead:
        headers = header_map(message.headers())
        assert headers[H_REASON] == "sink_rejected"
        assert H_SOURCE_OFFSET in headers and H_SOURCE_PARTITION in headers
        assert marker.encode() in (message.value() or b"")  # the original bytes


# -- transient faults: the run rides them out ------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _clients_since(pg: psycopg.Connection[tuple[object, ...]], since: object) -> int:
    """Client connections to the test database opened after `since` (other than `pg` itself)."""
    row = pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' AND backend_start > %s",
        (since,),
    ).fetchone()
    count = row[0] if row is not None else 0
    assert isinstance(count, int)
    return count


def _publish(settings: Settings, envelopes: list[Envelope]) -> None:
    producer = Producer(producer_config(settings))
    for envelope in envelopes:
        producer.produce(settings.topic, key=_key(envelope), value=encode_envelope(envelope))
        producer.poll(0)
    assert producer.flush(30) == 0


def test_a_read_only_database_and_a_killed_connection_do_not_end_the_run(
    settings: Settings,
    real_plans: dict[str, str],
    pg: psycopg.Connection[tuple[object, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="planpipe.ingest")
    envelopes = make_envelopes(real_plans, 300, _prefix(settings))
    _publish(settings, envelopes[:100])
    engine = IngestEngine(settings, max_messages=50)
    outcome: list[RunSummary] = []
    worker = threading.Thread(target=lambda: outcome.append(engine.run(max_seconds=90)))
    try:
        pg.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        pg.execute("SELECT pg_reload_conf()")
        worker.start()
        _wait_until(lambda: "ReadOnlySqlTransaction" in caplog.text, "the run meets the read-only database")
        (killed_at,) = pg.execute("SELECT now()").fetchone() or (None,)
        killed = pg.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchone()
        assert killed is not None and int(killed[0]) >= 1  # type: ignore[call-overload]
        # The run reconnects while the database is still read-only, so it retries on the new connection too.
        _wait_until(lambda: _clients_since(pg, killed_at) > 0, "the run reconnects after its connection was killed")
    finally:
        pg.execute("ALTER SYSTEM RESET default_transaction_read_only")
        pg.execute("SELECT pg_reload_conf()")
    _publish(settings, envelopes[100:])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _stored_executions(settings) < len(envelopes):
        time.sleep(0.5)
    engine.stop()
    worker.join(30)
    engine.close()
    assert outcome, "the run ended with an exception"
    assert outcome[0].pg_retries >= 2
    assert "ReadOnlySqlTransaction" in caplog.text
    assert _stored_executions(settings) == len(envelopes)
    assert _parquet(settings).height == len(envelopes)


def test_a_table_lock_is_measured_as_lock_wait(
    settings: Settings, real_plans: dict[str, str], pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    envelopes = make_envelopes(real_plans, 40, _prefix(settings))
    _publish(settings, envelopes)
    engine = IngestEngine(settings, max_messages=500)
    holder = psycopg.connect(settings.pg_dsn)
    try:
        holder.execute("LOCK TABLE planpipe.plan_baselines IN ACCESS EXCLUSIVE MODE")
        outcome: list[RunSummary] = []
        worker = threading.Thread(target=lambda: outcome.append(engine.run(until_caught_up=True, max_seconds=90)))
        worker.start()
        # Hold the lock for 8 s after the batch starts waiting for it (longer than one lock_timeout).
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and not pg.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()
        ):
            time.sleep(0.05)
        time.sleep(8)
        holder.commit()
        worker.join(60)
    finally:
        holder.close()
        engine.close()
    assert outcome and outcome[0].caught_up
    row = pg.execute(
        "SELECT max(lock_wait_ms), max(duration_ms) FROM planpipe.ingest_batches WHERE consumer_group = %s",
        (settings.consumer_group,),
    ).fetchone()
    assert row is not None
    lock_wait_ms, duration_ms = float(row[0]), float(row[1])  # type: ignore[arg-type]
    assert 7500 <= lock_wait_ms <= duration_ms
    assert outcome[0].max_lock_wait_ms == pytest.approx(lock_wait_ms)
    assert outcome[0].pg_retries >= 1  # one lock_timeout expired on the way


def test_a_stale_batch_resumes_from_the_store_and_what_was_decoded_meanwhile_is_read_again(
    settings: Settings, real_plans: dict[str, str], pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """While our batch waits for a lock, another consumer of the group commits the head of one
    partition. Our batch is stale; the batch decoded meanwhile (the writes run beside the decode)
    is dropped too. That partition resumes past the other's commit, every other record is read
    again: at the end each record not taken by the other is in Parquet and PostgreSQL once."""
    _publish(settings, make_envelopes(real_plans, 600, _prefix(settings)))
    counts = {p: n for p, n in _partition_counts(settings).items() if n}
    taken_partition = max(counts, key=lambda p: counts[p])
    taken = counts[taken_partition] // 2
    # Two batches of several partitions each: one waits for the lock while the next is decoded.
    engine = IngestEngine(settings, max_messages=300)
    holder = psycopg.connect(settings.pg_dsn)
    outcome: list[RunSummary] = []
    try:
        holder.execute("LOCK TABLE planpipe.plan_baselines IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: outcome.append(engine.run(until_caught_up=True, max_seconds=90)))
        worker.start()
        _wait_for_a_lock_wait(pg)
        holder.execute(
            """INSERT INTO planpipe.consumer_offsets (consumer_group, topic, partition, next_offset)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = excluded.next_offset""",
            (settings.consumer_group, settings.topic, taken_partition, taken),
        )
        holder.commit()
        worker.join(90)
    finally:
        holder.close()
        engine.close()
    assert outcome and outcome[0].caught_up, outcome
    assert outcome[0].stale_batches >= 1
    expected = {
        (p, offset) for p, n in counts.items() for offset in range(n) if not (p == taken_partition and offset < taken)
    }
    frame = _parquet(settings)
    found = list(zip(frame["kafka_partition"].to_list(), frame["kafka_offset"].to_list(), strict=True))
    assert len(found) == len(set(found))  # nothing twice
    assert set(found) == expected  # nothing lost, nothing the other consumer committed
    assert _stored_executions(settings) == len(expected)


def _partition_counts(settings: Settings) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.consumer_group}-w"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(settings.topic, p), timeout=10)[1]
            for p in range(settings.partitions)
        }
    finally:
        consumer.close()


def _wait_for_a_lock_wait(pg: psycopg.Connection[tuple[object, ...]], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not pg.execute(
        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ).fetchone():
        assert time.monotonic() < deadline, "the batch never waited for the lock"
        time.sleep(0.05)


def test_until_caught_up_that_stops_short_exits_non_zero_naming_the_partitions(
    settings: Settings, real_plans: dict[str, str]
) -> None:
    _publish(settings, make_envelopes(real_plans, 3000, _prefix(settings)))
    done = subprocess.run(
        [sys.executable, "-m", "planpipe.cli", "ingest", "--until-caught-up", "--max-seconds", "2",
         "--max-messages", "5", "--max-wait", "0.05", "--quiet"],
        env=settings_env(settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "not caught up" in done.stderr
    assert "partition" in done.stderr


def test_a_broker_restart_mid_run_does_not_end_the_run(
    stack_settings: Settings, settings: Settings, real_plans: dict[str, str]
) -> None:
    from planpipe.stack import kafka

    envelopes = make_envelopes(real_plans, 200, _prefix(settings))
    _publish(settings, envelopes[:100])
    engine = IngestEngine(settings, max_messages=50)
    outcome: list[RunSummary] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(engine.run(max_seconds=240))
        except BaseException as error:  # the assertion below shows it
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _stored_executions(settings) < 100:
            time.sleep(0.5)
        assert kafka.stop(stack_settings)
        time.sleep(3)  # the run polls, computes lag and commits against a dead broker meanwhile
        assert kafka.start(stack_settings)
        _publish(settings, envelopes[100:])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _stored_executions(settings) < len(envelopes) and worker.is_alive():
            time.sleep(0.5)
    finally:
        engine.stop()
        worker.join(60)
        engine.close()
    assert not errors, errors
    assert outcome and not worker.is_alive()
    assert _stored_executions(settings) == len(envelopes)
    frame = _parquet(settings)
    assert frame.height == len(envelopes)
    assert frame.select(["kafka_partition", "kafka_offset"]).n_unique() == len(envelopes)
