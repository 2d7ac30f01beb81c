"""The consumer-loop base of the ingest and replay engines: assignment, record errors, lag,
caught-up, fault points and delivery tracking.

What differs between the two engines (where positions are stored, what one batch does, how
warnings are rate-limited) stays in their own modules; what a Kafka consumer loop has to get
right whatever it feeds lives here once.
"""

import os
import signal
from collections.abc import Callable
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

FAULT_ENV: Final = "PLANPIPE_FAULT_KILL_AT"
# ListOffsets' timestamp for "the end of the log" (Kafka's LATEST).
OFFSET_END_TIMESTAMP: Final = -1
_FAULT_COUNTS: dict[str, int] = {}

# (key, message): how a loop reports a transient problem; the key lets it rate-limit repeats.
Warn = Callable[[str, str], None]


def fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named step.

    PLANPIPE_FAULT_KILL_AT=<step>[:<batch number>] (1-based). Never set in production.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    step, _, nth = spec.partition(":")
    if step != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


def assignment_grace_s(conf: dict[str, str | int | bool]) -> float:
    """A member that died keeps its partitions until its session times out; only after that
    (plus a rebalance) may "no assignment" mean "nothing for us"."""
    return float(str(conf["session.timeout.ms"])) / 1000 + 15


class Deliveries:
    """Delivery reports of one produce round: errors, the partitions written, records acked."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.partitions: set[int] = set()
        self.records = 0

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.errors.append(f"{message.topic()}[{message.partition()}]: {error}")
        else:
            partition = message.partition()
            if partition is not None:
                self.partitions.add(partition)
            self.records += 1


class ConsumerLoop:
    """Reads one topic as one group member. Subclasses set `_consumer`, `_assignment_grace_s`
    and `_warn`, and may keep `_next_offsets` (positions they seeked to, for `lag`)."""

    _consumer: Consumer
    _assignment_grace_s: float
    _warn: Warn
    # Caught up with no assignment needs this many empty polls as well as the grace.
    _min_idle_polls: int = 0
    # Per assigned partition: the next offset to consume, where known before the first fetch.
    _next_offsets: dict[int, int]

    def _usable(self, record: Message) -> bool:
        """False for records to skip (partition EOF, transient errors); raises for fatal ones."""
        error = record.error()
        if error is None:
            return True
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        if error.fatal() or error.code() in (
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED,
        ):
            raise KafkaException(error)
        # Broker restarts surface as unknown partition / transport errors: librdkafka recovers.
        self._warn(f"record-{error.code()}", f"transient consumer error: {error}")
        return False

    def _caught_up(self, *, waited_s: float, idle_polls: int = 0, cached: bool = False) -> bool | None:
        """None: cached watermarks do not cover every assigned partition yet."""
        assignment = self._consumer.assignment()
        if not assignment:
            # In a group with more members than partitions we may never get any.
            return waited_s > self._assignment_grace_s and idle_polls >= self._min_idle_polls
        lags = self.lag(cached=cached)
        if len(lags) < len(assignment):
            return None if cached else False
        return all(lag == 0 for lag in lags.values())

    def lag(self, *, cached: bool = False) -> dict[int, int]:
        """Per assigned partition: high watermark minus our position (unreadable partitions omitted).

        The position moves past transaction markers, so a partition whose last offset
        is a commit marker reads as caught up.
        """
        try:
            assignment = self._consumer.assignment()
            if not assignment:
                return {}
            # position() is unknown for a partition we seeked to but have not fetched from yet.
            known = dict(self._next_offsets)
            known.update({tp.partition: tp.offset for tp in self._consumer.position(assignment) if tp.offset >= 0})
            unknown = [tp for tp in assignment if tp.partition not in known]
            if unknown:
                for tp in self._consumer.committed(unknown, timeout=10):
                    if tp.offset >= 0:
                        known[tp.partition] = tp.offset
        except KafkaException as error:  # a broker restarting: unknown for now, not fatal
            self._warn("lag", f"lag unavailable: {error}")
            return {}
        if not cached:
            return self._lag_from_end_offsets(assignment, known)
        result: dict[int, int] = {}
        for tp in assignment:
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=True)
            except KafkaException as error:  # e.g. _UNKNOWN_PARTITION while a broker restarts
                self._warn("watermarks", f"watermarks of partition {tp.partition} unavailable: {error}")
                continue
            if high < 0:  # cached: no fetch response for this partition yet
                continue
            result[tp.partition] = max(0, high - known.get(tp.partition, low))
        return result

    def _lag_from_end_offsets(self, assignment: list[TopicPartition], known: dict[int, int]) -> dict[int, int]:
        """Every assigned partition's end offset from one ListOffsets request (timestamp -1: the
        latest; the last stable offset under read_committed, like the high watermark). The broker
        answers a connection's requests in order, so each one waits behind the consumer's pending
        long-poll fetch (up to fetch.wait.max.ms): asked one partition at a time, six partitions
        took ~3 s."""
        try:
            ends = self._consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, OFFSET_END_TIMESTAMP) for tp in assignment], timeout=10
            )
        except KafkaException as error:  # a broker restarting: unknown for now, not fatal
            self._warn("watermarks", f"end offsets unavailable: {error}")
            return {}
        result: dict[int, int] = {}
        for tp in ends:
            if tp.error is not None or tp.offset < 0:
                self._warn("watermarks", f"end offset of partition {tp.partition} unavailable: {tp.error}")
                continue
            position = known.get(tp.partition)
            if position is None:  # neither fetched nor committed: from the start of the log
                try:
                    position, _ = self._consumer.get_watermark_offsets(tp, timeout=5)
                except KafkaException:
                    continue
            result[tp.partition] = max(0, tp.offset - position)
        return result
