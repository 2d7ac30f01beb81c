"""Correction rules: each one positive and negative, table-driven; then their composition via `correct`."""

from typing import Any

import msgspec
import pytest

from planpipe.contract import Envelope, EnvelopeDecoder, Reason
from planpipe.replay.rules import RULES, RULES_BY_NAME, Corrected, Rule, Uncorrectable, correct, parse_object

pytestmark = pytest.mark.unit

PLAN = [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "accounts", "Actual Rows": 3}}]
PLAN_TEXT = msgspec.json.encode(PLAN).decode()
VALID: dict[str, Any] = {
    "query_hash": "q-1",
    "execution_timestamp": 1_700_000_000.5,
    "cluster_id": "pg-eu-1",
    "plan_text": PLAN_TEXT,
    "actual_rows": 42,
    "total_time_ms": 12.5,
}
NO_HEADERS: dict[str, str] = {}
DECODER = EnvelopeDecoder()


def doc(drop: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    out = {k: v for k, v in VALID.items() if k not in drop}
    out.update(fields)
    return out


def raw(fields: dict[str, Any]) -> bytes:
    return msgspec.json.encode(fields)


# (rule, input object, headers, expected output object — None: not applicable)
CASES: list[tuple[str, dict[str, Any], dict[str, str], dict[str, Any] | None]] = [
    # (a) legacy names
    ("legacy_field_names", {"queryHash": "q-1", "clusterId": "c", "planText": "[]"}, NO_HEADERS,
     {"query_hash": "q-1", "cluster_id": "c", "plan_text": "[]"}),
    ("legacy_field_names", {"query_id": "q", "rows": 3, "duration_ms": 1.5, "ts": 1.0}, NO_HEADERS,
     {"query_hash": "q", "actual_rows": 3, "total_time_ms": 1.5, "execution_timestamp": 1.0}),
    ("legacy_field_names", {"plan": [1], "durationMs": 2, "timestamp": 3.0}, NO_HEADERS,
     {"plan_text": [1], "total_time_ms": 2, "execution_timestamp": 3.0}),
    ("legacy_field_names", {"a": 1, "queryHash": "q", "query_hash": "q"}, NO_HEADERS,  # agreeing duplicate dropped
     {"a": 1, "query_hash": "q"}),
    ("legacy_field_names", {"query_hash": "q"}, NO_HEADERS, None),  # nothing legacy
    ("legacy_field_names", {"queryHash": "a", "query_hash": "b"}, NO_HEADERS, None),  # conflict: no guessing
    ("legacy_field_names", {"query_id": "a", "queryHash": "b"}, NO_HEADERS, None),
    ("legacy_field_names", {"rows": 1, "actual_rows": 1.0}, NO_HEADERS, None),  # 1 vs 1.0 differ as JSON
    # (b) numbers as strings
    ("numeric_strings", {"total_time_ms": "12.5", "execution_timestamp": "1700000000", "actual_rows": "42"},
     NO_HEADERS, {"total_time_ms": 12.5, "execution_timestamp": 1_700_000_000.0, "actual_rows": 42}),
    ("numeric_strings", {"published_at": " 1.5e3 ", "actual_rows": "-3"}, NO_HEADERS,
     {"published_at": 1500.0, "actual_rows": -3}),  # negative converts; the decoder rejects it later
    ("numeric_strings", {"actual_rows": "42.5"}, NO_HEADERS, None),  # not an integer
    ("numeric_strings", {"total_time_ms": "n/a", "execution_timestamp": "inf"}, NO_HEADERS, None),
    ("numeric_strings", {"total_time_ms": "1_000", "actual_rows": "0x10"}, NO_HEADERS, None),
    ("numeric_strings", {"query_hash": "42", "total_time_ms": 3.0}, NO_HEADERS, None),  # only numeric fields
    # (c) seconds → milliseconds
    ("total_time_seconds", {"a": 1, "total_time_s": 1.5, "b": 2}, NO_HEADERS,
     {"a": 1, "total_time_ms": 1500.0, "b": 2}),
    ("total_time_seconds", {"total_time_s": "0.0123"}, NO_HEADERS, {"total_time_ms": 12.3}),
    ("total_time_seconds", {"total_time_s": 2, "total_time_ms": 2000}, NO_HEADERS, {"total_time_ms": 2000}),
    ("total_time_seconds", {"total_time_s": 2, "total_time_ms": 5.0}, NO_HEADERS, None),  # disagree
    ("total_time_seconds", {"total_time_s": True}, NO_HEADERS, None),
    ("total_time_seconds", {"total_time_s": "soon"}, NO_HEADERS, None),
    ("total_time_seconds", {"total_time_ms": 5.0}, NO_HEADERS, None),
    # (c) milliseconds → seconds for epochs
    ("timestamp_milliseconds", {"execution_timestamp": 1_700_000_000_500, "published_at": 1_700_000_001_000.0},
     NO_HEADERS, {"execution_timestamp": 1_700_000_000.5, "published_at": 1_700_000_001.0}),
    ("timestamp_milliseconds", {"execution_timestamp": 1_700_000_000.5}, NO_HEADERS, None),  # already seconds
    ("timestamp_milliseconds", {"execution_timestamp": 1_700_000_000_000_000}, NO_HEADERS, None),  # µs: no guess
    ("timestamp_milliseconds", {"execution_timestamp": "1700000000000"}, NO_HEADERS, None),  # strings: rule (b)
    # (d) cluster id from the header
    ("cluster_id_from_header", {"query_hash": "q"}, {"cluster-id": "pg-us-2"},
     {"query_hash": "q", "cluster_id": "pg-us-2"}),
    ("cluster_id_from_header", {"cluster_id": None}, {"cluster-id": " pg-us-2 "}, {"cluster_id": "pg-us-2"}),
    ("cluster_id_from_header", {"cluster_id": ""}, {"cluster-id": "pg-us-2"}, {"cluster_id": "pg-us-2"}),
    ("cluster_id_from_header", {"query_hash": "q"}, NO_HEADERS, None),  # nothing to recover it from
    ("cluster_id_from_header", {"query_hash": "q"}, {"cluster-id": "  "}, None),
    ("cluster_id_from_header", {"cluster_id": "pg-eu-1"}, {"cluster-id": "pg-us-2"}, None),  # never overwrite
    # (e) plan as JSON
    ("plan_text_serialized", {"plan_text": PLAN}, NO_HEADERS, {"plan_text": PLAN_TEXT}),
    ("plan_text_serialized", {"plan_text": {"Plan": {"Node Type": "Result"}}}, NO_HEADERS,
     {"plan_text": '{"Plan":{"Node Type":"Result"}}'}),
    ("plan_text_serialized", {"plan_text": PLAN_TEXT}, NO_HEADERS, None),
    ("plan_text_serialized", {"plan_text": 5}, NO_HEADERS, None),
    ("plan_text_serialized", {"query_hash": "q"}, NO_HEADERS, None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "given", "headers", "expected"), CASES)
def test_rule(name: str, given: dict[str, Any], headers: dict[str, str], expected: dict[str, Any] | None) -> None:
    rule = RULES_BY_NAME[name]
    snapshot = msgspec.json.encode(given)
    result = rule.fix(given, headers)
    assert msgspec.json.encode(given) == snapshot, "rules must not mutate their input"
    if expected is None:
        assert result is None
        assert rule.apply(raw(given), headers) is None
    else:
        assert result is not None
        # Compare as JSON text: field order and int-vs-float matter to what we republish.
        assert msgspec.json.encode(result) == msgspec.json.encode(expected)
        assert rule.apply(raw(given), headers) == msgspec.json.encode(expected)


def test_every_rule_has_cases_both_ways_and_is_documented() -> None:
    for rule in RULES:
        outcomes = {expected is None for name, _, _, expected in CASES if name == rule.name}
        assert outcomes == {True, False}, rule.name
        assert rule.description and rule.reasons
    assert len({r.name for r in RULES}) == len(RULES)


def test_apply_on_non_objects_is_not_applicable() -> None:
    rule = RULES_BY_NAME["legacy_field_names"]
    for payload in (b"", b"{not json", b"[1, 2]", b'"queryHash"', b"\xff\xfe"):
        assert parse_object(payload) is None
        assert rule.apply(payload, NO_HEADERS) is None


# --- correct(): gating, composition, decoding --------------------------------------------


def expect_corrected(outcome: Corrected | Uncorrectable) -> Corrected:
    assert isinstance(outcome, Corrected), outcome
    return outcome


@pytest.mark.parametrize(
    ("reason", "given", "headers", "rules", "fields"),
    [
        (Reason.UNKNOWN_FIELD, doc(drop=("query_hash",), queryHash="q-1"), NO_HEADERS,
         ("legacy_field_names",), {}),
        (Reason.MISSING_FIELD, doc(drop=("cluster_id",)), {"cluster-id": "pg-x"},
         ("cluster_id_from_header",), {"cluster_id": "pg-x"}),
        (Reason.WRONG_TYPE, doc(actual_rows="7", total_time_ms="0.25"), NO_HEADERS,
         ("numeric_strings",), {"actual_rows": 7, "total_time_ms": 0.25}),
        (Reason.UNKNOWN_FIELD, doc(drop=("total_time_ms",), total_time_s=0.5), NO_HEADERS,
         ("total_time_seconds",), {"total_time_ms": 500.0}),
        (Reason.OUT_OF_RANGE, doc(execution_timestamp=1_700_000_000_250), NO_HEADERS,
         ("timestamp_milliseconds",), {"execution_timestamp": 1_700_000_000.25}),
        (Reason.WRONG_TYPE, doc(plan_text=PLAN), NO_HEADERS,
         ("plan_text_serialized",), {"plan_text": PLAN_TEXT}),
    ],
)  # fmt: skip
def test_each_rule_alone_yields_a_valid_envelope(
    reason: Reason, given: dict[str, Any], headers: dict[str, str], rules: tuple[str, ...], fields: dict[str, Any]
) -> None:
    corrected = expect_corrected(correct(raw(given), headers, reason, decoder=DECODER))
    assert corrected.rules == rules
    assert corrected.envelope == msgspec.convert(doc(**fields), Envelope)


def test_rules_compose_in_table_order_and_each_is_recorded() -> None:
    legacy = {
        "queryHash": "q-9",
        "ts": 1_700_000_000_000,  # milliseconds
        "plan": PLAN,  # JSON, not text
        "rows": "42",  # a string
        "total_time_s": "1.25",  # seconds, as a string
        "trace_id": "t-1",
    }
    # The decoder stops at the first problem: the DLQ reason names only that one.
    corrected = expect_corrected(correct(raw(legacy), {"cluster-id": "pg-eu-3"}, Reason.UNKNOWN_FIELD, decoder=DECODER))
    assert corrected.envelope == Envelope(
        query_hash="q-9",
        execution_timestamp=1_700_000_000.0,
        cluster_id="pg-eu-3",
        plan_text=PLAN_TEXT,
        actual_rows=42,
        total_time_ms=1250.0,
        trace_id="t-1",
    )
    # Pass 1 (unknown_field): names, seconds. The decoder then names out_of_range (ts in ms), then
    # missing_field (cluster), then wrong_type (rows, plan): each pass runs the table in order.
    assert corrected.rules == (
        "legacy_field_names",
        "total_time_seconds",
        "timestamp_milliseconds",
        "cluster_id_from_header",
        "numeric_strings",
        "plan_text_serialized",
    )
    assert set(corrected.rules) == {r.name for r in RULES}
    again = correct(raw(legacy), {"cluster-id": "pg-eu-3"}, Reason.UNKNOWN_FIELD, decoder=DECODER)
    assert again == corrected, "deterministic"


def test_rules_are_gated_by_reason() -> None:
    # A string row count, yet the DLQ reason says the plan was unparseable: nothing applies, and
    # since the decoder then names WRONG_TYPE, numeric_strings is gated in on the second pass.
    given = doc(actual_rows="5")
    corrected = expect_corrected(correct(raw(given), NO_HEADERS, Reason.PLAN_UNPARSEABLE, decoder=DECODER))
    assert corrected.rules == ("numeric_strings",)
    # With no rules at all the same message is uncorrectable.
    parked = correct(raw(given), NO_HEADERS, Reason.WRONG_TYPE, decoder=DECODER, rules=())
    assert isinstance(parked, Uncorrectable) and parked.rules == ()
    assert "wrong_type" in parked.why and "actual_rows" in parked.why


def test_a_valid_message_passes_with_no_rules() -> None:
    corrected = expect_corrected(correct(raw(doc()), NO_HEADERS, Reason.WRONG_TYPE, decoder=DECODER))
    assert corrected.rules == ()
    assert corrected.envelope == msgspec.convert(VALID, Envelope)


@pytest.mark.parametrize(
    ("reason", "payload", "headers", "why", "rules"),
    [
        (Reason.MALFORMED_JSON, b"{not json", NO_HEADERS, "not a JSON object", ()),
        (Reason.EMPTY, b"", NO_HEADERS, "not a JSON object", ()),
        (Reason.NOT_AN_OBJECT, b"[1]", NO_HEADERS, "not a JSON object", ()),
        # missing cluster and no header: nothing to recover it from
        (Reason.MISSING_FIELD, raw(doc(drop=("cluster_id",))), NO_HEADERS, "missing_field (cluster_id)", ()),
        # legacy rename applied, but the value is out of range: still parked, rule recorded
        (Reason.UNKNOWN_FIELD, raw(doc(drop=("actual_rows",), rows=-5)), NO_HEADERS, "out_of_range (actual_rows)",
         ("legacy_field_names",)),
        # two different hashes: no guessing
        (Reason.UNKNOWN_FIELD, raw(doc(queryHash="other")), NO_HEADERS, "unknown_field (queryHash)", ()),
        # a plan the fingerprint cannot parse would come straight back to the DLQ
        (Reason.PLAN_UNPARSEABLE, raw(doc(plan_text="not a plan")), NO_HEADERS, "plan_unparseable", ()),
        (Reason.WRONG_TYPE, raw(doc(plan_text={"no": "plan"})), NO_HEADERS, "plan_unparseable",
         ("plan_text_serialized",)),
        # microseconds: not divided
        (Reason.OUT_OF_RANGE, raw(doc(execution_timestamp=1.7e15)), NO_HEADERS, "out_of_range", ()),
        (Reason.UNKNOWN_FIELD, raw(doc(extra_field=1)), NO_HEADERS, "unknown_field (extra_field)", ()),
    ],
)  # fmt: skip
def test_uncorrectable(
    reason: Reason, payload: bytes, headers: dict[str, str], why: str, rules: tuple[str, ...]
) -> None:
    outcome = correct(payload, headers, reason, decoder=DECODER)
    assert isinstance(outcome, Uncorrectable), outcome
    assert why in outcome.why
    assert outcome.rules == rules


def test_plan_too_large_stays_too_large() -> None:
    small = EnvelopeDecoder(max_plan_bytes=16)
    outcome = correct(raw(doc()), NO_HEADERS, Reason.PLAN_TOO_LARGE, decoder=small)
    assert isinstance(outcome, Uncorrectable) and "plan_too_large" in outcome.why


def test_custom_rule_table() -> None:
    def lowercase_hash(fields: dict[str, Any], headers: Any) -> dict[str, Any] | None:
        value = fields.get("query_hash")
        return {**fields, "query_hash": value.lower()} if isinstance(value, str) and value != value.lower() else None

    rule = Rule("lowercase_hash", "hashes are lowercase", frozenset({Reason.OUT_OF_RANGE}), lowercase_hash)
    given = raw(doc(query_hash="ABC"))
    corrected = expect_corrected(correct(given, NO_HEADERS, Reason.OUT_OF_RANGE, decoder=DECODER, rules=(rule,)))
    assert corrected.rules == ("lowercase_hash",) and corrected.envelope.query_hash == "abc"
    # Not gated in by this reason (and the message decodes as it is): the rule does not run.
    assert expect_corrected(correct(given, NO_HEADERS, Reason.WRONG_TYPE, decoder=DECODER, rules=(rule,))).rules == ()
