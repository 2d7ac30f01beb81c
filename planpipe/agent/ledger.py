"""Capture ids, watermark snapshots and finding an agent's records in Kafka.

Every record the agent publishes carries `planpipe-capture-id:
{agent}/{dev}:{inode}@{offset}#{crc32 of the entry}` — the log entry it came
from — so reading the same entry again yields the same id. After a `kill -9`, recovery looks for the
ids of the batch in doubt in Kafka, from `scan_from` to the end of each
partition. `scan_from` is a snapshot of the topics' end offsets taken before
any record that could still be in doubt was produced:

* a batch handed to the producer is in doubt until it is durable (the oldest
  open send bounds the snapshot);
* a spooled record can be delivered by librdkafka's retries or the drain up to
  `message.timeout.ms` after it was produced, and be acknowledged without its
  spool row being deleted yet: while the spool holds rows, the snapshot is at
  least that much older than now.
"""

import contextlib
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from planpipe.agent.state import Offsets
from planpipe.kafka_config import consumer_config
from planpipe.settings import Settings
from planpipe.topology import load_topology

logger = logging.getLogger("planpipe.agent.ledger")

H_CAPTURE_ID: Final = "planpipe-capture-id"


def capture_id(agent: str, dev: int, inode: int, offset: int, entry: bytes) -> str:
    """The entry's file, offset and a digest of its bytes (a truncated and rewritten file reuses offsets)."""
    return f"{agent}/{dev}:{inode}@{offset}#{zlib.crc32(entry):08x}"


def agent_prefix(agent: str) -> bytes:
    return f"{agent}/".encode()


def publish_topics(settings: Settings) -> tuple[str, ...]:
    """Every topic the router may send to: the base pair and each region's (PLANPIPE_TOPOLOGY_FILE)."""
    topics = [settings.topic, settings.dlq_topic]
    for region in load_topology(settings).regions:
        topics += [region.topic, region.dlq_topic]
    return tuple(dict.fromkeys(topics))


def _consumer(settings: Settings, agent: str) -> Consumer:
    # Never subscribes or commits: the group id is only required by the client. Partition EOF
    # events say "read to the end" even where the log ends in transaction markers.
    extra: dict[str, str | int | bool] = {
        "enable.auto.commit": False,
        "isolation.level": "read_uncommitted",
        "enable.partition.eof": True,
    }
    return Consumer(consumer_config(settings, f"planpipe-agent-ledger-{agent}", **extra))


def end_offsets(consumer: Consumer, topics: Iterable[str], timeout_s: float) -> Offsets:
    """High watermarks of every partition of `topics`; raises KafkaException when the broker does not answer."""
    result: Offsets = {}
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise KafkaException(f"topic {topic} not found: {None if found is None else found.error}")
        result[topic] = {
            partition: consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s, cached=False
            )[1]
            for partition in found.partitions
        }
    return result


class OpenSends:
    """Hand-offs not yet durable, with their start times: the oldest bounds `scan_from`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._started: dict[int, float] = {}

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        token = next(self._tokens)
        with self._lock:
            self._started[token] = time.time()
        try:
            yield
        finally:
            with self._lock:
                self._started.pop(token, None)

    def oldest(self) -> float | None:
        with self._lock:
            return min(self._started.values(), default=None)


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    offsets: Offsets


class Watermarks:
    """A ring of end-offset snapshots; `scan_from(bound)` is the newest one taken at or before `bound`."""

    def __init__(self, settings: Settings, agent: str, *, timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._topics = publish_topics(settings)
        self._timeout_s = timeout_s
        self._consumer = _consumer(settings, agent)
        self._lock = threading.Lock()
        self._ring: list[Snapshot] = []

    def seed(self, offsets: Offsets) -> None:
        """A floor older than anything this process produces (the last persisted `scan_from`; {}: from 0),
        used until a snapshot taken before the producer started, or a later one, can be."""
        with self._lock:
            self._ring.insert(0, Snapshot(0.0, offsets))

    def take(self) -> Offsets | None:
        """A snapshot of every publish topic's end offsets (also returned); None when Kafka does not answer."""
        try:
            offsets = end_offsets(self._consumer, self._topics, self._timeout_s)
        except KafkaException as error:
            logger.debug("watermark snapshot failed: %s", error)
            return None
        taken_at = time.time()
        with self._lock:
            self._ring.append(Snapshot(taken_at, offsets))
        return offsets

    def scan_from(self, bound: float) -> Offsets | None:
        """Offsets no later than anything produced after `bound`; older snapshots are forgotten."""
        with self._lock:
            if not self._ring:
                return None
            chosen = 0
            for index, snapshot in enumerate(self._ring):
                if snapshot.taken_at <= bound:
                    chosen = index
            del self._ring[:chosen]
            return self._ring[0].offsets

    def close(self) -> None:
        self._consumer.close()


def find_in_kafka(
    settings: Settings,
    agent: str,
    start: Offsets | None,
    *,
    timeout_s: float = 10.0,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """capture id → topic for every record of `agent` from `start` (None: from the beginning) to the end."""
    prefix = agent_prefix(agent)
    consumer = _consumer(settings, agent)
    found: dict[str, str] = {}
    try:
        ends = end_offsets(consumer, publish_topics(settings), timeout_s)
        assignment = []
        for topic, partitions in ends.items():
            for partition, end in partitions.items():
                begin = (start or {}).get(topic, {}).get(partition, 0)
                if begin < end:
                    assignment.append(TopicPartition(topic, partition, begin))
        if not assignment:
            return found
        remaining = {(tp.topic, tp.partition): ends[tp.topic][tp.partition] for tp in assignment}
        consumer.assign(assignment)
        idle_deadline = time.monotonic() + timeout_s
        while remaining and not stop():
            messages = consumer.consume(500, timeout=0.5)
            if messages:
                idle_deadline = time.monotonic() + timeout_s
            for message in cast(list[Any], messages):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.pop((message.topic(), message.partition()), None)
                    continue
                for name, value in message.headers() or ():
                    if name == H_CAPTURE_ID and value is not None and value.startswith(prefix):
                        found[value.decode()] = message.topic()
            for tp in consumer.position([TopicPartition(t, p) for t, p in remaining]):
                if tp.offset >= 0 and tp.offset >= remaining[(tp.topic, tp.partition)]:
                    del remaining[(tp.topic, tp.partition)]
            if remaining and time.monotonic() > idle_deadline:
                raise KafkaException(f"reading {sorted(remaining)} made no progress for {timeout_s} s")
        if remaining:  # stopped part-way: a partial answer must never be taken for the whole
            raise KafkaException("scan interrupted")
        return found
    finally:
        consumer.close()
