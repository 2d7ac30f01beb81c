"""The last-resort queue (runbook fallback 3): Kafka records parked in Redis streams.

When Kafka is degraded a capture agent writes the records it would have
produced — topic, key, value and headers, exactly as `PlanProducer` would send
them — to one Redis stream per priority (`planpipe:{agent}:{priority}`, DLQ
records in `…:dlq`). A stream keeps insertion order, and a key
`{priority}:{query_hash}` always maps to one stream, so draining each stream
oldest first keeps the order per key.

* A batch is one MULTI/EXEC: stored whole or not at all. Against the local
  server (append-only file, `appendfsync always`) it is on disk when
  `push()` returns.
* Bounded: at most `max_entries` across the agent's streams (`QueueFull`), and
  the server's `maxmemory` with `noeviction` refuses writes rather than evicting.
* TTL eviction: `expire()` removes entries older than `ttl_s` and returns them,
  so the caller counts and logs every one (never a silent drop).
* `RedisDrainer` moves entries to Kafka through the producer once the caller
  says Kafka is healthy: a batch is handed over, the entries are deleted only
  after the producer reports it durable (acknowledged or spooled). A crash
  between the two leaves an entry in both places; the capture id header lets
  the agent's recovery delete the Redis copy (`delete_ids`).
"""

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import msgspec
import redis

from planpipe.contract import PRIORITIES
from planpipe.errors import PlanpipeError
from planpipe.routing.router import parse_message_key
from planpipe.routing.spool import OutRecord

logger = logging.getLogger("planpipe.redis_queue")

DLQ_STREAM: Final = "dlq"
STREAMS: Final[tuple[str, ...]] = (*PRIORITIES, DLQ_STREAM)
DEFAULT_TTL_S: Final = 24 * 3600.0
DEFAULT_MAX_ENTRIES: Final = 200_000

_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


class QueueUnavailable(PlanpipeError):
    """Redis did not answer or refused the write; nothing of the batch was stored."""


class QueueFull(QueueUnavailable):
    """The agent's streams hold `max_entries`, or the server is at maxmemory."""


@dataclass(frozen=True, slots=True)
class QueuedRecord:
    stream: str
    entry_id: bytes
    record: OutRecord
    capture_id: str | None

    @property
    def enqueued_ms(self) -> int:
        return int(self.entry_id.split(b"-", 1)[0])


def stream_for(record: OutRecord, dlq_topic: str) -> str:
    if record.topic == dlq_topic or record.key is None:
        return DLQ_STREAM
    priority, _ = parse_message_key(record.key)
    return priority


