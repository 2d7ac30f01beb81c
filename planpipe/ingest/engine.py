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

Faults never end the run (see `faults`): transient ones are retried with backoff
while the batch waits in memory; a record a sink refuses for a data reason is
isolated and dead-lettered (`isolate`) and the rest of its batch commits. A stop
request abandons an uncommitted batch, which is safe for the same reasons as a
crash. Offsets have gaps (transaction markers, aborted transactions): the store
fences on "not already committed", and Kafka offsets follow the consumer's
position so a trailing marker never reads as lag.

Steps 3–5 run on the batch writer's thread (`writer`) while this loop decodes the next
batch; step 6 and the batch's report wait for that write to finish, so the order above
holds per batch and batches are committed one at a time, in the order consumed. A batch
found stale sends its partitions back to the stored offsets and the batch decoded
meanwhile is consumed again; partitions change hands only after the batch being written.

The loop's Kafka mechanics shared with the DLQ replay (record errors, lag, caught-up, fault
points) are `planpipe.messaging.consumer.ConsumerLoop`; the order above is this module's.

Engine code never imports Dagster: assets call `IngestEngine.run`.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

from planpipe.contract import EnvelopeDecoder, Reason
from planpipe.ingest import faults, metrics, parquet_sink, sinks
from planpipe.ingest.baseline_sink import CommitResult
from planpipe.ingest.batch import (
    BATCH_GROWTH,
    BATCH_MAX_BYTES,
    PREFETCH_KBYTES,
    KafkaRecord,
    PreparedBatch,
    next_batch_limit,
    prepare_batch,
    split_by_bytes,
    trim_heap,
)
from planpipe.ingest.breaker import LatencyBreaker, LockWaitThrottle
from planpipe.ingest.sinks import Abandoned
from planpipe.ingest.writer import BatchWriter, WrittenBatch
from planpipe.kafka_config import consumer_config
from planpipe.messaging.consumer import ConsumerLoop, assignment_grace_s, fault_point
from planpipe.messaging.routes import RoutingConfig
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.ingest")

_KNOWN_FINGERPRINTS_MAX: Final = 200_000
# Watchdog: lag and no committed batch for this long means the run is stuck.
STALL_AFTER_S: Final = 60.0


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
    # The latency breaker's state the batch was decoded under (open: its `low` records were shed).
    # The next batch may already be decoded before this one's latency reaches the breaker.
    breaker_open: bool
    sink_rejected: int = 0
    started_at: float = 0.0  # wall clock: the batch's decode began
    committed_at: float = 0.0  # wall clock: its PostgreSQL commit returned


@dataclass
class RunSummary:
    batches: int = 0
    consumed: int = 0
    valid: int = 0
    dlq: int = 0
    dropped_low: int = 0
    sink_rejected: int = 0
    stale_batches: int = 0
    abandoned_batches: int = 0
    pg_retries: int = 0
    kafka_retries: int = 0
    stalls: int = 0
    throttled_s: float = 0.0
    max_p95_latency_ms: float = 0.0
    max_lock_wait_ms: float = 0.0
    seconds: float = 0.0
    caught_up: bool = False
    final_lag: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    @property
    def behind(self) -> dict[int, int]:
        """Partitions with lag left at the end of the run."""
        return {p: n for p, n in sorted(self.final_lag.items()) if n > 0}


