"""The micro-batch consumer: Kafka → decode + fingerprint → Parquet → PostgreSQL → Kafka commit.

Order of effects per batch, and why each crash point is safe:

1. consume up to `max_messages` records or `max_wait_s`;
2. decode, validate and fingerprint (pure; a crash here loses nothing);
3. publish rejects to the DLQ and wait for their acks (a crash after this and
   before 5 republishes them: the DLQ is at-least-once, and the replay job
   de-duplicates by source coordinates);
4. write the Parquet files, fsynced (a crash after this leaves files for
   offsets the store never committed; they are discarded when the partition is
   next assigned, then rewritten);
5. one PostgreSQL transaction: fence on the stored offsets, upserts, the
   batch's stats, and the next offsets (the commit point);
6. commit the offsets to Kafka (a crash before this is harmless: on
   assignment the consumer seeks to the offsets stored in PostgreSQL).

Engine code never imports Dagster: assets call `IngestEngine.run`.
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import psycopg
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from planpipe.contract import EnvelopeDecoder
from planpipe.ingest import baseline_sink, metrics, parquet_sink
from planpipe.ingest.batch import PreparedBatch, prepare_batch
from planpipe.ingest.breaker import LatencyBreaker, LockWaitThrottle
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.plans.fingerprint import identify_plan
from planpipe.routing.router import RoutingConfig
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.ingest")

_KNOWN_FINGERPRINTS_MAX: Final = 200_000
_PG_RETRY_MAX_DELAY_S: Final = 30.0


def _fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named step.

    PLANPIPE_FAULT_KILL_AT=<step>[:<batch number>] (1-based). Never set in production.
    """
    spec = os.environ.get("PLANPIPE_FAULT_KILL_AT")
    if not spec:
        return
    step, _, nth = spec.partition(":")
    if step != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}


@dataclass(frozen=True)
class BatchReport:
    batch_id: int
    offset_ranges: list[dict[str, object]]
    consumed: int
    valid: int
    dlq: int
    dropped_low: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    lock_wait_ms: float
    duration_ms: float
    parquet_files: list[str]
    breaker_open: bool


@dataclass
class RunSummary:
    batches: int = 0
    consumed: int = 0
    valid: int = 0
    dlq: int = 0
    dropped_low: int = 0
    stale_batches: int = 0
    pg_retries: int = 0
    throttled_s: float = 0.0
    max_p95_latency_ms: float = 0.0
    max_lock_wait_ms: float = 0.0
    seconds: float = 0.0
    caught_up: bool = False
    final_lag: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class _DeliveryTracker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.errors.append(f"{message.topic()}: {error}")


