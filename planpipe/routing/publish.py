"""`PlanPublisher`: Router → bounded queue → `PlanProducer`, and `planpipe publish`.

The capture side calls `submit_raw()` and never waits on Kafka: the router
validates, routes and samples synchronously; rejects go to the DLQ (through the
producer, so they are spooled like everything else during an outage); accepted
envelopes enter the routing guide's bounded drop-oldest queue and a sender
thread hands them to the producer in batches. The value on the topic is the
original bytes, untouched; routing facts travel in the key and headers.
"""

import collections
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import msgspec
from opentelemetry.context import Context

from planpipe import tracing
from planpipe.contract import EnvelopeDecoder
from planpipe.dlq import DeadLetter, fit_value
from planpipe.kafka_config import size_limits
from planpipe.messaging.headers import H_REASON, H_TRACE_ID, header_map
from planpipe.messaging.headers import H_ROUTE as H_ROUTE
from planpipe.messaging.headers import H_SOURCE_LINE as H_SOURCE_LINE
from planpipe.routing import metrics
from planpipe.routing.candidates import BaselineLatencies, RegressionCandidates
from planpipe.routing.producer import DEFAULT_COOLDOWN_S, PlanProducer, ProducerStats
from planpipe.routing.router import (
    BoundedEventQueue,
    Rejection,
    Router,
    RoutingConfig,
    RoutingDecision,
    parse_message_key,
)
from planpipe.routing.spool import OutRecord
from planpipe.settings import Settings
from planpipe.topology import load_topology

logger = logging.getLogger("planpipe.publish")


DEFAULT_SEND_BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class Source:
    """Where a raw envelope came from, for DLQ headers (file and 1-based line)."""

    file: str | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class _Outgoing:
    decision: RoutingDecision
    raw: bytes
    trace: Context | None = None  # the router span of a sampled envelope

    @property
    def query_hash(self) -> str:
        return self.decision.query_hash


class _ClusterOnly(msgspec.Struct):
    cluster_id: object = None


_cluster_only = msgspec.json.Decoder(_ClusterOnly)


def label(route: str, priority: str) -> str:
    return f"{route}/{priority}"


@dataclass(frozen=True)
class PublishReport:
    submitted: int
    accepted: dict[str, int]  # route/priority → handed to the producer
    published: dict[str, int]  # route/priority → acknowledged by Kafka
    rejected: dict[str, int]  # reason → sent to the DLQ
    dead_lettered: dict[str, int]  # reason → acknowledged on the DLQ topic
    sampled_out: int
    queue_overflow: int
    undeliverable: int
    producer: ProducerStats
    lines_read: int = 0
    blank_lines: int = 0
    seconds: float = 0.0

    @property
    def still_spooled(self) -> int:
        return self.producer.spool_depth

    def as_dict(self) -> dict[str, object]:
        return {
            "lines_read": self.lines_read,
            "blank_lines": self.blank_lines,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "published": self.published,
            "published_total": sum(self.published.values()),
            "rejected": self.rejected,
            "dead_lettered": self.dead_lettered,
            "dead_lettered_total": sum(self.dead_lettered.values()),
            "sampled_out": self.sampled_out,
            "queue_overflow": self.queue_overflow,
            "undeliverable": self.undeliverable,
            "spooled": self.producer.spooled,
            "still_spooled": self.still_spooled,
            "breaker_opened": self.producer.breaker_opened,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Counts:
    submitted: int = 0
    sampled_out: int = 0
    queue_overflow: int = 0
    undeliverable: int = 0
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    published: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)


def _observe_flush(elapsed_ms: float) -> None:
    metrics.BATCH_FLUSH_MS.observe(elapsed_ms)


