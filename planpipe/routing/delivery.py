"""Delivery settlement for `PlanProducer`: what librdkafka reported, and who is told.

The librdkafka boundary (the client Protocol and how its error codes classify),
the bookkeeping of records inside librdkafka (`Pending`) and of `send()` batches
(`Ticket`), and `Settlement`: one round of delivery callbacks collected under
the producer's lock, then applied together (one SQLite transaction each) and
reported to the hooks outside the lock.
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from confluent_kafka import KafkaError, Message

from planpipe.routing import metrics
from planpipe.routing.spool import OutRecord

logger = logging.getLogger("planpipe.producer")

# Timeouts waiting for the brokers: counted for the ProducerRequestTimeouts alert.
TIMEOUTS: Final = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._TIMED_OUT})
# Our own purge: the record was not lost and the broker is not to blame.
PURGED: Final = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# Permanent per-record errors: retrying from the spool would block it forever.
UNDELIVERABLE: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
    }
)

DeliveryCallback = Callable[[KafkaError | None, Message], None]
HeadersType = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]]


class KafkaClient(Protocol):
    """The part of `confluent_kafka.Producer` used here (tests substitute a fake)."""

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        callback: DeliveryCallback | None = None,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: HeadersType | None = None,
    ) -> None: ...
    def poll(self, timeout: float = -1) -> int: ...
    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...
    def close(self) -> bool: ...


ClientFactory = Callable[[dict[str, Any]], KafkaClient]

DeliveredHook = Callable[[Sequence[OutRecord]], None]
UndeliverableHook = Callable[[OutRecord, str], None]


def log_undeliverable(record: OutRecord, error: str) -> None:
    logger.error(
        "undeliverable record for %s key=%r (%d bytes): %s", record.topic, record.key, len(record.value), error
    )


@dataclass(slots=True)
class Ticket:
    """One `send()` batch; `on_durable` fires once every record is acked or spooled."""

    remaining: int
    started: float
    on_durable: Callable[[float], None]


@dataclass(slots=True)
class Pending:
    token: int  # global produce order: the order rows must have in the spool
    record: OutRecord
    seq: int | None  # its spool row, if it has one
    from_spool: bool
    ticket: Ticket | None


@dataclass
class Round:
    """What one pass of callbacks produced, applied together (one SQLite txn each)."""

    acks: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    delivered: list[OutRecord] = field(default_factory=list)
    undeliverable: list[tuple[OutRecord, str]] = field(default_factory=list)
    durable: list[Ticket] = field(default_factory=list)


class Settlement:
    """The current `Round`, the hooks it ends in, and the count of what was settled.

    Mutated only under the producer's lock; `fire()` and `report()` run outside it.
    """

    def __init__(self, dlq_topic: str, on_delivered: DeliveredHook | None, on_undeliverable: UndeliverableHook) -> None:
        self.round = Round()
        self._dlq_topic = dlq_topic
        self._on_delivered = on_delivered
        self._on_undeliverable = on_undeliverable
        self.delivered_count = 0
        self.delivered_from_spool = 0
        self.undeliverable_count = 0

    def resolve(self, ticket: Ticket, count: int) -> None:
        ticket.remaining -= count
        if ticket.remaining == 0:
            self.round.durable.append(ticket)

    def undeliverable(self, record: OutRecord, seq: int | None, ticket: Ticket | None, error: str) -> None:
        self.undeliverable_count += 1
        destination: metrics.Destination = "dlq" if record.topic == self._dlq_topic else "topic"
        metrics.UNDELIVERABLE.labels(destination=destination).inc()
        if seq is not None:
            self.round.acks.append(seq)  # it can never succeed; the hook owns it now
        if ticket is not None:
            self.resolve(ticket, 1)
        self.round.undeliverable.append((record, error))

    def delivered(self, pending: Pending) -> None:
        self.delivered_count += 1
        if pending.from_spool:
            self.delivered_from_spool += 1
        if pending.seq is not None:
            self.round.acks.append(pending.seq)
        if pending.ticket is not None:
            self.resolve(pending.ticket, 1)
        self.round.delivered.append(pending.record)

    def take_hooks(self) -> tuple[list[Ticket], list[tuple[OutRecord, str]]]:
        """Durable tickets and undeliverable records so far, for `fire()` once the lock is released."""
        durable, self.round.durable = self.round.durable, []
        undeliverable, self.round.undeliverable = self.round.undeliverable, []
        return durable, undeliverable

    def take_undeliverable(self) -> list[tuple[OutRecord, str]]:
        undeliverable, self.round.undeliverable = self.round.undeliverable, []
        return undeliverable

    def take_round(self) -> Round:
        work, self.round = self.round, Round()
        return work

    def report(self, work: Round) -> None:
        """Tell the hooks about a settled round."""
        if work.delivered and self._on_delivered is not None:
            try:
                self._on_delivered(work.delivered)
            except Exception:
                logger.exception("on_delivered hook failed")
        self.fire(work.durable, work.undeliverable)

    def fire(self, durable: list[Ticket], undeliverable: list[tuple[OutRecord, str]]) -> None:
        # Hooks run on producer threads; one that raises must not stop acks.
        now = time.perf_counter()
        try:
            for ticket in durable:
                ticket.on_durable((now - ticket.started) * 1000)
            for record, error in undeliverable:
                self._on_undeliverable(record, error)
        except Exception:
            logger.exception("producer hook failed")
