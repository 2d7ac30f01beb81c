"""Distributed tracing of sampled envelopes (runbook: "Sample 1% of EXPLAIN captures with full
distributed tracing. Verify that producer.publish_ts to baseline_store.commit_ts remains within SLA").

One trace per sampled envelope, W3C trace context end to end:

    capture ─► router ─► kafka.publish ─► ingest ─┬─ decode
                                                  ├─ parquet.write
                                                  └─ postgres.commit

* capture: `stamp()` decides the sample (PLANPIPE_TRACE_SAMPLE_PCT, default 1 %) and puts the
  capture span's `traceparent` into the envelope's `trace_id` field (so it survives a JSONL file
  between `planpipe capture` and `planpipe publish`);
* router and producer (`planpipe/routing/publish.py`): a `router` span, then a `kafka.publish`
  span from hand-over to the broker's ack, whose context travels in the record's `traceparent`
  header;
* ingest (`planpipe/ingest/engine.py`): per batch, only for its sampled records, an `ingest`
  span with `decode`, `parquet.write` and `postgres.commit` children, timed with the batch's own
  stage timestamps, and one `planpipe.trace_samples` row (publish → commit) for the SLA check.

Unsampled envelopes cost one comparison per stage: nothing here runs per record unless the
envelope carries a sampled `traceparent`. Spans go to an OTLP/HTTP collector when
PLANPIPE_OTLP_ENDPOINT is set and nowhere by default; tests install an in-memory exporter
with `use_provider()`.
"""

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from planpipe.contract import Envelope

if TYPE_CHECKING:
    import psycopg

TRACEPARENT: Final = "traceparent"  # W3C header name, also on Kafka records
DEFAULT_SAMPLE_PCT: Final = 1.0
SERVICE_NAME: Final = "planpipe"

_propagator: Final = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: TracerProvider | None = None
_sample_pct: float | None = None


def _env_pct() -> float:
    raw = os.environ.get("PLANPIPE_TRACE_SAMPLE_PCT", "").strip()
    try:
        pct = float(raw) if raw else DEFAULT_SAMPLE_PCT
    except ValueError:
        raise ValueError(f"PLANPIPE_TRACE_SAMPLE_PCT must be a number, got {raw!r}") from None
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"PLANPIPE_TRACE_SAMPLE_PCT must be within 0..100, got {pct}")
    return pct


def _default_provider() -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    endpoint = os.environ.get("PLANPIPE_OTLP_ENDPOINT", "").strip()
    if endpoint:
        # Imported only when configured: the exporter pulls in protobuf and an HTTP client.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def provider() -> TracerProvider:
    global _provider
    with _lock:
        if _provider is None:
            _provider = _default_provider()
        return _provider


def use_provider(new: TracerProvider | None, sample_pct: float | None = None) -> None:
    """Install a provider (tests: one with an in-memory exporter) and optionally a sample share;
    None restores the environment's."""
    global _provider, _sample_pct
    with _lock:
        _provider = new
        _sample_pct = sample_pct


def sample_pct() -> float:
    global _sample_pct
    if _sample_pct is None:
        _sample_pct = _env_pct()
    return _sample_pct


def _tracer() -> trace.Tracer:
    return provider().get_tracer("planpipe")


def is_sampled_traceparent(value: str | None) -> bool:
    """`00-<32 hex>-<16 hex>-<flags>` with the sampled bit: the only per-record test downstream."""
    return value is not None and len(value) == 55 and value[2] == "-" and value[-1] in "13579bdf"


def context_of(traceparent: str) -> Context:
    return _propagator.extract({TRACEPARENT: traceparent})


def traceparent_of(span: Span) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier[TRACEPARENT]


def _chosen(envelope: Envelope, pct: float) -> bool:
    # Deterministic per observation (same capture, same answer); spread evenly over hashes.
    if pct <= 0.0:
        return False
    if pct >= 100.0:
        return True
    key = f"{envelope.cluster_id}\x1f{envelope.query_hash}\x1f{envelope.execution_timestamp!r}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 1_000_000
    return bucket < pct * 10_000


def stamp(envelope: Envelope, *, pct: float | None = None) -> Envelope:
    """At capture: for a sampled share, record the `capture` span (the statement's execution up
    to now) and return the envelope with its `traceparent` as `trace_id`. An envelope that
    already has a trace id (set by a database proxy) keeps it."""
    if envelope.trace_id is not None or not _chosen(envelope, sample_pct() if pct is None else pct):
        return envelope
    started = int(envelope.execution_timestamp * 1e9)
    span = _tracer().start_span(
        "capture",
        kind=SpanKind.PRODUCER,
        start_time=min(started, time.time_ns()),
        attributes=_attributes(envelope.cluster_id, envelope.query_hash),
    )
    span.end()
    return msgspec.structs.replace(envelope, trace_id=traceparent_of(span))


def _attributes(cluster_id: str, query_hash: str) -> dict[str, str]:
    return {"planpipe.cluster_id": cluster_id, "planpipe.query_hash": query_hash}


# -- router and producer -------------------------------------------------------------------------


def router_span(envelope: Envelope, started_ns: int, route: str, priority: str) -> Context:
    """The router's decision for a sampled envelope; returns the context the publish span hangs off."""
    assert envelope.trace_id is not None
    span = _tracer().start_span(
        "router",
        context=context_of(envelope.trace_id),
        start_time=started_ns,
        attributes={
            **_attributes(envelope.cluster_id, envelope.query_hash),
            "planpipe.route": route,
            "planpipe.priority": priority,
        },
    )
    span.end()
    return trace.set_span_in_context(span)


