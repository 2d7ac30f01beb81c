"""Adaptive micro-batches: grow under a backlog, shrink back when caught up."""

from planpipe.ingest.batch import next_batch_limit


def test_batches_grow_while_full_and_shrink_when_caught_up() -> None:
    limit, sizes = 500, []
    for received in (500, 1000, 2000, 4000, 5000, 5000):  # a backlog: every consume comes back full
        limit = next_batch_limit(limit, received, 500, 5000)
        sizes.append(limit)
    assert sizes == [1000, 2000, 4000, 5000, 5000, 5000]
    assert next_batch_limit(5000, 3000, 500, 5000) == 5000  # more than half full: keep
    for _ in range(5):  # caught up: a trickle per wait
        limit = next_batch_limit(limit, 40, 500, 5000)
    assert limit == 500
