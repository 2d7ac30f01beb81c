"""Consumer-group lag from the broker: high watermark minus committed offset, per partition.

Offsets are not contiguous: the commit/abort markers of transactions (the replay
job republishes in Kafka transactions) and aborted records occupy offsets that a
`read_committed` consumer never receives, so a group that consumed everything
can stay a few offsets behind the high watermark for good. For a partition that
looks slightly behind, `group_lag` reads from the committed offset (read
committed, not joining the group) and, when nothing consumable is found before
the high watermark, reports the lag as 0 — a trailing marker is not backlog.

Bounded: every broker call has a timeout, so a sensor tick never hangs on Kafka.
"""

import time
from dataclasses import dataclass
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from planpipe.errors import PlanpipeError
from planpipe.kafka_config import admin_config, consumer_config
from planpipe.settings import Settings

# A partition at most this far behind is probed for consumable records; further
# behind, records are certainly there (markers take one offset per transaction).
PROBE_MAX_LAG: Final = 1_000
_PROBE_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    low: int
    high: int
    committed: int | None  # None: the group never committed on this partition
    # A read-committed read from the committed offset found nothing consumable before
    # this offset (markers, aborted records); None when not probed.
    consumable_from: int | None = None

    @property
    def lag(self) -> int:
        start = self.committed if self.committed is not None else self.low
        if self.consumable_from is not None:
            start = max(start, self.consumable_from)
        return max(0, self.high - start)


class LagUnavailable(PlanpipeError, RuntimeError):
    pass


def group_lag(
    settings: Settings, group: str, topic: str, timeout_s: float = 5.0, *, probe: bool = True
) -> list[PartitionLag]:
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    # Not subscribed: this consumer never joins the group, it only reads its offsets.
    options: dict[str, str | int | bool] = {
        "socket.timeout.ms": int(timeout_s * 1000),
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    }
    consumer = Consumer(consumer_config(settings, group, **options))
    try:
        metadata = consumer.list_topics(topic, timeout=left())
        topic_meta = metadata.topics.get(topic)
        if topic_meta is None or topic_meta.error is not None:
            raise LagUnavailable(f"topic {topic} not found: {topic_meta.error if topic_meta else 'missing'}")
        partitions = [TopicPartition(topic, p) for p in sorted(topic_meta.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=left())}
        result = []
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=left(), cached=False)
            offset = committed.get(tp.partition, -1)
            result.append(PartitionLag(tp.partition, int(low), int(high), int(offset) if offset >= 0 else None))
        if probe:
            result = _probe_markers(consumer, topic, result, min(_PROBE_TIMEOUT_S, left()))
        return result
    except KafkaException as error:
        raise LagUnavailable(str(error)) from error
    finally:
        consumer.close()


def _probe_markers(consumer: Consumer, topic: str, lags: list[PartitionLag], timeout_s: float) -> list[PartitionLag]:
    """Read the slightly-behind partitions from their committed offsets; where no record comes
    before the high watermark, the gap is markers or aborted records."""
    suspects = {p.partition: p for p in lags if p.committed is not None and 0 < p.lag <= PROBE_MAX_LAG}
    if not suspects:
        return lags
    consumer.assign([TopicPartition(topic, p.partition, p.committed or 0) for p in suspects.values()])
    unresolved = set(suspects)
    found_records: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while unresolved and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=100, timeout=min(0.5, max(0.05, deadline - time.monotonic()))):
            partition = message.partition()
            if partition is None or partition not in unresolved:
                continue
            error = message.error()
            if error is None:
                found_records.add(partition)  # a real record: the lag is real
                unresolved.discard(partition)
            elif error.code() == KafkaError._PARTITION_EOF:
                unresolved.discard(partition)
    positions = {
        tp.partition: tp.offset
        for tp in consumer.position([TopicPartition(topic, p) for p in suspects])
        if tp.offset is not None and tp.offset >= 0
    }
    consumer.unassign()
    probed = []
    for item in lags:
        position = positions.get(item.partition)
        if item.partition in suspects and item.partition not in found_records and position is not None:
            # Nothing consumable between the committed offset and `position`.
            item = PartitionLag(item.partition, item.low, item.high, item.committed, consumable_from=position)
        probed.append(item)
    return probed


def group_assignments(settings: Settings, group: str, topic: str, timeout_s: float = 5.0) -> dict[str, set[int]]:
    """Partitions of `topic` held by each member of the group, keyed by the member's client.id."""
    admin = AdminClient(admin_config(settings, **{"socket.timeout.ms": int(timeout_s * 1000)}))
    try:
        future = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group]
        description = future.result(timeout=timeout_s + 1)
    except KafkaException as error:
        raise LagUnavailable(str(error)) from error
    except TimeoutError as error:
        raise LagUnavailable(f"describing group {group} timed out") from error
    held: dict[str, set[int]] = {}
    for member in description.members:
        assignment = member.assignment.topic_partitions if member.assignment is not None else []
        held.setdefault(str(member.client_id), set()).update(tp.partition for tp in assignment if tp.topic == topic)
    return held
