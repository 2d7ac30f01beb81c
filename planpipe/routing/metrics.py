"""Router metrics, named as in the routing guide, on planpipe's own registry
(`planpipe.messaging.metrics`, re-exported here with its endpoint)."""

from typing import Final, Literal

from prometheus_client import Counter, Gauge, Histogram

from planpipe.contract import PRIORITIES, ROUTES
from planpipe.messaging.metrics import HEALTHY as HEALTHY
from planpipe.messaging.metrics import REGISTRY as REGISTRY
from planpipe.messaging.metrics import start_metrics_server as start_metrics_server

DropReason = Literal[
    "sampled_out",
    "queue_overflow",
    "circuit_open_low_priority",
    "schema_violation",
]
DROP_REASONS: Final[tuple[DropReason, ...]] = (
    "sampled_out",
    "queue_overflow",
    "circuit_open_low_priority",
    "schema_violation",
)

INGESTED: Final = Counter(
    "explain_router_ingested_total",
    "Envelopes accepted by the router (validated and sampled in).",
    ["route", "priority"],
    registry=REGISTRY,
)
DROPPED: Final = Counter(
    "explain_router_dropped_total",
    "Envelopes the router did not forward, by reason (schema violations go to the DLQ).",
    ["reason"],
    registry=REGISTRY,
)
QUEUE_DEPTH: Final = Gauge(
    "explain_router_queue_depth",
    "Events waiting in the router's bounded in-memory queue.",
    registry=REGISTRY,
)
# Records Kafka refused for good (too large, invalid): never delivered, never
# retried. `destination` is "topic" (query-plans) or "dlq". Any increase is a bug
# or a misconfigured cluster; `planpipe publish` exits non-zero for them.
Destination = Literal["topic", "dlq"]
DESTINATIONS: Final[tuple[Destination, ...]] = ("topic", "dlq")
UNDELIVERABLE: Final = Counter(
    "explain_router_undeliverable_total",
    "Records Kafka refused permanently (e.g. larger than the topic accepts), by destination.",
    ["destination"],
    registry=REGISTRY,
)
# Request timeouts from the brokers (runbook: broker disk iowait > 65 % shows up as these).
REQUEST_TIMEOUTS: Final = Counter(
    "explain_router_request_timeouts_total",
    "Producer requests or deliveries that timed out waiting for the brokers.",
    registry=REGISTRY,
)
# Route evaluation is a decode plus a few comparisons: tens of microseconds.
ROUTE_EVALUATION_MS: Final = Histogram(
    "explain_router_route_evaluation_duration_ms",
    "Time to decode, validate and route one envelope, in milliseconds.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0),
    registry=REGISTRY,
)
# A flush waits on broker acks (acks=all); the runbook's latency SLA is 1,200 ms.
BATCH_FLUSH_MS: Final = Histogram(
    "explain_router_batch_flush_duration_ms",
    "Time to hand one batch to Kafka (or the spool) and get it acknowledged, in milliseconds.",
    buckets=(1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 800.0, 1200.0, 2500.0, 5000.0, 10000.0),
    registry=REGISTRY,
)

# The producer: its spool, its circuit breaker and the failures that move the breaker.
SPOOL_DEPTH: Final = Gauge(
    "explain_router_spool_depth", "Records waiting in the producer's local spool.", registry=REGISTRY
)
BREAKER_STATE: Final = Gauge(
    "explain_router_breaker_state",
    "Producer circuit breaker: 0 closed, 1 half-open, 2 open.",
    registry=REGISTRY,
)
DELIVERY_FAILURES: Final = Counter(
    "explain_router_delivery_failures_total",
    "Failures seen by the producer's breaker, by kind.",
    ["kind"],
    registry=REGISTRY,
)
for _kind in ("delivery", "unreachable", "buffer_full", "probe", "produce", "fatal"):
    DELIVERY_FAILURES.labels(kind=_kind)

# Pre-create every label combination so series exist at 0 from the start:
# `rate()` and "absent" alerts misbehave on series that appear only on first use.
for _route in ROUTES:
    for _priority in PRIORITIES:
        INGESTED.labels(route=_route, priority=_priority)
for _reason in DROP_REASONS:
    DROPPED.labels(reason=_reason)
for _destination in DESTINATIONS:
    UNDELIVERABLE.labels(destination=_destination)
