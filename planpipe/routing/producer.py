"""`PlanProducer`: Kafka delivery with a circuit breaker and a durable, ordered spool.

Normal operation sends straight to librdkafka (`acks=all`, idempotence, zstd).
When the broker is unreachable (3 consecutive failures: failed deliveries,
transport errors, `BufferError`, metadata probes that time out) the breaker
opens and records go to the SQLite spool; after the cool-down a half-open drain
re-sends the spool oldest first, deletes each row only once Kafka acked it, and
closes the breaker when the spool is empty.

Invariants that keep per-key order and avoid duplicates:

* A record goes direct only when the breaker is closed AND nothing older is
  waiting outside librdkafka (spool empty, no failed record not yet spooled).
  Otherwise it is appended to the spool behind everything older.
* Before anything new is appended, every older record still inside librdkafka
  gets a spool row too, in produce order ("write-through"). Those stay in
  librdkafka: if the broker returns within `message.timeout.ms`, librdkafka's
  idempotent retries deliver them exactly once, in order, and the delivery
  callback deletes their rows. If the process dies first, the rows are resent.
* The drain only starts when librdkafka holds none of our records, so a spooled
  record can never overtake one that librdkafka may still deliver.
* librdkafka does NOT fail the rest of a partition queue when one message
  times out (its docs: messages 1..5, 2 and 3 time out, the log gets 1, 4, 5).
  So the first failed delivery "fences": everything in flight is spooled in
  order, then the local queues are purged so nothing queued behind the failure
  is delivered ahead of it. Purged records keep their rows and are resent.

Residual risk (documented, not hidden): a record that times out while its
request was in flight may already be in the log (librdkafka's
POSSIBLY_PERSISTED, which the Python client does not expose). Resending it from
the spool then duplicates it. Outages shorter than `message.timeout.ms` (300 s
here) never get there: librdkafka's idempotent retry delivers those exactly once.
A kill -9 loses what was sent direct and not yet acked (librdkafka memory, a
few ms of traffic while healthy); during an outage everything is in the spool.

Collaborators, each sharing this producer's lock: `routing.delivery.Settlement`
(one round of delivery callbacks and the hooks it ends in) and
`routing.drain.SpoolDrain` (the drain thread).
"""

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from planpipe.kafka_config import producer_config
from planpipe.routing import metrics
from planpipe.routing.breaker import DEFAULT_COOLDOWN_S as DEFAULT_COOLDOWN_S
from planpipe.routing.breaker import DEFAULT_FAILURE_THRESHOLD as DEFAULT_FAILURE_THRESHOLD
from planpipe.routing.breaker import STATE_GAUGE
from planpipe.routing.breaker import BreakerState as BreakerState
from planpipe.routing.breaker import CircuitBreaker as CircuitBreaker
from planpipe.routing.delivery import PURGED, TIMEOUTS, UNDELIVERABLE, Pending, Settlement, Ticket, log_undeliverable
from planpipe.routing.delivery import ClientFactory as ClientFactory
from planpipe.routing.delivery import DeliveredHook as DeliveredHook
from planpipe.routing.delivery import DeliveryCallback as DeliveryCallback
from planpipe.routing.delivery import HeadersType as HeadersType
from planpipe.routing.delivery import KafkaClient as KafkaClient
from planpipe.routing.delivery import UndeliverableHook as UndeliverableHook
from planpipe.routing.drain import DEFAULT_DRAIN_BATCH as DEFAULT_DRAIN_BATCH
from planpipe.routing.drain import SpoolDrain
from planpipe.routing.spool import OutRecord, Spool
from planpipe.routing.spool_lock import SpoolInUse as SpoolInUse
from planpipe.routing.spool_lock import lock_spool
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.producer")

# Passthrough settings (PLANPIPE_PRODUCER__*) still win over these.
_PRODUCER_EXTRA: Final[dict[str, str | int | bool]] = {
    # librdkafka's default (10 s) can leave a healthy broker unused for 10 s after
    # an outage; 1 s bounds recovery time.
    "reconnect.backoff.max.ms": 1000,
    # The breaker, not message timeouts, moves records to the spool here, and the
    # records librdkafka holds already have spool rows (write-through). Letting it
    # keep retrying them is what makes an outage exactly-once: a record that times
    # out mid-request may be in the log already and would be resent as a duplicate.
    # 300 s (librdkafka's own default) instead of producer_config's 30 s.
    "message.timeout.ms": 300_000,
}

# error_cb codes that mean "cannot reach the cluster"; each counts as a failure.
_UNREACHABLE: Final = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT}
)


