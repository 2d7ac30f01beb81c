"""librdkafka configurations with the runbook's defaults, and the one size limit.

User passthrough (PLANPIPE_PRODUCER__*, PLANPIPE_CONSUMER__*) wins over the
runbook's defaults. The size options are the exception: they are derived from
`PLANPIPE_MAX_PLAN_BYTES` by `SizeLimits` (topics, broker, producer, consumer
and DLQ all read the same numbers from here) and a passthrough may raise them,
never lower them below what the limit needs. The consumer's fetch sizes are not
limits (a larger first batch is returned whole) but memory: they stay small.
"""

import logging
from dataclasses import dataclass
from typing import Any, Final

from planpipe.log_repeats import RepeatFilter
from planpipe.settings import Settings

CLIENT_LOGGER: Final = logging.getLogger("planpipe.kafka.client")
CLIENT_LOGGER.addFilter(RepeatFilter())

# Runbook, "High-Throughput Producer".
PRODUCER_DEFAULTS: Final[dict[str, str | int | bool]] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "zstd",
    "batch.size": 1_048_576,
    "linger.ms": 15,
    "max.in.flight.requests.per.connection": 5,
}

# Runbook, "Kafka Consumer Rebalancing Storms" and "Deterministic Consumer".
CONSUMER_DEFAULTS: Final[dict[str, str | int | bool]] = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 45_000,
    "heartbeat.interval.ms": 15_000,
    "max.poll.interval.ms": 300_000,
    "isolation.level": "read_committed",
    # When the prefetch queue is over its threshold (queued.max.messages.kbytes), librdkafka
    # postpones the partitions' next fetch by this much (its default: 1,000 ms). A live consumer
    # that fell a little behind then saw nothing new for a second while records waited in the
    # broker: +1 s on every record of the burst (bench ingest's latency phase, p50 1,030 ms).
    "fetch.queue.backoff.ms": 10,
}


MIB: Final = 1024 * 1024

# JSON escaping of plan_text inside the envelope: each byte of an EXPLAIN plan
# takes at most two on the wire (`"` → `\"`, `\` → `\\`, newline → `\n`) when the
# writer emits UTF-8 as is (msgspec, `json.dumps(ensure_ascii=False)`). `\uXXXX`
# escapes can grow it further; such an envelope is rejected whole by the router
# (reason `plan_too_large`, no field) and dead-lettered, never lost.
PLAN_ESCAPE_FACTOR: Final = 2
# Everything in an envelope but the plan: query_text, hashes, ids, numbers.
ENVELOPE_FIELDS_ALLOWANCE: Final = 1 * MIB
# Key and headers of one record: route, trace-id, the DLQ's reason/detail (1 KiB)/
# stage/source coordinates and file path, truncation headers, the caller's own.
RECORD_HEADROOM: Final = 64 * 1024
# Record batch framing and compression overhead above the one record a batch of
# a large record holds (librdkafka never adds records after one larger than
# batch.size): what the broker checks against the topic's max.message.bytes.
BATCH_HEADROOM: Final = 64 * 1024
# librdkafka's range for message.max.bytes (the largest of the derived values).
LIBRDKAFKA_MAX_MESSAGE_BYTES: Final = 1_000_000_000
# Defaults the derived values never go below (librdkafka's and Kafka's own).
DEFAULT_RECEIVE_MESSAGE_MAX_BYTES: Final = 100_000_000
DEFAULT_SOCKET_REQUEST_MAX_BYTES: Final = 104_857_600
MIN_PLAN_BYTES: Final = 1024
# What a consumer asks per fetch, in compressed bytes: per partition, and in all. Not a size
# limit: the broker returns a first batch larger than either whole (KIP-74), and librdkafka
# grows its request for it. But memory: a response is decompressed at once, whatever the
# prefetch queue's bound, and zstd packs plans ~18:1 — the 50 MiB default fetched a whole
# backlog of 5 KB envelopes (~250 MiB decoded) in one response: the ingest consumer's peak RSS.
FETCH_PARTITION_BYTES: Final = 1 * MIB
FETCH_MAX_BYTES: Final = 2 * MIB
# A consumer's own requests are small; librdkafka wants fetch.max.bytes >= message.max.bytes.
CONSUMER_REQUEST_MAX_BYTES: Final = 1 * MIB


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """Every size Kafka must carry, derived from the contract's plan_text limit.

    * `max_envelope_bytes`: the largest raw envelope the router accepts, and the
      most of a rejected input's bytes the DLQ carries (beyond it: truncated).
    * `max_record_bytes`: one record (value + key + headers), producer
      `message.max.bytes`.
    * `max_batch_bytes`: topic `max.message.bytes`, broker `message.max.bytes`
      and `replica.fetch.max.bytes`; a consumer's fetch response holds one such
      batch whole plus `fetch_max_bytes` (`receive.message.max.bytes`).
    """

    max_plan_bytes: int
    max_envelope_bytes: int
    max_record_bytes: int
    max_batch_bytes: int
    fetch_max_bytes: int
    receive_message_max_bytes: int
    socket_request_max_bytes: int

    @classmethod
    def for_plan_bytes(cls, max_plan_bytes: int) -> "SizeLimits":
        envelope = PLAN_ESCAPE_FACTOR * max_plan_bytes + ENVELOPE_FIELDS_ALLOWANCE
        record = envelope + RECORD_HEADROOM
        batch = record + BATCH_HEADROOM
        if max_plan_bytes < MIN_PLAN_BYTES or batch > LIBRDKAFKA_MAX_MESSAGE_BYTES:
            largest = (LIBRDKAFKA_MAX_MESSAGE_BYTES - BATCH_HEADROOM - RECORD_HEADROOM - ENVELOPE_FIELDS_ALLOWANCE) // (
                PLAN_ESCAPE_FACTOR
            )
            raise ValueError(
                f"PLANPIPE_MAX_PLAN_BYTES must be within {MIN_PLAN_BYTES}..{largest} "
                f"(Kafka clients carry at most {LIBRDKAFKA_MAX_MESSAGE_BYTES:,} bytes per request), "
                f"got {max_plan_bytes}"
            )
        # A fetch returns at least one whole batch (KIP-74), so the response may be
        # fetch.max.bytes plus one batch, plus protocol framing.
        fetch = FETCH_MAX_BYTES
        return cls(
            max_plan_bytes=max_plan_bytes,
            max_envelope_bytes=envelope,
            max_record_bytes=record,
            max_batch_bytes=batch,
            fetch_max_bytes=fetch,
            receive_message_max_bytes=max(DEFAULT_RECEIVE_MESSAGE_MAX_BYTES, fetch + batch + 512),
            socket_request_max_bytes=max(DEFAULT_SOCKET_REQUEST_MAX_BYTES, batch + MIB),
        )

    def producer_options(self) -> dict[str, int]:
        # librdkafka refuses at produce() a record whose wire size exceeds this
        # (MSG_SIZE_TOO_LARGE), so nothing the topic would refuse is ever queued.
        return {"message.max.bytes": self.max_record_bytes}

    def consumer_options(self) -> dict[str, int]:
        return {
            "message.max.bytes": CONSUMER_REQUEST_MAX_BYTES,
            "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
            "fetch.max.bytes": self.fetch_max_bytes,
            "receive.message.max.bytes": self.receive_message_max_bytes,
        }

    def consumer_floors(self) -> dict[str, int]:
        """The least a consumer passthrough may set: a response holding one whole batch must be
        received (the fetch sizes may go lower: the broker still returns a first batch whole)."""
        return {"receive.message.max.bytes": self.max_batch_bytes + self.fetch_max_bytes + 512}

    def topic_config(self) -> dict[str, str]:
        return {"max.message.bytes": str(self.max_batch_bytes)}

    def broker_properties(self) -> dict[str, str]:
        return {
            "message.max.bytes": str(self.max_batch_bytes),
            "replica.fetch.max.bytes": str(self.max_batch_bytes),
            "socket.request.max.bytes": str(self.socket_request_max_bytes),
        }


