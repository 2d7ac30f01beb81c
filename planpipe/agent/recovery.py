"""Start-up reconciliation after a crash: nothing lost, nothing published twice.

What can be in doubt when the agent starts:

* an open intent: a batch handed to the producer or Redis whose cursor commit
  never happened. Its records may be in Kafka, the spool or Redis — or nowhere.
* a spool row that Kafka acknowledged but whose deletion never happened (the
  producer's drain or librdkafka's retry was acked right before the kill).
* a Redis entry that the drainer handed to the producer (now in Kafka or the
  spool) but never deleted.

Recovery reads the capture ids of this agent in Kafka from `scan_from` on, in
the spool and in Redis, then: deletes spool rows already in Kafka, deletes
Redis entries already in Kafka or the spool, and records the in-doubt ids found
anywhere as published (counted, and skipped when the log is read again). An
in-doubt id found nowhere is simply read and published again. It runs before
the producer starts (the spool is not being drained) and is idempotent: a
crash during recovery repeats it.

Needs Kafka to answer: without it, an in-doubt record may or may not be in the
log, so recovery waits (the log keeps the entries meanwhile).

A produce request the dead process sent just before the kill may still be in the
broker's socket or request queue, or appended but not yet below the high watermark:
a scan that ran before the broker finished it would miss the record and the entry
would be published again. So the scan waits until `settle_s` after the dead
process's last heartbeat (`AgentState.alive_at`, written every `HEARTBEAT_S`): by
then the broker has appended it or answered it with an error (request.timeout.ms).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaException

from planpipe.agent.handoff import Stopped
from planpipe.agent.ledger import H_CAPTURE_ID, agent_prefix, find_in_kafka
from planpipe.agent.state import AgentState
from planpipe.routing.redis_queue import QueuedRecord, QueueUnavailable, RedisQueue
from planpipe.routing.spool import Spool
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.agent.recovery")

HEARTBEAT_S = 1.0  # how often a running agent records that it is alive (AgentState.mark_alive)


@dataclass
class RecoveryReport:
    in_doubt: int = 0
    found_in_kafka: int = 0
    found_in_spool: int = 0
    found_in_redis: int = 0
    spool_duplicates_removed: int = 0
    redis_duplicates_removed: int = 0
    scanned: bool = False
    settle_waited_s: float = 0.0  # waited for the dead process's last requests before the scan
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _spool_ids(spool: Spool, prefix: bytes) -> dict[str, tuple[int, str]]:
    """capture id → (spool seq, topic) for this agent's rows."""
    found: dict[str, tuple[int, str]] = {}
    after = 0
    while batch := spool.peek_batch(1000, after_seq=after):
        for row in batch:
            for name, value in row.record.headers:
                if name == H_CAPTURE_ID and value.startswith(prefix):
                    found[value.decode()] = (row.seq, row.record.topic)
        after = batch[-1].seq
    return found


def recover(
    settings: Settings,
    agent: str,
    state: AgentState,
    *,
    redis_queue: RedisQueue | None,
    stop: threading.Event,
    retry_s: float = 5.0,
    settle_s: float = 35.0,
    on_wait: Callable[[str], None] = lambda _why: None,
) -> RecoveryReport:
    started = time.monotonic()
    report = RecoveryReport()
    prefix = agent_prefix(agent)
    intents = state.open_intents()
    in_doubt = {cid for intent in intents for cid in intent.capture_ids}
    report.in_doubt = len(in_doubt)

    with Spool(settings.spool_path) as spool:
        spooled = _spool_ids(spool, prefix)
        queued = _redis_entries(redis_queue, stop, retry_s, on_wait)
        if not (in_doubt or spooled or queued):
            return report
        report.settle_waited_s = _settle(state, settle_s, stop, on_wait)
        in_kafka = _kafka_ids(settings, agent, state, stop, retry_s, on_wait)
        report.scanned = True
        duplicates = [seq for cid, (seq, _topic) in spooled.items() if cid in in_kafka]
        report.spool_duplicates_removed = spool.ack(duplicates)

    redis_duplicates = [entry for cid, entry in queued.items() if cid in in_kafka or cid in spooled]
    if redis_queue is not None and redis_duplicates:
        report.redis_duplicates_removed = redis_queue.delete(redis_duplicates)

    found: dict[str, str] = {}
    for cid in in_doubt:
        if cid in in_kafka:
            found[cid] = in_kafka[cid]
            report.found_in_kafka += 1
        elif cid in spooled:
            found[cid] = spooled[cid][1]
            report.found_in_spool += 1
        elif cid in queued:
            found[cid] = queued[cid].record.topic
            report.found_in_redis += 1
    state.resolve_recovery([intent.id for intent in intents], found)
    report.seconds = round(time.monotonic() - started, 3)
    logger.warning("agent recovery: %s", report.as_dict())
    return report


def _settle(state: AgentState, settle_s: float, stop: threading.Event, on_wait: Callable[[str], None]) -> float:
    """Wait until a request the previous process sent can no longer become visible after the scan."""
    alive_at = state.alive_at()
    if alive_at is None:
        return 0.0
    until = alive_at + HEARTBEAT_S + settle_s
    waited = max(0.0, until - time.time())
    if waited > 0:
        on_wait(f"recovery waits {waited:.0f} s for requests of the previous process still in flight")
        if stop.wait(waited):
            raise Stopped
    return round(waited, 3)


def _redis_entries(
    queue: RedisQueue | None, stop: threading.Event, retry_s: float, on_wait: Callable[[str], None]
) -> dict[str, QueuedRecord]:
    if queue is None:
        return {}
    while True:
        try:
            return {entry.capture_id: entry for entry in queue.scan() if entry.capture_id is not None}
        except QueueUnavailable as error:
            on_wait(f"recovery waits for Redis: {error}")
            if stop.wait(retry_s):
                raise


def _kafka_ids(
    settings: Settings,
    agent: str,
    state: AgentState,
    stop: threading.Event,
    retry_s: float,
    on_wait: Callable[[str], None],
) -> dict[str, str]:
    while True:
        try:
            return find_in_kafka(settings, agent, state.scan_from(), stop=stop.is_set)
        except KafkaException as error:
            on_wait(f"recovery waits for Kafka: {error}")
            if stop.wait(retry_s):
                raise
