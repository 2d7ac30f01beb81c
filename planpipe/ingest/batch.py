"""Turn one micro-batch of Kafka records into observations and dead letters (pure, no I/O).

Kept apart from the consumer loop so it can be unit-tested and benchmarked alone.
"""

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

from planpipe.contract import ContractViolation, EnvelopeDecoder, Reason
from planpipe.dlq import DeadLetter
from planpipe.messaging.headers import H_TRACE_ID, AnyHeaders, as_header_list
from planpipe.messaging.keys import parse_message_key
from planpipe.messaging.routes import RoutingConfig, ingest_route
from planpipe.plans.fingerprint import PlanParseError, fingerprint_and_work


class KafkaRecord(Protocol):
    """The subset of `confluent_kafka.Message` the engine reads (also easy to build in tests)."""

    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...
    def headers(self) -> AnyHeaders: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class _HasValue(Protocol):
    def value(self) -> bytes | None: ...


_R = TypeVar("_R", bound=_HasValue)


@dataclass
class OffsetRange:
    topic: str
    partition: int
    first: int
    last: int

    def as_dict(self) -> dict[str, object]:
        return {"topic": self.topic, "partition": self.partition, "first": self.first, "last": self.last}


@dataclass
class Observations:
    """Column-oriented: cheap to hand to polars and to aggregate for PostgreSQL."""

    query_hash: list[str] = field(default_factory=list)
    cluster_id: list[str] = field(default_factory=list)
    execution_timestamp: list[float] = field(default_factory=list)
    plan_text: list[str] = field(default_factory=list)
    actual_rows: list[int] = field(default_factory=list)
    total_time_ms: list[float] = field(default_factory=list)
    query_type: list[str | None] = field(default_factory=list)
    query_text: list[str | None] = field(default_factory=list)
    trace_id: list[str | None] = field(default_factory=list)
    published_at: list[float] = field(default_factory=list)
    fingerprint: list[str] = field(default_factory=list)
    route: list[str] = field(default_factory=list)
    priority: list[str] = field(default_factory=list)
    kafka_topic: list[str] = field(default_factory=list)
    kafka_partition: list[int] = field(default_factory=list)
    kafka_offset: list[int] = field(default_factory=list)
    # The plan's work (planpipe.plans.work): load-invariant evidence for detection.
    shared_blocks: list[int | None] = field(default_factory=list)
    temp_blocks: list[int | None] = field(default_factory=list)
    top_rows: list[float | None] = field(default_factory=list)
    top_loops: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.query_hash)

    def columns(self) -> dict[str, list[object]]:
        return dict(self.__dict__)


@dataclass
class PreparedBatch:
    observations: Observations
    dead_letters: list[DeadLetter]
    offset_ranges: dict[tuple[str, int], OffsetRange]
    consumed: int
    dropped_low: int
    # fingerprint → plan text of its first observation in this batch (for the plan catalog)
    new_plan_samples: dict[str, str]


