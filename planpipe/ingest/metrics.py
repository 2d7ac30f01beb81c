"""Prometheus metrics of the consumer side, named as the runbook's alert rules expect."""

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from planpipe.messaging.metrics import REGISTRY

_MS_BUCKETS: Final = (5, 10, 25, 50, 100, 200, 300, 500, 800, 1200, 2000, 5000, 10000, 30000)

RECORDS_CONSUMED = Counter(
    "kafka_consumer_records_consumed_total", "Records consumed by the ingest engine", registry=REGISTRY
)
DLQ_TOTAL = Counter("kafka_consumer_dlq_total", "Records the ingest engine sent to the DLQ", registry=REGISTRY)
DROPPED_LOW = Counter(
    "planpipe_ingest_dropped_low_priority_total", "low-priority records shed by the breaker", registry=REGISTRY
)
PUBLISH_TO_COMMIT_MS = Histogram(
    "planpipe_ingest_publish_to_commit_ms", "Publish → baseline commit latency per record (ms)",
    buckets=_MS_BUCKETS, registry=REGISTRY,
)  # fmt: skip
LOCK_WAIT_MS = Gauge("planpipe_ingest_lock_wait_ms", "Lock wait of the last batch (ms)", registry=REGISTRY)
BREAKER_OPEN = Gauge("planpipe_ingest_breaker_open", "1 while the latency circuit breaker is open", registry=REGISTRY)
GROUP_LAG = Gauge("kafka_consumer_group_lag", "Lag per partition", ["group", "topic", "partition"], registry=REGISTRY)
SINK_REJECTED = Counter(
    "planpipe_ingest_sink_rejected_total", "Records PostgreSQL or Parquet refused, dead-lettered", registry=REGISTRY
)
INGEST_STALLS = Counter(
    "planpipe_ingest_stalls_total", "Watchdog: lag and no committed batch for 60 s", registry=REGISTRY
)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each value, with one increment per bucket instead of one call per value.

    The ingest observes a whole batch's latencies at once: once per record cost ~10 µs each
    (a lock and a bucket walk per call). Relies on prometheus_client's Histogram layout
    (`_upper_bounds`, `_buckets`, `_sum`); `test_metrics` checks it against `observe`.
    """
    if not values:
        return
    bounds: list[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(math.fsum(values))
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)
