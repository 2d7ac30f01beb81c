"""Where a durable batch goes — the producer or the Redis queue — and the Redis drainer.

One lock orders every decision, so order per key holds from spool to Redis to Kafka:

1. Redis while it still holds records (newer records queue behind them);
2. Redis while the broker-health sensor reports the cluster degraded
   (`planpipe.kafka_fallback_mode`, runbook: URP > 5 for > 2 min);
3. Redis when the producer's breaker is not closed (Kafka unreachable) and the
   spool passed a size or age limit;
4. otherwise the producer (Kafka, or its spool on an outage).

The drainer moves Redis records to Kafka only while the cluster is not degraded,
the breaker is closed and the spool is empty (spooled records are older); when
Redis is empty, new batches go to the producer again. While Redis holds older
records but refuses new ones (restart, full), `store()` waits rather than reorder.
"""

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final, Literal

from planpipe.agent import server
from planpipe.agent.config import AgentConfig
from planpipe.agent.ledger import OpenSends
from planpipe.agent.publisher import AgentPublisher
from planpipe.agent.state import AgentState
from planpipe.errors import PlanpipeError
from planpipe.health.broker import FallbackMode
from planpipe.health.fallback import FallbackModeReader
from planpipe.routing.producer import BreakerState
from planpipe.routing.redis_queue import QueueUnavailable, RedisDrainer, RedisQueue
from planpipe.routing.spool import OutRecord

logger = logging.getLogger("planpipe.agent")

Destination = Literal["kafka", "redis"]
_SPOOL_CHECK_S: Final = 1.0
_FAULT_COUNTS: dict[str, int] = {}


class Stopped(PlanpipeError):
    """Stop requested while a batch could be stored nowhere: its intent stays open, the log keeps it."""


def fault_point(name: str) -> None:
    """Crash tests: PLANPIPE_FAULT_KILL_AT=<step>[:<n>] SIGKILLs the agent at the n-th pass. Never in production."""
    step, _, nth = os.environ.get("PLANPIPE_FAULT_KILL_AT", "").partition(":")
    if step != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


def _setter(event: threading.Event) -> Callable[[float], None]:
    return lambda _elapsed_ms: event.set()


class Handoff:
    def __init__(
        self,
        config: AgentConfig,
        publisher: AgentPublisher,
        redis: RedisQueue | None,
        mode: FallbackModeReader,
        *,
        state: AgentState,
        sends: OpenSends,
        stop: threading.Event,
        waiting: Callable[[str], None],
    ) -> None:
        self._config = config
        self._publisher = publisher
        self.redis = redis
        self._mode_reader = mode
        self._state = state
        self._sends = sends
        self._stop = stop
        self._waiting = waiting
        self._lock = threading.Lock()
        self._spool_over: tuple[float, bool] = (0.0, False)
        # Read by the mode thread only: a slow or absent PostgreSQL never stalls the capture path.
        self.mode = mode()
        self.redis_pending = False
        if redis is not None:
            try:
                self.redis_pending = redis.pending() > 0
            except QueueUnavailable:  # unknown: assume it holds older records (order first)
                self.redis_pending = True

    @property
    def writes_to(self) -> Destination:
        return "redis" if self.redis_pending or (self.redis and self.mode is FallbackMode.REDIS) else "kafka"

    def store(self, records: Sequence[OutRecord]) -> Destination:
        """Store `records` durably, in order, in Redis or through the producer; blocks until done."""
        while True:
            done = threading.Event()
            with self._lock:
                destination = self._destination()
                if destination == "redis":
                    assert self.redis is not None
                    try:
                        self.redis.push(records)
                        self.redis_pending = True
                        return "redis"
                    except QueueUnavailable as error:
                        if self.redis_pending:
                            wait_reason = f"Redis holds older records but refuses new ones ({error}); waiting"
                        else:
                            logger.warning("Redis queue unavailable (%s); using the producer and its spool", error)
                            destination = "kafka"
                if destination == "kafka":
                    if records:
                        self._publisher.producer.send(records, on_durable=_setter(done))
                    else:
                        done.set()
            if destination == "kafka":
                done.wait()
                return "kafka"
            self._waiting(wait_reason)
            if self._stop.wait(1.0):
                raise Stopped

    def _destination(self) -> Destination:
        if self.redis is None:
            return "kafka"
        if self.redis_pending or self.mode is FallbackMode.REDIS:
            return "redis"
        if self._publisher.producer.breaker_state is not BreakerState.CLOSED and self._spool_over_limit():
            return "redis"
        return "kafka"

    def _spool_over_limit(self) -> bool:
        """Rows from the spool's own count (exact, free); bytes and age from SQLite at most once a second."""
        spool = self._publisher.producer.spool
        if spool.depth() >= self._config.spool_max_rows:
            return True
        checked_at, over = self._spool_over
        if time.monotonic() - checked_at >= _SPOOL_CHECK_S:
            stats = spool.stats()
            over = stats.value_bytes >= self._config.spool_max_bytes or (
                (stats.oldest_age_s or 0.0) >= self._config.spool_max_age_s
            )
            self._spool_over = (time.monotonic(), over)
        return over

    # -- threads -----------------------------------------------------------------------

    def mode_loop(self) -> None:
        while not self._stop.is_set():
            self.mode = self._mode_reader()  # cached by the reader for mode_refresh_s
            self._stop.wait(min(1.0, self._config.mode_refresh_s))

    def drain_loop(self) -> None:
        assert self.redis is not None
        drainer = RedisDrainer(self.redis, self._send_durable, may_drain=self._may_drain)
        next_expiry = 0.0
        while not self._stop.is_set():
            moved = 0
            try:
                if time.monotonic() >= next_expiry:
                    self._expire()
                    next_expiry = time.monotonic() + min(10.0, self.redis.ttl_s / 2)
                if self.redis_pending and self._may_drain():
                    moved = drainer.drain_once(self._stop)
                    server.REDIS_MOVED.inc(moved)
                    if moved == 0:
                        with self._lock:
                            if self.redis.pending() == 0:
                                self.redis_pending = False
                server.REDIS_PENDING.set(self.redis.pending())
            except QueueUnavailable as error:
                self._waiting(f"Redis drain waits: {error}")
            server.FALLBACK_REDIS.set(1 if self.redis_pending else 0)
            if not moved:
                self._stop.wait(0.5)

    def _may_drain(self) -> bool:
        producer = self._publisher.producer
        return (
            self.mode is not FallbackMode.REDIS
            and producer.breaker_state is BreakerState.CLOSED
            and producer.spool.depth() == 0
        )

    def _send_durable(self, records: Sequence[OutRecord]) -> None:
        with self._sends.open():
            self._publisher.send_durable(records)
            fault_point("drain_before_delete")

    def _expire(self) -> None:
        assert self.redis is not None
        expired = self.redis.expire()
        if not expired:
            return
        per_topic = Counter(entry.record.topic for entry in expired)
        self._state.add_dropped(per_topic)
        for topic, count in per_topic.items():
            server.REDIS_EXPIRED.labels(topic=topic).inc(count)
        keys = ", ".join(sorted({(e.record.key or b"-").decode(errors="replace") for e in expired})[:20])
        logger.error(
            "Redis queue TTL (%.0f s): dropped %d record(s) never delivered (%s); keys: %s",
            self.redis.ttl_s,
            len(expired),
            dict(per_topic),
            keys,
        )
