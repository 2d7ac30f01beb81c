"""The envelope decoder: every reason code, the plan size limit, and fuzzing.

The fuzz properties pin the decoder's one promise to the router and the ingest
engine: any bytes at all either become an `Envelope` or raise a
`ContractViolation` carrying a `Reason` — never another exception.
"""

import contextlib
import json
import pickle
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.contract import (
    REQUIRED_FIELDS,
    ContractViolation,
    Envelope,
    EnvelopeDecoder,
    Reason,
    encode_envelope,
)

pytestmark = pytest.mark.unit

# No example database: keeps runs reproducible and the working tree clean.
fuzz = settings(database=None, max_examples=300, deadline=None)

VALID: dict[str, Any] = {
    "query_hash": "5f1c2a9e",
    "execution_timestamp": 1_700_000_000.25,
    "cluster_id": "pg-eu-1",
    "plan_text": '[{"Plan": {"Node Type": "Seq Scan"}}]',
    "actual_rows": 42,
    "total_time_ms": 12.5,
}
STRUCT_FIELDS = frozenset(Envelope.__struct_fields__)
DECODER = EnvelopeDecoder()


def payload(drop: tuple[str, ...] = (), **overrides: Any) -> bytes:
    doc = {k: v for k, v in VALID.items() if k not in drop}
    doc.update(overrides)
    return msgspec.json.encode(doc)


def with_query_text_bytes(raw_text: bytes) -> bytes:
    """A valid envelope whose `query_text` string holds `raw_text` verbatim (not escaped)."""
    return payload()[:-1] + b',"query_text":"' + raw_text + b'"}'


def outcome(raw: bytes, decoder: EnvelopeDecoder = DECODER) -> Envelope | ContractViolation:
    """Decode, asserting the decoder's contract: an Envelope or a well-formed ContractViolation."""
    try:
        return decoder.decode(raw)
    except ContractViolation as violation:
        assert isinstance(violation.reason, Reason)
        assert isinstance(violation.detail, str) and violation.detail
        if violation.reason is Reason.UNKNOWN_FIELD:
            assert violation.field is not None and violation.field not in STRUCT_FIELDS
        else:
            assert violation.field is None or violation.field in STRUCT_FIELDS
        return violation


# --- valid inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        pytest.param(payload(), lambda e: e.actual_rows == 42 and e.query_type is None, id="minimal"),
        pytest.param(
            payload(
                query_type="DDL",
                query_text="ALTER TABLE t ADD c int",
                trace_id="abc",
                published_at=1_700_000_001.0,
                route_tag="ddl",
                priority="low",
            ),
            lambda e: e.route_tag == "ddl" and e.priority == "low" and e.published_at == 1_700_000_001.0,
            id="all-optionals",
        ),
        pytest.param(
            payload(execution_timestamp=1_700_000_000),
            lambda e: isinstance(e.execution_timestamp, float),
            id="int-timestamp-is-float",
        ),
        pytest.param(payload(actual_rows=0, total_time_ms=0), lambda e: e.total_time_ms == 0.0, id="zeros"),
        pytest.param(payload(actual_rows=2**63 - 1), lambda e: e.actual_rows == 2**63 - 1, id="int64-max-rows"),
        pytest.param(payload(query_hash="h" * 256), lambda e: len(e.query_hash) == 256, id="hash-256-chars"),
        pytest.param(payload(query_text=None), lambda e: e.query_text is None, id="explicit-null-optional"),
        pytest.param(with_query_text_bytes("é😀".encode()), lambda e: e.query_text == "é😀", id="utf8-text"),
    ],
)
def test_valid_envelopes_decode(raw: bytes, check: Any) -> None:
    envelope = DECODER.decode(raw)
    assert isinstance(envelope, Envelope)
    assert check(envelope)


# --- every reason code, with the field it concerns ------------------------------------------

