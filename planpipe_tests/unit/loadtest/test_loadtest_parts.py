"""The replay test's pure parts: the envelope mix, its isolation, and the breaker bookkeeping."""

from collections import Counter
from pathlib import Path

import pytest

from planpipe.contract import EnvelopeDecoder, encode_envelope
from planpipe.ingest.engine import BatchReport
from planpipe.loadtest.runner import LoadtestConfig, _Batches, kind_of, loadtest_settings, synthetic_envelope
from planpipe.plans.fingerprint import fingerprint
from planpipe.routing.router import Router, RoutingDecision
from planpipe.settings import load_settings


def test_the_mix_holds_the_configured_shares_and_routes_as_intended() -> None:
    kinds = Counter(kind_of(n, 0.2, 0.1) for n in range(10_000))
    assert kinds == {"low": 2000, "critical": 1000, "standard": 7000}
    router = Router()
    for n in range(40):
        envelope = synthetic_envelope("r1", n, 0.2, 0.1)
        raw = encode_envelope(envelope)
        assert EnvelopeDecoder().decode(raw) == envelope and fingerprint(envelope.plan_text)
        decision = router.route_raw(raw)
        assert isinstance(decision, RoutingDecision)
        expected = {"low": "low", "critical": "critical", "standard": "standard"}[kind_of(n, 0.2, 0.1)]
        assert decision.priority == expected and envelope.trace_id == f"lt-r1-{n:09d}"


def test_a_run_has_topics_groups_spool_and_data_of_its_own(tmp_path: Path) -> None:
    base = load_settings({"PLANPIPE_HOME": str(tmp_path)})
    own = loadtest_settings(base, "abc")
    assert own.topic == "query-plans.loadtest-abc" and own.dlq_topic == "query-plans.loadtest-abc.dlq"
    assert own.consumer_group != base.consumer_group and own.spool_path != base.spool_path
    assert own.parquet_dir.is_relative_to(tmp_path / "loadtest" / "abc")
    with pytest.raises(ValueError):
        LoadtestConfig(rate=0)


def _report(dropped_low: int, breaker_open: bool) -> BatchReport:
    return BatchReport(
        batch_id=1, offset_ranges=[], consumed=10, valid=10 - dropped_low, dlq=0, dropped_low=dropped_low,
        p50_latency_ms=1.0, p95_latency_ms=2000.0 if breaker_open else 5.0, lock_wait_ms=0.0, duration_ms=1.0,
        parquet_files=[], breaker_open=breaker_open,
    )  # fmt: skip


def test_low_drops_count_as_defects_unless_the_batch_was_prepared_with_the_breaker_open() -> None:
    batches = _Batches()
    # A report's breaker_open is the state its batch was decoded under.
    batches.record(_report(0, breaker_open=False))  # decoded while closed, dropped nothing
    batches.record(_report(3, breaker_open=True))  # decoded while open: a legitimate drop
    batches.record(_report(2, breaker_open=False))  # dropped with the breaker closed: a defect
    assert (batches.dropped_low, batches.drops_while_closed, batches.breaker_open_batches) == (5, 2, 1)