class PlanPublisher:
    def __init__(
        self,
        settings: Settings,
        *,
        router: Router | None = None,
        send_batch: int = DEFAULT_SEND_BATCH,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self._settings = settings
        self._limits = size_limits(settings)
        self._topology = load_topology(settings)
        self._router = router or Router(
            RoutingConfig(
                sample_rate_pct=settings.sample_rate_pct, latency_multiplier=settings.latency_multiplier or None
            ),
            decoder=EnvelopeDecoder(max_plan_bytes=settings.max_plan_bytes),
            regression_candidates=RegressionCandidates(settings.pg_dsn),
            baselines=BaselineLatencies(settings.pg_dsn),
            region_of=self._topology.region_of,
            max_envelope_bytes=self._limits.max_envelope_bytes,
        )
        # Data residency: every region's pair of topics; the base pair for unmapped clusters.
        self._topics: dict[str | None, tuple[str, str]] = {None: (settings.topic, settings.dlq_topic)}
        self._topics.update({r.name: (r.topic, r.dlq_topic) for r in self._topology.regions})
        self._main_topics = {main for main, _ in self._topics.values()}
        self._dlq_topics = {dlq for _, dlq in self._topics.values()}
        if self._router.max_envelope_bytes is None:
            # A caller's router still enforces the size limit the producer is set up for.
            self._router.max_envelope_bytes = self._limits.max_envelope_bytes
        self._queue: BoundedEventQueue[_Outgoing] = BoundedEventQueue(self._router.config.queue_capacity)
        self._counts = _Counts()
        self._counts_lock = threading.Lock()
        self._send_batch = send_batch
        self._producer = PlanProducer(
            settings,
            cooldown_s=cooldown_s,
            on_delivered=self._on_delivered,
            on_undeliverable=self._on_undeliverable,
        )
        self._publish_spans = tracing.PublishSpans()
        self._started = time.monotonic()
        self._sender = threading.Thread(target=self._send_loop, name="planpipe-publisher-send", daemon=True)
        self._sender.start()

    @property
    def producer(self) -> PlanProducer:
        return self._producer

    @property
    def queue(self) -> BoundedEventQueue[_Outgoing]:
        return self._queue

    def submit_raw(self, raw: bytes, *, source: Source | None = None) -> RoutingDecision | Rejection:
        """Route one raw envelope; returns what the router decided. Never blocks on Kafka."""
        started_ns = time.time_ns()
        outcome = self._router.route_raw(raw)
        with self._counts_lock:
            self._counts.submitted += 1
            if isinstance(outcome, Rejection):
                self._counts.rejected[outcome.reason.value] += 1
            elif not outcome.sampled:
                self._counts.sampled_out += 1
            else:
                self._counts.accepted[label(outcome.route, outcome.priority)] += 1
        if isinstance(outcome, Rejection):
            self._producer.send([self._dead_letter(outcome, source or Source())])
        elif outcome.sampled:
            trace = None
            if tracing.is_sampled_traceparent(outcome.envelope.trace_id):
                trace = tracing.router_span(outcome.envelope, started_ns, outcome.route, outcome.priority)
            evicted = self._queue.put(_Outgoing(outcome, raw, trace))
            if evicted is not None:
                with self._counts_lock:
                    self._counts.queue_overflow += 1  # the router logged the evicted hash
        return outcome

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Backpressure for batch callers (files): wait until a put will not evict.

        Live capture agents skip this and accept the drop-oldest policy instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.depth() >= self._queue.capacity:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def flush(self, timeout: float) -> int:
        """Wait until the queue is empty and the producer has nothing pending; returns what is left."""
        deadline = time.monotonic() + timeout
        while self._queue.depth() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._queue.depth() + self._producer.flush(max(0.0, deadline - time.monotonic()))

    def report(self) -> PublishReport:
        with self._counts_lock:
            counts = self._counts
            return PublishReport(
                submitted=counts.submitted,
                accepted=dict(counts.accepted),
                published=dict(counts.published),
                rejected=dict(counts.rejected),
                dead_lettered=dict(counts.dead_lettered),
                sampled_out=counts.sampled_out,
                queue_overflow=counts.queue_overflow,
                undeliverable=counts.undeliverable,
                producer=self._producer.stats(),
                seconds=time.monotonic() - self._started,
            )

    def close(self, timeout: float = 30.0) -> PublishReport:
        """Send what is queued, flush for up to `timeout` s, leave the rest spooled."""
        deadline = time.monotonic() + timeout
        self._queue.close()
        self._sender.join()
        self._producer.close(max(0.0, deadline - time.monotonic()))
        return self.report()

    # -- internals ---------------------------------------------------------------

    def _dead_letter(self, rejection: Rejection, source: Source) -> OutRecord:
        # A reject larger than the DLQ carries goes truncated, with its size and sha256.
        value, truncation = fit_value(rejection.raw, self._limits.max_envelope_bytes)
        if truncation:
            logger.warning(
                "reject of %d bytes (%s) truncated to %d bytes for the DLQ%s",
                len(rejection.raw),
                rejection.reason.value,
                len(value),
                f" ({source.file}:{source.line})" if source.file else "",
            )
        letter = DeadLetter(
            value=value,
            key=None,
            reason=rejection.reason,
            field=rejection.field,
            detail=rejection.detail,
            stage="router",
            source_file=source.file,
        )
        headers = letter.headers() + truncation
        if source.line is not None:
            headers.append((H_SOURCE_LINE, str(source.line).encode()))
        return OutRecord(self._dlq_topic_of(rejection.raw), None, value, tuple(headers))

    def _dlq_topic_of(self, raw: bytes) -> str:
        """A reject goes to its cluster's regional DLQ when its cluster id can still be read."""
        if len(self._topics) == 1:
            return self._settings.dlq_topic
        try:
            cluster_id = _cluster_only.decode(raw).cluster_id
        except (msgspec.DecodeError, UnicodeDecodeError):
            cluster_id = None
        region = self._topology.region_of(cluster_id) if isinstance(cluster_id, str) else None
        return self._topics[region][1]

    def _record(self, item: _Outgoing) -> OutRecord:
        decision = item.decision
        headers: list[tuple[str, bytes]] = [(H_ROUTE, decision.route.encode())]
        if decision.envelope.trace_id:
            headers.append((H_TRACE_ID, decision.envelope.trace_id.encode()))
        if item.trace is not None:  # the publish span's context travels to the consumer
            parent = self._publish_spans.start(item.trace, self._topics[decision.region][0], decision.key)
            headers.append((tracing.TRACEPARENT, parent.encode()))
        topic = self._topics[decision.region][0]
        return OutRecord(topic, decision.key, item.raw, tuple(headers))

    def _send_loop(self) -> None:
        while True:
            batch = self._queue.get_batch(self._send_batch, timeout=0.5)
            if not batch:
                if self._queue.drained:
                    return
                continue
            try:
                self._producer.send([self._record(item) for item in batch], on_durable=_observe_flush)
            except Exception:
                # Should not happen (send() spools on every broker problem); keep the
                # thread alive and say loudly what was lost.
                logger.exception("could not hand %d envelope(s) to the producer", len(batch))

    def _on_delivered(self, records: Sequence[OutRecord]) -> None:
        published: collections.Counter[str] = collections.Counter()
        dead: collections.Counter[str] = collections.Counter()
        for record in records:
            headers = header_map(record.headers)
            if record.topic in self._dlq_topics:
                dead[headers.get(H_REASON, "unknown")] += 1
            elif record.topic in self._main_topics and record.key is not None:
                priority, _ = parse_message_key(record.key)
                published[label(headers.get(H_ROUTE, "unknown"), priority)] += 1
                if (parent := headers.get(tracing.TRACEPARENT)) is not None:
                    self._publish_spans.delivered(parent)
        with self._counts_lock:
            self._counts.published.update(published)
            self._counts.dead_lettered.update(dead)

    def _on_undeliverable(self, record: OutRecord, error: str) -> None:
        with self._counts_lock:
            self._counts.undeliverable += 1
        logger.error(
            "Kafka refused a record for good (%s): topic=%s key=%r %d bytes",
            error,
            record.topic,
            record.key,
            len(record.value),
        )


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line terminator)."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip(b"\r\n")


