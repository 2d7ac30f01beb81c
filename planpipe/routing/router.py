"""The router (decode, validate, route, prioritise, key, sample) and the bounded event queue.

The static rules, keys and retention are shared vocabulary (`planpipe.messaging`); the router
adds the run-time snapshots and its metrics. Pure library code: no Kafka I/O. Every decision
is a function of the envelope, the `RoutingConfig`, the cluster topology and the current regression-candidate
and baseline-latency snapshots, so replaying the same capture against the same
snapshots gives the same route, priority, key, topic and sampling outcome (the
routing guide's precondition for incident reconstruction).
"""

import collections
import logging
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, Protocol, TypeVar

from planpipe.contract import (
    PRIORITIES,
    ROUTES,
    ContractViolation,
    Envelope,
    EnvelopeDecoder,
    Priority,
    Reason,
    Route,
)
from planpipe.errors import PlanpipeError

# The shared vocabulary lives in `planpipe.messaging`; re-exported for the producing side.
from planpipe.messaging.keys import message_key as message_key
from planpipe.messaging.keys import parse_message_key as parse_message_key
from planpipe.messaging.routes import DEFAULT_CONFIG as DEFAULT_CONFIG
from planpipe.messaging.routes import DEFAULT_LATENCY_MULTIPLIER as DEFAULT_LATENCY_MULTIPLIER
from planpipe.messaging.routes import DEFAULT_QUEUE_CAPACITY as DEFAULT_QUEUE_CAPACITY
from planpipe.messaging.routes import RETENTION_DAYS as RETENTION_DAYS
from planpipe.messaging.routes import RoutingConfig as RoutingConfig
from planpipe.messaging.routes import ingest_route as ingest_route
from planpipe.messaging.routes import is_sampled as is_sampled
from planpipe.messaging.routes import priority_for as priority_for
from planpipe.messaging.routes import route_for as route_for
from planpipe.routing import metrics

logger = logging.getLogger("planpipe.router")

