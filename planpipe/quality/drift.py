"""Schema drift between the envelope contract, the Parquet dataset and the PostgreSQL tables.

The runbook asks for a nightly diff between the message schema and the baseline
store DDL that alerts on type mismatches and dropped required fields. Here the
three places a field lives are compared through one explicit mapping,
`field_map.FIELD_MAP` (contract field → Parquet column → PostgreSQL columns), plus the
PostgreSQL columns that belong to the store itself (`field_map.POSTGRES_OWN`):

1. contract ↔ declared Parquet schema (`parquet_sink.SCHEMA`): pure Python on
   `msgspec.inspect` of `Envelope`;
2. declared Parquet schema ↔ the newest files on disk: a GX suite (column set,
   column types, no nulls in required columns) run on each file;
3. expected DDL ↔ `information_schema.columns`: a GX suite on that catalog
   frame (which columns are unknown, which expected ones are absent, which
   differ in type or nullability).

Each difference is a `DriftFinding` (`drift_report.py`): `source_a` is where the expectation comes
from, `source_b` where the deviation was found.
"""

import hashlib
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import psycopg

from planpipe.contract import Envelope
from planpipe.ingest.parquet_sink import PARTITION_COLUMNS, SCHEMA
from planpipe.quality.drift_report import DriftFinding, DriftReport, Kind
from planpipe.quality.field_map import (
    ADDED_LATER_COLUMNS,
    FIELD_MAP,
    PG_SCHEMA,
    TRACKED_TABLES,
    FieldMapping,
    PgColumn,
    Source,
    describe,
    expected_postgres_columns,
    origin_of,
    signature_of,
)
from planpipe.quality.suites import (
    REQUIRED_COLUMNS,
    DType,
    Outcome,
    gx_expectations,
    gx_type_name,
    run_suite,
)
from planpipe.settings import Settings

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
    added_later: Collection[str] = ADDED_LATER_COLUMNS,
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
        predates = _written_before(path, set(on_disk), files, added_later)
        for outcome in run_suite(frame, name, build):
            for finding in _file_findings(outcome, path, stored, on_disk):
                if finding.kind == "missing" and finding.column in predates:
                    continue
                found.setdefault((finding.column, finding.kind), finding)
    return list(found.values())


def _written_before(path: Path, columns: set[str], files: Sequence[Path], added_later: Collection[str]) -> set[str]:
    """Columns a later version added that `path` lacks while a newer checked file has them: the
    file was written before the upgrade (readers fill these in), not by a writer that drifted.
    With no newer file to tell, a missing column stays drift."""
    lacking = [c for c in added_later if c not in columns]
    if not lacking:
        return set()
    written = path.stat().st_mtime
    newer = [other for other in files if other != path and other.stat().st_mtime > written]
    newer_columns = set().union(*(pl.read_parquet_schema(other) for other in newer)) if newer else set()
    return {c for c in lacking if c in newer_columns}


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
            "signature": [signature_of(o.table, o.column, o.data_type, o.nullable) for o in observed],
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
                        origin, "postgres", key, "missing", f"expected {describe(spec)}; the column does not exist"
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
                            f"expected {spec.data_type} ({origin_of(spec)}), found {o.data_type}",
                        )
                    )
                if o.nullable != spec.nullable:
                    findings.append(
                        DriftFinding(
                            origin,
                            "postgres",
                            key,
                            "nullability",
                            f"expected {'null' if spec.nullable else 'NOT NULL'} ({origin_of(spec)}), found "
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
