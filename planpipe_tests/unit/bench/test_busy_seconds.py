import pytest

from planpipe.bench.ingest import busy_seconds

pytestmark = pytest.mark.unit


def test_overlapping_batches_count_once_and_gaps_not_at_all() -> None:
    # Batch 2 is decoded while batch 1 is written; batch 3 starts after an idle gap.
    spans = [(10.0, 10.5), (10.3, 10.9), (12.0, 12.2)]
    assert busy_seconds(spans) == pytest.approx(0.9 + 0.2)


def test_a_span_inside_another_adds_nothing() -> None:
    assert busy_seconds([(0.0, 4.0), (1.0, 2.0)]) == pytest.approx(4.0)
    assert busy_seconds([]) == 0.0
