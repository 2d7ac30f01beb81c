"""Adaptive micro-batches: grow under a backlog, shrink back when caught up."""

from planpipe.ingest.batch import BATCH_TARGET_BYTES, next_batch_limit


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


def test_batches_stay_within_the_byte_budget() -> None:
    # 5 KB envelopes: the budget holds ~2,500 of them, whatever the count ceiling.
    limit = 500
    for _ in range(8):
        limit = next_batch_limit(limit, limit, 500, 5000, received_bytes=limit * 5 * 1024)
    assert limit == BATCH_TARGET_BYTES // (5 * 1024)
    # Huge envelopes never push a batch below the configured size.
    assert next_batch_limit(500, 500, 500, 5000, received_bytes=500 * 8 * 2**20) == 500
