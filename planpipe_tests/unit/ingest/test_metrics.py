"""`observe_many` must leave a histogram exactly as one `observe` per value would."""

from prometheus_client import CollectorRegistry, Histogram

from planpipe.ingest.metrics import observe_many


def _samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    samples = [s for metric in histogram.collect() for s in metric.samples if not s.name.endswith("_created")]
    return {(s.name, s.labels.get("le", "")): s.value for s in samples}


def test_observe_many_matches_observe_per_value() -> None:
    values = [0.0, 4.9, 5.0, 5.1, 99.0, 1200.0, 1200.5, 29_999.0, 31_000.0, 250.25]
    buckets = (5, 10, 100, 1200, 30000)
    one = Histogram("one_ms", "per value", buckets=buckets, registry=CollectorRegistry())
    many = Histogram("one_ms", "batched", buckets=buckets, registry=CollectorRegistry())
    for value in values:
        one.observe(value)
    observe_many(many, values)
    observe_many(many, [])
    assert _samples(many) == _samples(one)
    assert _samples(many)[("one_ms_count", "")] == len(values)
