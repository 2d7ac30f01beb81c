"""DLQ replay: correct what can be corrected, republish it exactly once, park the rest.

One Kafka transaction per micro-batch of DLQ records:

1. consume up to `max_messages` records of `settings.dlq_topic` (own group,
   `settings.replay_group`, read_committed);
2. decide each record (pure): correct it with `planpipe.replay.rules`, route it
   with the capture side's `Router` (same key and sampling), or park it; then
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

import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from planpipe.contract import EnvelopeDecoder, Reason, encode_envelope
from planpipe.dlq import (
    H_CORRECTION_RULE,
    H_DETAIL,
    H_FIELD,
    H_REASON,
    H_SOURCE_FILE,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_STAGE,
    H_TRACE_ID,
    Headers,
    header_map,
)
from planpipe.kafka_config import consumer_config, producer_config
from planpipe.replay.rules import RULES, Corrected, Rule, correct
from planpipe.routing.router import Router, RoutingConfig
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.replay")

# Headers added to a republished envelope (the source ones reuse planpipe.dlq's names).
H_DLQ_TOPIC: Final = "planpipe-dlq-topic"
H_DLQ_PARTITION: Final = "planpipe-dlq-partition"
H_DLQ_OFFSET: Final = "planpipe-dlq-offset"
H_REPLAY_REASON: Final = "planpipe-replay-reason"
H_REPLAYED_AT: Final = "planpipe-replayed-at"

NO_RULES_APPLIED: Final = "none"
MISSING_REASON: Final = "<missing>"

# Extension point: DLQ reasons that say "the message was fine, a dependency was not"
# (none exist yet). Such messages are republished as they are, no rules applied,
# provided they still decode; a reason that is neither transient nor a `Reason` is parked.
TRANSIENT_REASONS: frozenset[str] = frozenset()

_KAFKA_TIMEOUT_S: Final = 30.0
_COMMIT_ATTEMPTS: Final = 5
_FAULT_ENV: Final = "PLANPIPE_FAULT_KILL_AT"
_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Crash-safety tests: SIGKILL ourselves at a named step (as in the ingest engine).

    PLANPIPE_FAULT_KILL_AT=<step>[:<batch number>]; steps `replay_after_produce`,
    `replay_before_commit`. Never set in production.
    """
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return
    step, _, nth = spec.partition(":")
    if step != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


_CONTRACT_REASONS: Final = frozenset(r.value for r in Reason)


class Disposition(enum.Enum):
    CORRECT = "correct"  # a contract problem: apply the rules
    RETRY = "retry"  # transient: republish unchanged
    PARK = "park"  # nothing we know how to handle


def disposition(reason: str | None) -> Disposition:
    if reason in TRANSIENT_REASONS:
        return Disposition.RETRY
    if reason in _CONTRACT_REASONS:
        return Disposition.CORRECT
    return Disposition.PARK


Coords = tuple[str, int, int]  # topic, partition, offset


def _header_pairs(headers: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None) -> Headers:
    # confluent-kafka hands back str or bytes (or None) values, as a list or a dict.
    pairs = list(headers.items()) if isinstance(headers, dict) else headers or []
    return [(name, value.encode() if isinstance(value, str) else (value or b"")) for name, value in pairs]


@dataclass(frozen=True, slots=True)
class Letter:
    """One DLQ record, with the DeadLetter headers read back."""

    coords: Coords
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    meta: dict[str, str]

    @classmethod
    def from_message(cls, message: Message) -> "Letter":
        headers = _header_pairs(message.headers())
        return cls(
            coords=(message.topic() or "", message.partition() or 0, message.offset() or 0),
            value=message.value() or b"",
            key=message.key(),
            headers=headers,
            meta=header_map(headers),
        )

    @property
    def reason(self) -> str | None:
        return self.meta.get(H_REASON) or None

    @property
    def source(self) -> Coords | None:
        """The coordinates of the record ingest rejected (router rejects have none)."""
        topic, partition, offset = (self.meta.get(h) for h in (H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET))
        if not (topic and partition and offset):
            return None
        try:
            return topic, int(partition), int(offset)
        except ValueError:
            return None

    @property
    def trace_id(self) -> str | None:
        return self.meta.get(H_TRACE_ID) or None


