"""The envelope contract shared by every stage, and the one decoder they all use.

An envelope is the immutable telemetry object the routing guide describes: one
`EXPLAIN (ANALYZE, FORMAT JSON)` observation of one statement on one cluster.
Anything that does not decode into an `Envelope` is rejected with a
machine-readable `Reason` (and the field it concerns) so the caller can send the
original bytes, untouched, to the dead-letter queue.
"""

import enum
import json
import math
import re
from typing import Annotated, Final, Literal

import msgspec

from planpipe.errors import PlanpipeError

DEFAULT_MAX_PLAN_BYTES: Final = 8 * 1024 * 1024

Priority = Literal["low", "standard", "critical", "regression_candidate"]
PRIORITIES: Final[tuple[Priority, ...]] = ("low", "standard", "critical", "regression_candidate")

Route = Literal["critical", "baseline", "ddl"]
ROUTES: Final[tuple[Route, ...]] = ("critical", "baseline", "ddl")

# Upper bounds keep values finite (msgspec turns 1e999 into inf) and catch unit
# mix-ups early: 1e12 ms is ~31 years, 1e11 s is the year 5138.
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_EpochSeconds = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
_Millis = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
# int64: what PostgreSQL `bigint` and Parquet can hold; a larger count would be
# accepted here and then poison the baseline transaction downstream.
_Rows = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One captured plan. Unknown fields are rejected so schema drift is seen at the edge."""

    query_hash: _NonEmpty
    execution_timestamp: _EpochSeconds
    cluster_id: _NonEmpty
    plan_text: str
    actual_rows: _Rows
    total_time_ms: _Millis
    query_type: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    query_text: str | None = None
    trace_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    published_at: _EpochSeconds | None = None
    # Explicit routing tag set by the capture agent; it wins over every rule.
    route_tag: Route | None = None
    # Explicit priority set by the capture agent (e.g. `low` for bulk captures).
    priority: Priority | None = None


REQUIRED_FIELDS: Final = (
    "query_hash",
    "execution_timestamp",
    "cluster_id",
    "plan_text",
    "actual_rows",
    "total_time_ms",
)


class Reason(enum.StrEnum):
    """Why an envelope was rejected; travels in the DLQ `reason` header."""

    EMPTY = "empty_payload"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    PLAN_TOO_LARGE = "plan_too_large"
    PLAN_UNPARSEABLE = "plan_unparseable"
    # PostgreSQL text and jsonb cannot hold U+0000; the envelope is rejected whole
    # (the DLQ keeps the original bytes) rather than silently stripped.
    NUL_CHARACTER = "nul_character"
    # The same field twice: JSON decoders disagree on which value wins, so the
    # envelope is ambiguous and rejected.
    DUPLICATE_KEY = "duplicate_key"
    # A sink (PostgreSQL or the Parquet writer) refused the record for a data
    # reason the contract did not foresee; set by the ingest engine, never here.
    SINK_REJECTED = "sink_rejected"


class ContractViolation(PlanpipeError):
    # A plain exception, not a frozen dataclass: `contextlib.contextmanager`
    # assigns `__traceback__` on exceptions passing through a `with`, which a
    # frozen slots dataclass turns into a TypeError. Passing the fields to
    # `Exception.__init__` also keeps it picklable.
    def __init__(self, reason: Reason, field: str | None, detail: str) -> None:
        super().__init__(reason, field, detail)
        self.reason = reason
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.reason}{where}: {self.detail}"


_TEXT_FIELDS: Final = ("query_hash", "cluster_id", "plan_text", "query_type", "query_text", "trace_id")
# A `\u0000` escape inside the plan JSON (preceded by an even number of backslashes,
# so it is an escape and not the literal text "\\u0000") decodes to U+0000 when the
# plan is parsed and would poison the jsonb plan catalog.
_PLAN_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_AT_PATH = re.compile(r" - at `\$\.?([^`\[]*)")
_CONSTRAINT = re.compile(r"Expected `[^`]+` (?:[<>]=?|of length)")


def _violation_from(error: msgspec.ValidationError) -> ContractViolation:
    text = str(error)
    if m := _MISSING.search(text):
        return ContractViolation(Reason.MISSING_FIELD, m.group(1), text)
    if m := _UNKNOWN.search(text):
        return ContractViolation(Reason.UNKNOWN_FIELD, m.group(1), text)
    path = _AT_PATH.search(text)
    field = path.group(1) or None if path else None
    if field is None and text.startswith("Expected `object`"):
        return ContractViolation(Reason.NOT_AN_OBJECT, None, text)
    if _CONSTRAINT.search(text):
        return ContractViolation(Reason.OUT_OF_RANGE, field, text)
    if text.startswith(("Invalid enum value", "Number out of range")):
        return ContractViolation(Reason.OUT_OF_RANGE, field, text)
    return ContractViolation(Reason.WRONG_TYPE, field, text)


class EnvelopeDecoder:
    """Typed, strict decoder: the only way bytes become an `Envelope`."""

    def __init__(self, max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES) -> None:
        self.max_plan_bytes = max_plan_bytes
        self._decoder = msgspec.json.Decoder(Envelope)

    def decode(self, raw: bytes | bytearray | memoryview | None) -> Envelope:
        if not raw:
            raise ContractViolation(Reason.EMPTY, None, "empty message value")
        try:
            envelope = self._decoder.decode(raw)
        except msgspec.ValidationError as error:
            raise _violation_from(error) from None
        except UnicodeDecodeError as error:
            # msgspec validates UTF-8 lazily, inside strings, and lets this escape.
            raise ContractViolation(Reason.NOT_UTF8, None, str(error)) from None
        except msgspec.DecodeError as error:
            reason = Reason.NOT_UTF8 if "UTF-8" in str(error) else Reason.MALFORMED_JSON
            raise ContractViolation(reason, None, str(error)) from None
        # `plan_text` length in characters is a lower bound of its UTF-8 size;
        # only encode when the cheap check is inconclusive.
        plan_chars = len(envelope.plan_text)
        if plan_chars * 4 > self.max_plan_bytes:
            plan_bytes = len(envelope.plan_text.encode())
            if plan_bytes > self.max_plan_bytes:
                raise ContractViolation(
                    Reason.PLAN_TOO_LARGE,
                    "plan_text",
                    f"{plan_bytes} bytes > limit {self.max_plan_bytes}",
                )
        _reject_duplicate_keys(raw)
        _reject_nul_characters(envelope)
        if not envelope.plan_text or envelope.plan_text.isspace():  # blank (`strip()` would copy it)
            raise ContractViolation(Reason.OUT_OF_RANGE, "plan_text", "plan_text is empty")
        if not (math.isfinite(envelope.total_time_ms) and math.isfinite(envelope.execution_timestamp)):
            raise ContractViolation(Reason.OUT_OF_RANGE, "total_time_ms", "non-finite number")
        return envelope


def _members_fill_the_object(data: bytes) -> bool:
    """True when the object's distinct members account for every byte: then no key repeats.

    A decode into `dict[str, Raw]` keeps one member per key (the last) with its value's exact
    bytes, without decoding the plan. `{` + `"key":value` joined by `,` + `}` spans the whole
    payload only if nothing else is there: a repeated member, whitespace or an escaped key would
    add bytes. Exact, and ~10x cheaper than counting each field name in the payload.
    """
    try:
        members = _MEMBERS.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False
    if not members:
        return len(data) == 2
    # Braces and commas (n + 1), then `"key":` (3 + key) and the value of each member.
    keys = "".join(members).encode()
    return 1 + 4 * len(members) + len(keys) + sum(map(len, members.values())) == len(data)


_MEMBERS: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _reject_duplicate_keys(raw: bytes | bytearray | memoryview) -> None:
    """Reject an envelope that names a field twice (msgspec, like most decoders, keeps the last).

    Cheap exact screen first (`_members_fill_the_object`); only a payload it cannot clear
    (pretty-printed, escaped keys, or a real duplicate) pays for a full parse that sees every key.
    """
    data = raw if isinstance(raw, bytes) else bytes(raw)
    if _members_fill_the_object(data):
        return
    seen: set[str] = set()
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        for name, _ in pairs:
            if name in seen:
                duplicates.append(name)
            seen.add(name)
        return {}

    # Only the envelope itself is a JSON object (the plan travels as a string).
    json.loads(data, object_pairs_hook=pairs_hook)
    if duplicates:
        raise ContractViolation(Reason.DUPLICATE_KEY, duplicates[0], f"field `{duplicates[0]}` appears more than once")


def _reject_nul_characters(envelope: Envelope) -> None:
    # Searching one character is a memchr; the payload's bytes hold backslashes everywhere (every
    # quote of the plan JSON is escaped) and a search there for `\\u0000` cost ~2.4 us per 5 KB.
    for name in _TEXT_FIELDS:
        value = getattr(envelope, name)
        if value is not None and "\x00" in value:
            raise ContractViolation(Reason.NUL_CHARACTER, name, f"`{name}` contains U+0000")
    plan = envelope.plan_text
    if "\\" in plan and "\\u0000" in plan and _PLAN_NUL_ESCAPE.search(plan):
        raise ContractViolation(Reason.NUL_CHARACTER, "plan_text", "plan JSON contains a \\u0000 escape")


_encoder = msgspec.json.Encoder()


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)
