"""The batches the observations suite falls back to, read from the real ingest_batches table."""

import json
import uuid

import psycopg

from planpipe.quality.batches import recent_batch_files
from planpipe.settings import Settings


def test_the_newest_batches_with_files_of_the_group_newest_first(settings: Settings) -> None:
    group = f"test-batches-{uuid.uuid4().hex[:8]}"
    batches = [["a.parquet"], [], ["b.parquet", "c.parquet"], ["d.parquet"]]
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        for files in batches:
            conn.execute(
                """INSERT INTO planpipe.ingest_batches
                   (consumer_group, offset_ranges, consumed, valid, dlq, lock_wait_ms, duration_ms, parquet_files)
                   VALUES (%s, '[]', 1, 1, 0, 0, 1, %s)""",
                (group, json.dumps(files)),
            )
        try:
            assert recent_batch_files(conn, group, 3) == [["d.parquet"], ["b.parquet", "c.parquet"]]
            assert recent_batch_files(conn, group, 10) == [["d.parquet"], ["b.parquet", "c.parquet"], ["a.parquet"]]
            assert recent_batch_files(conn, f"{group}-other", 10) == []
        finally:
            conn.execute("DELETE FROM planpipe.ingest_batches WHERE consumer_group = %s", (group,))
