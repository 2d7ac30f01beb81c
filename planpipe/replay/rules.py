"""Table-driven corrections for dead-lettered envelopes (pure, no I/O).

Each `Rule` is a small function over the JSON object of a rejected message and
its DLQ headers. It returns a corrected copy, or None when it has nothing to
do. Rules only transform what is present (rename, re-type, re-scale,
re-serialize, or copy a value the producer put in a header): they never invent
a value. `correct` applies them in the fixed order of `RULES` and accepts the
result only if the contract's own decoder (and the plan parser the ingest
engine uses) accepts it; everything else is reported as uncorrectable, to be
parked.

Gating by DLQ reason. A rule runs only for the reasons it can fix. A message
often has several problems, but the decoder stops at the first one, so the DLQ
reason names only that one. `correct` therefore re-decodes after each pass and
adds the new reason to the set the rules are gated on, until the envelope
decodes or a pass neither changes anything nor reveals a new reason.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import msgspec

from planpipe.contract import ContractViolation, Envelope, EnvelopeDecoder, Reason
from planpipe.plans.fingerprint import PlanParseError, fingerprint

JsonObject: TypeAlias = dict[str, Any]
RuleFn: TypeAlias = Callable[[JsonObject, Mapping[str, str]], JsonObject | None]

H_CLUSTER_ID: Final = "cluster-id"

_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    description: str
    reasons: frozenset[Reason]
    fix: RuleFn

    def apply(self, raw: bytes, headers: Mapping[str, str]) -> bytes | None:
        """Corrected JSON bytes, or None when the rule does not apply (ungated by reason)."""
        fields = parse_object(raw)
        if fields is None:
            return None
        fixed = self.fix(fields, headers)
        return None if fixed is None else _encoder.encode(fixed)


def parse_object(raw: bytes) -> JsonObject | None:
    """The message as a JSON object, or None if it is not one (nothing to correct then)."""
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _same(a: object, b: object) -> bool:
    # Compare encodings: `1 == 1.0 == True` in Python, but they are different JSON.
    return _encoder.encode(a) == _encoder.encode(b)


# --- (a) legacy and camelCase field names ----------------------------------------------

LEGACY_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "queryHash": "query_hash",
        "query_id": "query_hash",
        "clusterId": "cluster_id",
        "plan": "plan_text",
        "planText": "plan_text",
        "rows": "actual_rows",
        "actualRows": "actual_rows",
        "duration_ms": "total_time_ms",
        "durationMs": "total_time_ms",
        "totalTimeMs": "total_time_ms",
        "ts": "execution_timestamp",
        "timestamp": "execution_timestamp",
        "executionTimestamp": "execution_timestamp",
        "queryType": "query_type",
        "queryText": "query_text",
        "traceId": "trace_id",
        "publishedAt": "published_at",
        "routeTag": "route_tag",
    }
)


def legacy_field_names(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """Rename legacy/camelCase fields to the contract's names.

    When a field arrives under several names (or also under its contract name)
    the values must agree; if they differ the group is left alone: picking one
    would be a guess, and the decoder will then reject the message so it is parked.
    """
    groups: dict[str, list[str]] = {}
    for name in fields:
        target = LEGACY_NAMES.get(name)
        if target is not None:
            groups.setdefault(target, []).append(name)
    agreed: set[str] = set()
    for target, aliases in groups.items():
        values = [fields[a] for a in aliases] + ([fields[target]] if target in fields else [])
        if all(_same(values[0], v) for v in values[1:]):
            agreed.update(aliases)
    if not agreed:
        return None
    out: JsonObject = {}
    for name, value in fields.items():
        # The first spelling met keeps its place; the others carry the same value.
        out.setdefault(LEGACY_NAMES[name] if name in agreed else name, value)
    return out


# --- (b) numbers sent as strings ------------------------------------------------------

_FLOAT_TEXT: Final = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_INT_TEXT: Final = re.compile(r"-?\d+")
FLOAT_FIELDS: Final = ("execution_timestamp", "total_time_ms", "published_at")
INT_FIELDS: Final = ("actual_rows",)


def _number_from_text(text: str, *, integer: bool) -> int | float | None:
    # A strict JSON-number grammar: Python's float() would also take "nan", "inf" and "1_0".
    text = text.strip()
    if integer:
        return int(text) if _INT_TEXT.fullmatch(text) else None
    if not _FLOAT_TEXT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def numeric_strings(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """Numbers sent as strings: "12.5" → 12.5 for float fields, "42" → 42 for `actual_rows`.

    Only strings that are exactly a decimal number convert; "42.5" for a row
    count, "n/a" or "inf" stay as they are (and the message is parked).
    """
    out = dict(fields)
    changed = False
    for name, integer in [(f, False) for f in FLOAT_FIELDS] + [(f, True) for f in INT_FIELDS]:
        value = fields.get(name)
        if isinstance(value, str):
            number = _number_from_text(value, integer=integer)
            if number is not None:
                out[name] = number
                changed = True
    return out if changed else None


# --- (c) unit mix-ups ---------------------------------------------------------------------


def _plain_number(value: object) -> float | None:
    if isinstance(value, bool):  # bool is an int subclass; `true` is not a duration
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            return None
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        # Shared with `numeric_strings`: a string `total_time_s` is reported as an
        # unknown field, never as a wrong type, so that rule would not be gated in.
        return _number_from_text(value, integer=False)
    return None


def total_time_seconds(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """`total_time_s` (seconds) → `total_time_ms` = value × 1000.

    If `total_time_ms` is also present it must agree (then the seconds copy is
    dropped); two different durations are left for a human.
    """
    if "total_time_s" not in fields:
        return None
    seconds = _plain_number(fields["total_time_s"])
    if seconds is None:
        return None
    # Rounded to the nanosecond: hides binary float noise (0.0123 * 1000), loses nothing EXPLAIN reports.
    millis = round(seconds * 1000, 6)
    existing = fields.get("total_time_ms")
    if existing is not None and not (
        isinstance(existing, int | float) and not isinstance(existing, bool) and math.isclose(existing, millis)
    ):
        return None
    out = {}
    for key, value in fields.items():
        if key == "total_time_s":
            out["total_time_ms"] = existing if existing is not None else millis
        elif key != "total_time_ms":
            out[key] = value
    return out


EPOCH_SECONDS_MAX: Final = 1e11  # the contract's bound: year 5138 in seconds, 1973 in milliseconds
EPOCH_FIELDS: Final = ("execution_timestamp", "published_at")


def timestamp_milliseconds(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """Epoch timestamps sent in milliseconds (> 1e11) → seconds (/1000).

    Only when the result is a valid epoch in seconds: a value that is still too
    large after /1000 is in micro- or nanoseconds, and we do not guess which.
    """
    out = dict(fields)
    changed = False
    for name in EPOCH_FIELDS:
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if EPOCH_SECONDS_MAX < value <= EPOCH_SECONDS_MAX * 1000:
            out[name] = value / 1000
            changed = True
    return out if changed else None


# --- (d) cluster id from the header ------------------------------------------------------


def cluster_id_from_header(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """Missing/null/empty `cluster_id` ← the `cluster-id` header the capture agent set.

    The DLQ record carries the original record's headers (see `DeadLetter.headers`),
    so this is the producer's own value, not a guess.
    """
    current = fields.get("cluster_id")
    if current is not None and current != "":
        return None
    cluster = headers.get(H_CLUSTER_ID, "").strip()
    if not cluster:
        return None
    out = dict(fields)
    out["cluster_id"] = cluster
    return out


# --- (e) plan sent as JSON instead of text -----------------------------------------------


def plan_text_serialized(fields: JsonObject, headers: Mapping[str, str]) -> JsonObject | None:
    """`plan_text` sent as a JSON array/object (the EXPLAIN output itself) → its JSON text."""
    plan = fields.get("plan_text")
    if not isinstance(plan, dict | list):
        return None
    out = dict(fields)
    out["plan_text"] = _encoder.encode(plan).decode()
    return out


def _rule(fn: RuleFn, *reasons: Reason) -> Rule:
    doc = (fn.__doc__ or "").strip().splitlines()
    return Rule(name=fn.__name__, description=doc[0] if doc else fn.__name__, reasons=frozenset(reasons), fix=fn)


# The fixed order matters: names first (so later rules find the contract's fields),
# then types, then units (on numbers), then the missing value, then the plan's form.
RULES: Final[tuple[Rule, ...]] = (
    _rule(legacy_field_names, Reason.UNKNOWN_FIELD, Reason.MISSING_FIELD),
    _rule(numeric_strings, Reason.WRONG_TYPE),
    _rule(total_time_seconds, Reason.UNKNOWN_FIELD, Reason.MISSING_FIELD),
    _rule(timestamp_milliseconds, Reason.OUT_OF_RANGE),
    _rule(cluster_id_from_header, Reason.MISSING_FIELD, Reason.WRONG_TYPE, Reason.OUT_OF_RANGE),
    _rule(plan_text_serialized, Reason.WRONG_TYPE),
)
RULES_BY_NAME: Final[Mapping[str, Rule]] = MappingProxyType({r.name: r for r in RULES})


# --- applying them -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Corrected:
    envelope: Envelope
    rules: tuple[str, ...]  # in the order applied; empty if the message was valid as it was


@dataclass(frozen=True, slots=True)
class Uncorrectable:
    why: str
    rules: tuple[str, ...]  # rules applied before giving up (their result still did not decode)


Correction = Corrected | Uncorrectable


def correct(
    raw: bytes,
    headers: Mapping[str, str],
    reason: Reason | None,
    *,
    decoder: EnvelopeDecoder,
    rules: Sequence[Rule] = RULES,
    check_plan: Callable[[str], object] | None = fingerprint,
) -> Correction:
    """Apply every applicable rule once, in order; accept only what the decoder accepts.

    `reason` is the DLQ reason (None: not a contract rejection, so no rule is gated in
    until the decoder itself names a problem).

    `check_plan` (default: the ingest engine's fingerprint) must accept the plan
    text too, or the republished envelope would come straight back to the DLQ.
    """
    fields = parse_object(raw)
    if fields is None:
        why = "the payload is not a JSON object"
        return Uncorrectable(f"{reason.value}: {why}" if reason is not None else why, ())
    applied: list[str] = []
    seen = {reason} if reason is not None else set()
    candidate = raw
    while True:
        progressed = False
        for rule in rules:
            if rule.name in applied or not (rule.reasons & seen):
                continue
            fixed = rule.fix(fields, headers)
            if fixed is not None and not _same(fixed, fields):
                fields = fixed
                applied.append(rule.name)
                progressed = True
        if applied:
            candidate = _encoder.encode(fields)
        try:
            envelope = decoder.decode(candidate)
        except ContractViolation as violation:
            if progressed or violation.reason not in seen:
                seen.add(violation.reason)
                continue
            return Uncorrectable(str(violation), tuple(applied))
        break
    if check_plan is not None:
        try:
            check_plan(envelope.plan_text)
        except PlanParseError as error:
            return Uncorrectable(f"{Reason.PLAN_UNPARSEABLE.value} (plan_text): {error}", tuple(applied))
    return Corrected(envelope, tuple(applied))
