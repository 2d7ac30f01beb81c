"""The agent's hand-off: router → records with capture ids → producer (or Redis), durable per batch.

`PlanPublisher` feeds live capture through the routing guide's drop-oldest
queue. The agent reads a log that is itself the buffer, so it skips that queue:
each batch is routed (validation, routing, sampling; rejects become DLQ
records), stamped with its capture ids, and handed to the producer in one
`send()`; the caller waits until the producer reports it durable (acknowledged
by Kafka or committed to the spool) before moving the log cursor.
"""

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from planpipe import tracing
from planpipe.agent.ledger import H_CAPTURE_ID
from planpipe.routing import metrics
from planpipe.routing.publish import PlanPublisher, Source, _Outgoing, label
from planpipe.routing.router import Rejection
from planpipe.routing.spool import OutRecord


@dataclass(frozen=True, slots=True)
class Item:
    raw: bytes
    capture_id: str
    source: Source


@dataclass(frozen=True)
class Routed:
    records: list[OutRecord]
    per_topic: collections.Counter[str]  # records per destination topic (main, DLQ)
    sampled_out: int


class AgentPublisher(PlanPublisher):
    def route(self, items: Sequence[Item]) -> Routed:
        """Route a batch (counted like `submit_raw`); sampled-out envelopes produce no record."""
        records: list[OutRecord] = []
        per_topic: collections.Counter[str] = collections.Counter()
        accepted: collections.Counter[str] = collections.Counter()
        rejected: collections.Counter[str] = collections.Counter()
        sampled_out = 0
        for item in items:
            started_ns = time.time_ns()
            outcome = self._router.route_raw(item.raw)
            if isinstance(outcome, Rejection):
                rejected[outcome.reason.value] += 1
                record = self._dead_letter(outcome, item.source)
            elif not outcome.sampled:
                sampled_out += 1
                continue
            else:
                accepted[label(outcome.route, outcome.priority)] += 1
                trace = None  # as in submit_raw: a sampled traceparent gets its router span
                if tracing.is_sampled_traceparent(outcome.envelope.trace_id):
                    trace = tracing.router_span(outcome.envelope, started_ns, outcome.route, outcome.priority)
                record = self._record(_Outgoing(outcome, item.raw, trace))
            records.append(replace(record, headers=(*record.headers, (H_CAPTURE_ID, item.capture_id.encode()))))
            per_topic[record.topic] += 1
        with self._counts_lock:
            self._counts.submitted += len(items)
            self._counts.sampled_out += sampled_out
            self._counts.accepted.update(accepted)
            self._counts.rejected.update(rejected)
        return Routed(records, per_topic, sampled_out)

    def send_durable(self, records: Sequence[OutRecord]) -> None:
        """Hand `records` to the producer in order; returns once all are acknowledged or spooled."""
        if not records:
            return
        done = threading.Event()

        def durable(elapsed_ms: float) -> None:
            metrics.BATCH_FLUSH_MS.observe(elapsed_ms)
            done.set()

        self._producer.send(records, on_durable=durable)
        done.wait()