@dataclass(frozen=True, slots=True)
class Republish:
    letter: Letter
    value: bytes
    key: bytes
    rules: tuple[str, ...]
    trace_id: str | None


@dataclass(frozen=True, slots=True)
class Park:
    letter: Letter
    why: str
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Skip:
    letter: Letter
    outcome: Literal["sampled_out", "duplicate"]
    rules: tuple[str, ...]
    key: bytes | None


Decision = Republish | Park | Skip


def decide(
    letter: Letter, *, decoder: EnvelopeDecoder, router: Router, rules: Sequence[Rule] = RULES
) -> Republish | Park | Skip:
    """What to do with one DLQ record. Pure apart from the router's metrics."""
    reason = letter.reason
    kind = disposition(reason)
    if kind is Disposition.PARK:
        why = "no planpipe-reason header" if reason is None else f"unknown DLQ reason {reason!r}"
        return Park(letter, why, ())
    outcome = correct(
        letter.value,
        letter.meta,
        Reason(reason) if kind is Disposition.CORRECT and reason is not None else None,
        decoder=decoder,
        rules=rules if kind is Disposition.CORRECT else (),
    )
    if not isinstance(outcome, Corrected):
        return Park(letter, outcome.why, outcome.rules)
    routed = router.route_envelope(outcome.envelope)
    if not routed.sampled:
        # Sampling is deterministic per query hash: the capture side would have dropped it too.
        return Skip(letter, "sampled_out", outcome.rules, routed.key)
    trace_id = letter.trace_id or outcome.envelope.trace_id
    return Republish(letter, encode_envelope(outcome.envelope), routed.key, outcome.rules, trace_id)


def republish_headers(decision: Republish, replayed_at: float) -> list[tuple[str, bytes]]:
    """Original (non-planpipe) headers, trace-id, the DLQ and source coordinates, the rules."""
    letter = decision.letter
    headers = [(name, value) for name, value in letter.headers if not name.startswith("planpipe-")]
    if H_TRACE_ID not in letter.meta and decision.trace_id:
        headers.append((H_TRACE_ID, decision.trace_id.encode()))
    topic, partition, offset = letter.coords
    headers += [
        (H_CORRECTION_RULE, (",".join(decision.rules) or NO_RULES_APPLIED).encode()),
        (H_REPLAY_REASON, (letter.reason or MISSING_REASON).encode()),
        (H_DLQ_TOPIC, topic.encode()),
        (H_DLQ_PARTITION, str(partition).encode()),
        (H_DLQ_OFFSET, str(offset).encode()),
        (H_REPLAYED_AT, f"{replayed_at:.6f}".encode()),
    ]
    headers += [(name, letter.meta[name].encode()) for name in _SOURCE_HEADERS if name in letter.meta]
    return headers


_SOURCE_HEADERS: Final = (H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET, H_SOURCE_FILE, H_STAGE)


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


class _Deliveries:
    """Delivery reports of one transaction: errors, and the partitions written (each gets a
    transaction marker, which takes an offset no consumer sees)."""

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


def transactional_id(settings: Settings) -> str:
    # One id per replay group: a restarted replay fences (and aborts) its crashed predecessor.
    return f"planpipe-replay.{settings.replay_group}"


def _columns(rows: Sequence[Coords]) -> tuple[list[str], list[int], list[int]]:
    # Coordinates as three arrays, for `unnest(%s::text[], %s::int[], %s::bigint[])`.
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; headers and details may (they come from anywhere).
    return None if value is None else value.replace("\x00", "\ufffd")


