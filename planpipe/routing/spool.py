"""The producer's local spool: an ordered, durable outbox in SQLite (WAL).

When the broker is unreachable the producer appends records here and a drain
thread re-sends them, oldest first, once it is back; a row is deleted only after
Kafka acknowledged it. The spool therefore has to survive a `kill -9` at any
point: every append and every ack is its own committed transaction, WAL mode with
`synchronous=FULL` fsyncs each commit, so a row whose `append()` returned is on
disk and a row whose `ack()` returned never comes back.

One `Spool` object is shared by the producer's writer and drain threads; a
single connection behind a lock keeps that simple (SQLite serialises writers
anyway). Other processes may open the same file to read (`planpipe spool
status`); only one process should write it (`PlanProducer` holds a lock file).
"""

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import msgspec

Header = tuple[str, bytes]

# AUTOINCREMENT (not a plain rowid) so a seq is never reused, even after the
# newest rows were acked and deleted: seq order is append order across restarts.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spool (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT    NOT NULL,
    key         BLOB,
    value       BLOB    NOT NULL,
    headers     BLOB    NOT NULL,
    enqueued_at REAL    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0
)
"""
# Stay well below SQLITE_MAX_VARIABLE_NUMBER on every SQLite build.
_CHUNK: Final = 500

_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One Kafka record as the producer will send it."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[Header, ...] = ()


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    seq: int
    record: OutRecord
    enqueued_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    depth: int
    oldest_enqueued_at: float | None
    oldest_age_s: float | None
    newest_seq: int | None
    value_bytes: int


class Spool:
    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; each write is an explicit
        # BEGIN IMMEDIATE … COMMIT, so its durability point is obvious.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        self._depth = self._count()
        self._closed = False

    # -- writes -----------------------------------------------------------------

    def append(self, records: Iterable[OutRecord], *, now: float | None = None) -> list[int]:
        """Append in order, in one transaction; returns the seqs. Durable when it returns."""
        stamp = time.time() if now is None else now
        rows = [(r.topic, r.key, r.value, _headers_encoder.encode(list(r.headers)), stamp) for r in records]
        if not rows:
            return []
        with self._lock:
            seqs: list[int] = []
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cursor = self._conn.execute(
                        "INSERT INTO spool (topic, key, value, headers, enqueued_at) VALUES (?, ?, ?, ?, ?)", row
                    )
                    assert cursor.lastrowid is not None
                    seqs.append(cursor.lastrowid)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._depth += len(seqs)
            return seqs

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete delivered rows (one transaction); returns how many existed."""
        return self._execute_in("DELETE FROM spool WHERE seq IN ({})", sorted(set(seqs)))

    def delete_upto(self, seq: int) -> int:
        """Delete every row with seq <= `seq` (the drain acks a prefix)."""
        with self._lock:
            deleted = self._write("DELETE FROM spool WHERE seq <= ?", (seq,))
            self._depth -= deleted
            return deleted

    def record_attempt(self, seqs: Iterable[int]) -> None:
        """Count a failed send of these rows (diagnostics: `attempts` column)."""
        self._execute_in("UPDATE spool SET attempts = attempts + 1 WHERE seq IN ({})", sorted(set(seqs)), counts=False)

    # -- reads --------------------------------------------------------------------

    def peek_batch(self, limit: int, *, after_seq: int = 0) -> list[SpooledRecord]:
        """Up to `limit` oldest rows (seq order) without removing them."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, topic, key, value, headers, enqueued_at, attempts FROM spool"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            SpooledRecord(
                seq=seq,
                record=OutRecord(topic=topic, key=key, value=value, headers=tuple(_headers_decoder.decode(headers))),
                enqueued_at=enqueued_at,
                attempts=attempts,
            )
            for seq, topic, key, value, headers, enqueued_at, attempts in rows
        ]

    def depth(self) -> int:
        """Rows waiting, as tracked by this object (exact when it is the only writer)."""
        with self._lock:
            return self._depth

    def count(self) -> int:
        """Rows waiting, counted in the database (sees other processes' writes)."""
        with self._lock:
            self._depth = self._count()
            return self._depth

    def oldest_age_s(self, *, now: float | None = None) -> float | None:
        stats = self.stats(now=now)
        return stats.oldest_age_s

    def stats(self, *, now: float | None = None) -> SpoolStats:
        with self._lock:
            depth, value_bytes, newest = self._conn.execute(
                "SELECT count(*), coalesce(sum(length(value)), 0), max(seq) FROM spool"
            ).fetchone()
            oldest = self._conn.execute("SELECT enqueued_at FROM spool ORDER BY seq LIMIT 1").fetchone()
            self._depth = int(depth)
        oldest_at = float(oldest[0]) if oldest else None
        stamp = time.time() if now is None else now
        return SpoolStats(
            depth=int(depth),
            oldest_enqueued_at=oldest_at,
            oldest_age_s=max(0.0, stamp - oldest_at) if oldest_at is not None else None,
            newest_seq=None if newest is None else int(newest),
            value_bytes=int(value_bytes),
        )

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------

    def _count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    def _write(self, sql: str, params: Sequence[object]) -> int:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            changed = self._conn.execute(sql, params).rowcount
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return changed

    def _execute_in(self, template: str, seqs: Sequence[int], *, counts: bool = True) -> int:
        if not seqs:
            return 0
        with self._lock:
            changed = 0
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(seqs), _CHUNK):
                    chunk = seqs[start : start + _CHUNK]
                    sql = template.format(",".join("?" * len(chunk)))
                    changed += self._conn.execute(sql, chunk).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if counts:
                self._depth -= changed
            return changed
