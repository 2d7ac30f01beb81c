"""The plan's work (load-invariant evidence) read from captured plans, and carried by the ingest to Parquet."""

import json
from pathlib import Path

import pytest

from planpipe.contract import Envelope, EnvelopeDecoder, encode_envelope
from planpipe.ingest import parquet_sink
from planpipe.ingest.batch import prepare_batch
from planpipe.plans.fingerprint import fingerprint as fingerprint_alone
from planpipe.plans.fingerprint import fingerprint_and_work
from planpipe.plans.normalize import PlanParseError
from planpipe.plans.work import NO_WORK, WORK_COLUMNS, PlanWork, plan_work
from planpipe.routing.router import RoutingConfig
from planpipe_tests.unit.ingest.test_latency_and_batch import Record
from planpipe_tests.unit.plans._fixtures import all_names, expected_work, plan_doc, plan_text


def test_top_node_totals_of_real_plans() -> None:
    assert plan_work(plan_text("point_aid_42")) == PlanWork(shared_blocks=3, temp_blocks=0, top_rows=1.0, top_loops=1)
    # An external sort spills: temp read + written blocks; shared hit + read of its whole subtree.
    external = plan_work(plan_text("sort_external"))
    top = plan_doc("sort_external")[0]["Plan"]
    assert external.shared_blocks == top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert external.temp_blocks == top["Temp Read Blocks"] + top["Temp Written Blocks"] > 0
    assert external.top_rows == 100_000.0
    # auto_explain prints one object ("Query Text" + "Plan") instead of EXPLAIN's array.
    assert plan_work(plan_text("point_aid_42_autoexplain")).shared_blocks == 3


def test_plans_without_buffers_or_analyze_give_none_not_zero() -> None:
    doc = plan_doc("point_aid_42")
    top = doc[0]["Plan"]
    for key in [k for k in top if k.endswith("Blocks")]:
        del top[key]
    assert plan_work(json.dumps(doc)) == PlanWork(None, None, 1.0, 1)
    assert plan_work('{"Plan": {"Node Type": "Result"}}') == PlanWork(None, None, None, None)


def test_reads_count_with_hits() -> None:
    # A cold cache moves blocks from hit to read; the plan's work is the same.
    doc = plan_doc("point_aid_42")
    doc[0]["Plan"]["Shared Hit Blocks"], doc[0]["Plan"]["Shared Read Blocks"] = 1, 2
    assert plan_work(json.dumps(doc)).shared_blocks == 3


@pytest.mark.parametrize("text", ["", "not json", "[]", '[{"Plan": 1}]', '{"no": "plan"}'])
def test_not_a_plan_is_a_parse_error(text: str) -> None:
    with pytest.raises(PlanParseError):
        plan_work(text)


def test_ingest_carries_the_work_to_parquet(tmp_path: Path) -> None:
    def envelope(plan: str, offset: int) -> Record:
        fields = dict(query_hash="q", execution_timestamp=1_790_000_000.0 + offset, cluster_id="c", plan_text=plan,
                      actual_rows=1, total_time_ms=1.0)  # fmt: skip
        return Record(encode_envelope(Envelope(**fields)), offset)  # type: ignore[arg-type]

    odd = plan_doc("point_aid_42")
    odd[0]["Plan"]["Shared Hit Blocks"] = "three"  # the fingerprint ignores it; the work is unknown, the row is kept
    records = [envelope(plan_text("sort_external"), 1), envelope(json.dumps(odd), 2)]
    batch = prepare_batch(records, EnvelopeDecoder(), RoutingConfig())
    assert not batch.dead_letters
    parquet_sink.write_batch(tmp_path, batch.observations, [("query-plans", 3, 1, 2)])
    rows = parquet_sink.scan(tmp_path).sort("kafka_offset").select(WORK_COLUMNS).collect().rows()
    assert rows == [(1659, 10366, 100_000.0, 1), (None, None, None, None)]


# --- one decode for the fingerprint and the work (the ingest path) ------------------------


def _other_form(text: str) -> str:
    """EXPLAIN's one-element array as auto_explain's object, and the other way round."""
    doc = json.loads(text)
    return json.dumps(doc[0] if isinstance(doc, list) else [doc])


@pytest.mark.parametrize("name", all_names())
def test_fingerprint_and_work_equal_the_two_separate_reads(name: str) -> None:
    for text in (plan_text(name), _other_form(plan_text(name))):
        fingerprint, work = fingerprint_and_work(text)
        assert fingerprint == fingerprint_alone(text)
        assert work == plan_work(text)
        assert tuple(work.columns().values()) == expected_work(text)


def test_odd_work_types_keep_the_fingerprint_and_lose_the_work() -> None:
    doc = plan_doc("sort_external")
    doc[0]["Plan"]["Actual Loops"] = "one"
    assert fingerprint_and_work(json.dumps(doc)) == (fingerprint_alone(plan_text("sort_external")), NO_WORK)


@pytest.mark.parametrize("text", ["", "not json", "[]", '[{"Plan": 1}]', '[{"Plan": {"Actual Loops": 1}}]'])
def test_fingerprint_and_work_reject_what_the_fingerprint_rejects(text: str) -> None:
    with pytest.raises(PlanParseError) as alone:
        fingerprint_alone(text)
    with pytest.raises(PlanParseError) as combined:
        fingerprint_and_work(text)
    assert str(combined.value) == str(alone.value)
