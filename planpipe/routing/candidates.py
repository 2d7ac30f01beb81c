"""The set of query hashes with open regressions, for the router's `regression_candidate` priority.

Read from PostgreSQL at most once per TTL; the router calls it per message, so
between refreshes it is a set lookup. If the store is unreachable the last known
set is kept (capture must never block or fail on the baseline store).
"""

import logging
import threading
import time
from collections.abc import Callable, Container

import psycopg

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
    from planpipe.plans.regressions import open_regression_candidates

    return open_regression_candidates(dsn)