class IngestEngine:
    def __init__(
        self,
        settings: Settings,
        *,
        max_messages: int | None = None,
        max_wait_s: float | None = None,
        routing: RoutingConfig | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        client_id: str = "planpipe-ingest",
    ) -> None:
        self.settings = settings
        self.max_messages = max_messages or settings.batch_max_messages
        self.max_wait_s = max_wait_s if max_wait_s is not None else settings.batch_max_wait_s
        self.routing = routing or RoutingConfig(sample_rate_pct=100)
        self.on_batch = on_batch
        self.decoder = EnvelopeDecoder(settings.max_plan_bytes)
        self.breaker = LatencyBreaker()
        self.throttle = LockWaitThrottle()
        self.parquet_root = settings.parquet_dir
        self._known_fingerprints: set[str] = set()
        self._next_offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self._conn = psycopg.connect(settings.pg_dsn, autocommit=True)
        conf = consumer_config(settings, settings.consumer_group, **{"client.id": client_id})
        # A member that died keeps its partitions until its session times out; only
        # after that (plus a rebalance) may "no assignment" mean "nothing for us".
        self._assignment_grace_s = float(str(conf["session.timeout.ms"])) / 1000 + 15
        self._consumer = Consumer(conf)
        dlq_options: dict[str, str | int | bool] = {"client.id": f"{client_id}-dlq", "linger.ms": 5}
        self._dlq = Producer(producer_config(settings, **dlq_options))

    # -- partition assignment: PostgreSQL is the source of truth for positions ------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = baseline_sink.stored_offsets(self._conn, self.settings.consumer_group, self.settings.topic)
        for tp in partitions:
            # Files at or past the stored offset were never committed; with no stored
            # offset nothing of this partition was, so all of its files go.
            next_offset = stored.get(tp.partition)
            parquet_sink.discard_uncommitted(self.parquet_root, tp.topic, tp.partition, next_offset or 0)
            # Unknown to the store: fall back to Kafka's committed offset / auto.offset.reset.
            tp.offset = OFFSET_INVALID if next_offset is None else next_offset
            if next_offset is not None:
                self._next_offsets[tp.partition] = next_offset
        consumer.incremental_assign(partitions)
        # A crash between the store commit and the Kafka commit leaves Kafka behind;
        # bring it level so lag computed from Kafka's committed offsets is right.
        resumed = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in partitions if tp.offset >= 0]
        if resumed:
            try:
                consumer.commit(offsets=resumed, asynchronous=True)
            except KafkaException as error:
                logger.info("could not align Kafka offsets on assignment: %s", error)
        logger.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_unassign(partitions)
        for tp in partitions:
            self._next_offsets.pop(tp.partition, None)
        logger.info("revoked %s", sorted(tp.partition for tp in partitions))

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            self._dlq.flush(10)
            self._conn.close()

    # -- the loop -----------------------------------------------------------------------
    def run(self, *, until_caught_up: bool = False, max_seconds: float | None = None) -> RunSummary:
        summary = RunSummary()
        started = time.monotonic()
        self._consumer.subscribe([self.settings.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        idle_polls = 0
        while not self._stop.is_set():
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            records = self._consumer.consume(num_messages=self.max_messages, timeout=self.max_wait_s)
            records = [r for r in records if self._usable(r)]
            if not records:
                idle_polls += 1
                if until_caught_up and self._caught_up(waited_s=time.monotonic() - started, idle_polls=idle_polls):
                    summary.caught_up = True
                    break
                continue
            idle_polls = 0
            report = self._process(records, summary)
            if report is not None and self.on_batch is not None:
                self.on_batch(report)
            delay = self.throttle.delay_s()
            if delay:
                summary.throttled_s += delay
                self._stop.wait(delay)
        summary.seconds = round(time.monotonic() - started, 3)
        summary.final_lag = self.lag()
        return summary

    def _usable(self, record: Message) -> bool:
        error = record.error()
        if error is None:
            return True
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        if error.fatal() or not error.retriable():
            raise KafkaException(error)
        logger.warning("transient consumer error: %s", error)
        return False

    def _caught_up(self, *, waited_s: float, idle_polls: int) -> bool:
        assignment = self._consumer.assignment()
        if not assignment:
            # In a group with more members than partitions we may never get any.
            return waited_s > self._assignment_grace_s and idle_polls >= 3
        return all(lag == 0 for lag in self.lag().values())

    def lag(self) -> dict[int, int]:
        """Per assigned partition: high watermark minus our next offset."""
        assignment = self._consumer.assignment()
        if not assignment:
            return {}
        # position() is unknown for a partition we seeked to but have not fetched from yet.
        known = dict(self._next_offsets)
        known.update({tp.partition: tp.offset for tp in self._consumer.position(assignment) if tp.offset >= 0})
        unknown = [tp for tp in assignment if tp.partition not in known]
        if unknown:
            for tp in self._consumer.committed(unknown, timeout=10):
                if tp.offset >= 0:
                    known[tp.partition] = tp.offset
        result: dict[int, int] = {}
        for tp in assignment:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            result[tp.partition] = max(0, high - known.get(tp.partition, low))
        return result

    def _process(self, records: list[Message], summary: RunSummary) -> BatchReport | None:
        batch_started = time.time()
        batch = prepare_batch(
            records,
            self.decoder,
            self.routing,
            drop_low_priority=self.breaker.is_open,
            known_fingerprints=self._known_fingerprints,
        )
        _fault_point("after_decode")
        self._publish_dead_letters(batch)
        written = self._write_parquet(batch)
        _fault_point("after_parquet")
        identities = {fp: identify_plan(text) for fp, text in batch.new_plan_samples.items()}
        new_plans = {fp: (ident.normalized_json, ident.summary) for fp, ident in identities.items()}
        relative = [str(w.path.relative_to(self.parquet_root)) for w in written]
        result = self._commit_with_retry(batch, new_plans, relative, batch_started, summary)
        if result is None:
            return None
        _fault_point("after_pg_commit")
        self._remember(new_plans)
        for span in batch.offset_ranges.values():
            self._next_offsets[span.partition] = span.last + 1
        self._commit_kafka(batch)
        _fault_point("after_kafka_commit")

        self.breaker.record(result.p95_latency_ms or 0.0)
        self.throttle.record(result.lock_wait_ms)
        metrics.RECORDS_CONSUMED.inc(batch.consumed)
        metrics.DLQ_TOTAL.inc(len(batch.dead_letters))
        metrics.DROPPED_LOW.inc(batch.dropped_low)
        metrics.LOCK_WAIT_MS.set(result.lock_wait_ms)
        metrics.BREAKER_OPEN.set(1 if self.breaker.is_open else 0)
        for published in batch.observations.published_at:
            metrics.PUBLISH_TO_COMMIT_MS.observe(max(0.0, (result.committed_at - published) * 1000))
        summary.batches += 1
        summary.consumed += batch.consumed
        summary.valid += len(batch.observations)
        summary.dlq += len(batch.dead_letters)
        summary.dropped_low += batch.dropped_low
        summary.max_p95_latency_ms = max(summary.max_p95_latency_ms, result.p95_latency_ms or 0.0)
        summary.max_lock_wait_ms = max(summary.max_lock_wait_ms, result.lock_wait_ms)
        return BatchReport(
            batch_id=result.batch_id,
            offset_ranges=[r.as_dict() for r in batch.offset_ranges.values()],
            consumed=batch.consumed,
            valid=len(batch.observations),
            dlq=len(batch.dead_letters),
            dropped_low=batch.dropped_low,
            p50_latency_ms=result.p50_latency_ms,
            p95_latency_ms=result.p95_latency_ms,
            lock_wait_ms=result.lock_wait_ms,
            duration_ms=(result.committed_at - batch_started) * 1000,
            parquet_files=relative,
            breaker_open=self.breaker.is_open,
        )

    def _publish_dead_letters(self, batch: PreparedBatch) -> None:
        if not batch.dead_letters:
            return
        tracker = _DeliveryTracker()
        for letter in batch.dead_letters:
            self._dlq.produce(
                self.settings.dlq_topic, value=letter.value, key=letter.key, headers=list(letter.headers()),
                on_delivery=tracker,
            )  # fmt: skip
        remaining = self._dlq.flush(60)
        if remaining or tracker.errors:
            # Nothing is committed: the batch is consumed again once the DLQ is writable.
            raise KafkaException(f"DLQ publish failed ({remaining} unsent): {tracker.errors[:3]}")

    def _write_parquet(self, batch: PreparedBatch) -> list[parquet_sink.WrittenFile]:
        ranges = [(r.topic, r.partition, r.first, r.last) for r in batch.offset_ranges.values()]
        return parquet_sink.write_batch(self.parquet_root, batch.observations, ranges)

    def _commit_with_retry(
        self,
        batch: PreparedBatch,
        new_plans: dict[str, tuple[str, str]],
        files: list[str],
        started_at: float,
        summary: RunSummary,
    ) -> baseline_sink.CommitResult | None:
        delay = 0.5
        while True:
            try:
                return baseline_sink.commit_batch(
                    self._conn, self.settings.consumer_group, batch, new_plans, files, started_at
                )
            except baseline_sink.StaleBatchError as stale:
                # Another consumer committed these offsets: drop our copy, resume from the store.
                logger.warning("stale batch discarded: %s", stale)
                summary.stale_batches += 1
                self._discard_stale(batch, files)
                return None
            except psycopg.OperationalError as error:
                # The batch stays in memory (our local buffer) and is replayed as is;
                # consumption waits, so the store is not flooded while it recovers.
                summary.pg_retries += 1
                logger.warning("baseline store rejected the batch (%s); retrying in %.1fs", error, delay)
                if self._stop.wait(delay):
                    raise
                delay = min(_PG_RETRY_MAX_DELAY_S, delay * 2)
                if self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(self.settings.pg_dsn, autocommit=True)

    def _discard_stale(self, batch: PreparedBatch, files: list[str]) -> None:
        committed = {
            str(row[0])
            for row in self._conn.execute(
                """SELECT f FROM planpipe.ingest_batches, jsonb_array_elements_text(parquet_files) AS f
                   WHERE f = ANY(%s)""",
                (files,),
            )
        }
        for name in files:
            if name not in committed:
                (self.parquet_root / name).unlink(missing_ok=True)
        stored = baseline_sink.stored_offsets(self._conn, self.settings.consumer_group, self.settings.topic)
        assigned = {tp.partition for tp in self._consumer.assignment()}
        for span in batch.offset_ranges.values():
            if span.partition in assigned and span.partition in stored:
                self._consumer.seek(TopicPartition(span.topic, span.partition, stored[span.partition]))

    def _commit_kafka(self, batch: PreparedBatch) -> None:
        offsets = [TopicPartition(r.topic, r.partition, r.last + 1) for r in batch.offset_ranges.values()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as error:  # e.g. during a rebalance; PostgreSQL already has them
            logger.info("Kafka offset commit skipped: %s", error)

    def _remember(self, new_plans: dict[str, tuple[str, str]]) -> None:
        if len(self._known_fingerprints) > _KNOWN_FINGERPRINTS_MAX:
            self._known_fingerprints.clear()
        self._known_fingerprints.update(new_plans)
