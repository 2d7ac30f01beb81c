"""Tracing helpers with the SDK's in-memory exporter: sampling at capture, W3C context, spans."""

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from planpipe import tracing
from planpipe.contract import Envelope


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider, sample_pct=100.0)
    yield exporter
    tracing.use_provider(None)


def _envelope(n: int, trace_id: str | None = None) -> Envelope:
    return Envelope(
        query_hash=f"q{n}", execution_timestamp=1_700_000_000.0 + n, cluster_id="c1", plan_text="[{}]",
        actual_rows=1, total_time_ms=2.0, trace_id=trace_id,
    )  # fmt: skip


def test_stamp_samples_the_configured_share_deterministically(spans: InMemorySpanExporter) -> None:
    envelopes = [_envelope(n) for n in range(20_000)]
    stamped = [tracing.stamp(e, pct=1.0) for e in envelopes]
    chosen = sum(1 for e in stamped if e.trace_id is not None)
    assert 140 <= chosen <= 260  # 1 % of 20,000, binomial spread
    assert [tracing.stamp(e, pct=1.0).trace_id is not None for e in envelopes[:500]] == [
        e.trace_id is not None for e in stamped[:500]
    ]
    assert all(tracing.is_sampled_traceparent(e.trace_id) for e in stamped if e.trace_id)
    assert len(spans.get_finished_spans()) == chosen + sum(1 for e in stamped[:500] if e.trace_id)  # one per stamp
    assert tracing.stamp(envelopes[0], pct=0.0).trace_id is None
    proxy = _envelope(1, trace_id="from-the-proxy")
    assert tracing.stamp(proxy, pct=100.0) is proxy  # an upstream trace id is kept


def test_one_connected_trace_from_capture_to_commit(spans: InMemorySpanExporter) -> None:
    envelope = tracing.stamp(_envelope(7))
    assert envelope.trace_id is not None
    routed = tracing.router_span(envelope, started_ns=1, route="baseline", priority="standard")
    publishing = tracing.PublishSpans()
    header = publishing.start(routed, "query-plans", b"standard:q7")
    assert len(publishing) == 1
    publishing.delivered(header)
    assert len(publishing) == 0
    times = tracing.BatchTimes(10.0, 10.1, 10.1, 10.2, 10.2, 10.5)
    (sample,) = tracing.record_ingest({0: header}, ["q7"], ["c1"], [9.0], times, batch_id=3)
    assert sample.publish_to_commit_ms == pytest.approx(1500.0)

    finished = spans.get_finished_spans()
    names = sorted(s.name for s in finished)
    assert names == sorted(
        ["capture", "router", "kafka.publish", "ingest", "decode", "parquet.write", "postgres.commit"]
    )
    assert len({s.context.trace_id for s in finished}) == 1
    assert sample.trace_id == format(finished[0].context.trace_id, "032x")
    by_id = {s.context.span_id: s for s in finished}
    roots = [s for s in finished if s.parent is None]
    assert [r.name for r in roots] == ["capture"]
    for span in finished:  # every other span's parent is in the same trace
        assert span.parent is None or span.parent.span_id in by_id, span.name
    chain = {s.name: by_id[s.parent.span_id].name for s in finished if s.parent is not None}
    assert chain == {
        "router": "capture", "kafka.publish": "router", "ingest": "kafka.publish",
        "decode": "ingest", "parquet.write": "ingest", "postgres.commit": "ingest",
    }  # fmt: skip


def test_publish_spans_are_bounded(spans: InMemorySpanExporter) -> None:
    publishing = tracing.PublishSpans(capacity=2)
    parent = tracing.router_span(tracing.stamp(_envelope(1)), 1, "baseline", "standard")
    headers = [publishing.start(parent, "t", None) for _ in range(3)]
    assert len(publishing) == 2
    evicted = [s for s in spans.get_finished_spans() if s.name == "kafka.publish"]
    assert [(s.attributes or {})["planpipe.outcome"] for s in evicted] == ["spooled"]
    publishing.delivered(headers[0])  # already ended: ignored
    assert len(publishing) == 2


def test_sampled_indexes_and_traceparent_shape() -> None:
    sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert tracing.sampled_indexes([None, sampled, "t-000001", unsampled, sampled]) == [1, 4]
