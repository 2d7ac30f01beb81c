"""The capture agents' fallback mode, shared through PostgreSQL.

The broker_health_sensor (Dagster) decides the mode from the cluster's health
(`broker.next_state`) and writes it with `publish_mode`; every capture agent reads it with
`FallbackModeReader`, a TTL cache like the router's regression candidates: a dict lookup
between refreshes, and the last known mode when the store is unreachable (capture never
blocks on it). Agents run on database hosts and cannot be reached by Dagster; the baseline
store is the one place both sides already talk to.
"""

import logging
import threading
import time
from dataclasses import dataclass

import psycopg

from planpipe.health.broker import FallbackMode

logger = logging.getLogger("planpipe.health")

DEFAULT_TTL_S = 15.0


@dataclass(frozen=True)
class ModeRecord:
    mode: FallbackMode
    reason: str
    changed_at: float | None


def publish_mode(conn: psycopg.Connection[tuple[object, ...]], cluster: str, mode: FallbackMode, reason: str) -> bool:
    """Record the mode of `cluster` (bootstrap servers); True when it changed."""
    row = conn.execute(
        """INSERT INTO planpipe.kafka_fallback_mode AS m (cluster, mode, reason) VALUES (%s, %s, %s)
           ON CONFLICT (cluster) DO UPDATE SET
               checked_at = now(),
               reason = CASE WHEN m.mode = EXCLUDED.mode THEN m.reason ELSE EXCLUDED.reason END,
               changed_at = CASE WHEN m.mode = EXCLUDED.mode THEN m.changed_at ELSE now() END,
               mode = EXCLUDED.mode
           RETURNING changed_at = checked_at""",
        (cluster, mode.value, reason),
    ).fetchone()
    return bool(row and row[0])


def read_mode(conn: psycopg.Connection[tuple[object, ...]], cluster: str) -> ModeRecord:
    row = conn.execute(
        "SELECT mode, reason, extract(epoch FROM changed_at) FROM planpipe.kafka_fallback_mode WHERE cluster = %s",
        (cluster,),
    ).fetchone()
    if row is None:
        return ModeRecord(FallbackMode.KAFKA, "never degraded", None)
    return ModeRecord(FallbackMode(str(row[0])), str(row[1]), float(row[2]))  # type: ignore[arg-type]


class FallbackModeReader:
    """For capture agents: `reader()` is the current mode, refreshed at most every `ttl_s`."""

    def __init__(self, dsn: str, cluster: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._dsn = dsn
        self._cluster = cluster
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._record = ModeRecord(FallbackMode.KAFKA, "not read yet", None)
        self._loaded_at = float("-inf")

    @property
    def record(self) -> ModeRecord:
        self()
        return self._record

    def __call__(self) -> FallbackMode:
        if time.monotonic() - self._loaded_at >= self._ttl_s and self._lock.acquire(blocking=False):
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=3) as conn:
                    self._record = read_mode(conn, self._cluster)
            except psycopg.Error as error:
                logger.warning("fallback mode not refreshed (keeping %s): %s", self._record.mode, error)
            finally:
                self._loaded_at = time.monotonic()
                self._lock.release()
        return self._record.mode
