"""Which failures the ingest run rides out, which are the data's fault, and how long it waits.

A transient fault (broker restart, lost connection, read-only or restarting
database, lock timeout) is retried with capped exponential backoff inside the
run: the batch stays in memory and nothing is committed until it succeeds. A data
fault (a value PostgreSQL or the Parquet writer refuses) is not retried: the
engine isolates the records at fault and dead-letters them. Anything else is a
bug and ends the run loudly.
"""

import logging
import sys
import threading
import time
from typing import Final

import polars as pl
import psycopg
import psycopg.errors
from confluent_kafka import KafkaError, KafkaException

from planpipe.ingest.baseline_sink import LockWaitTimeout

_TRANSIENT_PG: Final = (
    psycopg.OperationalError,  # connection lost, admin shutdown, cannot connect now, lock/statement timeout
    psycopg.InterfaceError,  # the connection object is closed or broken
    psycopg.errors.ReadOnlySqlTransaction,  # a failover or default_transaction_read_only for a while
    psycopg.errors.TransactionRollback,  # serialization failure, deadlock detected
    LockWaitTimeout,
)
_DATA_PG: Final = (psycopg.DataError, psycopg.IntegrityError)
_DATA_PARQUET: Final = (pl.exceptions.PolarsError, UnicodeError, OverflowError)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    """pyarrow's errors, if something loaded pyarrow: only then can one be raised. Importing it
    just for this check cost the ingest process ~50 MB of RSS (pyarrow and numpy)."""
    pyarrow = sys.modules.get("pyarrow")
    return (pyarrow.ArrowException,) if pyarrow is not None else ()


def is_transient(error: BaseException) -> bool:
    if isinstance(error, _TRANSIENT_PG):
        return True
    if isinstance(error, KafkaException):
        kafka_error = error.args[0] if error.args else None
        # A message string (our own DLQ failures) or a retriable, non-fatal librdkafka error.
        return not isinstance(kafka_error, KafkaError) or not kafka_error.fatal()
    return False


def is_data_fault(error: BaseException) -> bool:
    return isinstance(error, _DATA_PG + _DATA_PARQUET + _arrow_errors())


class Backoff:
    """Capped exponential backoff that wakes early when the run is asked to stop."""

    def __init__(self, stop: threading.Event, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self._stop = stop
        self._first_s = first_s
        self._max_s = max_s
        self.next_s = first_s

    def wait(self) -> bool:
        """Sleep before the next attempt; False when a stop was requested meanwhile."""
        stopped = self._stop.wait(self.next_s)
        self.next_s = min(self._max_s, self.next_s * 2)
        return not stopped

    def reset(self) -> None:
        self.next_s = self._first_s


class OncePerMinute:
    """A warning per key at most once a minute; the repeats go to debug."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._logger = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._every_s) >= self._every_s:
            self._last[key] = now
            self._logger.warning(message)
        else:
            self._logger.debug(message)
