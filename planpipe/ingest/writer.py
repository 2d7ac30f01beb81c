"""The writes of one micro-batch — DLQ, Parquet, the PostgreSQL transaction — on a thread of its own.

The engine decodes batch N+1 while this thread writes batch N. Decoding is Python and holds
the GIL; the writes mostly wait on zstd, fsync, polars and PostgreSQL, which release it, so
on two cores the two overlap instead of taking turns. Order is what it was without the
thread: one batch at a time, in the order consumed, and the engine commits a batch's offsets
to Kafka only once `wait` has handed it that batch's PostgreSQL commit.

Everything here that can go wrong stays the engine's to decide: `wait` returns a stale batch
as such and raises what the writes raised (`Abandoned` on a stop request, a fatal error).
"""

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from planpipe import tracing
from planpipe.ingest import baseline_sink, faults, isolate, metrics, parquet_sink, sinks
from planpipe.ingest.batch import KafkaRecord, PreparedBatch
from planpipe.ingest.sinks import Abandoned
from planpipe.messaging.consumer import fault_point

logger = logging.getLogger("planpipe.ingest")


@dataclass
class WrittenBatch:
    """One batch after its writes. `result` is None when the batch was stale (another consumer
    had committed its offsets): its files are gone and nothing of it was kept."""

    records: Sequence[KafkaRecord]
    batch: PreparedBatch  # without the records a sink refused (they were dead-lettered)
    positions: dict[int, int]  # consumer positions right after the consume, for the Kafka commit
    started: float  # the batch's decode began
    decoded: float
    shed_low: bool  # decoded with the latency breaker open: `low` records were dropped
    result: baseline_sink.CommitResult | None = None
    files: list[parquet_sink.WrittenFile] = field(default_factory=list)
    new_plans: sinks.NewPlans = field(default_factory=dict)
    sink_rejected: int = 0


class BatchWriter:
    """Writes the batches handed to `submit`, one at a time, on one thread."""

    def __init__(
        self, batch_sinks: sinks.BatchSinks, stop: threading.Event, warn: faults.OncePerMinute, consumer_group: str
    ) -> None:
        self._sinks = batch_sinks
        self._stop = stop
        self._warn = warn
        self._consumer_group = consumer_group
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planpipe-batch-writer")
        self._pending: Future[WrittenBatch] | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, written: WrittenBatch) -> None:
        if self._pending is not None:
            raise RuntimeError("a batch is still being written: wait() for it first")
        self._pending = self._thread.submit(self._write, written)

    def wait(self) -> WrittenBatch | None:
        """The batch being written once its writes are done (None if there is none); raises
        what the writes raised."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def discard(self) -> None:
        """Let a batch being written finish (or be abandoned on the stop request) and forget it:
        its offsets are not committed to Kafka, which is safe (PostgreSQL holds the positions)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as error:  # the run is ending anyway; the batch stays uncommitted (safe)
                logger.info("batch left unfinished: %s", error)

    def close(self) -> None:
        self.discard()
        self._thread.shutdown(wait=True)

    # -- on the writer thread -------------------------------------------------------------
    def _write(self, written: WrittenBatch) -> WrittenBatch:
        batch = written.batch
        parquet_started = parquet_done = commit_started = time.time()  # stage times: traces
        published = 0
        files: list[parquet_sink.WrittenFile] = []
        relative: list[str] = []
        data_backoff = faults.Backoff(self._stop)
        while True:
            try:
                self._sinks.publish_dead_letters(batch.dead_letters[published:])
                published = len(batch.dead_letters)
                parquet_started = time.time()
                files = self._sinks.write_parquet(batch, replacing=files)
                parquet_done = time.time()
                fault_point("after_parquet")
                new_plans = sinks.identify_new_plans(batch)
                relative = [str(w.path.relative_to(self._sinks.parquet_root)) for w in files]
                commit_started = time.time()
                result = self._sinks.commit(batch, new_plans, relative, written.started)
                break
            except baseline_sink.StaleBatchError as stale:
                logger.warning("stale batch discarded: %s", stale)
                self._sinks.discard_uncommitted_files(relative)
                written.batch = batch
                return written
            except Exception as error:
                if not faults.is_data_fault(error):
                    raise
                rejects = isolate.find_rejects(batch, self._sinks.trial)
                if not rejects:
                    # Not one record's fault after all: retry the batch as a whole.
                    logger.warning("batch refused (%s) but no record fails alone; retrying", error)
                    if not data_backoff.wait():
                        raise Abandoned from error
                    continue
                obs = batch.observations
                for index, reason in rejects.items():
                    logger.warning(
                        "record %s[%s]@%s refused by a sink, dead-lettered: %s",
                        obs.kafka_topic[index], obs.kafka_partition[index], obs.kafka_offset[index], reason,
                    )  # fmt: skip
                batch = isolate.without_rejects(batch, rejects, written.records)
                written.sink_rejected += len(rejects)
                metrics.SINK_REJECTED.inc(len(rejects))
        fault_point("after_pg_commit")
        written.batch, written.result, written.files, written.new_plans = batch, result, files, new_plans
        times = tracing.BatchTimes(written.started, written.decoded, parquet_started, parquet_done, commit_started,
                                   result.committed_at)  # fmt: skip
        self._trace(written, result.batch_id, times)
        return written

    def _trace(self, written: WrittenBatch, batch_id: int, times: tracing.BatchTimes) -> None:
        """Spans and a trace_samples row for the batch's sampled envelopes (none: one list scan)."""
        obs = written.batch.observations
        sampled = tracing.sampled_indexes(obs.trace_id)
        if not sampled:
            return
        try:
            parents = tracing.parents_from_headers(
                written.records, obs.kafka_partition, obs.kafka_offset, obs.trace_id, sampled
            )
            samples = tracing.record_ingest(
                parents, obs.query_hash, obs.cluster_id, obs.published_at, times, batch_id,
                {"messaging.kafka.consumer.group": self._consumer_group},
            )  # fmt: skip
            tracing.store_samples(self._sinks.conn, self._consumer_group, samples)
        except Exception as error:  # diagnostics: never fail a committed batch over them
            self._warn("trace", f"trace samples of batch {batch_id} not recorded: {error}")
