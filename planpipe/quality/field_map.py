"""The expected mapping behind schema drift: where each observation field is stored.

Data more than logic: `FIELD_MAP` (contract field → Parquet column → PostgreSQL columns) and
`POSTGRES_OWN` (the columns of the planpipe tables no observation field feeds). `drift.py`
compares the contract, the Parquet dataset and the PostgreSQL catalog against it; a new field
or column is one more entry here.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import polars as pl

from planpipe.quality.suites import DType

Source = Literal["contract", "parquet_schema", "parquet_files", "postgres", "mapping"]

PG_SCHEMA: Final = "planpipe"

# -- the expected mapping --------------------------------------------------------------------


@dataclass(frozen=True)
class PgColumn:
    """A column of a planpipe table as `information_schema.columns` shows it."""

    table: str
    column: str
    data_type: str  # information_schema.columns.data_type, e.g. "text", "double precision"
    nullable: bool
    how: str = "copied"  # how the value gets there from its source field

    @property
    def key(self) -> str:
        return f"{self.table}.{self.column}"

    @property
    def signature(self) -> str:
        return signature_of(self.table, self.column, self.data_type, self.nullable)


def signature_of(table: str, column: str, data_type: str, nullable: bool) -> str:
    return f"{table}.{column}:{data_type}:{'null' if nullable else 'not null'}"


@dataclass(frozen=True)
class FieldMapping:
    """Where one observation field is stored.

    `field` is the Envelope field (None: derived by the engine); `contract_type`
    its declared Python type ("str", "float", "int"); `parquet` the column of
    `parquet_sink.SCHEMA` it lands in (None: not stored as such), with its polars
    type; `filled_at_ingest`: optional in the contract, yet never null in Parquet
    because the engine fills it.
    """

    field: str | None
    contract_type: str | None
    parquet: str | None
    parquet_type: DType | None
    postgres: tuple[PgColumn, ...] = ()
    filled_at_ingest: bool = False
    note: str = ""
    # A column a later planpipe version added: files written before it lack it and readers fill
    # it in (null work: unknown; the plan key computed from the row). Not drift in such files.
    added_later: bool = False


TEXT, F8, I4, I8, NUM, JSONB, TSTZ = (
    "text",
    "double precision",
    "integer",
    "bigint",
    "numeric",
    "jsonb",
    "timestamp with time zone",
)
_KEYED = ("query_catalog", "plan_baselines", "plan_rollups_hourly")

FIELD_MAP: Final[tuple[FieldMapping, ...]] = (
    FieldMapping(
        "query_hash", "str", "query_hash", pl.String, tuple(PgColumn(t, "query_hash", TEXT, False) for t in _KEYED)
    ),
    FieldMapping(
        "cluster_id", "str", "cluster_id", pl.String, tuple(PgColumn(t, "cluster_id", TEXT, False) for t in _KEYED)
    ),
    FieldMapping(
        "execution_timestamp",
        "float",
        "execution_timestamp",
        pl.Float64,
        (
            PgColumn("query_catalog", "first_seen", TSTZ, False, "min, epoch s → timestamptz"),
            PgColumn("query_catalog", "last_seen", TSTZ, False, "max, epoch s → timestamptz"),
            PgColumn("plan_baselines", "first_seen", TSTZ, False, "min, epoch s → timestamptz"),
            PgColumn("plan_baselines", "last_seen", TSTZ, False, "max, epoch s → timestamptz"),
            PgColumn("plan_rollups_hourly", "hour", TSTZ, False, "truncated to the hour"),
        ),
    ),
    FieldMapping(
        "plan_text",
        "str",
        "plan_text",
        pl.String,
        (
            PgColumn("plan_catalog", "sample_plan_text", TEXT, False, "first observation of a new fingerprint"),
            PgColumn("plan_catalog", "normalized_plan", JSONB, False, "normalized tree"),
            PgColumn("plan_catalog", "summary", TEXT, False, "one-line summary of the tree"),
        ),
    ),
    FieldMapping(
        "actual_rows",
        "int",
        "actual_rows",
        pl.Int64,
        (
            PgColumn("plan_baselines", "rows_sum", NUM, False, "sum (numeric: a sum of int64 can overflow bigint)"),
            PgColumn("plan_rollups_hourly", "rows_sum", NUM, False, "sum per hour"),
        ),
    ),
    FieldMapping(
        "total_time_ms",
        "float",
        "total_time_ms",
        pl.Float64,
        (
            PgColumn("plan_baselines", "total_time_sum", F8, False, "sum"),
            PgColumn("plan_baselines", "total_time_min", F8, False, "min"),
            PgColumn("plan_baselines", "total_time_max", F8, False, "max"),
            PgColumn("plan_baselines", "latency_hist", JSONB, False, "log-scale histogram"),
            PgColumn("plan_rollups_hourly", "total_time_sum", F8, False, "sum per hour"),
            PgColumn("plan_rollups_hourly", "latency_hist", JSONB, False, "log-scale histogram per hour"),
        ),
    ),
    FieldMapping(
        "query_type",
        "str",
        "query_type",
        pl.String,
        (PgColumn("query_catalog", "query_type", TEXT, True, "first non-null"),),
    ),
    FieldMapping(
        "query_text",
        "str",
        "query_text",
        pl.String,
        (PgColumn("query_catalog", "query_text", TEXT, True, "first non-null"),),
    ),
    FieldMapping("trace_id", "str", "trace_id", pl.String, note="Parquet only (falls back to the trace header)"),
    FieldMapping(
        "published_at",
        "float",
        "published_at",
        pl.Float64,
        (
            PgColumn("ingest_batches", "p50_latency_ms", F8, True, "publish → commit latency, p50 per batch"),
            PgColumn("ingest_batches", "p95_latency_ms", F8, True, "publish → commit latency, p95 per batch"),
            PgColumn("ingest_batches", "max_latency_ms", F8, True, "publish → commit latency, max per batch"),
        ),
        note="Kafka CreateTime when the agent did not stamp it",
    ),
    FieldMapping("route_tag", "str", None, None, note="resolved with the routing rules into `route`"),
    FieldMapping(
        "priority", "str", "priority", pl.String, filled_at_ingest=True, note="defaults to the key's priority"
    ),
    # Derived by the engine, not in the contract.
    FieldMapping(
        None,
        None,
        "fingerprint",
        pl.String,
        (
            PgColumn("plan_catalog", "fingerprint", TEXT, False),
            PgColumn("plan_baselines", "fingerprint", TEXT, False),
            PgColumn("plan_rollups_hourly", "fingerprint", TEXT, False),
        ),
        note="of the normalized plan",
    ),
    FieldMapping(None, None, "route", pl.String, (PgColumn("plan_rollups_hourly", "route", TEXT, False),)),
    FieldMapping(None, None, "kafka_topic", pl.String, (PgColumn("consumer_offsets", "topic", TEXT, False),)),
    FieldMapping(None, None, "kafka_partition", pl.Int32, (PgColumn("consumer_offsets", "partition", I4, False),)),
    FieldMapping(
        None,
        None,
        "kafka_offset",
        pl.Int64,
        (
            PgColumn("consumer_offsets", "next_offset", I8, False, "last offset of the batch + 1"),
            PgColumn("ingest_batches", "offset_ranges", JSONB, False, "first/last per partition"),
        ),
    ),
    FieldMapping(None, None, "ingested_at", pl.Datetime("us", "UTC")),
    # The plan's work, read from plan_text (planpipe.plans.work); null when the plan lacks BUFFERS/ANALYZE.
    FieldMapping(None, None, "shared_blocks", pl.Int64, note="top node's shared hit + read blocks", added_later=True),
    FieldMapping(None, None, "temp_blocks", pl.Int64, note="top node's temp read + written blocks", added_later=True),
    FieldMapping(None, None, "top_rows", pl.Float64, note="top node's actual rows", added_later=True),
    FieldMapping(None, None, "top_loops", pl.Int64, note="top node's actual loops", added_later=True),
    FieldMapping(
        None, None, "plan_key", pl.UInt64, note="64-bit key of cluster_id, query_hash, fingerprint", added_later=True
    ),
)

# Parquet columns that files written by an earlier version may lack.
ADDED_LATER_COLUMNS: Final = frozenset(m.parquet for m in FIELD_MAP if m.added_later and m.parquet)

# Columns of the planpipe tables that no observation field feeds.
POSTGRES_OWN: Final[tuple[PgColumn, ...]] = (
    PgColumn("plan_catalog", "first_seen", TSTZ, False, "default now()"),
    PgColumn("plan_baselines", "plan_version", I4, False, "numbered per query"),
    PgColumn("plan_baselines", "status", TEXT, False, "accepted/candidate/rejected"),
    PgColumn("plan_baselines", "status_by", TEXT, True),
    PgColumn("plan_baselines", "status_at", TSTZ, True),
    PgColumn("plan_baselines", "executions", I8, False, "count"),
    PgColumn("plan_rollups_hourly", "executions", I8, False, "count per hour"),
    PgColumn("consumer_offsets", "consumer_group", TEXT, False),
    PgColumn("consumer_offsets", "updated_at", TSTZ, False),
    PgColumn("ingest_batches", "batch_id", I8, False, "bigserial"),
    PgColumn("ingest_batches", "consumer_group", TEXT, False),
    PgColumn("ingest_batches", "committed_at", TSTZ, False),
    PgColumn("ingest_batches", "consumed", I4, False),
    PgColumn("ingest_batches", "valid", I4, False),
    PgColumn("ingest_batches", "dlq", I4, False),
    PgColumn("ingest_batches", "dropped_low", I4, False),
    PgColumn("ingest_batches", "lock_wait_ms", F8, False),
    PgColumn("ingest_batches", "duration_ms", F8, False),
    PgColumn("ingest_batches", "parquet_files", JSONB, False),
)


def expected_postgres_columns(
    mapping: Sequence[FieldMapping] = FIELD_MAP, own: Sequence[PgColumn] = POSTGRES_OWN
) -> dict[str, tuple[PgColumn, Source]]:
    """`table.column` → (expected column, where its data comes from)."""
    expected: dict[str, tuple[PgColumn, Source]] = {}
    for entry in mapping:
        origin: Source = "contract" if entry.field is not None else "parquet_schema"
        for column in entry.postgres:
            if column.key in expected:
                raise ValueError(f"{column.key} is mapped twice")
            expected[column.key] = (column, origin)
    for column in own:
        if column.key in expected:
            raise ValueError(f"{column.key} is mapped twice")
        expected[column.key] = (column, "mapping")
    return expected


TRACKED_TABLES: Final = tuple(sorted({c.table for c, _ in expected_postgres_columns().values()}))


def describe(spec: PgColumn) -> str:
    """How a drift report names an expected column: type, nullability and where its value comes from."""
    return f"{spec.data_type} {'null' if spec.nullable else 'NOT NULL'} ({origin_of(spec)})"


def origin_of(spec: PgColumn) -> str:
    source = next((m for m in FIELD_MAP if spec in m.postgres), None)
    if source is None:
        return spec.how
    origin = f"contract `{source.field}`" if source.field else f"derived `{source.parquet}`"
    return f"{origin}, {spec.how}"


def mapping_markdown(mapping: Sequence[FieldMapping] = FIELD_MAP) -> str:
    """The expected mapping as a table (for asset descriptions and docs)."""
    lines = ["| contract field | Parquet column | PostgreSQL |", "| --- | --- | --- |"]
    for m in mapping:
        contract = f"`{m.field}` ({m.contract_type})" if m.field else "(derived)"
        parquet = f"`{m.parquet}` {m.parquet_type}" if m.parquet else "—"
        pg = "<br>".join(f"`{c.key}` {c.data_type} ({c.how})" for c in m.postgres) or "—"
        lines.append(f"| {contract} | {parquet} | {pg} |")
    return "\n".join(lines)
