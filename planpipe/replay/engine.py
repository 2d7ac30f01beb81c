"""DLQ replay: correct what can be corrected, republish it exactly once, park the rest.

One Kafka transaction per micro-batch of DLQ records:

1. consume up to `max_messages` records of `settings.dlq_topic` (own group,
   `settings.replay_group`, read_committed);
2. decide each record (pure): correct it with `planpipe.replay.rules`, route it
   with the capture side's static rules (`planpipe.messaging.routes.StaticRouter`, or
   a router the caller injects: same key and sampling), or park it; then
   skip duplicates: a source record already handled from another DLQ record
   (the ingest engine's DLQ is at-least-once), or a DLQ record another replay
   group already recorded;
3. begin the transaction, produce the corrected envelopes to `settings.topic`
   and wait for their acks;
4. add the batch's next DLQ offsets to the transaction (`send_offsets_to_transaction`);
5. record parked and replayed messages in PostgreSQL (ON CONFLICT DO NOTHING,
   keyed by DLQ coordinates), committed before the Kafka transaction;
6. commit the Kafka transaction: the republished envelopes become visible to
   read_committed consumers (ingest) and the DLQ offsets advance, atomically.

A crash anywhere before 6 aborts the transaction (the next `init_transactions`
with the same transactional.id fences and aborts it); the batch is consumed
again, decided identically, and the PostgreSQL rows it already wrote are kept.
A crash after 6 loses nothing either. Because the transactional.id is derived
from the replay group, two replays of one group fence each other: run one.

Engine code never imports Dagster: the replay job calls `run_replay`.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from planpipe.contract import EnvelopeDecoder
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.messaging.consumer import ConsumerLoop, Deliveries, assignment_grace_s, fault_point
from planpipe.messaging.routes import RoutingConfig, StaticRouter
from planpipe.replay.decide import (
    MISSING_REASON,
    Decision,
    EnvelopeRouter,
    Letter,
    Park,
    Republish,
    decide,
    republish_headers,
)
from planpipe.replay.rules import RULES, Rule
from planpipe.replay.store import ReplayStore
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.replay")

_KAFKA_TIMEOUT_S: Final = 30.0
_COMMIT_ATTEMPTS: Final = 5
# Crash-safety tests kill the replay at these `fault_point` steps: replay_after_produce, replay_before_commit.


def _log_warning(_key: str, message: str) -> None:
    logger.warning(message)


@dataclass
class ReplaySummary:
    consumed: int = 0
    republished: int = 0
    parked: int = 0
    duplicates: int = 0
    sampled_out: int = 0
    transactions: int = 0
    # rule name → republished envelopes it helped correct
    by_rule: dict[str, int] = field(default_factory=dict)
    # DLQ reason → {"consumed": n, "republished": n, "parked": n, ...}
    by_reason: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    caught_up: bool = False
    final_lag: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def count(self, decision: Decision) -> None:
        self.consumed += 1
        per_reason = self.by_reason.setdefault(decision.letter.reason or MISSING_REASON, {})
        per_reason["consumed"] = per_reason.get("consumed", 0) + 1
        if isinstance(decision, Republish):
            self.republished += 1
            outcome = "republished"
            for rule in decision.rules:
                self.by_rule[rule] = self.by_rule.get(rule, 0) + 1
        elif isinstance(decision, Park):
            self.parked += 1
            outcome = "parked"
        else:
            outcome = decision.outcome
            if outcome == "duplicate":
                self.duplicates += 1
            else:
                self.sampled_out += 1
        per_reason[outcome] = per_reason.get(outcome, 0) + 1


def transactional_id(settings: Settings) -> str:
    # One id per replay group: a restarted replay fences (and aborts) its crashed predecessor.
    return f"planpipe-replay.{settings.replay_group}"


class ReplayEngine(ConsumerLoop):
    def __init__(
        self,
        settings: Settings,
        *,
        max_messages: int | None = None,
        max_wait_s: float | None = None,
        rules: Sequence[Rule] = RULES,
        routing: RoutingConfig | None = None,
        router: EnvelopeRouter | None = None,
        progress: Callable[[ReplaySummary], None] | None = None,
        client_id: str = "planpipe-replay",
    ) -> None:
        if settings.dlq_topic == settings.topic:
            raise ValueError("the DLQ topic and the main topic must differ")
        self.settings = settings
        self.max_messages = max_messages or settings.batch_max_messages
        self.max_wait_s = max_wait_s if max_wait_s is not None else settings.batch_max_wait_s
        self.rules = tuple(rules)
        self.decoder = EnvelopeDecoder(settings.max_plan_bytes)
        # The capture side's static routing and sampling, so a corrected envelope gets the key it
        # would have had; a caller may inject the capture side's own `Router` instead.
        self.router: EnvelopeRouter = router or StaticRouter(
            routing or RoutingConfig(sample_rate_pct=settings.sample_rate_pct)
        )
        self.progress = progress
        self._stop = threading.Event()
        self._store = ReplayStore(settings.pg_dsn, replay_group=settings.replay_group, topic=settings.topic)
        extra: dict[str, str | int | bool] = {
            "transactional.id": transactional_id(settings),
            "client.id": client_id,
            "linger.ms": 5,
        }
        self._producer = Producer(producer_config(settings, **extra))
        # Before the consumer joins: this aborts a crashed predecessor's open transaction,
        # whose pending offset commit would otherwise block our offset fetch.
        self._producer.init_transactions(_KAFKA_TIMEOUT_S)
        conf = consumer_config(settings, settings.replay_group, **{"client.id": client_id})
        self._assignment_grace_s = assignment_grace_s(conf)
        self._next_offsets: dict[int, int] = {}
        self._warn = _log_warning
        self._consumer = Consumer(conf)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            self._store.close()

    # -- the loop -------------------------------------------------------------------------
    def run(self, *, until_caught_up: bool = True, max_seconds: float | None = None) -> ReplaySummary:
        summary = ReplaySummary()
        started = time.monotonic()
        self._consumer.subscribe([self.settings.dlq_topic])
        while not self._stop.is_set():
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            records = [r for r in self._consumer.consume(self.max_messages, self.max_wait_s) if self._usable(r)]
            if records:
                self._process(records, summary)
                if self.progress is not None:
                    self.progress(summary)
            elif until_caught_up and self._caught_up(waited_s=time.monotonic() - started):
                summary.caught_up = True
                break
        summary.seconds = round(time.monotonic() - started, 3)
        summary.final_lag = self.lag()
        return summary

    # -- one batch, one transaction ----------------------------------------------------------
    def _process(self, records: list[Message], summary: ReplaySummary) -> None:
        letters = [Letter.from_message(r) for r in records]
        decisions = self._store.deduplicate(
            [decide(x, decoder=self.decoder, router=self.router, rules=self.rules) for x in letters]
        )
        next_offsets: dict[tuple[str, int], int] = {}
        for letter in letters:
            topic, partition, offset = letter.coords
            next_offsets[(topic, partition)] = max(next_offsets.get((topic, partition), 0), offset + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]

        self._producer.begin_transaction()
        written = Deliveries()
        recorded: int | None = None
        try:
            self._produce([d for d in decisions if isinstance(d, Republish)], written)
            fault_point("replay_after_produce")
            self._producer.send_offsets_to_transaction(
                offsets, self._consumer.consumer_group_metadata(), _KAFKA_TIMEOUT_S
            )
            recorded = self._store.record(decisions, written.partitions, written.records)
            fault_point("replay_before_commit")
            self._commit()
        except BaseException:
            self._abort()
            self._store.note_aborted(written.partitions, written.records, recorded)
            raise
        summary.transactions += 1
        for decision in decisions:
            summary.count(decision)
            if isinstance(decision, Park):
                logger.warning("parked %s:%d@%d: %s", *decision.letter.coords, decision.why)

    def _produce(self, republish: list[Republish], delivery: Deliveries) -> None:
        if not republish:
            return
        now = time.time()
        for decision in republish:
            headers: list[tuple[str, str | bytes | None]] = [*republish_headers(decision, now)]
            self._producer.produce(
                self.settings.topic, value=decision.value, key=decision.key, headers=headers, on_delivery=delivery
            )
            self._producer.poll(0)
        # Acknowledged before the offsets join the transaction: nothing advances on a failed send.
        remaining = self._producer.flush(_KAFKA_TIMEOUT_S)
        if remaining or delivery.errors:
            raise KafkaException(f"republish failed ({remaining} unsent): {delivery.errors[:3]}")

    def _commit(self) -> None:
        # librdkafka: a retriable commit error may be retried as is; anything else means abort.
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                self._producer.commit_transaction(_KAFKA_TIMEOUT_S)
                return
            except KafkaException as error:
                kafka_error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else None
                if kafka_error is None or not kafka_error.retriable() or attempt == _COMMIT_ATTEMPTS:
                    raise
                logger.warning("transaction commit failed (attempt %d), retrying: %s", attempt, kafka_error)

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(_KAFKA_TIMEOUT_S)
        except KafkaException as error:  # fatal (e.g. fenced): the next init_transactions aborts it
            logger.warning("could not abort the replay transaction: %s", error)


def run_replay(
    settings: Settings,
    *,
    max_seconds: float | None = None,
    until_caught_up: bool = True,
    max_messages: int | None = None,
    progress: Callable[[ReplaySummary], None] | None = None,
    router: EnvelopeRouter | None = None,
) -> ReplaySummary:
    """Replay `settings.dlq_topic` into `settings.topic` until caught up (or `max_seconds`).

    Raises on a Kafka or PostgreSQL failure after aborting the open transaction;
    calling it again resumes from the last committed batch.
    """
    engine = ReplayEngine(settings, max_messages=max_messages, progress=progress, router=router)
    try:
        return engine.run(until_caught_up=until_caught_up, max_seconds=max_seconds)
    finally:
        engine.close()
