"""Routes, retention and the static routing rules both sides apply to an envelope.

The router (`routing/`) adds what changes at run time (regression candidates, baselines,
regions, metrics); the consumer re-derives a record's route from these rules
(`ingest_route`), and the DLQ replay re-keys a corrected envelope with them (`StaticRouter`),
so a republished record gets the key the capture side would have given it.
"""

import hashlib
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from planpipe.contract import Envelope, Priority, Route
from planpipe.messaging.keys import message_key

DEFAULT_QUEUE_CAPACITY: Final = 10_000
# Routing guide, "latency multipliers against historical baselines": a plan slower than k x its
# query's baseline p95 is critical. k is not given there; 3 flags clear outliers, not noise.
DEFAULT_LATENCY_MULTIPLIER: Final = 3.0

# The guide names 7 days for critical and 30 for baseline; DDL gets its own
# index but keeps the baseline retention.
RETENTION_DAYS: Final[Mapping[Route, int]] = MappingProxyType({"critical": 7, "baseline": 30, "ddl": 30})


def check_rate(sample_rate_pct: int) -> None:
    if isinstance(sample_rate_pct, bool) or not isinstance(sample_rate_pct, int):
        raise TypeError(f"sample_rate_pct must be an int, got {sample_rate_pct!r}")
    if not 0 <= sample_rate_pct <= 100:
        raise ValueError(f"sample_rate_pct must be within 0..100, got {sample_rate_pct}")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    critical_time_ms: float = 5000.0
    critical_rows: int = 1_000_000
    sample_rate_pct: int = 100
    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    # None or 0: no latency-multiplier rule.
    latency_multiplier: float | None = DEFAULT_LATENCY_MULTIPLIER

    def __post_init__(self) -> None:
        check_rate(self.sample_rate_pct)
        k = self.latency_multiplier
        if k is not None and not (math.isfinite(k) and k >= 0):
            raise ValueError(f"latency_multiplier must be finite and >= 0, got {k}")
        if not (math.isfinite(self.critical_time_ms) and self.critical_time_ms >= 0):
            raise ValueError(f"critical_time_ms must be finite and >= 0, got {self.critical_time_ms}")
        if self.critical_rows < 0:
            raise ValueError(f"critical_rows must be >= 0, got {self.critical_rows}")
        if self.queue_capacity < 1:
            raise ValueError(f"queue_capacity must be >= 1, got {self.queue_capacity}")


DEFAULT_CONFIG: Final = RoutingConfig()


def route_for(
    envelope: Envelope, config: RoutingConfig = DEFAULT_CONFIG, baseline_p95_ms: float | None = None
) -> Route:
    """The guide's precedence: explicit tag, then the latency multiplier against the query's
    baseline p95 (when one is known), then DDL, then critical thresholds, else baseline."""
    if envelope.route_tag is not None:
        return envelope.route_tag
    k = config.latency_multiplier
    if k and baseline_p95_ms is not None and envelope.total_time_ms > k * baseline_p95_ms:
        return "critical"
    if envelope.query_type is not None and envelope.query_type.casefold() == "ddl":
        return "ddl"
    # Strictly greater: a query at exactly the threshold is still baseline.
    if envelope.total_time_ms > config.critical_time_ms or envelope.actual_rows > config.critical_rows:
        return "critical"
    return "baseline"


def ingest_route(envelope: Envelope, key_priority: str, config: RoutingConfig = DEFAULT_CONFIG) -> Route:
    """The route the router chose, as the consumer can tell it: the static rules, and `critical`
    when the key says the router made it critical on its own (the latency multiplier judged it
    against baselines of that moment; no explicit priority or tag was given)."""
    route = route_for(envelope, config)
    if route != "critical" and key_priority == "critical" and envelope.priority is None and envelope.route_tag is None:
        return "critical"
    return route


def is_sampled(query_hash: str, sample_rate_pct: int) -> bool:
    """`int(sha256(query_hash)) % 100 < rate`: same answer in every process and after restarts.

    sha256 rather than `hash()`, whose str hashing is salted per process
    (PYTHONHASHSEED), so a restart would resample a different set of queries.
    """
    check_rate(sample_rate_pct)
    if sample_rate_pct == 100:
        return True
    if sample_rate_pct == 0:
        return False
    # Same integer as int(hexdigest(), 16), without the hex round trip.
    digest = hashlib.sha256(query_hash.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % 100 < sample_rate_pct


def priority_for(envelope: Envelope, route: Route, regression_candidates: Container[str]) -> Priority:
    """Explicit priority wins; `low` only ever comes from the capture agent."""
    if envelope.priority is not None:
        return envelope.priority
    if envelope.query_hash in regression_candidates:
        return "regression_candidate"
    if route == "critical":
        return "critical"
    return "standard"


@dataclass(frozen=True, slots=True)
class StaticRoute:
    """The static rules' answer for one envelope: what a router with no snapshots decides."""

    route: Route
    priority: Priority
    key: bytes
    sampled: bool


@dataclass(frozen=True, slots=True)
class StaticRouter:
    """Routes with the static rules only: no regression candidates, no baselines (exactly what
    `routing.router.Router` decides when given none), and counts nothing."""

    config: RoutingConfig = DEFAULT_CONFIG

    def route_envelope(self, envelope: Envelope) -> StaticRoute:
        route = route_for(envelope, self.config)
        priority = priority_for(envelope, route, frozenset())
        return StaticRoute(
            route=route,
            priority=priority,
            key=message_key(priority, envelope.query_hash),
            sampled=is_sampled(envelope.query_hash, self.config.sample_rate_pct),
        )