# Resolved once: `Counter.labels()` takes a lock and a dict lookup per call.
_INGESTED = {(r, p): metrics.INGESTED.labels(route=r, priority=p) for r in ROUTES for p in PRIORITIES}
_DROPPED_SAMPLED_OUT: Final = metrics.DROPPED.labels(reason="sampled_out")
_DROPPED_SCHEMA: Final = metrics.DROPPED.labels(reason="schema_violation")
_DROPPED_OVERFLOW: Final = metrics.DROPPED.labels(reason="queue_overflow")


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    envelope: Envelope
    route: Route
    priority: Priority
    key: bytes
    # False: the sampler dropped it; the caller must not publish it.
    sampled: bool
    # Data residency: the region of the envelope's cluster (None: no topology, or unmapped).
    region: str | None = None
    # The query's baseline p95 the latency multiplier compared against (None: none known).
    baseline_p95_ms: float | None = None

    @property
    def query_hash(self) -> str:
        return self.envelope.query_hash

    @property
    def retention_days(self) -> int:
        return RETENTION_DAYS[self.route]


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input that broke the contract, bound for the DLQ with its original bytes."""

    raw: bytes
    reason: Reason
    field: str | None
    detail: str

    @classmethod
    def from_violation(cls, raw: bytes, violation: ContractViolation) -> "Rejection":
        return cls(raw=raw, reason=violation.reason, field=violation.field, detail=violation.detail)


def _no_regression_candidates() -> Container[str]:
    return frozenset()


_NO_BASELINES: Final[Mapping[tuple[str, str], float]] = MappingProxyType({})


def _no_baselines() -> Mapping[tuple[str, str], float]:
    return _NO_BASELINES


def _no_region(cluster_id: str) -> str | None:
    return None


def envelope_too_large(size: int, limit: int) -> ContractViolation:
    """An envelope larger than Kafka is configured to carry (`SizeLimits.max_envelope_bytes`).

    Reported as `plan_too_large` with no field: the plan limit is what sizes the
    envelope limit (2 x PLANPIPE_MAX_PLAN_BYTES + 1 MiB for the other fields), and
    the replay job already parks that reason.
    """
    return ContractViolation(
        Reason.PLAN_TOO_LARGE,
        None,
        f"envelope is {size} bytes > limit {limit} (2 x PLANPIPE_MAX_PLAN_BYTES + 1 MiB)",
    )


class Router:
    """Decode, validate, route, prioritise, key and sample one message at a time.

    `regression_candidates` and `baselines` ({(cluster_id, query_hash): p95 ms}) are called
    once per message, so they must be cheap: return a snapshot refreshed elsewhere (TTL
    caches in `candidates`), not a database query. `region_of` maps a cluster id to its
    region (`topology.Topology.region_of`).
    `max_envelope_bytes` (None: no check) bounds the raw envelope before it is
    decoded, so nothing reaches the producer that Kafka is not set up to carry.
    """

    def __init__(
        self,
        config: RoutingConfig | None = None,
        *,
        decoder: EnvelopeDecoder | None = None,
        regression_candidates: Callable[[], Container[str]] = _no_regression_candidates,
        baselines: Callable[[], Mapping[tuple[str, str], float]] = _no_baselines,
        region_of: Callable[[str], str | None] = _no_region,
        max_envelope_bytes: int | None = None,
    ) -> None:
        self.config = config if config is not None else DEFAULT_CONFIG
        self.decoder = decoder if decoder is not None else EnvelopeDecoder()
        self._regression_candidates = regression_candidates
        self._baselines = baselines
        self._region_of = region_of
        self.max_envelope_bytes = max_envelope_bytes

    def route_envelope(self, envelope: Envelope) -> RoutingDecision:
        """Route an already-decoded envelope (e.g. a corrected DLQ entry)."""
        p95 = self._baselines().get((envelope.cluster_id, envelope.query_hash))
        route = route_for(envelope, self.config, p95)
        priority = priority_for(envelope, route, self._regression_candidates())
        sampled = is_sampled(envelope.query_hash, self.config.sample_rate_pct)
        if sampled:
            _INGESTED[route, priority].inc()
        else:
            _DROPPED_SAMPLED_OUT.inc()
        return RoutingDecision(
            envelope=envelope,
            route=route,
            priority=priority,
            key=message_key(priority, envelope.query_hash),
            sampled=sampled,
            region=self._region_of(envelope.cluster_id),
            baseline_p95_ms=p95,
        )

    def route_raw(self, raw: bytes) -> RoutingDecision | Rejection:
        """Never raises for bad input: a contract violation becomes a `Rejection`."""
        started = time.perf_counter_ns()
        try:
            try:
                if self.max_envelope_bytes is not None and len(raw) > self.max_envelope_bytes:
                    raise envelope_too_large(len(raw), self.max_envelope_bytes)
                envelope = self.decoder.decode(raw)
            except ContractViolation as violation:
                _DROPPED_SCHEMA.inc()
                return Rejection.from_violation(raw, violation)
            return self.route_envelope(envelope)
        finally:
            metrics.ROUTE_EVALUATION_MS.observe((time.perf_counter_ns() - started) / 1e6)


class _HasQueryHash(Protocol):
    @property
    def query_hash(self) -> str: ...


T = TypeVar("T", bound=_HasQueryHash)


class QueueClosed(PlanpipeError, RuntimeError):
    """put() on a queue after close()."""


class BoundedEventQueue(Generic[T]):
    """Thread-safe bounded FIFO that drops the oldest event when full.

    Drop-oldest (the runbook's policy) keeps the capture side non-blocking: a
    slow broker costs old observations, never stalls the database host.
    After `close()`, `put()` raises `QueueClosed` and `get_batch()` drains what
    is left, then returns [] at once; `drained` tells a consumer to stop.
    """

    def __init__(self, capacity: int = DEFAULT_QUEUE_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def drained(self) -> bool:
        """Closed and empty: nothing more will ever come out."""
        with self._lock:
            return self._closed and not self._items

    def depth(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, item: T) -> T | None:
        """Enqueue `item`; returns the evicted oldest item when the queue was full."""
        evicted: T | None = None
        with self._lock:
            if self._closed:
                raise QueueClosed("put() on a closed queue")
            if len(self._items) >= self._capacity:
                evicted = self._items.popleft()
            self._items.append(item)
            # Set under the lock so concurrent puts/gets cannot publish a stale depth last.
            metrics.QUEUE_DEPTH.set(len(self._items))
            self._not_empty.notify()
        if evicted is not None:
            _DROPPED_OVERFLOW.inc()
            # Logged outside the lock: handlers may do I/O. The hash is the audit trail.
            logger.warning(
                "router queue full (capacity %d): dropped oldest event query_hash=%s",
                self._capacity,
                evicted.query_hash,
                extra={"query_hash": evicted.query_hash},
            )
        return evicted

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Up to `max_items` oldest events; waits up to `timeout` s (None: forever) for the first.

        Returns [] on timeout, or at once when the queue is closed and empty.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        with self._not_empty:
            if not self._not_empty.wait_for(lambda: bool(self._items) or self._closed, timeout):
                return []
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            metrics.QUEUE_DEPTH.set(len(self._items))
            return batch

    def close(self) -> None:
        """Refuse further puts and wake every waiting consumer."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
