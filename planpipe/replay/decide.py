"""What the DLQ replay does with one dead letter: correct and re-route it, retry it, or park it.

Pure (apart from what an injected router counts): the same letter always gets the same decision, which is
what makes a replayed batch after a crash decide identically.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from confluent_kafka import Message

from planpipe.contract import Envelope, EnvelopeDecoder, Reason, encode_envelope
from planpipe.messaging.headers import (
    H_CORRECTION_RULE,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_TOPIC,
    H_REASON,
    H_REPLAY_REASON,
    H_REPLAYED_AT,
    H_SOURCE_FILE,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_STAGE,
    H_TRACE_ID,
    OWN_PREFIX,
    as_header_list,
    header_map,
)
from planpipe.replay.rules import RULES, Corrected, Rule, correct


class Routed(Protocol):
    """What re-routing tells the replay: the Kafka key, and whether the sampler keeps it."""

    @property
    def key(self) -> bytes: ...
    @property
    def sampled(self) -> bool: ...


class EnvelopeRouter(Protocol):
    """Re-routes a corrected envelope. Injected by the caller: `messaging.routes.StaticRouter`
    by default, or the capture side's `routing.router.Router` (both fit)."""

    def route_envelope(self, envelope: Envelope, /) -> Routed: ...


NO_RULES_APPLIED: Final = "none"
MISSING_REASON: Final = "<missing>"

# Extension point: DLQ reasons that say "the message was fine, a dependency was not"
# (none exist yet). Such messages are republished as they are, no rules applied,
# provided they still decode; a reason that is neither transient nor a `Reason` is parked.
TRANSIENT_REASONS: frozenset[str] = frozenset()


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
        headers = as_header_list(message.headers())
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
    letter: Letter, *, decoder: EnvelopeDecoder, router: EnvelopeRouter, rules: Sequence[Rule] = RULES
) -> Republish | Park | Skip:
    """What to do with one DLQ record. Pure apart from what `router` counts."""
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
    headers = [(name, value) for name, value in letter.headers if not name.startswith(OWN_PREFIX)]
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