class IngestEngine(ConsumerLoop):
    _min_idle_polls = 3

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
        # The configured size is the floor; under lag batches grow (an explicit max_messages pins the size).
        self._batch_ceiling = self.max_messages if max_messages else self.max_messages * BATCH_GROWTH
        self._batch_limit = self.max_messages
        self.max_wait_s = max_wait_s if max_wait_s is not None else settings.batch_max_wait_s
        self.routing = routing or RoutingConfig(sample_rate_pct=100)
        self.on_batch = on_batch
        self.decoder = EnvelopeDecoder(settings.max_plan_bytes)
        self.breaker = LatencyBreaker()
        self.throttle = LockWaitThrottle()
        self.parquet_root = settings.parquet_dir
        self._known_fingerprints: set[str] = set()
        self._next_offsets: dict[int, int] = {}  # per assigned partition: next offset to consume
        self._kafka_committed: dict[int, int] = {}
        self._stop = threading.Event()
        self._last_commit = time.monotonic()
        self._last_stall_warning = 0.0
        self._warn = faults.OncePerMinute(logger)
        self._consumer_retries = 0
        self._last_uncached_lag = 0.0
        self._sinks = sinks.BatchSinks(settings, self._stop, self.throttle, self._warn, client_id)
        self._writer = BatchWriter(self._sinks, self._stop, self._warn, settings.consumer_group)
        self._summary = RunSummary()  # the running one: batches are settled from rebalance callbacks too
        self._rebalance_error: BaseException | None = None
        extra: dict[str, str | int | bool] = {"client.id": client_id, "queued.max.messages.kbytes": PREFETCH_KBYTES}
        conf = consumer_config(settings, settings.consumer_group, **extra)
        self._assignment_grace_s = assignment_grace_s(conf)
        self._consumer = Consumer(conf)

    # -- partition assignment: PostgreSQL is the source of truth for positions ------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._settle_before_rebalance()
        stored = self._sinks.stored_offsets()
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
            self._commit_offsets(resumed)
        logger.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._settle_before_rebalance()
        consumer.incremental_unassign(partitions)
        for tp in partitions:
            self._next_offsets.pop(tp.partition, None)
            self._kafka_committed.pop(tp.partition, None)
        logger.info("revoked %s", sorted(tp.partition for tp in partitions))

    def stop(self) -> None:
        """Ask the run to end: between batches, or by abandoning a batch that waits out a fault."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def seconds_since_commit(self) -> float:
        return time.monotonic() - self._last_commit

    def close(self) -> None:
        try:
            self._writer.close()
            self._await_kafka_commits()
            self._consumer.close()
        finally:
            self._sinks.close()

    def _await_kafka_commits(self, timeout_s: float = 5.0) -> None:
        """Offsets are committed asynchronously; before leaving, wait (bounded: a dead broker must not
        hold the exit) until the broker has them, so whoever reads the group's lag next sees it."""
        topic = self.settings.topic
        wanted = {p: o for p, o in self._kafka_committed.items() if o >= 0}
        deadline = time.monotonic() + timeout_s
        while wanted and time.monotonic() < deadline:
            try:
                found = self._consumer.committed([TopicPartition(topic, p) for p in wanted], timeout=1.0)
            except KafkaException:
                return  # the broker is not answering: PostgreSQL holds the offsets anyway
            wanted = {tp.partition: wanted[tp.partition] for tp in found if tp.offset < wanted[tp.partition]}
            if wanted:
                time.sleep(0.05)  # the commit request is in flight (librdkafka sends it on its own thread)

    # -- the loop -----------------------------------------------------------------------
    def run(
        self, *, until_caught_up: bool = False, max_seconds: float | None = None, idle_s: float = 0.0
    ) -> RunSummary:
        """Consume until stopped, `max_seconds`, or — with `until_caught_up` — lag zero for `idle_s`.

        A long-lived run (the Dagster asset) lingers caught up for a while, so traffic that
        keeps arriving is committed within the latency SLA instead of waiting for the next run.
        """
        summary = self._summary = RunSummary()
        started = time.monotonic()
        self._last_commit = started
        self._consumer.subscribe([self.settings.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            self._loop(summary, started, until_caught_up=until_caught_up, max_seconds=max_seconds, idle_s=idle_s)
        except Abandoned:
            summary.abandoned_batches += 1
            logger.info("stop requested: uncommitted batch abandoned (it is consumed again by the next run)")
        finally:
            self._writer.discard()  # after an error: a batch still being written ends before anything else
        summary.seconds = round(time.monotonic() - started, 3)
        summary.final_lag = self.lag()
        summary.pg_retries = self._sinks.pg_retries
        summary.kafka_retries = self._sinks.kafka_retries + self._consumer_retries
        return summary

    def _loop(
        self, summary: RunSummary, started: float, *, until_caught_up: bool, max_seconds: float | None, idle_s: float
    ) -> None:
        idle_polls = 0
        caught_up_since: float | None = None
        consume_backoff = faults.Backoff(self._stop, first_s=0.5, max_s=10.0)
        while not self._stop.is_set():
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            try:
                records = [r for r in self._consume() if self._usable(r)]
            except KafkaException as error:
                if not faults.is_transient(error):
                    raise
                self._consumer_retries += 1
                self._warn("consume", f"consumer error, retrying: {error}")
                consume_backoff.wait()
                continue
            finally:
                self._raise_rebalance_error()
            consume_backoff.reset()
            if not records:
                self._settle(summary)  # nothing to decode meanwhile: finish the batch being written
                idle_polls += 1
                self._advance_past_markers()
                waited_s = time.monotonic() - started
                if until_caught_up and self._idle_caught_up(waited_s=waited_s, idle_polls=idle_polls):
                    caught_up_since = caught_up_since or time.monotonic()
                    if time.monotonic() - caught_up_since >= idle_s and self._caught_up(
                        waited_s=waited_s, idle_polls=idle_polls, cached=False
                    ):
                        summary.caught_up = True
                        break
                self._watch_progress(summary)
                continue
            idle_polls = 0
            caught_up_since = None
            # Right after consume(): past the last record and any markers behind it.
            positions = self._positions(records)
            chunks = split_by_bytes(records, BATCH_MAX_BYTES)
            for n, chunk in enumerate(chunks, 1):
                prepared = self._prepare(chunk, positions if n == len(chunks) else {})
                # The previous batch was written while this one was decoded.
                if not self._settle(summary, unwritten=chunks[n - 1 :]):
                    break
                self._writer.submit(prepared)
            self._watch_progress(summary)
            delay = self.throttle.delay_s()
            if delay:
                summary.throttled_s += delay
                self._stop.wait(delay)
        self._settle(summary)  # the last batch: committed, or abandoned on the stop request

    def _consume(self) -> list[Message]:
        records = self._consumer.consume(num_messages=self._batch_limit, timeout=self.max_wait_s)
        received_bytes = sum(len(r.value() or b"") for r in records)
        self._batch_limit = next_batch_limit(
            self._batch_limit, len(records), self.max_messages, self._batch_ceiling, received_bytes
        )
        return records

    def _idle_caught_up(self, *, waited_s: float, idle_polls: int) -> bool:
        """Caught up, judged from the watermarks of the last fetch responses (no broker round trip:
        a lingering run polls every batch wait, and six ListOffsets per poll delayed the records
        that arrived meanwhile). Where a watermark is not known yet, ask the broker at most once a second."""
        cached = self._caught_up(waited_s=waited_s, idle_polls=idle_polls, cached=True)
        if cached is not None:
            return cached
        now = time.monotonic()
        if now - self._last_uncached_lag < 1.0:
            return False
        self._last_uncached_lag = now
        return bool(self._caught_up(waited_s=waited_s, idle_polls=idle_polls, cached=False))

    def _advance_past_markers(self) -> None:
        """Idle: let Kafka's committed offsets follow positions that moved past control records."""
        assignment = self._consumer.assignment()
        if not assignment:
            return
        try:
            positions = self._consumer.position(assignment)
        except KafkaException:
            return
        ahead = [
            TopicPartition(tp.topic, tp.partition, tp.offset)
            for tp in positions
            if tp.offset >= 0
            and tp.partition in self._next_offsets
            and tp.offset > self._kafka_committed.get(tp.partition, self._next_offsets[tp.partition])
        ]
        if ahead:
            self._commit_offsets(ahead)

    def _watch_progress(self, summary: RunSummary) -> None:
        idle_s = self.seconds_since_commit()
        now = time.monotonic()
        if idle_s < STALL_AFTER_S or now - self._last_stall_warning < STALL_AFTER_S:
            return
        self._last_stall_warning = now
        behind = {p: n for p, n in self.lag().items() if n > 0}
        if behind:
            summary.stalls += 1
            metrics.INGEST_STALLS.inc()
            logger.warning(
                "no batch committed for %.0f s while partitions are behind: %s",
                idle_s,
                ", ".join(f"{p}: {n}" for p, n in behind.items()),
            )

    # -- one batch: decoded here, written on the writer's thread, finished here -------------
    def _prepare(self, records: list[Message], positions: dict[int, int]) -> WrittenBatch:
        started = time.time()
        shed_low = self.breaker.is_open
        batch = prepare_batch(
            records,
            self.decoder,
            self.routing,
            drop_low_priority=shed_low,
            known_fingerprints=self._known_fingerprints,
        )
        fault_point("after_decode")
        return WrittenBatch(records, batch, positions, started, time.time(), shed_low)

    def _settle(self, summary: RunSummary, unwritten: Sequence[Sequence[KafkaRecord]] = ()) -> bool:
        """Finish the batch being written, if any: Kafka commit, metrics, report. False when it
        was stale: its partitions, and those of `unwritten` (records consumed after it, which
        are dropped), then resume from the store."""
        written = self._writer.wait()
        if written is None:
            return True
        summary.sink_rejected += written.sink_rejected
        if written.result is None:
            summary.stale_batches += 1
            self._resume_from_store([written.records, *unwritten])
            return False
        report = self._finish(written, written.result, summary)
        if self.on_batch is not None:
            self.on_batch(report)
        return True

    def _resume_from_store(self, dropped: Sequence[Sequence[KafkaRecord]]) -> None:
        """Consume the dropped records again, from where the store says this group is: past what
        another consumer committed meanwhile, never past a record nobody has committed."""
        first: dict[tuple[str, int], int] = {}
        for records in dropped:
            for record in records:
                key, offset = (record.topic() or "", record.partition() or 0), record.offset() or 0
                first[key] = min(first.get(key, offset), offset)
        stored = self._sinks.stored_offsets()
        assigned = {tp.partition for tp in self._consumer.assignment()}
        for (topic, partition), offset in first.items():
            if partition in assigned:
                self._consumer.seek(TopicPartition(topic, partition, max(offset, stored.get(partition, offset))))

    def _settle_before_rebalance(self) -> None:
        """Partitions change hands only between batches: the batch being written is finished
        (its offsets committed) first. An error is raised once consume() returns."""
        try:
            self._settle(self._summary)
        except BaseException as error:  # a callback must not raise into librdkafka
            self._rebalance_error = self._rebalance_error or error

    def _raise_rebalance_error(self) -> None:
        error, self._rebalance_error = self._rebalance_error, None
        if error is not None:
            raise error

    def _finish(self, written: WrittenBatch, result: CommitResult, summary: RunSummary) -> BatchReport:
        batch = written.batch
        self._last_commit = time.monotonic()
        self._remember(written.new_plans)
        self._commit_kafka(batch, written.positions)
        fault_point("after_kafka_commit")
        trim_heap()  # the batch's memory goes back to the OS before the next consume
        self.breaker.record(result.p95_latency_ms or 0.0)
        self.throttle.record(result.lock_wait_ms)
        metrics.RECORDS_CONSUMED.inc(batch.consumed)
        metrics.DLQ_TOTAL.inc(len(batch.dead_letters))
        metrics.DROPPED_LOW.inc(batch.dropped_low)
        metrics.LOCK_WAIT_MS.set(result.lock_wait_ms)
        metrics.BREAKER_OPEN.set(1 if self.breaker.is_open else 0)
        metrics.observe_many(
            metrics.PUBLISH_TO_COMMIT_MS,
            [max(0.0, (result.committed_at - p) * 1000) for p in batch.observations.published_at],
        )
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
            duration_ms=(result.committed_at - written.started) * 1000,
            parquet_files=[str(w.path.relative_to(self.parquet_root)) for w in written.files],
            breaker_open=written.shed_low,
            sink_rejected=sum(1 for d in batch.dead_letters if d.reason == Reason.SINK_REJECTED),
            started_at=written.started,
            committed_at=result.committed_at,
        )

    def _positions(self, records: Sequence[Message]) -> dict[int, int]:
        partitions = {(r.topic(), r.partition()) for r in records}
        try:
            found = self._consumer.position([TopicPartition(t or "", p or 0) for t, p in partitions])
        except KafkaException:
            return {}
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    def _commit_kafka(self, batch: PreparedBatch, positions: dict[int, int]) -> None:
        offsets = []
        for span in batch.offset_ranges.values():
            next_offset = max(span.last + 1, positions.get(span.partition, 0))
            self._next_offsets[span.partition] = next_offset
            offsets.append(TopicPartition(span.topic, span.partition, next_offset))
        self._commit_offsets(offsets)

    def _commit_offsets(self, offsets: list[TopicPartition]) -> None:
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as error:  # e.g. during a rebalance; PostgreSQL already has them
            logger.info("Kafka offset commit skipped: %s", error)
            return
        for tp in offsets:
            self._kafka_committed[tp.partition] = tp.offset

    def _remember(self, new_plans: dict[str, tuple[str, str]]) -> None:
        if len(self._known_fingerprints) > _KNOWN_FINGERPRINTS_MAX:
            self._known_fingerprints.clear()
        self._known_fingerprints.update(new_plans)