def size_limits(settings: Settings) -> SizeLimits:
    return SizeLimits.for_plan_bytes(settings.max_plan_bytes)


def _apply_overrides(conf: dict[str, Any], overrides: dict[str, str], floors: dict[str, int], scope: str) -> None:
    """Passthrough wins, except that it may not lower a size option below the limit's needs."""
    for name, floor in floors.items():
        if name in overrides:
            try:
                value = int(overrides[name])
            except ValueError:
                raise ValueError(f"{scope} option {name} must be an integer, got {overrides[name]!r}") from None
            if value < floor:
                variable = f"PLANPIPE_{scope.upper()}__{name.upper().replace('.', '_')}"
                raise ValueError(
                    f"{variable}={value} is below the {floor:,} bytes PLANPIPE_MAX_PLAN_BYTES needs; "
                    "raise it, drop it, or lower PLANPIPE_MAX_PLAN_BYTES"
                )
    conf.update(overrides)


def _base(settings: Settings) -> dict[str, str | int | bool | logging.Logger]:
    return {"bootstrap.servers": settings.kafka_bootstrap, "logger": CLIENT_LOGGER}


def producer_config(settings: Settings, **extra: str | int | bool) -> dict[str, Any]:
    """Every producer (router, ingest DLQ, replay, bench): carries records up to the size limit."""
    sizes = size_limits(settings).producer_options()
    conf: dict[str, Any] = {**_base(settings), **PRODUCER_DEFAULTS, **sizes, **extra}
    _apply_overrides(conf, settings.producer_overrides, sizes, "producer")
    return conf


def consumer_config(settings: Settings, group_id: str, **extra: str | int | bool) -> dict[str, Any]:
    """Every consumer (ingest, replay, lag): fetches records up to the size limit."""
    limits = size_limits(settings)
    sizes = limits.consumer_options()
    conf: dict[str, Any] = {**_base(settings), "group.id": group_id, **CONSUMER_DEFAULTS, **sizes, **extra}
    _apply_overrides(conf, settings.consumer_overrides, limits.consumer_floors(), "consumer")
    return conf


def admin_config(settings: Settings, **extra: str | int | bool) -> dict[str, Any]:
    conf: dict[str, Any] = {**_base(settings), **extra}
    conf.update(settings.consumer_overrides)
    return conf