REJECTIONS = [
    # (id, raw, reason, field)
    ("empty-bytes", b"", Reason.EMPTY, None),
    ("invalid-utf8-in-string", with_query_text_bytes(b"\xff\xfe"), Reason.NOT_UTF8, None),
    ("truncated-utf8-in-string", with_query_text_bytes(b"\xc3"), Reason.NOT_UTF8, None),
    ("utf8-encoded-surrogate", with_query_text_bytes(b"\xed\xa0\x80"), Reason.NOT_UTF8, None),
    ("truncated", payload()[:-1], Reason.MALFORMED_JSON, None),
    ("trailing-garbage", payload() + b" x", Reason.MALFORMED_JSON, None),
    ("nan-literal", payload()[:-1] + b',"published_at":NaN}', Reason.MALFORMED_JSON, None),
    ("lone-surrogate-escape", with_query_text_bytes(rb"\udc00"), Reason.MALFORMED_JSON, None),
    ("binary-garbage", b"\xff\x00\x01", Reason.MALFORMED_JSON, None),
    ("array", b"[]", Reason.NOT_AN_OBJECT, None),
    ("number", b"1", Reason.NOT_AN_OBJECT, None),
    ("string", b'"x"', Reason.NOT_AN_OBJECT, None),
    ("null", b"null", Reason.NOT_AN_OBJECT, None),
    ("deeply-nested-array", b"[" * 100_000, Reason.NOT_AN_OBJECT, None),
    *[(f"missing-{f}", payload(drop=(f,)), Reason.MISSING_FIELD, f) for f in REQUIRED_FIELDS],
    ("unknown-field", payload(plan_json={}), Reason.UNKNOWN_FIELD, "plan_json"),
    ("unknown-field-deep-value", b'{"x":' + b"[" * 100_000, Reason.UNKNOWN_FIELD, "x"),
    ("hash-is-int", payload(query_hash=1), Reason.WRONG_TYPE, "query_hash"),
    ("cluster-is-null", payload(cluster_id=None), Reason.WRONG_TYPE, "cluster_id"),
    ("plan-is-object-not-text", payload(plan_text=[{"Plan": {}}]), Reason.WRONG_TYPE, "plan_text"),
    ("rows-is-float", payload(actual_rows=1.5), Reason.WRONG_TYPE, "actual_rows"),
    ("rows-is-bool", payload(actual_rows=True), Reason.WRONG_TYPE, "actual_rows"),
    ("time-is-string", payload(total_time_ms="12.5"), Reason.WRONG_TYPE, "total_time_ms"),
    ("route-tag-is-int", payload(route_tag=1), Reason.WRONG_TYPE, "route_tag"),
    ("negative-rows", payload(actual_rows=-1), Reason.OUT_OF_RANGE, "actual_rows"),
    ("rows-beyond-int64", payload(actual_rows=2**63), Reason.OUT_OF_RANGE, "actual_rows"),
    ("rows-beyond-uint64", payload(actual_rows=10**30), Reason.OUT_OF_RANGE, "actual_rows"),
    ("negative-time", payload(total_time_ms=-0.5), Reason.OUT_OF_RANGE, "total_time_ms"),
    ("time-too-large", payload(total_time_ms=1e13), Reason.OUT_OF_RANGE, "total_time_ms"),
    ("time-overflows-to-inf", payload()[:-1] + b',"total_time_ms":1e999}', Reason.OUT_OF_RANGE, "total_time_ms"),
    ("timestamp-in-millis", payload(execution_timestamp=1.7e12), Reason.OUT_OF_RANGE, "execution_timestamp"),
    ("empty-hash", payload(query_hash=""), Reason.OUT_OF_RANGE, "query_hash"),
    ("hash-too-long", payload(query_hash="h" * 257), Reason.OUT_OF_RANGE, "query_hash"),
    ("unknown-route-tag", payload(route_tag="urgent"), Reason.OUT_OF_RANGE, "route_tag"),
    ("unknown-priority", payload(priority="urgent"), Reason.OUT_OF_RANGE, "priority"),
    ("blank-plan", payload(plan_text=" \n\t"), Reason.OUT_OF_RANGE, "plan_text"),
    ("empty-plan", payload(plan_text=""), Reason.OUT_OF_RANGE, "plan_text"),
    ("nul-in-cluster", payload(cluster_id="a\u0000"), Reason.NUL_CHARACTER, "cluster_id"),
    ("duplicate-key", payload()[:-1] + b',"query_hash":"other"}', Reason.DUPLICATE_KEY, "query_hash"),
]


@pytest.mark.parametrize(("raw", "reason", "field"), [pytest.param(*c[1:], id=c[0]) for c in REJECTIONS])
def test_rejections_carry_reason_and_field(raw: bytes, reason: Reason, field: str | None) -> None:
    with pytest.raises(ContractViolation) as caught:
        DECODER.decode(raw)
    assert (caught.value.reason, caught.value.field) == (reason, field), caught.value.detail
    assert outcome(raw) is not None  # and the well-formedness checks hold


