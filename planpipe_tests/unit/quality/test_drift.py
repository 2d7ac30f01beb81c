"""Drift comparison logic on fabricated contracts, schemas, files and catalog rows."""

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import msgspec
import polars as pl
import pytest

from planpipe.contract import REQUIRED_FIELDS
from planpipe.ingest import parquet_sink
from planpipe.quality import drift
from planpipe.quality.drift import (
    ContractField,
    ObservedColumn,
    compare_contract_to_parquet,
    compare_parquet_files,
    compare_postgres,
    contract_fields,
)
from planpipe.quality.drift_report import DriftFinding, DriftReport
from planpipe.quality.field_map import expected_postgres_columns
from planpipe.quality.suites import REQUIRED_COLUMNS
from planpipe_tests.unit.quality.helpers import ROWS, observations

pytestmark = pytest.mark.unit


def kinds(findings: list[DriftFinding]) -> set[tuple[str, str, str, str]]:
    return {(f.source_a, f.source_b, f.column, f.kind) for f in findings}


# -- 1. contract ↔ declared Parquet schema -----------------------------------------------------


def test_envelope_fields_seen_through_msgspec() -> None:
    fields = contract_fields()
    assert {name for name, f in fields.items() if f.required} == set(REQUIRED_FIELDS)
    assert fields["actual_rows"] == ContractField("actual_rows", "int", True, False)
    assert fields["query_type"] == ContractField("query_type", "str", False, True)
    assert fields["route_tag"].type_name == "str"  # Literal of strings


def test_real_contract_and_schema_agree() -> None:
    assert compare_contract_to_parquet(contract_fields(), parquet_sink.SCHEMA, REQUIRED_COLUMNS) == []


class EnvelopeV2(msgspec.Struct, frozen=True):
    """A contract revision: actual_rows became a float, cpu_ms appeared, query_text and trace_id are gone."""

    query_hash: str
    execution_timestamp: float
    cluster_id: str
    plan_text: str
    actual_rows: float
    total_time_ms: Annotated[float, msgspec.Meta(ge=0)]
    cpu_ms: float
    query_type: str | None = None
    published_at: float | None = None
    route_tag: str | None = None
    priority: str | None = None


def test_a_revised_contract_drifts_from_the_parquet_schema() -> None:
    findings = compare_contract_to_parquet(contract_fields(EnvelopeV2), parquet_sink.SCHEMA, REQUIRED_COLUMNS)
    assert kinds(findings) == {
        ("contract", "parquet_schema", "cpu_ms", "missing"),
        ("contract", "parquet_schema", "actual_rows", "type_mismatch"),
        ("parquet_schema", "contract", "query_text", "missing"),
        ("parquet_schema", "contract", "trace_id", "missing"),
    }
    detail = next(f.detail for f in findings if f.kind == "type_mismatch")
    assert detail == "contract field `actual_rows` is float, was int; Parquet `actual_rows` stores Int64"


def test_requiredness_changes_are_nullability_drift() -> None:
    fields = contract_fields()
    fields["query_hash"] = replace(fields["query_hash"], required=False, nullable=True)  # a required field relaxed
    fields["trace_id"] = replace(fields["trace_id"], required=True, nullable=False)  # an optional one now required
    findings = compare_contract_to_parquet(fields, parquet_sink.SCHEMA, REQUIRED_COLUMNS)
    assert kinds(findings) == {
        ("contract", "parquet_schema", "query_hash", "nullability"),
        ("contract", "parquet_schema", "trace_id", "nullability"),
    }


def test_priority_is_optional_in_the_contract_yet_always_filled() -> None:
    assert contract_fields()["priority"].required is False
    assert "priority" in REQUIRED_COLUMNS
    assert compare_contract_to_parquet(contract_fields(), parquet_sink.SCHEMA, REQUIRED_COLUMNS) == []


def test_a_changed_parquet_schema_drifts_from_the_contract_and_the_mapping() -> None:
    schema = dict(parquet_sink.SCHEMA)
    schema["kafka_partition"] = pl.Int64
    schema["total_time_ms"] = pl.Float32
    del schema["cluster_id"]
    del schema["fingerprint"]
    schema["cpu_ms"] = pl.Float64
    findings = compare_contract_to_parquet(contract_fields(), schema, REQUIRED_COLUMNS)
    assert kinds(findings) == {
        ("mapping", "parquet_schema", "kafka_partition", "type_mismatch"),
        ("contract", "parquet_schema", "total_time_ms", "type_mismatch"),
        ("contract", "parquet_schema", "cluster_id", "missing"),
        ("mapping", "parquet_schema", "fingerprint", "missing"),
        ("mapping", "parquet_schema", "cpu_ms", "extra"),
    }


# -- 2. declared Parquet schema ↔ files on disk ----------------------------------------------


def write_dataset(root: Path) -> list[Path]:
    written = parquet_sink.write_batch(root, observations(), [("query-plans", p, 100, 100 + ROWS) for p in range(3)])
    return [w.path for w in written]


def test_files_written_by_the_sink_match_the_schema(tmp_path: Path) -> None:
    files = write_dataset(tmp_path)
    assert sorted(drift.newest_parquet_files(tmp_path)) == sorted(files)  # one per route here
    assert compare_parquet_files(files) == []


def test_newest_file_per_route(tmp_path: Path) -> None:
    import os

    first = write_dataset(tmp_path / "a")
    assert drift.newest_parquet_files(tmp_path / "missing") == []
    older = next(p for p in first if "route=baseline" in str(p))
    newer = older.with_name(parquet_sink.file_name("query-plans", 0, 900, 950))
    newer.write_bytes(older.read_bytes())
    os.utime(older, (1_000_000_000, 1_000_000_000))
    assert newer in drift.newest_parquet_files(tmp_path / "a")
    assert older not in drift.newest_parquet_files(tmp_path / "a")


