"""The SLA measures over planpipe.ingest_batches, on the real PostgreSQL."""

import uuid

import psycopg

from planpipe.ingest import sla


def _batch(conn: psycopg.Connection[tuple[object, ...]], group: str, valid: int, p95_ms: float) -> None:
    conn.execute(
        """INSERT INTO planpipe.ingest_batches (consumer_group, offset_ranges, consumed, valid, dlq,
               p95_latency_ms, lock_wait_ms, duration_ms, parquet_files)
           VALUES (%s, '[]', %s, %s, 0, %s, 0, 1, '[]')""",
        (group, valid, valid, p95_ms),
    )


def test_p95_weights_each_batch_by_its_rows(pg: psycopg.Connection[tuple[object, ...]]) -> None:
    group = f"sla-{uuid.uuid4().hex[:8]}"
    assert sla.p95_latency(pg, group).value is None  # no batches: nothing measured, nothing breached
    _batch(pg, group, valid=96, p95_ms=100.0)
    _batch(pg, group, valid=4, p95_ms=5_000.0)
    # 96 of 100 rows committed within 100 ms: the 95th row is in the fast batch
    within = sla.p95_latency(pg, group)
    assert (within.passed, within.value) == (True, 100.0)
    # two more slow rows: the 95th of 102 rows is now a slow one, however few batches carried them
    _batch(pg, group, valid=2, p95_ms=5_000.0)
    breached = sla.p95_latency(pg, group)
    assert (breached.passed, breached.value) == (False, 5_000.0)
    assert "3 batches" in breached.detail