def test_none_is_empty() -> None:
    with pytest.raises(ContractViolation) as caught:
        DECODER.decode(None)
    assert caught.value.reason is Reason.EMPTY


def test_every_decoder_reason_is_covered() -> None:
    # PLAN_UNPARSEABLE belongs to the plan normalizer: the decoder treats plan_text as
    # opaque text (the routing guide: the router does not parse execution trees).
    # SINK_REJECTED is the ingest engine's, for what PostgreSQL or Parquet refuse.
    covered = {c[2] for c in REJECTIONS} | {Reason.PLAN_TOO_LARGE}
    assert set(Reason) - covered == {Reason.PLAN_UNPARSEABLE, Reason.SINK_REJECTED}


# --- plan_text size limit --------------------------------------------------------------------

LIMIT = 120


@pytest.mark.parametrize("char", ["x", "é", "€", "😀"], ids=["1-byte", "2-byte", "3-byte", "4-byte"])
def test_plan_size_limit_is_in_utf8_bytes(char: str) -> None:
    decoder = EnvelopeDecoder(max_plan_bytes=LIMIT)
    width = len(char.encode())
    at_limit = char * (LIMIT // width) + "x" * (LIMIT % width)
    assert len(at_limit.encode()) == LIMIT
    assert decoder.decode(payload(plan_text=at_limit)).plan_text == at_limit

    with pytest.raises(ContractViolation) as caught:
        decoder.decode(payload(plan_text=at_limit + "x"))
    assert (caught.value.reason, caught.value.field) == (Reason.PLAN_TOO_LARGE, "plan_text")
    assert f"{LIMIT + 1} bytes" in caught.value.detail


def test_default_plan_limit_is_8_mib() -> None:
    big = "x" * (8 * 1024 * 1024)
    assert DECODER.decode(payload(plan_text=big)).plan_text == big
    with pytest.raises(ContractViolation) as caught:
        DECODER.decode(payload(plan_text=big + "x"))
    assert caught.value.reason is Reason.PLAN_TOO_LARGE


# --- ContractViolation as an exception -------------------------------------------------------


def test_violation_str_and_pickle() -> None:
    violation = ContractViolation(Reason.MISSING_FIELD, "cluster_id", "Object missing required field")
    assert str(violation) == "missing_field (cluster_id): Object missing required field"
    clone = pickle.loads(pickle.dumps(violation))
    assert (clone.reason, clone.field, clone.detail) == (violation.reason, violation.field, violation.detail)


def test_violation_propagates_through_contextmanager() -> None:
    # Regression: as a frozen slots dataclass it turned into a TypeError here, because
    # contextlib assigns `__traceback__` on the exception.
    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        yield

    with pytest.raises(ContractViolation) as caught, scope():
        DECODER.decode(b"[]")
    assert caught.value.reason is Reason.NOT_AN_OBJECT


# --- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


@fuzz
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    outcome(raw)


@fuzz
@given(json_values)
def test_arbitrary_json_never_crashes(value: Any) -> None:
    outcome(msgspec.json.encode(value))


@fuzz
@given(st.binary(max_size=64))
def test_arbitrary_bytes_inside_a_string_never_crash(raw_text: bytes) -> None:
    outcome(with_query_text_bytes(raw_text))


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with some fields replaced, removed or added: reaches the typed checks."""
    doc = dict(VALID)
    for name in draw(st.sets(st.sampled_from(sorted(STRUCT_FIELDS)), max_size=3)):
        if draw(st.booleans()):
            doc[name] = draw(json_values)
        else:
            doc.pop(name, None)
    doc.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return doc


@fuzz
@given(mutated_envelopes())
def test_mutated_envelopes_decode_or_violate(doc: dict[str, Any]) -> None:
    result = outcome(msgspec.json.encode(doc))
    if isinstance(result, Envelope):
        # Whatever gets through really satisfies the contract.
        assert result.query_hash and result.cluster_id and result.plan_text.strip()
        assert 0 <= result.actual_rows <= 2**63 - 1
        assert 0 <= result.total_time_ms <= 1e12
        assert 0 <= result.execution_timestamp <= 1e11


def _text(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    # U+0000 is outside the contract (Reason.NUL_CHARACTER), so valid envelopes never hold it.
    alphabet = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
    return st.text(alphabet, min_size=min_size, max_size=max_size)


valid_envelopes = st.builds(
    Envelope,
    query_hash=_text(1, 256),
    execution_timestamp=st.floats(min_value=0, max_value=1e11),
    cluster_id=_text(1, 256),
    plan_text=_text(1).filter(str.strip),
    actual_rows=st.integers(min_value=0, max_value=2**63 - 1),
    total_time_ms=st.floats(min_value=0, max_value=1e12),
    query_type=st.none() | _text(max_size=32),
    query_text=st.none() | _text(),
    trace_id=st.none() | _text(max_size=128),
    published_at=st.none() | st.floats(min_value=0, max_value=1e11),
    route_tag=st.none() | st.sampled_from(["critical", "baseline", "ddl"]),
    priority=st.none() | st.sampled_from(["low", "standard", "critical", "regression_candidate"]),
)


@fuzz
@given(valid_envelopes)
def test_valid_envelopes_round_trip(envelope: Envelope) -> None:
    encoded = encode_envelope(envelope)
    decoded = DECODER.decode(encoded)
    assert decoded == envelope
    assert encode_envelope(decoded) == encoded


# -- NUL characters: PostgreSQL text/jsonb cannot hold them, so they stop at the edge ------------


@pytest.mark.parametrize("field", ["query_hash", "cluster_id", "plan_text", "query_text", "query_type", "trace_id"])
def test_a_nul_character_in_any_text_field_is_rejected_with_its_own_reason(field: str) -> None:
    nul: dict[str, Any] = {field: "a\u0000b"}
    result = outcome(payload(**nul))
    assert isinstance(result, ContractViolation)
    assert (result.reason, result.field) == (Reason.NUL_CHARACTER, field)


def test_a_nul_escape_inside_the_plan_json_is_rejected() -> None:
    plan = '[{"Plan": {"Node Type": "Seq Scan", "Filter": "(name = \'a\\u0000b\'::text)"}}]'
    result = outcome(payload(plan_text=plan))
    assert isinstance(result, ContractViolation)
    assert (result.reason, result.field) == (Reason.NUL_CHARACTER, "plan_text")


def test_an_escaped_backslash_before_u0000_is_literal_text_and_accepted() -> None:
    # In the plan JSON `\\u0000` is a backslash followed by the text "u0000": no NUL.
    plan = '[{"Plan": {"Node Type": "Seq Scan", "Filter": "(name = \'a\\\\u0000b\'::text)"}}]'
    result = outcome(payload(plan_text=plan))
    assert isinstance(result, Envelope)


# -- duplicate keys: ambiguous, whichever value a decoder keeps -----------------------------------


def test_a_duplicate_field_is_rejected_naming_the_field() -> None:
    raw = payload()[:-1] + b',"cluster_id":"pg-other"}'
    result = outcome(raw)
    assert isinstance(result, ContractViolation)
    assert (result.reason, result.field) == (Reason.DUPLICATE_KEY, "cluster_id")


def test_a_duplicate_field_spelled_with_escapes_is_rejected() -> None:
    raw = payload()[:-1] + b',"cluster\\u005fid":"pg-other"}'
    result = outcome(raw)
    assert isinstance(result, ContractViolation)
    assert (result.reason, result.field) == (Reason.DUPLICATE_KEY, "cluster_id")


def test_a_field_name_as_a_value_is_not_a_duplicate() -> None:
    result = outcome(payload(query_text="cluster_id", query_type="plan_text"))
    assert isinstance(result, Envelope)
    assert result.query_text == "cluster_id"


def test_a_duplicate_with_the_same_value_or_spaced_out_is_rejected() -> None:
    # The fast screen accounts for every byte: a repeated member, even an identical one, or
    # whitespace sends the payload to the full parse, which names the field.
    for raw in (
        payload()[:-1] + b',"cluster_id":' + msgspec.json.encode(json.loads(payload())["cluster_id"]) + b"}",
        payload()[:-1] + b' , "query_hash" : "other" }',
    ):
        result = outcome(raw)
        assert isinstance(result, ContractViolation)
        assert result.reason == Reason.DUPLICATE_KEY


def test_a_pretty_printed_envelope_without_duplicates_is_accepted() -> None:
    raw = json.dumps(json.loads(payload()), indent=2).encode()
    assert isinstance(outcome(raw), Envelope)
