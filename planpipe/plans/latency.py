"""Sparse log-scale latency histograms that merge exactly by adding counts per bucket.

Baselines and rollups are upserted by several consumers; a mergeable sketch lets
`executions`, p50 and p95 per plan and per window be read back without keeping
every observation in PostgreSQL (the Parquet dataset keeps those). Bucket i
covers [BASE * GROWTH**(i-1), BASE * GROWTH**i) ms, so a quantile read back is
within GROWTH-1 (5 %) of the true value; bucket 0 holds everything below BASE.
Histograms are sparse ({bucket: count}, jsonb in PostgreSQL): one plan's latencies
usually touch a few dozen of the buckets.
"""

import math
from collections.abc import Iterable, Mapping
from typing import Final

BASE_MS: Final = 0.01
GROWTH: Final = 1.05
BUCKETS: Final = 640  # 0.01 ms · 1.05**639 ≈ 3.6e11 ms: any finite envelope value fits
_LOG_GROWTH: Final = math.log(GROWTH)


def bucket_of(ms: float) -> int:
    if ms < BASE_MS:
        return 0
    return min(BUCKETS - 1, 1 + int(math.log(ms / BASE_MS) / _LOG_GROWTH))


def upper_bound(bucket: int) -> float:
    return BASE_MS * GROWTH**bucket


Histogram = dict[int, int]


def histogram(values: Iterable[float]) -> Histogram:
    counts: Histogram = {}
    for value in values:
        bucket = bucket_of(value)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts


def merge(a: Mapping[int, int], b: Mapping[int, int]) -> Histogram:
    merged = dict(a)
    for bucket, count in b.items():
        merged[bucket] = merged.get(bucket, 0) + count
    return merged


def from_json(raw: Mapping[str, int]) -> Histogram:
    """jsonb keys are strings."""
    return {int(bucket): int(count) for bucket, count in raw.items()}


def quantile(counts: Mapping[int, int], q: float) -> float | None:
    """The q-quantile as the geometric middle of its bucket; None for an empty histogram."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            if bucket == 0:
                return BASE_MS / 2
            return math.sqrt(upper_bound(bucket - 1) * upper_bound(bucket))
    raise AssertionError("unreachable: rank <= total")