class RedisQueue:
    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        dlq_topic: str,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        capture_header: str = "planpipe-capture-id",
        timeout_s: float = 5.0,
    ) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._dlq_topic = dlq_topic
        self._capture_header = capture_header
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def key(self, stream: str) -> str:
        return f"planpipe:{self.namespace}:{stream}"

    def close(self) -> None:
        self._client.close()

    # -- writing -------------------------------------------------------------------

    def push(self, records: Sequence[OutRecord]) -> None:
        """Store `records` in order, all or nothing. Raises `QueueFull` / `QueueUnavailable`."""
        if not records:
            return
        try:
            if self.pending() + len(records) > self.max_entries:
                raise QueueFull(f"Redis queue {self.namespace} holds {self.max_entries} entries (its limit)")
            pipe = self._client.pipeline(transaction=True)
            for record in records:
                fields: dict[str, bytes] = {
                    "t": record.topic.encode(),
                    "v": record.value,
                    "h": _headers_encoder.encode(list(record.headers)),
                }
                if record.key is not None:
                    fields["k"] = record.key
                pipe.xadd(self.key(stream_for(record, self._dlq_topic)), fields)  # type: ignore[arg-type]
            pipe.execute()
        except redis.ResponseError as error:
            if "OOM" in str(error):
                raise QueueFull(f"Redis is at maxmemory: {error}") from error
            raise QueueUnavailable(f"Redis refused the batch: {error}") from error
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unreachable: {error}") from error

    # -- reading ---------------------------------------------------------------------

    def pending(self) -> int:
        """Entries across the agent's streams. Raises `QueueUnavailable`."""
        try:
            pipe = self._client.pipeline(transaction=False)
            for stream in STREAMS:
                pipe.xlen(self.key(stream))
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unreachable: {error}") from error

    def read(self, stream: str, count: int, *, max_id: str = "+") -> list[QueuedRecord]:
        """The oldest `count` entries of one stream (up to `max_id`), without removing them."""
        try:
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]], self._client.xrange(self.key(stream), "-", max_id, count=count)
            )
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unreachable: {error}") from error
        return [self._decode(stream, entry_id, fields) for entry_id, fields in entries]

    def scan(self) -> list[QueuedRecord]:
        """Every entry of the agent (recovery; bounded by `max_entries`)."""
        out: list[QueuedRecord] = []
        for stream in STREAMS:
            after = "-"
            while True:
                try:
                    entries = cast(
                        list[tuple[bytes, dict[bytes, bytes]]],
                        self._client.xrange(self.key(stream), after, "+", count=1000),
                    )
                except redis.RedisError as error:
                    raise QueueUnavailable(f"Redis unreachable: {error}") from error
                if not entries:
                    break
                out.extend(self._decode(stream, entry_id, fields) for entry_id, fields in entries)
                after = "(" + entries[-1][0].decode()
        return out

    # -- removing ----------------------------------------------------------------------

    def delete(self, entries: Iterable[QueuedRecord]) -> int:
        by_stream: dict[str, list[bytes]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.entry_id)
        if not by_stream:
            return 0
        try:
            pipe = self._client.pipeline(transaction=True)
            for stream, ids in by_stream.items():
                pipe.xdel(self.key(stream), *ids)
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unreachable: {error}") from error

    def expire(self) -> list[QueuedRecord]:
        """Remove and return entries older than the TTL (by the server's clock)."""
        try:
            seconds, micros = self._client.time()
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unreachable: {error}") from error
        cutoff_ms = int(seconds * 1000 + micros // 1000 - self.ttl_s * 1000)
        if cutoff_ms <= 0:
            return []
        expired: list[QueuedRecord] = []
        for stream in STREAMS:
            while batch := self.read(stream, 1000, max_id=f"{cutoff_ms - 1}-18446744073709551615"):
                self.delete(batch)
                expired.extend(batch)
        return expired

    def _decode(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> QueuedRecord:
        headers = tuple(_headers_decoder.decode(fields[b"h"]))
        capture = next((v.decode() for n, v in headers if n == self._capture_header), None)
        record = OutRecord(topic=fields[b"t"].decode(), key=fields.get(b"k"), value=fields[b"v"], headers=headers)
        return QueuedRecord(stream, entry_id, record, capture)


class RedisDrainer:
    """Moves entries to Kafka, per stream oldest first, when `may_drain()` says Kafka is healthy."""

    def __init__(
        self,
        queue: RedisQueue,
        send_durable: Callable[[Sequence[OutRecord]], None],
        *,
        may_drain: Callable[[], bool],
        batch: int = 500,
    ) -> None:
        """`send_durable(records)` returns once every record is acknowledged by Kafka or spooled."""
        self.queue = queue
        self._send_durable = send_durable
        self._may_drain = may_drain
        self._batch = batch
        self.moved = 0

    def drain_once(self, stop: threading.Event) -> int:
        """One batch from each non-empty stream; returns how many entries were moved."""
        moved = 0
        for stream in STREAMS:
            if stop.is_set() or not self._may_drain():
                break
            entries = self.queue.read(stream, self._batch)
            if not entries:
                continue
            self._send_durable([e.record for e in entries])
            self.queue.delete(entries)
            moved += len(entries)
        self.moved += moved
        return moved
