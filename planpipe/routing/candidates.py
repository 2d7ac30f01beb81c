"""Snapshots of the baseline store the router consults per message, each a TTL cache:

* `RegressionCandidates`: query hashes with open regressions (`regression_candidate` priority);
* `BaselineLatencies`: per (cluster, query) the baseline p95, for the routing guide's latency
  multiplier (a plan slower than k x its query's baseline p95 is critical).

Read from PostgreSQL at most once per TTL; the router calls them per message, so
between refreshes they are a lookup. If the store is unreachable the last known
snapshot is kept (capture must never block or fail on the baseline store).
"""

import logging
import threading
import time
from collections.abc import Callable, Container, Mapping
from types import MappingProxyType
from typing import Final

import psycopg

from planpipe.plans import latency

logger = logging.getLogger("planpipe.router")


class RegressionCandidates:
    def __init__(self, dsn: str, ttl_s: float = 30.0, loader: Callable[[str], set[str]] | None = None) -> None:
        self._dsn = dsn
        self._ttl_s = ttl_s
        self._loader = loader or _open_candidates
        self._lock = threading.Lock()
        self._hashes: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")

    def __call__(self) -> Container[str]:
        if time.monotonic() - self._loaded_at >= self._ttl_s and self._lock.acquire(blocking=False):
            try:
                self._hashes = frozenset(self._loader(self._dsn))
            except psycopg.Error as error:
                logger.warning("regression candidates not refreshed (keeping %d): %s", len(self._hashes), error)
            finally:
                self._loaded_at = time.monotonic()
                self._lock.release()
        return self._hashes


def _open_candidates(dsn: str) -> set[str]:
    from planpipe.plans.findings import open_regression_candidates

    return open_regression_candidates(dsn)


# A baseline needs this many executions before its p95 means anything.
MIN_BASELINE_EXECUTIONS: Final = 20

BaselineP95 = Mapping[tuple[str, str], float]


class BaselineLatencies:
    """{(cluster_id, query_hash): baseline p95 ms}, reloaded at most every `ttl_s`."""

    def __init__(
        self, dsn: str, ttl_s: float = 60.0, loader: Callable[[str], dict[tuple[str, str], float]] | None = None
    ) -> None:
        self._dsn = dsn
        self._ttl_s = ttl_s
        self._loader = loader or baseline_p95
        self._lock = threading.Lock()
        self._p95: BaselineP95 = MappingProxyType({})
        self._loaded_at = float("-inf")

    def __call__(self) -> BaselineP95:
        if time.monotonic() - self._loaded_at >= self._ttl_s and self._lock.acquire(blocking=False):
            try:
                self._p95 = MappingProxyType(self._loader(self._dsn))
            except psycopg.Error as error:
                logger.warning("baseline latencies not refreshed (keeping %d): %s", len(self._p95), error)
            finally:
                self._loaded_at = time.monotonic()
                self._lock.release()
        return self._p95


def baseline_p95(dsn: str, min_executions: int = MIN_BASELINE_EXECUTIONS) -> dict[tuple[str, str], float]:
    """A query's baseline is its accepted plans when it has any, else every plan not rejected;
    its p95 comes from their merged latency sketches (exact merge, 5 % bucket error)."""
    merged: dict[tuple[str, str], tuple[bool, latency.Histogram]] = {}
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            """SELECT cluster_id, query_hash, status = 'accepted', latency_hist FROM planpipe.plan_baselines
               WHERE status <> 'rejected'"""
        )
        for cluster_id, query_hash, accepted, hist in rows:
            key = (str(cluster_id), str(query_hash))
            counts = latency.from_json(hist)
            held = merged.get(key)
            if held is None or (accepted and not held[0]):
                merged[key] = (bool(accepted), counts)
            elif bool(accepted) == held[0]:
                merged[key] = (held[0], latency.merge(held[1], counts))
    out: dict[tuple[str, str], float] = {}
    for key, (_, counts) in merged.items():
        if sum(counts.values()) >= min_executions and (p95 := latency.quantile(counts, 0.95)) is not None:
            out[key] = p95
    return out