def prepare_batch(
    records: Sequence[KafkaRecord],
    decoder: EnvelopeDecoder,
    routing: RoutingConfig,
    *,
    drop_low_priority: bool = False,
    known_fingerprints: set[str] | None = None,
) -> PreparedBatch:
    obs = Observations()
    dead: list[DeadLetter] = []
    ranges: dict[tuple[str, int], OffsetRange] = {}
    samples: dict[str, str] = {}
    dropped_low = 0
    known = known_fingerprints if known_fingerprints is not None else set()
    # Keys repeat ("{priority}:{query_hash}"): each distinct key is parsed once per batch.
    priorities: dict[bytes, str] = {}
    for record in records:
        topic, partition, offset = record.topic() or "", record.partition() or 0, record.offset() or 0
        span = ranges.get((topic, partition))
        if span is None:
            ranges[(topic, partition)] = OffsetRange(topic, partition, offset, offset)
        elif offset > span.last:
            span.last = offset
        elif offset < span.first:
            span.first = offset
        raw = record.value()
        key = record.key()
        priority = "standard"
        try:
            if key:
                known_priority = priorities.get(key)
                if known_priority is None:
                    known_priority = priorities[key] = parse_message_key(key)[0]
                priority = known_priority
            envelope = decoder.decode(raw)
            plan_fingerprint, work = fingerprint_and_work(envelope.plan_text)
        except ContractViolation as violation:
            dead.append(dead_letter(record, raw, violation.reason, violation.field, violation.detail))
            continue
        except PlanParseError as error:
            dead.append(dead_letter(record, raw, Reason.PLAN_UNPARSEABLE, "plan_text", str(error)))
            continue
        except ValueError as error:  # a malformed key: the payload may be fine, the key is not
            dead.append(dead_letter(record, raw, Reason.WRONG_TYPE, "key", str(error)))
            continue
        if envelope.priority is not None:
            priority = envelope.priority
        # Runbook circuit breaker: under sustained latency breach shed `low` only.
        if drop_low_priority and priority == "low":
            dropped_low += 1
            continue
        if plan_fingerprint not in known and plan_fingerprint not in samples:
            samples[plan_fingerprint] = envelope.plan_text
        _, create_ms = record.timestamp()
        obs.query_hash.append(envelope.query_hash)
        obs.cluster_id.append(envelope.cluster_id)
        obs.execution_timestamp.append(envelope.execution_timestamp)
        obs.plan_text.append(envelope.plan_text)
        obs.actual_rows.append(envelope.actual_rows)
        obs.total_time_ms.append(envelope.total_time_ms)
        obs.query_type.append(envelope.query_type)
        obs.query_text.append(envelope.query_text)
        obs.trace_id.append(envelope.trace_id or _trace_header(record))
        # Latency is measured from publication; Kafka's CreateTime when the agent did not stamp it.
        obs.published_at.append(envelope.published_at if envelope.published_at is not None else create_ms / 1000)
        obs.fingerprint.append(plan_fingerprint)
        obs.route.append(ingest_route(envelope, priority, routing))
        obs.priority.append(priority)
        obs.kafka_topic.append(topic)
        obs.kafka_partition.append(partition)
        obs.kafka_offset.append(offset)
        obs.shared_blocks.append(work.shared_blocks)
        obs.temp_blocks.append(work.temp_blocks)
        obs.top_rows.append(work.top_rows)
        obs.top_loops.append(work.top_loops)
    return PreparedBatch(
        observations=obs,
        dead_letters=dead,
        offset_ranges=ranges,
        consumed=len(records),
        dropped_low=dropped_low,
        new_plan_samples=samples,
    )


# Under lag a batch may grow to this many times the configured size: fixed costs per batch
# (one transaction, one file per partition, fsyncs) are then spread over more records.
BATCH_GROWTH: Final = 10


# ... and to about this many bytes of envelopes: a batch's memory (records, decoded plans,
# Parquet frames) grows with its bytes; 5,000 envelopes of 5 KB peaked near 500 MB RSS.
BATCH_TARGET_BYTES: Final = 12 * 1024 * 1024


# librdkafka's prefetch queue of the ingest consumer (its default, 64 MiB, plus the fetch
# responses in flight, was the largest part of peak RSS); PLANPIPE_CONSUMER__* still wins.
PREFETCH_KBYTES: Final = 16 * 1024

_libc: ctypes.CDLL | None = None


def trim_heap() -> None:
    """Give the freed memory of a batch back to the OS (glibc keeps it otherwise: a batch's
    decoded plans and frames are freed in fragments, and RSS only ever grew)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc: nothing to trim
            return
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def next_batch_limit(limit: int, received: int, floor: int, ceiling: int, received_bytes: int = 0) -> int:
    """The next consume's record limit: doubles while consumes come back full (a backlog),
    halves once they come back less than half full (caught up: small batches, low latency).
    Never above what `BATCH_TARGET_BYTES` holds at the envelope size just seen."""
    if received and received_bytes:
        ceiling = max(floor, min(ceiling, BATCH_TARGET_BYTES * received // received_bytes))
    if received >= limit:
        return min(ceiling, limit * 2)
    if received < limit // 2:
        return max(floor, limit // 2)
    return min(limit, ceiling)


# A micro-batch holds at most this many bytes of envelopes (500 plans of 8 MiB would be 4 GiB).
BATCH_MAX_BYTES: Final = 64 * 1024 * 1024


def split_by_bytes(records: list[_R], max_bytes: int) -> list[list[_R]]:
    """Consecutive slices of at most `max_bytes` of values (one record at least): memory stays
    bounded when the records are large plans, whatever the message count."""
    chunks: list[list[_R]] = [[]]
    size = 0
    for record in records:
        length = len(record.value() or b"")
        if chunks[-1] and size + length > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(record)
        size += length
    return chunks


def _trace_header(record: KafkaRecord) -> str | None:
    for name, value in as_header_list(record.headers()):
        if name == H_TRACE_ID and value:
            return value.decode(errors="replace")
    return None


def dead_letter(record: KafkaRecord, raw: bytes | None, reason: Reason, field: str | None, detail: str) -> DeadLetter:
    return DeadLetter(
        value=raw or b"",
        key=record.key(),
        reason=reason,
        field=field,
        detail=detail,
        stage="ingest",
        source_topic=record.topic(),
        source_partition=record.partition(),
        source_offset=record.offset(),
        original_headers=as_header_list(record.headers()),
    )
