"""Consumer-group lag from the broker: high watermark minus committed offset, per partition.

Bounded: every broker call has a timeout, so a sensor tick never hangs on Kafka.
"""

import time
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from planpipe.kafka_config import consumer_config
from planpipe.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    low: int
    high: int
    committed: int | None  # None: the group never committed on this partition

    @property
    def lag(self) -> int:
        start = self.committed if self.committed is not None else self.low
        return max(0, self.high - start)


class LagUnavailable(RuntimeError):
    pass


def group_lag(settings: Settings, group: str, topic: str, timeout_s: float = 5.0) -> list[PartitionLag]:
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    # Not subscribed: this consumer never joins the group, it only reads its offsets.
    consumer = Consumer(consumer_config(settings, group, **{"socket.timeout.ms": int(timeout_s * 1000)}))
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
        return result
    except KafkaException as error:
        raise LagUnavailable(str(error)) from error
    finally:
        consumer.close()
