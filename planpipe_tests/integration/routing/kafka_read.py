"""Read a whole topic back with a fresh consumer group (helpers for the routing tests)."""

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from planpipe.dlq import header_map
from planpipe.kafka_config import consumer_config
from planpipe.settings import Settings


@dataclass(frozen=True)
class Read:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    probe = Consumer(consumer_config(settings, f"probe-{uuid.uuid4().hex[:8]}"))
    try:
        partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        probe.close()


def read_all(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[Read]:
    """Every record currently in `topic`, per partition in offset order."""
    ends = end_offsets(settings, topic)
    consumer = Consumer(consumer_config(settings, f"verify-{uuid.uuid4().hex[:8]}"))
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    records: list[Read] = []
    position = dict.fromkeys(ends, 0)
    deadline = time.monotonic() + timeout_s
    try:
        while any(position[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                assert message.error() is None, message.error()
                partition, offset, value = message.partition(), message.offset(), message.value()
                assert partition is not None and offset is not None and value is not None
                records.append(Read(partition, offset, message.key(), value, header_map(message.headers())))
                position[partition] = offset + 1
    finally:
        consumer.close()
    missing = {p: ends[p] - position[p] for p in ends if position[p] < ends[p]}
    assert not missing, f"could not read to the end of {topic}: {missing}"
    return records