class PublishSpans:
    """Open `kafka.publish` spans by the traceparent they put in the record header; ended on ack.

    Bounded: a record that stays spooled past `capacity` newer sampled records ends its span
    with `planpipe.outcome=spooled` (the record is safe in the spool, its trace just stops there).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._open: OrderedDict[str, Span] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, parent: Context, topic: str, key: bytes | None) -> str:
        span = _tracer().start_span(
            "kafka.publish",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                        "messaging.kafka.message.key": (key or b"").decode(errors="replace")},
        )  # fmt: skip
        header = traceparent_of(span)
        evicted: list[Span] = []
        with self._lock:
            self._open[header] = span
            while len(self._open) > self._capacity:
                evicted.append(self._open.popitem(last=False)[1])
        for old in evicted:
            old.set_attribute("planpipe.outcome", "spooled")
            old.end()
        return header

    def delivered(self, header: str) -> None:
        with self._lock:
            span = self._open.pop(header, None)
        if span is not None:
            span.set_attribute("planpipe.outcome", "acknowledged")
            span.end()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


# -- ingest --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Wall-clock stage boundaries of one micro-batch (seconds since the epoch)."""

    started: float
    decoded: float
    parquet_started: float
    parquet_done: float
    commit_started: float
    committed: float


@dataclass(frozen=True, slots=True)
class TraceSample:
    trace_id: str  # 32 hex digits
    query_hash: str
    cluster_id: str
    published_at: float
    committed_at: float
    batch_id: int

    @property
    def publish_to_commit_ms(self) -> float:
        return max(0.0, (self.committed_at - self.published_at) * 1000)


def sampled_indexes(trace_ids: Sequence[str | None]) -> list[int]:
    """Positions of sampled envelopes in a batch: one cheap test per record."""
    return [i for i, value in enumerate(trace_ids) if value is not None and is_sampled_traceparent(value)]


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def record_ingest(
    parents: Mapping[int, str],
    query_hashes: Sequence[str],
    cluster_ids: Sequence[str],
    published_at: Sequence[float],
    times: BatchTimes,
    batch_id: int,
    attributes: Mapping[str, str | int] | None = None,
) -> list[TraceSample]:
    """Spans of one committed batch for its sampled records (index → parent traceparent)."""
    tracer = _tracer()
    samples: list[TraceSample] = []
    stages = (
        ("decode", times.started, times.decoded),
        ("parquet.write", times.parquet_started, times.parquet_done),
        ("postgres.commit", times.commit_started, times.committed),
    )
    for index, parent in parents.items():
        ingest = tracer.start_span(
            "ingest",
            context=context_of(parent),
            kind=SpanKind.CONSUMER,
            start_time=_ns(times.started),
            attributes={
                **_attributes(cluster_ids[index], query_hashes[index]),
                "planpipe.batch_id": batch_id,
                "planpipe.publish_to_commit_ms": round(max(0.0, times.committed - published_at[index]) * 1000, 3),
                **(attributes or {}),
            },
        )
        inside = trace.set_span_in_context(ingest)
        for name, start, end in stages:
            tracer.start_span(name, context=inside, start_time=_ns(start)).end(end_time=_ns(max(start, end)))
        ingest.end(end_time=_ns(times.committed))
        samples.append(
            TraceSample(
                trace_id=parent[3:35],
                query_hash=query_hashes[index],
                cluster_id=cluster_ids[index],
                published_at=published_at[index],
                committed_at=times.committed,
                batch_id=batch_id,
            )
        )
    return samples


class _HasHeaders(Protocol):
    def headers(self) -> Any: ...  # confluent-kafka: a list of (name, value) pairs, or None
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


def parents_from_headers(
    records: Sequence[_HasHeaders],
    partitions: Sequence[int],
    offsets: Sequence[int],
    trace_ids: Sequence[str | None],
    sampled: Sequence[int],
) -> dict[int, str]:
    """Index → parent traceparent: the record's `traceparent` header (the publish span), else the
    envelope's own (the capture span, e.g. for a record republished by the DLQ replay)."""
    wanted = {(partitions[i], offsets[i]): i for i in sampled}
    parents: dict[int, str] = {}
    for record in records:
        index = wanted.get((record.partition() or 0, record.offset() or 0))
        if index is None:
            continue
        for name, value in record.headers() or ():
            if name == TRACEPARENT and isinstance(value, str | bytes) and value:
                header = value.decode(errors="replace") if isinstance(value, bytes) else value
                if is_sampled_traceparent(header) and header[3:35] == str(trace_ids[index])[3:35]:
                    parents[index] = header
        parents.setdefault(index, str(trace_ids[index]))
    return parents


def store_samples(conn: "psycopg.Connection[Any]", consumer_group: str, samples: Sequence[TraceSample]) -> None:
    """One row per sampled envelope; a batch committed again after a crash adds nothing twice."""
    if not samples:
        return
    conn.execute(
        """INSERT INTO planpipe.trace_samples (trace_id, query_hash, cluster_id, consumer_group, published_at,
                                               committed_at, publish_to_commit_ms, batch_id)
           SELECT t, q, c, %s, to_timestamp(p), to_timestamp(k), ms, b
           FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[], %s::float8[], %s::bigint[])
                AS s(t, q, c, p, k, ms, b)
           ON CONFLICT (trace_id) DO NOTHING""",
        (
            consumer_group,
            [s.trace_id for s in samples],
            [s.query_hash for s in samples],
            [s.cluster_id for s in samples],
            [s.published_at for s in samples],
            [s.committed_at for s in samples],
            [s.publish_to_commit_ms for s in samples],
            [s.batch_id for s in samples],
        ),
    )


def force_flush(timeout_ms: int = 5_000) -> bool:
    """Export what is buffered (end of a CLI run; tests)."""
    return provider().force_flush(timeout_ms)
