"""One connected trace per sampled envelope, capture → router → Kafka → ingest → Parquet → PostgreSQL,
on the real broker and database, recorded by the SDK's in-memory exporter."""

import collections
from collections.abc import Iterator

import msgspec
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from planpipe import tracing
from planpipe.contract import encode_envelope
from planpipe.ingest import sla
from planpipe.ingest.engine import IngestEngine
from planpipe.routing.publish import PlanPublisher
from planpipe.settings import Settings
from planpipe_tests.integration.workload import capture_plans, create_workload, make_envelopes

STAGES = ["capture", "router", "kafka.publish", "ingest", "decode", "parquet.write", "postgres.commit"]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use_provider(provider)
    yield memory
    tracing.use_provider(None)


def test_sampled_envelopes_have_one_connected_trace_each(settings: Settings, exporter: InMemorySpanExporter) -> None:
    create_workload(settings.pg_dsn)
    plans = capture_plans(settings.pg_dsn)
    envelopes = [msgspec.structs.replace(e, trace_id=None) for e in make_envelopes(plans, 80, "traced")]
    stamped = [tracing.stamp(e, pct=20.0) for e in envelopes]
    sampled = {e.trace_id[3:35]: e for e in stamped if e.trace_id}
    assert 5 <= len(sampled) <= 30

    publisher = PlanPublisher(settings)
    for envelope in stamped:
        publisher.submit_raw(encode_envelope(envelope))
    report = publisher.close(30)
    assert sum(report.published.values()) == len(stamped)

    engine = IngestEngine(settings, max_messages=40)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=60)
    finally:
        engine.close()
    assert summary.valid == len(stamped)

    traces: dict[str, list[ReadableSpan]] = collections.defaultdict(list)
    for span in exporter.get_finished_spans():
        assert span.context is not None
        traces[format(span.context.trace_id, "032x")].append(span)
    assert set(traces) == set(sampled)  # unsampled envelopes left no span anywhere
    for trace_id, spans in traces.items():
        assert sorted(s.name for s in spans) == sorted(STAGES), trace_id
        ids = {s.context.span_id for s in spans if s.context is not None}
        roots = [s for s in spans if s.parent is None]
        assert [r.name for r in roots] == ["capture"]
        assert all(s.parent is None or s.parent.span_id in ids for s in spans), trace_id  # connected
        (ingest,) = [s for s in spans if s.name == "ingest"]
        assert ingest.attributes is not None
        assert ingest.attributes["planpipe.query_hash"] == sampled[trace_id].query_hash

    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute(
            "SELECT trace_id, publish_to_commit_ms FROM planpipe.trace_samples WHERE consumer_group = %s",
            (settings.consumer_group,),
        ).fetchall()
        outcome = sla.trace_latency(conn, settings.consumer_group)
    assert {r[0] for r in rows} == set(sampled)
    assert all(ms >= 0 for _, ms in rows)
    assert outcome.value is not None and outcome.threshold == sla.P95_THRESHOLD_MS
    assert outcome.passed is (outcome.value <= sla.P95_THRESHOLD_MS)
    assert f"over {len(sampled)} sampled traces" in outcome.detail
