"""The agent's metrics; served with its health report on 127.0.0.1 by `routing.metrics.start_metrics_server`.

`GET /metrics`: Prometheus text — the router's and producer's metrics and the
agent's own (`planpipe_agent_*`). `GET /health`: JSON; HTTP 200 while the agent
captures (`ok`, or `degraded` when envelopes go to the spool or Redis), 503
while it starts, recovers after a crash or waits for a service it needs.
"""

from typing import Final

from prometheus_client import Counter, Gauge

from planpipe.routing import metrics

REGISTRY: Final = metrics.REGISTRY

ENVELOPES: Final = Counter(
    "planpipe_agent_envelopes_total",
    "Envelopes the agent made durable, by where they went (kafka: acknowledged or spooled; redis).",
    ["destination"],
    registry=REGISTRY,
)
SKIPPED_REPUBLISH: Final = Counter(
    "planpipe_agent_recovered_total",
    "In-doubt envelopes found already published after a crash (not published again), by where.",
    ["where"],
    registry=REGISTRY,
)
DUPLICATES_REMOVED: Final = Counter(
    "planpipe_agent_duplicates_removed_total",
    "Copies removed by recovery because the record was already in Kafka (spool) or Kafka/spool (redis).",
    ["where"],
    registry=REGISTRY,
)
REDIS_PENDING: Final = Gauge(
    "planpipe_agent_redis_pending", "Records waiting in the agent's Redis queue.", registry=REGISTRY
)
REDIS_MOVED: Final = Counter(
    "planpipe_agent_redis_moved_total", "Records moved from Redis to Kafka by the drainer.", registry=REGISTRY
)
REDIS_EXPIRED: Final = Counter(
    "planpipe_agent_redis_expired_total",
    "Records dropped from the Redis queue by its TTL (never delivered), by topic.",
    ["topic"],
    registry=REGISTRY,
)
FALLBACK_REDIS: Final = Gauge(
    "planpipe_agent_writes_to_redis", "1 while new envelopes go to the Redis queue, else 0.", registry=REGISTRY
)
LAST_COMMIT: Final = Gauge(
    "planpipe_agent_last_commit_timestamp_seconds",
    "When the agent last committed a batch (cursor moved, envelopes durable).",
    registry=REGISTRY,
)
SAMPLES: Final = Counter(
    "planpipe_agent_samples_total", "Live EXPLAIN ANALYZE sampling, by outcome.", ["outcome"], registry=REGISTRY
)
for _destination in ("kafka", "redis"):
    ENVELOPES.labels(destination=_destination)
for _where in ("kafka", "spool", "redis"):
    SKIPPED_REPUBLISH.labels(where=_where)
for _where in ("spool", "redis"):
    DUPLICATES_REMOVED.labels(where=_where)
