"""The three sinks of one batch — DLQ, Parquet, PostgreSQL — and riding out their faults.

`BatchSinks` owns the PostgreSQL connection and the DLQ producer of an ingest
run. Each write is retried inside the run while its fault is transient (see
`faults`); a stop request meanwhile raises `Abandoned`, leaving the batch
uncommitted, which is as safe as a crash at that point. `trial` tells whether
the sinks would take a set of observations without keeping anything, so the
engine can isolate records a sink refuses for a data reason.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import psycopg
from confluent_kafka import KafkaError, Message, Producer

from planpipe.dlq import DeadLetter
from planpipe.errors import PlanpipeError
from planpipe.ingest import baseline_sink, faults, metrics, parquet_sink
from planpipe.ingest.batch import PreparedBatch
from planpipe.ingest.breaker import LockWaitThrottle
from planpipe.kafka_config import producer_config
from planpipe.plans.fingerprint import identify_plan
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.ingest")

_T = TypeVar("_T")
NewPlans = dict[str, tuple[str, str]]  # fingerprint → (normalized plan JSON, one-line summary)


class Abandoned(PlanpipeError):
    """A stop was requested while a batch waited out a fault: it is dropped uncommitted (safe)."""


def identify_new_plans(batch: PreparedBatch) -> NewPlans:
    identities = {fp: identify_plan(text) for fp, text in batch.new_plan_samples.items()}
    return {fp: (ident.normalized_json, ident.summary) for fp, ident in identities.items()}


class _DeliveryReports:
    def __init__(self) -> None:
        self.failed: list[DeadLetter] = []
        self.errors: list[str] = []
        self.count = 0

    def callback(self, letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            self.count += 1
            if error is not None:
                self.failed.append(letter)
                self.errors.append(str(error))

        return delivered


class BatchSinks:
    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        throttle: LockWaitThrottle,
        warn: faults.OncePerMinute,
        client_id: str,
    ) -> None:
        self.settings = settings
        self.parquet_root: Path = settings.parquet_dir
        self._stop = stop
        self._throttle = throttle
        self._warn = warn
        self.pg_retries = 0
        self.kafka_retries = 0
        self.conn = psycopg.connect(settings.pg_dsn, autocommit=True)
        dlq_options: dict[str, str | int | bool] = {"client.id": f"{client_id}-dlq", "linger.ms": 5}
        self._dlq = Producer(producer_config(settings, **dlq_options))

    def close(self) -> None:
        try:
            self._dlq.flush(10)
        finally:
            self.conn.close()

    # -- DLQ ------------------------------------------------------------------------------
    def publish_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Publish and wait for every ack; failed deliveries are re-sent after a backoff."""
        pending = list(letters)
        backoff = faults.Backoff(self._stop, max_s=10.0)
        while pending:
            reports = _DeliveryReports()
            for letter in pending:
                self._dlq.produce(
                    self.settings.dlq_topic, value=letter.value, key=letter.key, headers=list(letter.headers()),
                    on_delivery=reports.callback(letter),
                )  # fmt: skip
            # Delivery reports come within message.timeout.ms, success or not.
            while reports.count < len(pending):
                self._dlq.poll(0.5)
                if self._stop.is_set() and self._dlq.flush(5) > 0:
                    raise Abandoned
            pending = reports.failed
            if pending:
                self.kafka_retries += 1
                self._warn("dlq", f"DLQ delivery of {len(pending)} failed, retrying: {reports.errors[0]}")
                if not backoff.wait():
                    raise Abandoned

    # -- Parquet --------------------------------------------------------------------------
    def write_parquet(
        self, batch: PreparedBatch, *, replacing: Sequence[parquet_sink.WrittenFile]
    ) -> list[parquet_sink.WrittenFile]:
        ranges = [(r.topic, r.partition, r.first, r.last) for r in batch.offset_ranges.values()]
        backoff = faults.Backoff(self._stop)
        while True:
            try:
                written = parquet_sink.write_batch(self.parquet_root, batch.observations, ranges)
                break
            except OSError as error:  # disk full, a stale NFS handle: retried like the store
                self._warn("parquet", f"writing Parquet failed ({error}); retrying")
                if not backoff.wait():
                    raise Abandoned from error
        # A rewrite after records were dead-lettered may leave a (route, date) group empty.
        kept = {w.path for w in written}
        for old in replacing:
            if old.path not in kept:
                old.path.unlink(missing_ok=True)
        return written

    # -- PostgreSQL -----------------------------------------------------------------------
    def commit(
        self, batch: PreparedBatch, new_plans: NewPlans, files: list[str], started_at: float
    ) -> baseline_sink.CommitResult:
        """The batch's transaction, retried through transient faults; raises `StaleBatchError`."""
        # Once an attempt timed out on a lock, everything since that attempt began (its wait,
        # the backoff, later waits) is time the batch spent blocked by locks.
        blocked_since: float | None = None

        def attempt() -> baseline_sink.CommitResult:
            nonlocal blocked_since
            started = time.perf_counter()
            earlier_ms = 0.0 if blocked_since is None else (started - blocked_since) * 1000
            try:
                return baseline_sink.commit_batch(
                    self.conn, self.settings.consumer_group, batch, new_plans, files, started_at,
                    earlier_lock_wait_ms=earlier_ms,
                )  # fmt: skip
            except baseline_sink.LockWaitTimeout as timeout:
                # Still waiting: the throttle and the gauge see it now, the batch row later.
                blocked_since = started if blocked_since is None else blocked_since
                waited_ms = earlier_ms + timeout.waited_ms
                self._throttle.record(waited_ms)
                metrics.LOCK_WAIT_MS.set(waited_ms)
                raise

        return self.with_pg_retry("commit the batch", attempt)

    def trial(self, batch: PreparedBatch) -> str | None:
        """Would the sinks take these observations? None if so, else why not. Keeps nothing."""
        try:
            parquet_sink.check_writable(batch.observations)
            baseline_sink.commit_batch(
                self.conn, self.settings.consumer_group, batch, identify_new_plans(batch), [], time.time(),
                dry_run=True,
            )  # fmt: skip
        except baseline_sink.StaleBatchError:
            return None  # not about the data; the real commit sees it again
        except Exception as error:
            if faults.is_data_fault(error):
                return f"{type(error).__name__}: {str(error).strip()}"
            raise
        return None

    def stored_offsets(self) -> dict[int, int]:
        return self.with_pg_retry(
            "read stored offsets",
            lambda: baseline_sink.stored_offsets(self.conn, self.settings.consumer_group, self.settings.topic),
        )

    def discard_uncommitted_files(self, files: Sequence[str]) -> None:
        """After a stale batch: remove its files unless a committed batch owns the same names."""
        committed = {
            str(row[0])
            for row in self.conn.execute(
                """SELECT f FROM planpipe.ingest_batches, jsonb_array_elements_text(parquet_files) AS f
                   WHERE f = ANY(%s)""",
                (list(files),),
            )
        }
        for name in files:
            if name not in committed:
                (self.parquet_root / name).unlink(missing_ok=True)

    def with_pg_retry(self, what: str, step: Callable[[], _T]) -> _T:
        backoff = faults.Backoff(self._stop)
        while True:
            try:
                return step()
            except Exception as error:
                if not faults.is_transient(error):
                    raise
                self.pg_retries += 1
                self._warn(f"pg-{what}", f"baseline store: {what} failed ({type(error).__name__}: {error}); retrying")
                if not backoff.wait():
                    raise Abandoned from error
                if self.conn.closed or self.conn.broken:
                    try:
                        self.conn = psycopg.connect(self.settings.pg_dsn, autocommit=True)
                    except psycopg.OperationalError as reconnect:
                        logger.debug("reconnect failed: %s", reconnect)
