"""Schema drift between the envelope contract, the Parquet dataset and the PostgreSQL tables.

The runbook asks for a nightly diff between the message schema and the baseline
store DDL that alerts on type mismatches and dropped required fields. Here the
three places a field lives are compared through one explicit mapping,
`FIELD_MAP` (contract field → Parquet column → PostgreSQL columns), plus the
PostgreSQL columns that belong to the store itself (`POSTGRES_OWN`):

1. contract ↔ declared Parquet schema (`parquet_sink.SCHEMA`): pure Python on
   `msgspec.inspect` of `Envelope`;
2. declared Parquet schema ↔ the newest files on disk: a GX suite (column set,
   column types, no nulls in required columns) run on each file;
3. expected DDL ↔ `information_schema.columns`: a GX suite on that catalog
   frame (which columns are unknown, which expected ones are absent, which
   differ in type or nullability).

Each difference is a `DriftFinding`: `source_a` is where the expectation comes
from, `source_b` where the deviation was found.
"""

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import polars as pl
import psycopg

from planpipe.contract import Envelope
from planpipe.ingest.parquet_sink import PARTITION_COLUMNS, SCHEMA
from planpipe.quality.suites import (
    REQUIRED_COLUMNS,
    DType,
    MetadataValue,
    Outcome,
    Plain,
    gx_expectations,
    gx_type_name,
    run_suite,
)
from planpipe.settings import Settings

Source = Literal["contract", "parquet_schema", "parquet_files", "postgres", "mapping"]
Kind = Literal["missing", "extra", "type_mismatch", "nullability"]

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
        return _signature(self.table, self.column, self.data_type, self.nullable)


def _signature(table: str, column: str, data_type: str, nullable: bool) -> str:
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
    FieldMapping(None, None, "shared_blocks", pl.Int64, note="top node's shared hit + read blocks"),
    FieldMapping(None, None, "temp_blocks", pl.Int64, note="top node's temp read + written blocks"),
    FieldMapping(None, None, "top_rows", pl.Float64, note="top node's actual rows"),
    FieldMapping(None, None, "top_loops", pl.Int64, note="top node's actual loops"),
)

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