def test_drifted_files_are_reported_once_per_column_and_kind(tmp_path: Path) -> None:
    files = write_dataset(tmp_path)
    for path in files:  # every file drifted the same way: one finding each
        frame = pl.read_parquet(path)
        frame = frame.with_columns(
            pl.col("kafka_partition").cast(pl.Int64),
            pl.lit(None, dtype=pl.String).alias("cluster_id"),
            pl.lit(1.0).alias("cpu_ms"),
        ).drop("trace_id")
        frame.write_parquet(path)
    findings = compare_parquet_files(files)
    assert kinds(findings) == {
        ("parquet_schema", "parquet_files", "kafka_partition", "type_mismatch"),
        ("parquet_schema", "parquet_files", "cluster_id", "nullability"),
        ("parquet_schema", "parquet_files", "cpu_ms", "extra"),
        ("parquet_schema", "parquet_files", "trace_id", "missing"),
    }
    by_kind = {f.kind: f.detail for f in findings}
    assert by_kind["type_mismatch"].startswith("declared Int32, route=")
    assert by_kind["type_mismatch"].endswith(" has Int64")
    assert "null(s) in route=" in by_kind["nullability"]


# -- 3. expected DDL ↔ information_schema ----------------------------------------------------


def as_catalog() -> list[ObservedColumn]:
    return [
        ObservedColumn(spec.table, spec.column, spec.data_type, spec.nullable)
        for spec, _ in expected_postgres_columns().values()
    ]


def test_catalog_matching_the_mapping_has_no_drift() -> None:
    assert compare_postgres(as_catalog()) == []


def test_catalog_drift_of_every_kind() -> None:
    rows = [
        r
        for r in as_catalog()
        if (r.table, r.column) != ("consumer_offsets", "next_offset")  # dropped
    ]
    rows = [
        replace(r, data_type="numeric")
        if (r.table, r.column) == ("plan_baselines", "total_time_sum")
        else replace(r, nullable=True)
        if (r.table, r.column) == ("plan_baselines", "query_hash")
        else replace(r, data_type="text", nullable=False)
        if (r.table, r.column) == ("query_catalog", "query_type")
        else r
        for r in rows
    ]
    rows.append(ObservedColumn("plan_baselines", "cpu_ms", "double precision", True))
    findings = compare_postgres(rows)
    assert kinds(findings) == {
        ("parquet_schema", "postgres", "consumer_offsets.next_offset", "missing"),
        ("contract", "postgres", "plan_baselines.total_time_sum", "type_mismatch"),
        ("contract", "postgres", "plan_baselines.query_hash", "nullability"),
        ("contract", "postgres", "query_catalog.query_type", "nullability"),
        ("mapping", "postgres", "plan_baselines.cpu_ms", "extra"),
    }
    detail = {f.column: f.detail for f in findings}
    assert detail["plan_baselines.total_time_sum"] == (
        "expected double precision (contract `total_time_ms`, sum), found numeric"
    )
    assert detail["consumer_offsets.next_offset"].startswith("expected bigint NOT NULL (derived `kafka_offset`")


def test_a_missing_table_reports_each_of_its_columns() -> None:
    rows = [r for r in as_catalog() if r.table != "plan_catalog"]
    findings = compare_postgres(rows)
    assert {f.column for f in findings} == {k for k in expected_postgres_columns() if k.startswith("plan_catalog.")}
    assert {f.kind for f in findings} == {"missing"}


def test_an_empty_catalog_misses_everything() -> None:
    findings = compare_postgres([])
    assert len(findings) == len(expected_postgres_columns())


# -- the report --------------------------------------------------------------------------------


def test_report_markdown_and_metadata() -> None:
    finding = DriftFinding("contract", "postgres", "plan_baselines.total_time_sum", "type_mismatch", "a | b")
    report = DriftReport((finding,), 12, 17, ("f.parquet",), "planpipe", 54, 12.5, ("note",))
    assert not report.ok
    text = report.to_markdown()
    assert "1 finding(s)" in text and "| type_mismatch | `plan_baselines.total_time_sum` |" in text
    assert "a / b" in text
    meta = report.to_metadata()
    assert meta["ok"] is False and meta["type_mismatch_count"] == 1 and meta["missing_count"] == 0
    assert meta["findings"] == [finding.to_plain()]
    clean = DriftReport((), 12, 17, (), "planpipe", 54, 1.0)
    assert clean.ok and "Schema drift: none" in clean.to_markdown()


def test_a_file_written_before_a_column_was_added_is_not_drift_once_a_newer_file_has_it(tmp_path: Path) -> None:
    """An upgrade added `plan_key`: the newest file of a quiet route still predates it (readers fill
    the key in), which the newer file of another route shows; a writer that drops it is drift."""
    import os

    files = write_dataset(tmp_path)
    old = next(p for p in files if "route=baseline" in str(p))
    pl.read_parquet(old).drop("plan_key").write_parquet(old)
    os.utime(old, (1_000_000_000, 1_000_000_000))
    assert compare_parquet_files(files) == []

    os.utime(old, None)  # now the newest file lacks it: the writer drifted
    for other in files:
        if other != old:
            os.utime(other, (1_000_000_000, 1_000_000_000))
    assert kinds(compare_parquet_files(files)) == {("parquet_schema", "parquet_files", "plan_key", "missing")}
    # A column that no version added later is drift whatever the files' ages.
    pl.read_parquet(old).drop("trace_id").write_parquet(old)
    os.utime(old, (1_000_000_000, 1_000_000_000))
    assert ("parquet_schema", "parquet_files", "trace_id", "missing") in kinds(compare_parquet_files(files))