@dataclass(frozen=True, slots=True)
class ProducerStats:
    breaker: BreakerState
    breaker_opened: int
    in_flight: int
    spool_depth: int
    max_spool_depth: int
    sent_direct: int
    delivered: int
    delivered_from_spool: int
    spooled: int
    failed_deliveries: int
    undeliverable: int
    drain_seconds: tuple[float, ...]


class PlanProducer:
    """Thread-safe: any thread may `send()`; a poll thread serves delivery
    callbacks and probes the broker, a drain thread (`SpoolDrain`) empties the spool."""

    def __init__(
        self,
        settings: Settings,
        *,
        spool: Spool | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        probe_timeout_s: float = 1.0,
        drain_batch: int = DEFAULT_DRAIN_BATCH,
        config: Mapping[str, str | int | bool] | None = None,
        on_delivered: DeliveredHook | None = None,
        on_undeliverable: UndeliverableHook = log_undeliverable,
        client_factory: ClientFactory = Producer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._conf = producer_config(settings, **_PRODUCER_EXTRA)
        self._conf.update(config or {})
        self._conf["error_cb"] = self._on_error
        message_timeout_s = int(str(self._conf.get("message.timeout.ms", 300_000))) / 1000
        self._probe_timeout_s = probe_timeout_s
        self._settlement = Settlement(settings.dlq_topic, on_delivered, on_undeliverable)

        self._owns_spool = spool is None
        spool_path = settings.spool_path if spool is None else spool.path
        self._lock_file = lock_spool(spool_path)
        try:
            self._spool = Spool(spool_path) if spool is None else spool
        except BaseException:
            self._lock_file.close()
            raise
        self._breaker = CircuitBreaker(failure_threshold, cooldown_s, clock)  # clock: tests skip the cool-down
        self._client_factory = client_factory
        self._producer = client_factory(self._conf)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inflight: dict[int, Pending] = {}
        self._failed_unspooled: list[Pending] = []
        self._fence = False
        self._suspect = False
        # Whether the broker answered since the last failure; decides if a drain probes first.
        self._contact_ok = False
        self._fatal: KafkaError | None = None
        self._next_token = 0
        self._closing = False
        self._closed = False
        self._stats_sent_direct = 0
        self._stats_spooled = 0
        self._stats_failed = 0
        self._max_depth = self._spool.depth()
        # Leftovers from an earlier run must go out before anything new.
        if self._max_depth:
            logger.info("spool %s holds %d record(s) from an earlier run; draining first", spool_path, self._max_depth)
        self._publish_gauges()

        self._drain = SpoolDrain(self, batch=drain_batch, message_timeout_s=message_timeout_s)
        self._stop_poll = threading.Event()
        self._poll_thread = threading.Thread(target=self._poll_loop, name="planpipe-producer-poll", daemon=True)
        self._poll_thread.start()
        self._drain.start()

    # -- public API ---------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def breaker_state(self) -> BreakerState:
        with self._lock:
            return self._breaker.state

    def send(self, records: Sequence[OutRecord], *, on_durable: Callable[[float], None] | None = None) -> None:
        """Hand records over, in order. Never blocks on the broker.

        `on_durable(ms)` fires (from a producer thread) once every record of this
        call is either acknowledged by Kafka or committed to the spool.
        """
        if not records:
            return
        ticket = Ticket(len(records), time.perf_counter(), on_durable) if on_durable else None
        with self._lock:
            if self._closing:
                raise RuntimeError("send() on a closed PlanProducer")
            index = 0
            if self._direct_allowed():
                for index, record in enumerate(records):  # noqa: B007 - index is the resume point
                    if not self._produce_direct(record, ticket):
                        break
                else:
                    index = len(records)
            if index < len(records):
                self._spool_new(records[index:], ticket)
            done, undeliverable = self._settlement.take_hooks()
        self._settlement.fire(done, undeliverable)

    def flush(self, timeout: float) -> int:
        """Wait until nothing is in flight and the spool is empty; returns what is left."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                left = len(self._inflight) + len(self._failed_unspooled) + self._spool.depth()
                remaining = deadline - time.monotonic()
                if left == 0 or remaining <= 0:
                    return left
                self._changed.wait(min(remaining, 0.25))

    def stats(self) -> ProducerStats:
        with self._lock:
            return self._stats_locked()

    def close(self, timeout: float = 10.0) -> ProducerStats:
        """Flush for up to `timeout` s, then make everything still pending durable and stop.

        Whatever Kafka has not acknowledged by then stays in the spool for the
        next run (`planpipe spool drain`).
        """
        with self._lock:
            if self._closed:
                return self._stats_locked()
            self._closing = True
        self.flush(timeout)
        self._drain.stop()
        with self._lock:
            # Durability before letting go: anything librdkafka still holds gets a row.
            self._persist_unspooled()
            leftover = len(self._inflight)
        if leftover:
            logger.warning("closing with %d record(s) unacknowledged; they stay in the spool", leftover)
        self._producer.purge(in_queue=True, in_flight=True, blocking=True)
        self._stop_poll.set()
        self._poll_thread.join()
        self._producer.poll(0)  # serve the purge callbacks: rows stay, nothing else happens
        self._settle()
        self._producer.close()  # nothing outstanding after the purge, so this does not block
        with self._lock:
            self._closed = True
            stats = self._stats_locked()
        if self._owns_spool:
            self._spool.close()
        self._lock_file.close()
        return stats

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sending (lock held) ----------------------------------------------------

    def _direct_allowed(self) -> bool:
        if self._breaker.state is not BreakerState.CLOSED or self._fatal or self._fence or self._failed_unspooled:
            return False
        depth = self._spool.depth()
        if depth == 0:
            return True
        # Hand-over: when every spooled row is already inside librdkafka (the drain's
        # last batch), a new record queues behind them there, so order holds.
        # Without this, steady traffic would keep arriving faster than one drain
        # round trip and never leave the spool path after an outage.
        rows_in_flight = sum(1 for p in self._inflight.values() if p.seq is not None)
        return depth == rows_in_flight + len(self._settlement.round.acks)

    def _produce(self, record: OutRecord, seq: int | None, ticket: Ticket | None, from_spool: bool) -> int:
        token = self._next_token
        headers: list[tuple[str, str | bytes | None]] = [(name, value) for name, value in record.headers]
        self._producer.produce(
            record.topic,
            value=record.value,
            key=record.key,
            headers=headers or None,
            on_delivery=functools.partial(self._on_delivery, token),
        )
        # Registered only once produce() accepted it: a raise leaves no ghost entry.
        self._next_token = token + 1
        self._inflight[token] = Pending(token, record, seq, from_spool, ticket)
        return token

    def _produce_direct(self, record: OutRecord, ticket: Ticket | None) -> bool:
        """False: divert this record and the rest of the batch to the spool."""
        try:
            self._produce(record, None, ticket, from_spool=False)
        except BufferError:
            self._failure("buffer_full", "local producer queue full (BufferError)")
            return False
        except KafkaException as error:
            kafka_error: KafkaError = error.args[0]
            if kafka_error.code() in UNDELIVERABLE:
                self._settlement.undeliverable(record, None, ticket, kafka_error.str())
                return True
            self._failure("produce", f"produce(): {kafka_error.str()}")
            return False
        self._stats_sent_direct += 1
        return True

    def _spool_new(self, records: Sequence[OutRecord], ticket: Ticket | None) -> None:
        # Older records first: they must keep their place ahead of these.
        self._persist_unspooled()
        self._spool.append(records)
        self._note_spooled(len(records))
        if ticket is not None:
            self._settlement.resolve(ticket, len(records))

    def _persist_unspooled(self) -> None:
        """Give every record that has no spool row yet one, in produce order."""
        waiting = self._failed_unspooled + [p for p in self._inflight.values() if p.seq is None]
        if not waiting:
            return
        waiting.sort(key=lambda p: p.token)
        seqs = self._spool.append([p.record for p in waiting])
        for pending, seq in zip(waiting, seqs, strict=True):
            pending.seq = seq  # still in flight: its ack will delete the row
            if pending.ticket is not None:
                self._settlement.resolve(pending.ticket, 1)
                pending.ticket = None
        self._failed_unspooled = []
        self._note_spooled(len(seqs))

    def _note_spooled(self, count: int) -> None:
        self._stats_spooled += count
        self._max_depth = max(self._max_depth, self._spool.depth())
        self._publish_gauges()

    def _failure(self, kind: str, what: str) -> None:
        metrics.DELIVERY_FAILURES.labels(kind=kind).inc()
        self._contact_ok = False
        was = self._breaker.state
        if self._breaker.record_failure(what):
            if was is BreakerState.HALF_OPEN:
                logger.info("producer circuit breaker re-opened, broker still unreachable: %s", what)
            else:
                logger.warning(
                    "producer circuit breaker OPEN after %s; spooling to %s, retry in %.1f s",
                    what,
                    self._spool.path,
                    self._breaker.cooldown_s,
                )
            # From now on new records are spooled; make the older in-flight ones
            # durable first so the spool holds them in their original order.
            self._persist_unspooled()
        self._publish_gauges()
        self._changed.notify_all()

    # -- librdkafka callbacks (poll thread, inside poll()) ------------------------

    def _on_delivery(self, token: int, error: KafkaError | None, message: Message) -> None:
        with self._lock:
            pending = self._inflight.pop(token, None)
            if pending is None:
                return
            if error is None:
                self._settlement.delivered(pending)
                self._breaker.record_success()
                self._contact_ok = True
                return
            code = error.code()
            if code in TIMEOUTS:
                metrics.REQUEST_TIMEOUTS.inc()
            if code in UNDELIVERABLE:
                self._settlement.undeliverable(pending.record, pending.seq, pending.ticket, error.str())
                return
            if code not in PURGED:
                self._stats_failed += 1
            if pending.seq is None:
                self._failed_unspooled.append(pending)
            else:
                self._settlement.round.attempts.append(pending.seq)
            if code not in PURGED:
                # Fence: nothing queued behind this record may be delivered before it.
                self._fence = True
                self._failure("delivery", f"delivery failed: {error.name()}: {error.str()}")

    def _on_error(self, error: KafkaError) -> None:
        with self._lock:
            if error.fatal():
                self._fatal = error
                self._failure("fatal", f"fatal producer error: {error.name()}: {error.str()}")
            elif error.code() in _UNREACHABLE:
                if error.code() in TIMEOUTS:
                    metrics.REQUEST_TIMEOUTS.inc()
                self._suspect = True
                self._failure("unreachable", f"{error.name()}: {error.str()}")
            else:
                logger.warning("producer error: %s: %s", error.name(), error.str())

    # -- poll thread ----------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop_poll.is_set():
            try:
                self._producer.poll(0.05)
                self._settle()
                self._maybe_probe()
                self._maybe_replace_producer()
            except Exception:
                # This thread is the only one serving acks: it must outlive a bad
                # round (e.g. a full disk under the spool); failed work is retried.
                logger.exception("producer poll loop error")
                time.sleep(0.5)
        self._settle()

    def _settle(self) -> None:
        """Apply one round of callbacks: spool failed records, fence, ack rows."""
        with self._lock:
            if self._failed_unspooled or self._fence:
                self._persist_unspooled()
            if self._fence:
                self._fence = False
                # Everything still queued already has a row (above); purging returns
                # it via _PURGE_QUEUE so no later record can overtake the failed one.
                self._producer.purge(in_queue=True, in_flight=False, blocking=False)
            work = self._settlement.take_round()
            if work.acks:
                self._spool.ack(work.acks)
                self._publish_gauges()
            if work.attempts:
                self._spool.record_attempt(work.attempts)
            self._drain.on_settled()
            self._changed.notify_all()
        self._settlement.report(work)

    def _probe(self) -> bool:
        """Metadata round trip; a timeout counts as a breaker failure."""
        try:
            metadata = self._producer.list_topics(self._settings.topic, timeout=self._probe_timeout_s)
        except KafkaException as error:
            with self._lock:
                self._failure("probe", f"metadata probe failed: {error}")
            return False
        ok = bool(metadata.brokers)
        with self._lock:
            if ok:
                self._suspect = False
                self._contact_ok = True
                self._breaker.record_success()
            else:
                self._failure("probe", "metadata probe: no brokers")
        return ok

    def _maybe_probe(self) -> None:
        with self._lock:
            wanted = self._suspect and self._breaker.state is BreakerState.CLOSED
        if wanted:
            self._probe()

    def _maybe_replace_producer(self) -> None:
        """A fatal idempotence error leaves the handle unusable: spool, purge, start a new one."""
        with self._lock:
            if self._fatal is None:
                return
            logger.error("replacing the Kafka producer after %s", self._fatal.str())
            self._persist_unspooled()
            old = self._producer
        old.purge(in_queue=True, in_flight=True, blocking=True)
        old.poll(0)
        self._settle()
        with self._lock:
            self._inflight.clear()  # all have rows; the old handle will never report them
            self._producer = self._client_factory(self._conf)
            self._fatal = None
            self._publish_gauges()

    # -- misc ------------------------------------------------------------------------------

    def _publish_gauges(self) -> None:
        metrics.SPOOL_DEPTH.set(self._spool.depth())
        metrics.BREAKER_STATE.set(STATE_GAUGE[self._breaker.state])

    def _stats_locked(self) -> ProducerStats:
        return ProducerStats(
            breaker=self._breaker.state,
            breaker_opened=self._breaker.times_opened,
            in_flight=len(self._inflight),
            spool_depth=self._spool.depth(),
            max_spool_depth=self._max_depth,
            sent_direct=self._stats_sent_direct,
            delivered=self._settlement.delivered_count,
            delivered_from_spool=self._settlement.delivered_from_spool,
            spooled=self._stats_spooled,
            failed_deliveries=self._stats_failed,
            undeliverable=self._settlement.undeliverable_count,
            drain_seconds=tuple(self._drain.durations),
        )
