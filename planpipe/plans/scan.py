"""What detection reads: the observation columns, the scope of a run (lookback, optional
window, time slots) and the packed integer keys its streaming group-bys use."""

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import polars as pl

from planpipe.ingest.parquet_sink import live_files
from planpipe.plans import latency
from planpipe.plans.plan_key import PLAN_KEY, plan_keys

__all__ = [
    "LOW_BITS",
    "OBSERVATION_COLUMNS",
    "RECENT_BIT",
    "SLOTS",
    "Scope",
    "bucket_of",
    "epoch",
    "group_key",
    "group_keys_of",
    "query_key",
    "scan_observations",
    "when",
]

OBSERVATION_COLUMNS: Final[dict[str, pl.DataType | type[pl.DataType]]] = {
    "cluster_id": pl.String,
    "query_hash": pl.String,
    "fingerprint": pl.String,
    "execution_timestamp": pl.Float64,
    "total_time_ms": pl.Float64,
    "shared_blocks": pl.Int64,
    "temp_blocks": pl.Int64,
    "top_rows": pl.Float64,
    "top_loops": pl.Int64,
    PLAN_KEY: pl.UInt64,
}

# Streaming group-by keys pack (plan group, low bits) into one UInt64: a single integer key keeps
# the hash tables several times smaller than string or multi-column keys. The group is the plan
# key's top 53 bits; a collision between two plans is detected and never merges verdicts.
LOW_BITS: Final = 2048
RECENT_BIT: Final = 1024  # histogram keys: 1 bit for "new side" + 10 bits for the bucket
SLOTS: Final = 64  # time slots per plan over [first execution, now] (screening and settling)
assert latency.BUCKETS <= RECENT_BIT


def scan_observations(root: Path) -> pl.LazyFrame | None:
    """The observations dataset reduced to the columns detection reads (never plan_text);
    None while the dataset holds no file yet. Files written before the work columns
    existed read as null work, before the plan key as a null key (detection fills it:
    `plan_key.fill_plan_keys`); files that compaction already merged into another are
    skipped (`parquet_sink.live_files`), so no execution counts twice."""
    files = live_files(root) if root.exists() else []
    if not files:
        return None
    return pl.scan_parquet(
        [str(f) for f in files],
        hive_partitioning=True,
        hive_schema={"route": pl.String, "date": pl.String},
        schema=OBSERVATION_COLUMNS,
        extra_columns="ignore",
        missing_columns="insert",
    )


def query_key() -> pl.Expr:
    return pl.struct("cluster_id", "query_hash").hash()


def group_key() -> pl.Expr:
    """The plan group of each row: from the `plan_key` column."""
    return pl.col(PLAN_KEY) // LOW_BITS


def group_keys_of(plans: pl.DataFrame) -> pl.Series:
    """The plan group of each row of a frame of cluster_id, query_hash and fingerprint."""
    return plan_keys(plans) // LOW_BITS


def bucket_of() -> pl.Expr:
    # Same buckets as latency.bucket_of: [BASE·G^(b-1), BASE·G^b), bucket 0 below BASE.
    ms = pl.col("total_time_ms")
    raw = ((ms / latency.BASE_MS).log() / math.log(latency.GROWTH)).floor() + 1
    return pl.when(ms < latency.BASE_MS).then(0).otherwise(raw.clip(upper_bound=latency.BUCKETS - 1)).cast(pl.UInt64)


def epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return moment.timestamp()


def when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass
class Scope:
    end: float
    lookback_start: float
    window_start: float | None
    t0: float  # first execution in scope
    slot_s: float

    def slot_of(self, epoch: float) -> int:
        return min(SLOTS - 1, max(0, int((epoch - self.t0) / self.slot_s)))

    def slot_start(self, slot: int) -> float:
        return self.t0 + slot * self.slot_s
