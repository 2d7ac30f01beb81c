"""Synthetic micro-batches for the quality unit tests."""

import hashlib
from datetime import UTC, datetime

import polars as pl

from planpipe.ingest import parquet_sink
from planpipe.ingest.batch import Observations
from planpipe.plans.plan_key import PLAN_KEY, plan_keys

ROWS = 60


def observations(n: int = ROWS) -> Observations:
    return Observations(
        query_hash=[f"q-{i % 7}" for i in range(n)],
        cluster_id=[f"pg-{i % 2}" for i in range(n)],
        execution_timestamp=[1_790_000_000.0 + i for i in range(n)],
        plan_text=['[{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t"}}]'] * n,
        actual_rows=[i * 10 for i in range(n)],
        total_time_ms=[0.5 + i for i in range(n)],
        query_type=["SELECT" if i % 3 else None for i in range(n)],
        query_text=[None] * n,
        trace_id=[f"trace-{i}" if i % 4 else None for i in range(n)],
        published_at=[1_790_000_000.5 + i for i in range(n)],
        fingerprint=[hashlib.blake2b(str(i % 5).encode(), digest_size=16).hexdigest() for i in range(n)],
        route=[("baseline", "critical", "ddl")[i % 3] for i in range(n)],
        priority=[("standard", "low", "critical", "regression_candidate")[i % 4] for i in range(n)],
        kafka_topic=["query-plans"] * n,
        kafka_partition=[i % 3 for i in range(n)],
        kafka_offset=[100 + i for i in range(n)],
        shared_blocks=[i if i % 5 else None for i in range(n)],
        temp_blocks=[0 if i % 5 else None for i in range(n)],
        top_rows=[float(i) if i % 5 else None for i in range(n)],
        top_loops=[1 if i % 5 else None for i in range(n)],
    )


def clean_frame(n: int = ROWS) -> pl.DataFrame:
    stamp = datetime(2026, 9, 21, 12, 0, tzinfo=UTC)
    schema = {name: dtype for name, dtype in parquet_sink.SCHEMA.items() if name != PLAN_KEY}
    frame = pl.DataFrame({**observations(n).columns(), "ingested_at": [stamp] * n}, schema=schema)
    return frame.with_columns(plan_keys(frame)).select(list(parquet_sink.SCHEMA))


def set_row(frame: pl.DataFrame, column: str, row: int, value: object) -> pl.DataFrame:
    values = frame[column].to_list()
    values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))
