"""Quality checks against the real stack: the live PostgreSQL schema and a dataset written by the engine."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import polars as pl
import psycopg
import pytest

from planpipe.contract import Envelope
from planpipe.ingest import parquet_sink
from planpipe.ingest.engine import IngestEngine
from planpipe.quality.drift import detect_drift
from planpipe.quality.drift_report import DriftReport
from planpipe.quality.field_map import TRACKED_TABLES
from planpipe.quality.suites import validate_observations
from planpipe.settings import Settings
from planpipe_tests.integration.workload import make_envelopes, publish

# Real `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` output captured from PostgreSQL 18 (pgbench
# tables; see capture_fixtures.py). Read from disk rather than re-captured so this module
# never recreates a schema another test session may be reading.
PLANS_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "plans"


def kinds(report: DriftReport) -> set[tuple[str, str, str, str]]:
    return {(f.source_a, f.source_b, f.column, f.kind) for f in report.findings}


def test_no_drift_on_the_real_schema(stack_settings: Settings, tmp_path: Path) -> None:
    report = detect_drift(stack_settings, parquet_root=tmp_path / "no-dataset")
    assert report.ok, report.to_markdown()
    assert report.postgres_columns > 40
    assert report.contract_fields == len(Envelope.__struct_fields__)
    assert report.notes  # says the on-disk Parquet schema was not checked


def test_drift_in_a_scratch_copy_names_the_exact_columns(stack_settings: Settings, tmp_path: Path) -> None:
    scratch = f"pp_drift_{uuid.uuid4().hex[:10]}"
    # One transaction, rolled back: the scratch schema never becomes visible to anyone else.
    with psycopg.connect(stack_settings.pg_dsn) as conn:
        try:
            conn.execute(f"CREATE SCHEMA {scratch}")
            for table in TRACKED_TABLES:
                conn.execute(f"CREATE TABLE {scratch}.{table} (LIKE planpipe.{table})")
            copy = detect_drift(stack_settings, pg_schema=scratch, conn=conn, parquet_root=tmp_path)
            assert copy.ok, copy.to_markdown()

            conn.execute(f"ALTER TABLE {scratch}.plan_baselines ADD COLUMN cpu_ms double precision")
            conn.execute(f"ALTER TABLE {scratch}.plan_baselines ALTER COLUMN total_time_sum TYPE numeric")
            conn.execute(f"ALTER TABLE {scratch}.query_catalog ALTER COLUMN query_type SET NOT NULL")
            conn.execute(f"ALTER TABLE {scratch}.plan_rollups_hourly ALTER COLUMN route DROP NOT NULL")
            conn.execute(f"ALTER TABLE {scratch}.consumer_offsets DROP COLUMN next_offset")
            report = detect_drift(stack_settings, pg_schema=scratch, conn=conn, parquet_root=tmp_path)
        finally:
            conn.rollback()
    assert kinds(report) == {
        ("mapping", "postgres", "plan_baselines.cpu_ms", "extra"),
        ("contract", "postgres", "plan_baselines.total_time_sum", "type_mismatch"),
        ("contract", "postgres", "query_catalog.query_type", "nullability"),
        ("parquet_schema", "postgres", "plan_rollups_hourly.route", "nullability"),
        ("parquet_schema", "postgres", "consumer_offsets.next_offset", "missing"),
    }
    by_column = {f.column: f.detail for f in report.findings}
    assert by_column["plan_baselines.total_time_sum"] == (
        "expected double precision (contract `total_time_ms`, sum), found numeric"
    )
    assert not report.ok
    assert report.to_metadata()["finding_count"] == 5
    with psycopg.connect(stack_settings.pg_dsn) as check:
        gone = check.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (scratch,)).fetchone()
    assert gone == (0,)


@dataclass(frozen=True)
class Ingested:
    settings: Settings
    envelopes: list[Envelope]
    files: list[Path]


@pytest.fixture
def ingested(settings: Settings) -> Iterator[Ingested]:
    """A few hundred envelopes of real plans, published and ingested by the engine until caught up."""
    plans = {path.stem: path.read_text() for path in sorted(PLANS_DIR.glob("*.json"))}
    prefix = settings.consumer_group.rsplit("-", 1)[-1]
    envelopes = []
    for i, e in enumerate(make_envelopes(plans, 360, prefix, seed=13)):
        if i % 9 == 0:
            e = msgspec.structs.replace(e, query_type="DDL")  # → ddl
        elif i % 5 == 0:
            e = msgspec.structs.replace(e, total_time_ms=5000.5 + i)  # → critical
        if i % 4 == 1:
            e = msgspec.structs.replace(e, priority="regression_candidate", query_text=f"SELECT {i}")
        envelopes.append(e)
    publish(settings, envelopes)
    engine = IngestEngine(settings, max_messages=100)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=120)
    finally:
        engine.close()
    assert summary.caught_up and summary.valid == len(envelopes) and summary.dlq == 0
    files = sorted(settings.parquet_dir.glob("route=*/date=*/*.parquet"))
    yield Ingested(settings, envelopes, files)


def test_a_dataset_written_by_the_engine_validates_clean(ingested: Ingested) -> None:
    assert {f.parent.parent.name for f in ingested.files} == {"route=baseline", "route=critical", "route=ddl"}
    whole = validate_observations(ingested.files)
    assert whole.success, whole.to_markdown()
    assert whole.rows == len(ingested.envelopes)
    for path in ingested.files:  # one micro-batch file at a time, as the ingest asset check will
        result = validate_observations([path])
        assert result.success, (path, result.to_markdown())
    # The dataset read back through the sink's own scanner (route from the directory, date dropped).
    scanned = parquet_sink.scan(ingested.settings.parquet_dir).collect().drop("date")
    assert validate_observations(scanned).success

    report = detect_drift(ingested.settings)
    assert report.ok, report.to_markdown()
    assert len(report.parquet_files) == 3  # the newest file of each route


def test_a_tampered_file_of_that_dataset_is_caught_by_both(ingested: Ingested) -> None:
    newest = max(
        (f for f in ingested.files if f.parent.parent.name == "route=critical"), key=lambda f: f.stat().st_mtime
    )
    frame = pl.read_parquet(newest)
    frame.with_columns(
        pl.col("kafka_partition").cast(pl.Int64), pl.lit(-1, dtype=pl.Int64).alias("actual_rows")
    ).write_parquet(newest)

    report = detect_drift(ingested.settings)
    assert kinds(report) == {("parquet_schema", "parquet_files", "kafka_partition", "type_mismatch")}
    assert "has Int64" in report.findings[0].detail

    result = validate_observations(ingested.files)
    assert result.failed_names == {
        ("expect_column_values_to_be_of_type", "kafka_partition"),
        ("expect_column_values_to_be_between", "actual_rows"),
    }
    negative = next(f for f in result.failed if f.column == "actual_rows")
    assert negative.unexpected_count == frame.height
