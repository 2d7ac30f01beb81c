import math
import random

import pytest

from planpipe.contract import Envelope, EnvelopeDecoder, encode_envelope
from planpipe.ingest.batch import prepare_batch
from planpipe.plans import latency
from planpipe.routing.router import RoutingConfig


def test_histogram_quantiles_are_within_bucket_precision() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(3, 1) for _ in range(20_000)]
    hist = latency.histogram(values)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        estimate = latency.quantile(hist, q)
        assert estimate is not None
        assert abs(estimate - exact) / exact < latency.GROWTH - 1


def test_merge_equals_histogram_of_the_union() -> None:
    a, b = [0.001, 1.0, 5.0, 5.1], [5.0, 1e9, 250.0]
    assert latency.merge(latency.histogram(a), latency.histogram(b)) == latency.histogram(a + b)
    assert latency.quantile({}, 0.5) is None
    with pytest.raises(ValueError):
        latency.quantile({1: 1}, 1.5)


class Record:
    def __init__(self, value: bytes, offset: int, key: bytes = b"standard:q") -> None:
        self._value, self._offset, self._key = value, offset, key

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [("trace-id", b"t-header")]

    def topic(self) -> str:
        return "query-plans"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_790_000_000_000)


PLAN = '[{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t", "Alias": "t"}}]'


def _envelope(**overrides: object) -> bytes:
    fields: dict[str, object] = dict(
        query_hash="q", execution_timestamp=1_790_000_000.0, cluster_id="c", plan_text=PLAN,
        actual_rows=1, total_time_ms=1.0,
    )  # fmt: skip
    fields.update(overrides)
    return encode_envelope(Envelope(**fields))  # type: ignore[arg-type]


def test_prepare_batch_splits_valid_rejects_and_low_priority() -> None:
    records = [
        Record(_envelope(), 10),
        Record(b"{nope", 11),
        Record(_envelope(plan_text="not a plan"), 12),
        Record(_envelope(), 13, key=b"low:q"),
        Record(_envelope(total_time_ms=6000.0), 14, key=b"critical:q"),
        Record(_envelope(), 15, key=b"no-colon"),
        # Repeated keys (parsed once per batch, a bad one rejected each time), offsets out of order.
        Record(_envelope(), 16, key=b"low:q"),
        Record(_envelope(total_time_ms=6000.0), 8),
        Record(_envelope(), 9, key=b"no-colon"),
    ]
    batch = prepare_batch(records, EnvelopeDecoder(), RoutingConfig(), drop_low_priority=True)
    assert batch.consumed == 9
    assert batch.observations.kafka_offset == [10, 14, 8]
    assert batch.observations.route == ["baseline", "critical", "critical"]
    assert batch.observations.priority == ["standard", "critical", "standard"]
    assert batch.observations.trace_id == ["t-header"] * 3
    assert batch.observations.published_at == [1_790_000_000.0] * 3
    assert [(d.reason.value, d.source_offset) for d in batch.dead_letters] == [
        ("malformed_json", 11), ("plan_unparseable", 12), ("wrong_type", 15), ("wrong_type", 9)]  # fmt: skip
    assert batch.dropped_low == 2
    span = batch.offset_ranges[("query-plans", 3)]
    assert (span.first, span.last) == (8, 16)
    assert len(batch.new_plan_samples) == 1


def test_split_by_bytes_bounds_each_slice_and_keeps_order() -> None:
    from planpipe.ingest.batch import split_by_bytes

    class Sized:
        def __init__(self, n: int) -> None:
            self.n = n

        def value(self) -> bytes:
            return b"x" * self.n

    records = [Sized(n) for n in (40, 40, 30, 100, 1, 1)]
    chunks = split_by_bytes(records, 80)
    assert [[r.n for r in c] for c in chunks] == [[40, 40], [30], [100], [1, 1]]
    assert split_by_bytes(list[Sized](), 80) == [[]]