# -- findings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftFinding:
    source_a: Source
    source_b: Source
    column: str
    kind: Kind
    detail: str

    def to_plain(self) -> dict[str, Plain]:
        return {
            "source_a": self.source_a,
            "source_b": self.source_b,
            "column": self.column,
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class DriftReport:
    findings: tuple[DriftFinding, ...]
    contract_fields: int
    parquet_columns: int
    parquet_files: tuple[str, ...]
    postgres_schema: str
    postgres_columns: int
    duration_ms: float
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_markdown(self) -> str:
        head = (
            f"**Schema drift: {'none' if self.ok else f'{len(self.findings)} finding(s)'}** — "
            f"contract {self.contract_fields} fields, Parquet {self.parquet_columns} columns "
            f"({len(self.parquet_files)} newest file(s) read), PostgreSQL `{self.postgres_schema}` "
            f"{self.postgres_columns} columns ({self.duration_ms:.0f} ms)"
        )
        lines = [head]
        lines += [f"- {note}" for note in self.notes]
        if self.findings:
            lines += ["", "| kind | column | expected by | found in | detail |", "| --- | --- | --- | --- | --- |"]
            lines += [
                f"| {f.kind} | `{f.column}` | {f.source_a} | {f.source_b} | {f.detail.replace('|', '/')} |"
                for f in self.findings
            ]
        return "\n".join(lines)

    def to_metadata(self) -> dict[str, MetadataValue]:
        counts = {kind: sum(f.kind == kind for f in self.findings) for kind in _KINDS}
        return {
            "ok": self.ok,
            "findings": [f.to_plain() for f in self.findings],
            "finding_count": len(self.findings),
            **{f"{kind}_count": n for kind, n in counts.items()},
            "contract_fields": self.contract_fields,
            "parquet_columns": self.parquet_columns,
            "parquet_files_checked": len(self.parquet_files),
            "postgres_schema": self.postgres_schema,
            "postgres_columns": self.postgres_columns,
            "drift_ms": round(self.duration_ms, 2),
        }


_KINDS: Final[tuple[Kind, ...]] = ("missing", "extra", "type_mismatch", "nullability")

# -- 1. contract ↔ declared Parquet schema (pure) ----------------------------------------------


@dataclass(frozen=True)
class ContractField:
    name: str
    type_name: str  # "str", "float", "int", … (Literal of strings counts as "str")
    required: bool
    nullable: bool


def contract_fields(struct: type[msgspec.Struct] = Envelope) -> dict[str, ContractField]:
    """The fields of a msgspec Struct as the wire sees them."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    fields: dict[str, ContractField] = {}
    for f in info.fields:
        inner = [t for t in _union_members(f.type) if not isinstance(t, msgspec.inspect.NoneType)]
        nullable = len(inner) != len(_union_members(f.type))
        names = sorted({_type_name(t) for t in inner})
        fields[f.encode_name] = ContractField(f.encode_name, " | ".join(names), f.required, nullable)
    return fields


def _union_members(t: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, ...]:
    return t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)


def _type_name(t: msgspec.inspect.Type) -> str:
    if isinstance(t, msgspec.inspect.StrType):
        return "str"
    if isinstance(t, msgspec.inspect.FloatType):
        return "float"
    if isinstance(t, msgspec.inspect.IntType):
        return "int"
    if isinstance(t, msgspec.inspect.BoolType):
        return "bool"
    if isinstance(t, msgspec.inspect.LiteralType):
        return "str" if all(isinstance(v, str) for v in t.values) else "literal"
    return type(t).__name__.removesuffix("Type").lower()


def compare_contract_to_parquet(
    contract: Mapping[str, ContractField],
    schema: Mapping[str, DType],
    required_columns: Collection[str],
    mapping: Sequence[FieldMapping] = FIELD_MAP,
) -> list[DriftFinding]:
    findings: list[DriftFinding] = []
    by_field = {m.field: m for m in mapping if m.field is not None}
    for name, spec in contract.items():
        m = by_field.get(name)
        if m is None:
            findings.append(
                DriftFinding(
                    "contract",
                    "parquet_schema",
                    name,
                    "missing",
                    f"contract field `{name}` ({spec.type_name}) is stored nowhere: no Parquet column is "
                    "mapped to it, so it would be decoded and dropped",
                )
            )
            continue
        if m.contract_type is not None and spec.type_name != m.contract_type:
            stored = f"Parquet `{m.parquet}` stores {m.parquet_type}" if m.parquet else "it is not stored as such"
            findings.append(
                DriftFinding(
                    "contract",
                    "parquet_schema",
                    name,
                    "type_mismatch",
                    f"contract field `{name}` is {spec.type_name}, was {m.contract_type}; {stored}",
                )
            )
        if m.parquet is None:
            continue
        if m.parquet not in schema:
            findings.append(
                DriftFinding(
                    "contract",
                    "parquet_schema",
                    m.parquet,
                    "missing",
                    f"contract field `{name}` maps to Parquet column `{m.parquet}`, absent from SCHEMA",
                )
            )
            continue
        column_required = m.parquet in required_columns
        if spec.required and not column_required:
            findings.append(
                DriftFinding(
                    "contract",
                    "parquet_schema",
                    m.parquet,
                    "nullability",
                    f"`{name}` is required in the contract but `{m.parquet}` may be null in Parquet",
                )
            )
        elif not spec.required and column_required and not m.filled_at_ingest:
            findings.append(
                DriftFinding(
                    "contract",
                    "parquet_schema",
                    m.parquet,
                    "nullability",
                    f"`{name}` is optional in the contract but `{m.parquet}` must not be null in Parquet "
                    "and nothing fills it at ingest",
                )
            )
    for m in mapping:
        if m.field is not None and m.field not in contract:
            findings.append(
                DriftFinding(
                    "parquet_schema",
                    "contract",
                    m.field,
                    "missing",
                    f"Parquet column `{m.parquet}` is fed by contract field `{m.field}`, which the "
                    "envelope no longer has"
                    if m.parquet
                    else f"contract field `{m.field}` was dropped from the envelope",
                )
            )
    mapped_columns = {m.parquet: m for m in mapping if m.parquet is not None}
    for column, dtype in schema.items():
        m = mapped_columns.get(column)
        origin: Source = "contract" if m is not None and m.field is not None else "mapping"
        if m is None:
            findings.append(
                DriftFinding(
                    "mapping",
                    "parquet_schema",
                    column,
                    "extra",
                    f"Parquet column `{column}` ({dtype}) is neither a contract field nor a known derived column",
                )
            )
        elif m.parquet_type is not None and dtype != m.parquet_type:
            findings.append(
                DriftFinding(
                    origin,
                    "parquet_schema",
                    column,
                    "type_mismatch",
                    f"Parquet column `{column}` is declared {dtype}, expected {m.parquet_type}",
                )
            )
    for column, m in mapped_columns.items():
        if m.field is None and column not in schema:
            findings.append(
                DriftFinding(
                    "mapping", "parquet_schema", column, "missing", f"derived column `{column}` is absent from SCHEMA"
                )
            )
    return findings


# -- 2. declared Parquet schema ↔ files on disk (GX) -------------------------------------------


def newest_parquet_files(root: Path, per_route: int = 1) -> list[Path]:
    """The most recently written file of each `route=` directory."""
    newest: list[Path] = []
    if not root.is_dir():
        return newest
    for route_dir in sorted(root.glob("route=*")):
        files = sorted(route_dir.glob("date=*/*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
        newest += files[:per_route]
    return newest


def compare_parquet_files(
    files: Sequence[Path],
    schema: Mapping[str, DType] = SCHEMA,
    required_columns: Collection[str] = REQUIRED_COLUMNS,
    partition_columns: Collection[str] = PARTITION_COLUMNS,
) -> list[DriftFinding]:
    """Validate each file against the declared schema with GX; one finding per (column, kind)."""
    stored = {c: t for c, t in schema.items() if c not in partition_columns}
    required = [c for c in required_columns if c in stored]
    name = "planpipe.drift.parquet." + _digest((sorted((c, str(t)) for c, t in stored.items()), sorted(required)))

    def build() -> list[Any]:
        return _file_expectations(stored, required)

    found: dict[tuple[str, Kind], DriftFinding] = {}
    for path in files:
        frame = pl.read_parquet(path)
        on_disk = dict(frame.schema)
        for outcome in run_suite(frame, name, build):
            for finding in _file_findings(outcome, path, stored, on_disk):
                found.setdefault((finding.column, finding.kind), finding)
    return list(found.values())


def _file_expectations(stored: Mapping[str, DType], required: Sequence[str]) -> list[Any]:
    gxe = gx_expectations()
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(stored), exact_match=True),
        *(gxe.ExpectColumnValuesToBeOfType(column=c, type_=gx_type_name(t)) for c, t in stored.items()),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in required),
    ]


def _file_findings(
    outcome: Outcome, path: Path, stored: Mapping[str, DType], on_disk: Mapping[str, DType]
) -> Iterable[DriftFinding]:
    if outcome.success:
        return
    where = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
    if outcome.expectation == "expect_table_columns_to_match_set":
        mismatched = outcome.details.get("mismatched")
        if not isinstance(mismatched, Mapping):
            return
        for column in sorted(str(c) for c in mismatched.get("missing") or ()):
            yield DriftFinding(
                "parquet_schema",
                "parquet_files",
                column,
                "missing",
                f"declared {stored.get(column)}, absent from {where}",
            )
        for column in sorted(str(c) for c in mismatched.get("unexpected") or ()):
            yield DriftFinding(
                "parquet_schema",
                "parquet_files",
                column,
                "extra",
                f"{where} has undeclared column `{column}` ({on_disk.get(column)})",
            )
    elif outcome.column is not None and outcome.column in on_disk:
        if outcome.expectation == "expect_column_values_to_be_of_type":
            yield DriftFinding(
                "parquet_schema",
                "parquet_files",
                outcome.column,
                "type_mismatch",
                f"declared {stored.get(outcome.column)}, {where} has {on_disk[outcome.column]}",
            )
        elif outcome.expectation == "expect_column_values_to_not_be_null":
            yield DriftFinding(
                "parquet_schema",
                "parquet_files",
                outcome.column,
                "nullability",
                f"required column has {outcome.unexpected_count} null(s) in {where}",
            )


# -- 3. expected DDL ↔ information_schema (GX) -----------------------------------------------


@dataclass(frozen=True)
class ObservedColumn:
    """One row of information_schema.columns."""

    table: str
    column: str
    data_type: str
    nullable: bool


def read_postgres_columns(
    conn: psycopg.Connection[tuple[object, ...]], schema: str = PG_SCHEMA, tables: Sequence[str] = TRACKED_TABLES
) -> list[ObservedColumn]:
    rows = conn.execute(
        """SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
           FROM information_schema.columns
           WHERE table_schema = %s AND table_name = ANY(%s)
           ORDER BY table_name, ordinal_position""",
        (schema, list(tables)),
    ).fetchall()
    return [ObservedColumn(str(t), str(c), str(d), n == "YES") for t, c, d, n in rows]


def compare_postgres(
    observed: Sequence[ObservedColumn],
    expected: Mapping[str, tuple[PgColumn, Source]] | None = None,
) -> list[DriftFinding]:
    """Check the catalog rows against the expected columns with a GX suite; classify what it flags."""
    expected = expected_postgres_columns() if expected is None else expected
    keys = sorted(expected)
    signatures = sorted(column.signature for column, _ in expected.values())
    frame = pl.DataFrame(
        {
            "key": [f"{o.table}.{o.column}" for o in observed],
            "signature": [_signature(o.table, o.column, o.data_type, o.nullable) for o in observed],
        },
        schema={"key": pl.String, "signature": pl.String},
    )
    name = "planpipe.drift.postgres." + _digest((keys, signatures))

    def build() -> list[Any]:
        return _catalog_expectations(keys, signatures)

    outcomes = run_suite(frame, name, build, result_format="COMPLETE", fast_first=False)
    by_key = {f"{o.table}.{o.column}": o for o in observed}
    findings: list[DriftFinding] = []
    for outcome in outcomes:
        if outcome.success:
            continue
        if outcome.error is not None:
            raise RuntimeError(f"GX could not evaluate {outcome.expectation}: {outcome.error}")
        if outcome.expectation == "expect_column_distinct_values_to_contain_set":
            missing = sorted(str(v) for v in _as_list(outcome.result.get("partial_missing_list")))
            count = outcome.result.get("missing_count")
            if isinstance(count, int) and count > len(missing):
                # GX names at most 20 missing values (and counts all): name the rest from the rows.
                missing = sorted(set(keys) - set(by_key))
            for key in missing:
                spec, origin = expected[key]
                findings.append(
                    DriftFinding(
                        origin, "postgres", key, "missing", f"expected {_describe(spec)}; the column does not exist"
                    )
                )
        elif outcome.column == "key":
            for key in sorted({str(v) for v in outcome.unexpected_examples}):
                o = by_key[key]
                findings.append(
                    DriftFinding(
                        "mapping",
                        "postgres",
                        key,
                        "extra",
                        f"{o.data_type} {'null' if o.nullable else 'not null'}: not in the expected mapping",
                    )
                )
        elif outcome.column == "signature":
            for signature in sorted({str(v) for v in outcome.unexpected_examples}):
                key = signature.split(":", 1)[0]
                if key not in expected:
                    continue  # reported as extra above
                spec, origin = expected[key]
                o = by_key[key]
                if o.data_type != spec.data_type:
                    findings.append(
                        DriftFinding(
                            origin,
                            "postgres",
                            key,
                            "type_mismatch",
                            f"expected {spec.data_type} ({_how(spec)}), found {o.data_type}",
                        )
                    )
                if o.nullable != spec.nullable:
                    findings.append(
                        DriftFinding(
                            origin,
                            "postgres",
                            key,
                            "nullability",
                            f"expected {'null' if spec.nullable else 'NOT NULL'} ({_how(spec)}), found "
                            f"{'null' if o.nullable else 'NOT NULL'}",
                        )
                    )
    return findings


def _catalog_expectations(keys: Sequence[str], signatures: Sequence[str]) -> list[Any]:
    gxe = gx_expectations()
    return [
        # Every column present is an expected one …
        gxe.ExpectColumnValuesToBeInSet(column="key", value_set=list(keys)),
        # … every expected one is present …
        gxe.ExpectColumnDistinctValuesToContainSet(column="key", value_set=list(keys)),
        # … with the expected type and nullability.
        gxe.ExpectColumnValuesToBeInSet(column="signature", value_set=list(signatures)),
        gxe.ExpectColumnValuesToBeUnique(column="key"),
    ]


def _describe(spec: PgColumn) -> str:
    return f"{spec.data_type} {'null' if spec.nullable else 'NOT NULL'} ({_how(spec)})"


def _how(spec: PgColumn) -> str:
    source = next((m for m in FIELD_MAP if spec in m.postgres), None)
    if source is None:
        return spec.how
    origin = f"contract `{source.field}`" if source.field else f"derived `{source.parquet}`"
    return f"{origin}, {spec.how}"


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple | set) else []


def _digest(value: object) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


# -- all together ----------------------------------------------------------------------------


def detect_drift(
    settings: Settings,
    *,
    pg_schema: str = PG_SCHEMA,
    conn: psycopg.Connection[tuple[object, ...]] | None = None,
    parquet_root: Path | None = None,
) -> DriftReport:
    """Compare contract, Parquet (declared and newest files) and PostgreSQL; never raises on drift.

    `conn` lets a caller look through its own (uncommitted) transaction;
    otherwise one is opened on `settings.pg_dsn`.
    """
    started = time.perf_counter()
    contract = contract_fields()
    findings = compare_contract_to_parquet(contract, SCHEMA, REQUIRED_COLUMNS)
    files = newest_parquet_files(parquet_root or settings.parquet_dir)
    findings += compare_parquet_files(files)
    notes: list[str] = []
    if not files:
        notes.append(f"no Parquet files under {parquet_root or settings.parquet_dir}: on-disk schema not checked")
    if conn is None:
        with psycopg.connect(settings.pg_dsn) as own:
            observed = read_postgres_columns(own, pg_schema)
    else:
        observed = read_postgres_columns(conn, pg_schema)
    findings += compare_postgres(observed)
    return DriftReport(
        findings=tuple(findings),
        contract_fields=len(contract),
        parquet_columns=len(SCHEMA),
        parquet_files=tuple(str(p) for p in files),
        postgres_schema=pg_schema,
        postgres_columns=len(observed),
        duration_ms=(time.perf_counter() - started) * 1000,
        notes=tuple(notes),
    )


def mapping_markdown(mapping: Sequence[FieldMapping] = FIELD_MAP) -> str:
    """The expected mapping as a table (for asset descriptions and docs)."""
    lines = ["| contract field | Parquet column | PostgreSQL |", "| --- | --- | --- |"]
    for m in mapping:
        contract = f"`{m.field}` ({m.contract_type})" if m.field else "(derived)"
        parquet = f"`{m.parquet}` {m.parquet_type}" if m.parquet else "—"
        pg = "<br>".join(f"`{c.key}` {c.data_type} ({c.how})" for c in m.postgres) or "—"
        lines.append(f"| {contract} | {parquet} | {pg} |")
    return "\n".join(lines)
