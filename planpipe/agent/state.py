"""The agent's durable state: one SQLite file (WAL, synchronous=FULL) beside its spool.

What it holds, and why each write is one transaction:

* `meta`: the log cursor (the reader's `CursorState` JSON), `scan_from`
  (Kafka offsets before which no record of this agent can still be in doubt) and
  `alive_at` (the process's heartbeat: after a crash, how recently it may have sent).
* `intents`: a batch's capture ids, written *before* the batch is handed to the
  producer or Redis. The cursor moves, the intent is deleted and the batch's
  counts are added in one transaction once the batch is durable. An intent
  still present at start-up is a batch in doubt (see `recovery`).
* `skip`: capture ids that recovery found already published; re-reading the
  log skips them (and deletes the row in the batch's commit).
* `counts`: captured (durable) and dropped (Redis TTL) envelopes per hour and
  topic; `dirty` marks rows not yet reported to PostgreSQL.
"""

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import msgspec

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS intents (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,"
    " ids BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS skip (capture_id TEXT PRIMARY KEY, created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counts (hour INTEGER NOT NULL, topic TEXT NOT NULL,"
    " captured INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0, dirty INTEGER NOT NULL DEFAULT 1,"
    " PRIMARY KEY (hour, topic))",
)
_CURSOR: Final = "cursor"
_SCAN_FROM: Final = "scan_from"
_ALIVE_AT: Final = "alive_at"

Offsets = dict[str, dict[int, int]]  # topic → partition → offset
T = TypeVar("T")

_ids_encoder = msgspec.msgpack.Encoder()
_ids_decoder = msgspec.msgpack.Decoder(list[str])
_offsets_decoder = msgspec.json.Decoder(dict[str, dict[int, int]])


@dataclass(frozen=True, slots=True)
class Intent:
    id: int
    created_at: float
    capture_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CountRow:
    hour: int  # epoch seconds of the hour's start
    topic: str
    captured: int
    dropped: int


def hour_of(epoch: float) -> int:
    return int(epoch // 3600 * 3600)


class AgentState:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._conn.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- reads ------------------------------------------------------------------

    def cursor(self) -> bytes | None:
        return self._meta(_CURSOR)

    def scan_from(self) -> Offsets | None:
        raw = self._meta(_SCAN_FROM)
        return None if raw is None else _offsets_decoder.decode(raw)

    def alive_at(self) -> float | None:
        raw = self._meta(_ALIVE_AT)
        return None if raw is None else float(raw)

    def open_intents(self) -> list[Intent]:
        with self._lock:
            rows = self._conn.execute("SELECT id, created_at, ids FROM intents ORDER BY id").fetchall()
        return [Intent(row[0], row[1], tuple(_ids_decoder.decode(row[2]))) for row in rows]

    def skip_ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT capture_id FROM skip")}

    def counts(self, *, dirty_only: bool = False) -> list[CountRow]:
        where = " WHERE dirty = 1" if dirty_only else ""
        with self._lock:
            rows = self._conn.execute(f"SELECT hour, topic, captured, dropped FROM counts{where} ORDER BY hour, topic")
            return [CountRow(*row) for row in rows]

    def totals(self) -> dict[str, tuple[int, int]]:
        """topic → (captured, dropped) over all hours."""
        with self._lock:
            rows = self._conn.execute("SELECT topic, sum(captured), sum(dropped) FROM counts GROUP BY topic")
            return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    # -- writes (each one transaction, durable when it returns) ----------------

    def open_intent(self, capture_ids: Iterable[str], scan_from: Offsets | None) -> int:
        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO intents (created_at, ids) VALUES (?, ?)",
                (time.time(), _ids_encoder.encode(list(capture_ids))),
            )
            if scan_from is not None:
                self._set_meta(conn, _SCAN_FROM, msgspec.json.encode(scan_from))
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        return self._transaction(write)

    def commit_batch(
        self,
        *,
        intent_id: int | None,
        cursor: bytes | None,
        captured: Mapping[str, int] | None = None,
        used_skips: Iterable[str] = (),
        now: float | None = None,
    ) -> None:
        """The batch is durable: move the cursor, drop its intent, count it, forget used skips."""
        hour = hour_of(time.time() if now is None else now)

        def write(conn: sqlite3.Connection) -> None:
            if cursor is not None:
                self._set_meta(conn, _CURSOR, cursor)
            if intent_id is not None:
                conn.execute("DELETE FROM intents WHERE id = ?", (intent_id,))
            for topic, count in (captured or {}).items():
                self._add_counts(conn, hour, topic, count, 0)
            conn.executemany("DELETE FROM skip WHERE capture_id = ?", [(cid,) for cid in used_skips])

        self._transaction(write)

    def resolve_recovery(self, intent_ids: Iterable[int], found: Mapping[str, str], now: float | None = None) -> None:
        """Recovery's verdict: in-doubt ids found published (id → topic) are counted and skipped on re-read."""
        stamp = time.time() if now is None else now
        per_topic: dict[str, int] = {}
        for topic in found.values():
            per_topic[topic] = per_topic.get(topic, 0) + 1

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM intents WHERE id = ?", [(i,) for i in intent_ids])
            conn.executemany(
                "INSERT OR IGNORE INTO skip (capture_id, created_at) VALUES (?, ?)", [(cid, stamp) for cid in found]
            )
            for topic, count in per_topic.items():
                self._add_counts(conn, hour_of(stamp), topic, count, 0)

        self._transaction(write)

    def prune_skips(self, *, older_than_s: float) -> None:
        cutoff = time.time() - older_than_s
        self._transaction(lambda conn: conn.execute("DELETE FROM skip WHERE created_at < ?", (cutoff,)))

    def set_scan_from(self, scan_from: Offsets) -> None:
        self._transaction(lambda conn: self._set_meta(conn, _SCAN_FROM, msgspec.json.encode(scan_from)))

    def mark_alive(self, at: float | None = None) -> None:
        stamp = repr(time.time() if at is None else at).encode()
        self._transaction(lambda conn: self._set_meta(conn, _ALIVE_AT, stamp))

    def add_dropped(self, per_topic: Mapping[str, int], now: float | None = None) -> None:
        hour = hour_of(time.time() if now is None else now)

        def write(conn: sqlite3.Connection) -> None:
            for topic, count in per_topic.items():
                self._add_counts(conn, hour, topic, 0, count)

        self._transaction(write)

    def mark_reported(self, rows: Iterable[CountRow]) -> None:
        """Rows reported with these values; a row changed since stays dirty."""

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE counts SET dirty = 0 WHERE hour = ? AND topic = ? AND captured = ? AND dropped = ?",
                [(r.hour, r.topic, r.captured, r.dropped) for r in rows],
            )

        self._transaction(write)

    # -- internals -----------------------------------------------------------------

    def _meta(self, key: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: bytes) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @staticmethod
    def _add_counts(conn: sqlite3.Connection, hour: int, topic: str, captured: int, dropped: int) -> None:
        conn.execute(
            "INSERT INTO counts (hour, topic, captured, dropped, dirty) VALUES (?, ?, ?, ?, 1)"
            " ON CONFLICT (hour, topic) DO UPDATE SET captured = captured + excluded.captured,"
            " dropped = dropped + excluded.dropped, dirty = 1",
            (hour, topic, captured, dropped),
        )

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return result
