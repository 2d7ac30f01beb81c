"""The spool drain of `PlanProducer`: re-send spooled records oldest first.

Runs on its own thread under the producer's lock and state. It only starts when
librdkafka holds none of the producer's records (so a spooled record never
overtakes one librdkafka may still deliver), sends one batch at a time, waits
for the whole batch to be acknowledged (the poll thread deletes the rows) before
the next peek, and closes a half-open breaker once a trial batch is acked or the
spool is empty.
"""

import logging
import threading
import time
from typing import TYPE_CHECKING, Final

from confluent_kafka import KafkaError, KafkaException

from planpipe.routing.breaker import BreakerState
from planpipe.routing.delivery import UNDELIVERABLE

if TYPE_CHECKING:
    from planpipe.routing.producer import PlanProducer

logger = logging.getLogger("planpipe.producer")

DEFAULT_DRAIN_BATCH: Final = 1000


class SpoolDrain:
    """Owned by one `PlanProducer`; every method but `start`/`stop` expects the producer's lock
    unless it says otherwise."""

    def __init__(self, producer: "PlanProducer", *, batch: int, message_timeout_s: float) -> None:
        self._p = producer
        self._batch = batch
        self._message_timeout_s = message_timeout_s
        self._started: float | None = None
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="planpipe-producer-drain", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (without the lock held); a batch in progress stops waiting for its acks."""
        self._stop.set()
        with self._p._changed:
            self._p._changed.notify_all()
        self._thread.join()

    def on_settled(self) -> None:
        """After the poll thread applied a round: a drain that emptied the spool is over."""
        if self._started is not None and self._p._spool.depth() == 0:
            self.durations.append(time.monotonic() - self._started)
            self._started = None
            self.close_breaker_if_drained()

    def close_breaker_if_drained(self) -> None:
        p = self._p
        if p._spool.depth() == 0 and not p._inflight and p._breaker.state is BreakerState.HALF_OPEN:
            logger.warning("producer circuit breaker CLOSED: broker answers, spool empty")
            p._breaker.close()
            p._publish_gauges()

    def _wanted(self) -> bool:
        p = self._p
        if self._stop.is_set():
            return True
        if p._inflight or p._failed_unspooled or p._fatal is not None:
            return False  # librdkafka may still deliver older records: never overtake them
        state = p._breaker.state
        if state is BreakerState.HALF_OPEN:
            return True
        return state is BreakerState.CLOSED and p._spool.depth() > 0

    def _loop(self) -> None:
        p = self._p
        while True:
            with p._changed:
                p._changed.wait_for(self._wanted, timeout=0.25)
                if self._stop.is_set():
                    return
                if not self._wanted():
                    continue
                # Half-open, or leftovers from an earlier run: ask the broker first
                # rather than parking a batch in librdkafka for message.timeout.ms.
                probe_first = p._breaker.state is BreakerState.HALF_OPEN or not p._contact_ok
            if probe_first and not p._probe():
                continue
            try:
                self._batch_once()
            except Exception:
                logger.exception("spool drain failed")
                with p._lock:
                    p._failure("produce", "spool drain raised")

    def _batch_once(self) -> None:
        """One batch (takes the lock itself)."""
        p = self._p
        batch = p._spool.peek_batch(self._batch)
        with p._lock:
            if p._inflight or p._failed_unspooled or p._breaker.state is BreakerState.OPEN:
                return  # something changed since we decided to drain
            if not batch:
                self.close_breaker_if_drained()
                return
            if self._started is None:
                self._started = time.monotonic()
            tokens: list[int] = []
            for row in batch:
                try:
                    tokens.append(p._produce(row.record, row.seq, None, from_spool=True))
                except BufferError:
                    break  # the rest waits for the next batch, still in order
                except KafkaException as error:
                    kafka_error: KafkaError = error.args[0]
                    if kafka_error.code() in UNDELIVERABLE:
                        p._settlement.undeliverable(row.record, row.seq, None, kafka_error.str())
                        continue
                    p._failure("produce", f"produce(): {kafka_error.str()}")
                    break
            undeliverable = p._settlement.take_undeliverable()
            # Wait for the whole batch (acked rows deleted by the poll thread) before
            # the next peek, so a row is never produced twice in one session.
            deadline = time.monotonic() + self._message_timeout_s + 5.0
            while not self._stop.is_set() and (
                any(t in p._inflight for t in tokens) or p._failed_unspooled or p._settlement.round.acks
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                p._changed.wait(min(remaining, 0.25))
            # A failure while half-open re-opens the breaker at once, so still
            # half-open here means the whole trial batch was acknowledged.
            if p._breaker.state is BreakerState.HALF_OPEN and not any(t in p._inflight for t in tokens):
                logger.warning("producer circuit breaker CLOSED: trial batch of %d acknowledged", len(batch))
                p._breaker.close()
                p._publish_gauges()
        p._settlement.fire([], undeliverable)