class ReplayEngine:
    def __init__(
        self,
        settings: Settings,
        *,
        max_messages: int | None = None,
        max_wait_s: float | None = None,
        rules: Sequence[Rule] = RULES,
        routing: RoutingConfig | None = None,
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
        # The capture side's routing and sampling, so a corrected envelope gets the key it would have had.
        self.router = Router(routing or RoutingConfig(sample_rate_pct=settings.sample_rate_pct), decoder=self.decoder)
        self.progress = progress
        self._stop = threading.Event()
        self._conn = psycopg.connect(settings.pg_dsn, autocommit=True)
        self._check_schema()
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
        self._assignment_grace_s = float(str(conf["session.timeout.ms"])) / 1000 + 15
        self._consumer = Consumer(conf)

    def _check_schema(self) -> None:
        try:
            self._conn.execute("SELECT 1 FROM planpipe.dlq_parked, planpipe.dlq_replays LIMIT 0")
        except psycopg.errors.UndefinedTable:
            self._conn.close()
            raise RuntimeError("planpipe.dlq_parked is missing: run `planpipe migrate` (sql/003_replay.sql)") from None

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            self._conn.close()

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
            elif until_caught_up and self._caught_up(time.monotonic() - started):
                summary.caught_up = True
                break
        summary.seconds = round(time.monotonic() - started, 3)
        summary.final_lag = self.lag()
        return summary

    def _usable(self, record: Message) -> bool:
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
        logger.warning("transient consumer error: %s", error)
        return False

    def _caught_up(self, waited_s: float) -> bool:
        if not self._consumer.assignment():
            # Another member may own every partition; only after a session timeout is that final.
            return waited_s > self._assignment_grace_s
        lags = self.lag()
        return len(lags) == len(self._consumer.assignment()) and all(lag == 0 for lag in lags.values())

    def lag(self) -> dict[int, int]:
        """Per assigned DLQ partition: high watermark minus our position (unreadable ones omitted)."""
        try:
            assignment = self._consumer.assignment()
            if not assignment:
                return {}
            known = {tp.partition: tp.offset for tp in self._consumer.position(assignment) if tp.offset >= 0}
            unknown = [tp for tp in assignment if tp.partition not in known]
            if unknown:
                known.update(
                    {tp.partition: tp.offset for tp in self._consumer.committed(unknown, timeout=10) if tp.offset >= 0}
                )
        except KafkaException as error:  # a broker restarting: unknown for now, not fatal
            logger.warning("DLQ lag unavailable: %s", error)
            return {}
        result = {}
        for tp in assignment:
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except KafkaException as error:
                logger.warning("watermarks of DLQ partition %s unavailable: %s", tp.partition, error)
                continue
            result[tp.partition] = max(0, high - known.get(tp.partition, low))
        return result

    # -- one batch, one transaction ----------------------------------------------------------
    def _process(self, records: list[Message], summary: ReplaySummary) -> None:
        letters = [Letter.from_message(r) for r in records]
        decisions = self._deduplicate(
            [decide(x, decoder=self.decoder, router=self.router, rules=self.rules) for x in letters]
        )
        next_offsets: dict[tuple[str, int], int] = {}
        for letter in letters:
            topic, partition, offset = letter.coords
            next_offsets[(topic, partition)] = max(next_offsets.get((topic, partition), 0), offset + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]

        self._producer.begin_transaction()
        written = _Deliveries()
        recorded: int | None = None
        try:
            self._produce([d for d in decisions if isinstance(d, Republish)], written)
            _fault_point("replay_after_produce")
            self._producer.send_offsets_to_transaction(
                offsets, self._consumer.consumer_group_metadata(), _KAFKA_TIMEOUT_S
            )
            recorded = self._record(decisions, written)
            _fault_point("replay_before_commit")
            self._commit()
        except BaseException:
            self._abort()
            self._note_aborted(written, recorded)
            raise
        summary.transactions += 1
        for decision in decisions:
            summary.count(decision)
            if isinstance(decision, Park):
                logger.warning("parked %s:%d@%d: %s", *decision.letter.coords, decision.why)

    def _deduplicate(self, decisions: list[Decision]) -> list[Decision]:
        """Skip what was already handled, so nothing is republished or parked twice.

        Two cases. (1) The DLQ is at-least-once: a source record republished or parked
        from other DLQ coordinates is a duplicate. (2) A DLQ record recorded by another
        replay group was that group's to finish (e.g. a group created to re-read the
        DLQ). A row under our own coordinates from our own group is different: we see
        the record again only because that attempt's transaction aborted, so we redo it.
        """
        group = self.settings.replay_group
        handled_elsewhere: set[Coords] = set()
        coords = [d.letter.coords for d in decisions]
        for row in self._conn.execute(
            """WITH wanted (t, p, o) AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[]))
               SELECT dlq_topic, dlq_partition, dlq_offset FROM planpipe.dlq_replays
               JOIN wanted ON (dlq_topic, dlq_partition, dlq_offset) = (t, p, o) WHERE replay_group <> %s
               UNION
               SELECT dlq_topic, dlq_partition, dlq_offset FROM planpipe.dlq_parked
               JOIN wanted ON (dlq_topic, dlq_partition, dlq_offset) = (t, p, o) WHERE replay_group <> %s""",
            (*_columns(coords), group, group),
        ):
            handled_elsewhere.add((row[0], row[1], row[2]))

        handled: dict[Coords, set[Coords]] = {}  # source coordinates → DLQ coordinates that handled it
        sources = list({d.letter.source for d in decisions if d.letter.source is not None})
        if sources:
            for row in self._conn.execute(
                """WITH wanted (t, p, o) AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[]))
                   SELECT source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset
                   FROM planpipe.dlq_replays
                   JOIN wanted ON (source_topic, source_partition, source_offset) = (t, p, o)
                   WHERE outcome <> 'duplicate'
                   UNION ALL
                   SELECT source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset
                   FROM planpipe.dlq_parked
                   JOIN wanted ON (source_topic, source_partition, source_offset) = (t, p, o)""",
                _columns(sources),
            ):
                handled.setdefault((row[0], row[1], row[2]), set()).add((row[3], row[4], row[5]))

        out: list[Decision] = []
        for decision in decisions:
            letter = decision.letter
            source = letter.source
            others = handled.get(source, set()) - {letter.coords} if source is not None else set()
            if letter.coords in handled_elsewhere or others:
                key = decision.key if isinstance(decision, Republish | Skip) else None
                out.append(Skip(letter, "duplicate", decision.rules, key))
                continue
            if source is not None and not isinstance(decision, Skip):
                handled.setdefault(source, set()).add(letter.coords)  # a later copy in this batch
            out.append(decision)
        return out

    def _produce(self, republish: list[Republish], delivery: _Deliveries) -> None:
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

    def _record(self, decisions: list[Decision], written: _Deliveries) -> int | None:
        """Decisions and the transaction's footprint on the topic, in one PostgreSQL transaction;
        returns the replay_transactions row (None when nothing was written to the topic)."""
        parked, replays = [], []
        group = self.settings.replay_group
        for d in decisions:
            letter = d.letter
            source = letter.source or (None, None, None)
            meta = letter.meta
            if isinstance(d, Park):
                headers_json = msgspec.json.encode([[n, _text(v.decode(errors="replace"))] for n, v in letter.headers])
                parked.append(
                    (*letter.coords, letter.value, letter.key, headers_json.decode(),
                     _text(letter.reason), _text(meta.get(H_FIELD)), _text(meta.get(H_DETAIL)),
                     _text(meta.get(H_STAGE)), _text(d.why), list(d.rules), *source, _text(letter.trace_id), group)
                )  # fmt: skip
            else:
                outcome = "republished" if isinstance(d, Republish) else d.outcome
                key = d.key.decode(errors="replace") if d.key is not None else None
                target = self.settings.topic if isinstance(d, Republish) else None
                replays.append(
                    (*letter.coords, outcome, list(d.rules), _text(letter.reason), target, _text(key),
                     *source, _text(letter.trace_id), group)
                )  # fmt: skip
        with self._conn.transaction(), self._conn.cursor() as cur:
            if parked:
                cur.executemany(
                    """INSERT INTO planpipe.dlq_parked (dlq_topic, dlq_partition, dlq_offset, value, key, headers,
                           reason, field, detail, stage, why, rules_applied, source_topic, source_partition,
                           source_offset, trace_id, replay_group)
                       VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    parked,
                )
            if replays:
                cur.executemany(
                    """INSERT INTO planpipe.dlq_replays (dlq_topic, dlq_partition, dlq_offset, outcome, rules,
                           reason, target_topic, new_key, source_topic, source_partition, source_offset, trace_id,
                           replay_group)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    replays,
                )
            if not written.partitions:
                return None
            row = cur.execute(
                """INSERT INTO planpipe.replay_transactions (replay_group, target_topic, partitions, records)
                   VALUES (%s, %s, %s, %s) RETURNING id""",
                (group, self.settings.topic, sorted(written.partitions), written.records),
            ).fetchone()
            return int(row[0]) if row else None

    def _note_aborted(self, written: _Deliveries, recorded: int | None) -> None:
        """Aborted records and their abort markers still take offsets on the topic: say so, for
        reconciliation (best effort — the database may be what failed)."""
        if not written.partitions:
            return
        try:
            with self._conn.transaction():
                if recorded is not None:
                    self._conn.execute(
                        "UPDATE planpipe.replay_transactions SET outcome = 'aborted' WHERE id = %s", (recorded,)
                    )
                else:
                    self._conn.execute(
                        """INSERT INTO planpipe.replay_transactions
                               (replay_group, target_topic, partitions, records, outcome)
                           VALUES (%s, %s, %s, %s, 'aborted')""",
                        (self.settings.replay_group, self.settings.topic, sorted(written.partitions), written.records),
                    )
        except psycopg.Error as error:
            logger.warning("could not record the aborted replay transaction: %s", error)

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
) -> ReplaySummary:
    """Replay `settings.dlq_topic` into `settings.topic` until caught up (or `max_seconds`).

    Raises on a Kafka or PostgreSQL failure after aborting the open transaction;
    calling it again resumes from the last committed batch.
    """
    engine = ReplayEngine(settings, max_messages=max_messages, progress=progress)
    try:
        return engine.run(until_caught_up=until_caught_up, max_seconds=max_seconds)
    finally:
        engine.close()


def parked_messages(
    dsn: str, *, dlq_topic: str | None = None, limit: int = 50, reason: str | None = None
) -> list[dict[str, object]]:
    """Most recently parked first, with a short preview of the original bytes."""
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(
            """SELECT dlq_topic, dlq_partition, dlq_offset, reason, field, why, rules_applied, stage,
                      source_topic, source_partition, source_offset, trace_id, parked_at, length(value) AS size,
                      substring(value from 1 for 160) AS preview
               FROM planpipe.dlq_parked
               WHERE (%(topic)s::text IS NULL OR dlq_topic = %(topic)s)
                 AND (%(reason)s::text IS NULL OR reason = %(reason)s)
               ORDER BY parked_at DESC, dlq_topic, dlq_partition, dlq_offset LIMIT %(limit)s""",
            {"topic": dlq_topic, "reason": reason, "limit": limit},
        )
        names = [column.name for column in cursor.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        preview = row["preview"]
        row["preview"] = bytes(preview).decode(errors="replace") if isinstance(preview, bytes | memoryview) else ""
    return rows
