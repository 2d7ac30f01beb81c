"""Which micro-batches the observations suite validates when it runs on its own (no batches of its run)."""

import psycopg


def recent_batch_files(
    conn: psycopg.Connection[tuple[object, ...]], consumer_group: str, limit: int
) -> list[list[str]]:
    """The Parquet files of the group's `limit` most recent committed batches, newest first."""
    rows = conn.execute(
        """SELECT parquet_files FROM planpipe.ingest_batches WHERE consumer_group = %s
           ORDER BY batch_id DESC LIMIT %s""",
        (consumer_group, limit),
    ).fetchall()
    return [[str(name) for name in files] for (files,) in rows if isinstance(files, list) and files]
