"""The replay's decisions (planpipe.replay.decide): what becomes of one DLQ record, and its headers."""

from typing import Any

import msgspec
import pytest

from planpipe.contract import Envelope, EnvelopeDecoder, Reason
from planpipe.dlq import DeadLetter
from planpipe.messaging.headers import (
    H_CORRECTION_RULE,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_TOPIC,
    H_REASON,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_STAGE,
    H_TRACE_ID,
    header_map,
)
from planpipe.replay import decide as decisions
from planpipe.replay.decide import (
    Disposition,
    Letter,
    Park,
    Republish,
    Skip,
    decide,
    disposition,
    republish_headers,
)
from planpipe.replay.engine import ReplaySummary
from planpipe.routing.router import Router, RoutingConfig, message_key

pytestmark = pytest.mark.unit

PLAN_TEXT = '[{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t"}}]'
VALID: dict[str, Any] = {
    "query_hash": "q-1",
    "execution_timestamp": 1_700_000_000.0,
    "cluster_id": "pg-eu-1",
    "plan_text": PLAN_TEXT,
    "actual_rows": 42,
    "total_time_ms": 12.5,
}
DECODER = EnvelopeDecoder()
ROUTER = Router(RoutingConfig(sample_rate_pct=100), decoder=DECODER)


def letter(value: bytes, reason: Reason | None, *, offset: int = 7, extra: list[tuple[str, bytes]] = ()) -> Letter:  # type: ignore[assignment]
    if reason is None:
        headers = list(extra)
    else:
        dead = DeadLetter(
            value=value, key=b"standard:q-1", reason=reason, field=None, detail="d", stage="ingest",
            source_topic="query-plans", source_partition=2, source_offset=99, original_headers=list(extra),
        )  # fmt: skip
        headers = dead.headers()
    return Letter(("query-plans.dlq", 1, offset), value, b"standard:q-1", headers, header_map(headers))


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("missing_field", Disposition.CORRECT), ("plan_unparseable", Disposition.CORRECT),
     ("broker_timeout", Disposition.PARK), (None, Disposition.PARK)],
)  # fmt: skip
def test_disposition(reason: str | None, expected: Disposition) -> None:
    assert disposition(reason) is expected


def test_transient_reasons_are_an_extension_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decisions, "TRANSIENT_REASONS", frozenset({"store_unavailable"}))
    assert disposition("store_unavailable") is Disposition.RETRY
    good = msgspec.json.encode(VALID)
    headers = [(H_REASON, b"store_unavailable")]
    retried = decide(Letter(("d", 0, 1), good, None, headers, header_map(headers)), decoder=DECODER, router=ROUTER)
    assert isinstance(retried, Republish) and retried.rules == ()
    # Transient means the payload was fine: no rule is applied to a broken one, it is parked.
    broken = msgspec.json.encode({**VALID, "actual_rows": "42"})
    parked = decide(Letter(("d", 0, 2), broken, None, headers, header_map(headers)), decoder=DECODER, router=ROUTER)
    assert isinstance(parked, Park) and parked.rules == ()


def test_correctable_is_republished_with_the_routers_key() -> None:
    value = msgspec.json.encode({**VALID, "total_time_ms": "9000"})  # critical once it is a number
    decision = decide(letter(value, Reason.WRONG_TYPE), decoder=DECODER, router=ROUTER)
    assert isinstance(decision, Republish)
    assert decision.rules == ("numeric_strings",)
    assert decision.key == message_key("critical", "q-1")
    assert msgspec.json.decode(decision.value, type=Envelope).total_time_ms == 9000.0


def test_uncorrectable_and_unknown_reasons_are_parked() -> None:
    parked = decide(letter(b"{oops", Reason.MALFORMED_JSON), decoder=DECODER, router=ROUTER)
    assert isinstance(parked, Park) and "not a JSON object" in parked.why
    no_reason = decide(letter(msgspec.json.encode(VALID), None), decoder=DECODER, router=ROUTER)
    assert isinstance(no_reason, Park) and "no planpipe-reason" in no_reason.why


def test_sampled_out_is_skipped_not_republished() -> None:
    never = Router(RoutingConfig(sample_rate_pct=0), decoder=DECODER)
    decision = decide(letter(msgspec.json.encode(VALID), Reason.WRONG_TYPE), decoder=DECODER, router=never)
    assert isinstance(decision, Skip) and decision.outcome == "sampled_out"


def test_republish_headers_name_dlq_and_source_and_keep_trace_id() -> None:
    value = msgspec.json.encode({**VALID, "actual_rows": "42"})
    original = [(H_TRACE_ID, b"trace-77"), ("cluster-id", b"pg-eu-1"), ("planpipe-stale", b"x")]
    decision = decide(letter(value, Reason.WRONG_TYPE, extra=original), decoder=DECODER, router=ROUTER)
    assert isinstance(decision, Republish)
    headers = republish_headers(decision, 1_700_000_000.0)
    meta = header_map(headers)
    assert meta[H_TRACE_ID] == "trace-77" and meta["cluster-id"] == "pg-eu-1"
    assert "planpipe-stale" not in meta and H_REASON not in meta
    assert (meta[H_DLQ_TOPIC], meta[H_DLQ_PARTITION], meta[H_DLQ_OFFSET]) == ("query-plans.dlq", "1", "7")
    assert (meta[H_SOURCE_TOPIC], meta[H_SOURCE_PARTITION], meta[H_SOURCE_OFFSET]) == ("query-plans", "2", "99")
    assert meta[H_CORRECTION_RULE] == "numeric_strings"
    assert meta[H_STAGE] == "ingest"
    assert [name for name, _ in headers].count(H_TRACE_ID) == 1


def test_trace_id_header_from_the_envelope_when_the_record_had_none() -> None:
    value = msgspec.json.encode({**VALID, "trace_id": "from-body"})
    decision = decide(letter(value, Reason.WRONG_TYPE), decoder=DECODER, router=ROUTER)
    assert isinstance(decision, Republish)
    meta = header_map(republish_headers(decision, 0.0))
    assert meta[H_TRACE_ID] == "from-body"
    assert meta[H_CORRECTION_RULE] == "none"


def test_letter_source_coordinates() -> None:
    assert letter(b"{}", Reason.EMPTY).source == ("query-plans", 2, 99)
    router_reject = [(H_REASON, b"empty_payload"), (H_STAGE, b"router")]
    assert Letter(("d", 0, 0), b"", None, router_reject, header_map(router_reject)).source is None


def test_summary_counts_by_rule_and_by_reason() -> None:
    summary = ReplaySummary()
    fixed = decide(letter(msgspec.json.encode({**VALID, "actual_rows": "1"}), Reason.WRONG_TYPE),
                   decoder=DECODER, router=ROUTER)  # fmt: skip
    parked = decide(letter(b"", Reason.EMPTY), decoder=DECODER, router=ROUTER)
    for decision in (fixed, parked, Skip(fixed.letter, "duplicate", (), None)):
        summary.count(decision)
    assert (summary.consumed, summary.republished, summary.parked, summary.duplicates) == (3, 1, 1, 1)
    assert summary.by_rule == {"numeric_strings": 1}
    assert summary.by_reason == {
        "wrong_type": {"consumed": 2, "republished": 1, "duplicate": 1},
        "empty_payload": {"consumed": 1, "parked": 1},
    }
    assert msgspec.json.decode(msgspec.json.encode(summary.as_dict()))["by_rule"] == {"numeric_strings": 1}