def publish_file(
    settings: Settings,
    path: Path,
    *,
    sample_rate_pct: int | None = None,
    flush_timeout_s: float = 60.0,
    cooldown_s: float = DEFAULT_COOLDOWN_S,
) -> PublishReport:
    """Publish a JSONL file of envelopes; bad lines go to the DLQ with file and line headers."""
    if sample_rate_pct is not None:
        RoutingConfig(sample_rate_pct=sample_rate_pct)  # validate 0..100 before anything starts
        settings = replace(settings, sample_rate_pct=sample_rate_pct)
    publisher = PlanPublisher(settings, cooldown_s=cooldown_s)
    lines = blank = 0
    source_file = str(path)
    try:
        for number, raw in read_lines(path):
            lines += 1
            if not raw.strip():
                blank += 1  # separators, not envelopes; counted, never routed
                continue
            publisher.wait_for_room()
            publisher.submit_raw(raw, source=Source(source_file, number))
    finally:
        report = publisher.close(flush_timeout_s)
    return replace(report, lines_read=lines, blank_lines=blank)


def format_report(report: PublishReport, settings: Settings, source: str | None = None) -> str:
    out: list[str] = []
    width = 24

    def row(name: str, value: object, note: str = "") -> None:
        out.append(f"  {name:<{width}}: {value}{f'  ({note})' if note else ''}")

    out.append(f"planpipe publish{f': {source}' if source else ''}")
    if source is not None:
        row("lines read", f"{report.lines_read:,}", f"{report.blank_lines} blank" if report.blank_lines else "")
    row("published", f"{sum(report.published.values()):,}", f"acknowledged on {settings.topic}")
    for name in sorted(set(report.accepted) | set(report.published)):
        accepted = report.accepted.get(name, 0)
        acked = report.published.get(name, 0)
        row(f"  {name}", f"{acked:,}", "" if acked == accepted else f"of {accepted:,} accepted")
    row("dead-lettered", f"{sum(report.dead_lettered.values()):,}", f"acknowledged on {settings.dlq_topic}")
    for reason in sorted(set(report.rejected) | set(report.dead_lettered)):
        rejected = report.rejected.get(reason, 0)
        acked = report.dead_lettered.get(reason, 0)
        row(f"  {reason}", f"{acked:,}", "" if acked == rejected else f"of {rejected:,} rejected")
    row("sampled out", f"{report.sampled_out:,}", f"sample rate {settings.sample_rate_pct}%")
    if report.queue_overflow:
        row("dropped (queue full)", f"{report.queue_overflow:,}")
    if report.undeliverable:
        row("undeliverable", f"{report.undeliverable:,}", "refused by Kafka, see log")
    stats = report.producer
    row("spooled", f"{stats.spooled:,}", f"breaker opened {stats.breaker_opened}x" if stats.breaker_opened else "")
    row("still spooled", f"{report.still_spooled:,}", str(settings.spool_path) if report.still_spooled else "")
    row("elapsed", f"{report.seconds:.2f} s")
    return "\n".join(out)
