"""The observations suite on synthetic micro-batches: a clean batch passes, each violation is named."""

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from planpipe.ingest import parquet_sink
from planpipe.quality import suites
from planpipe.quality.suites import REQUIRED_COLUMNS, SUITE_NAME, validate_observations
from planpipe_tests.unit.quality.helpers import ROWS, clean_frame, observations, set_row

pytestmark = pytest.mark.unit

UNIQUE = "expect_compound_columns_to_be_unique"
COLUMNS_SET = "expect_table_columns_to_match_set"
OF_TYPE = "expect_column_values_to_be_of_type"
NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
REGEX = "expect_column_values_to_match_regex"


def only_failure(frame: pl.DataFrame) -> suites.FailedExpectation:
    result = validate_observations(frame)
    assert not result.success
    assert len(result.failed) == 1, result.to_markdown()
    return result.failed[0]


def test_clean_batch_passes() -> None:
    result = validate_observations(clean_frame())
    assert result.success, result.to_markdown()
    assert result.failed == ()
    assert result.rows == ROWS
    # column set + one type per column + not-null per required column + the value checks
    assert result.evaluated == result.successful == len(suites.schema_expectations()) + len(suites.value_expectations())
    assert result.evaluated > 1 + len(parquet_sink.SCHEMA) + len(REQUIRED_COLUMNS)


def test_the_whole_suite_is_one_gx_suite_with_every_schema_column() -> None:
    import great_expectations as gx

    suite = suites.observations_suite()
    assert isinstance(suite, gx.ExpectationSuite)
    assert suite.name == SUITE_NAME
    expectations: list[Any] = list(suite.expectations)
    columns_set = next(e for e in expectations if e.expectation_type == COLUMNS_SET)
    assert set(columns_set.column_set) == set(parquet_sink.SCHEMA)
    assert columns_set.exact_match is True
    typed = {e.column for e in expectations if e.expectation_type == OF_TYPE}
    assert typed == set(parquet_sink.SCHEMA)


def test_empty_batch_passes() -> None:
    assert validate_observations(clean_frame(0)).success


def test_missing_column() -> None:
    result = validate_observations(clean_frame().drop("fingerprint"))
    assert not result.success
    failed = {f.expectation: f for f in result.failed}
    assert failed[COLUMNS_SET].observed_value == "missing: fingerprint; unexpected: -"
    # Everything else that fails is about the absent column, and says so.
    assert {f.column for f in result.failed if f.expectation != COLUMNS_SET} == {"fingerprint"}
    assert all(f.error == "column 'fingerprint' is missing" for f in result.failed if f.column == "fingerprint")


def test_extra_column() -> None:
    failure = only_failure(clean_frame().with_columns(pl.lit("x").alias("cpu_ms")))
    assert failure.expectation == COLUMNS_SET
    assert failure.observed_value == "missing: -; unexpected: cpu_ms"
    assert failure.unexpected_count == 1


@pytest.mark.parametrize("column", ["query_hash", "cluster_id", "plan_text", "fingerprint", "route", "kafka_offset"])
def test_null_in_required_field(column: str) -> None:
    failure = only_failure(set_row(clean_frame(), column, 7, None))
    assert (failure.expectation, failure.column, failure.unexpected_count) == (NOT_NULL, column, 1)


def test_nulls_in_optional_fields_are_fine() -> None:
    frame = clean_frame().with_columns(
        pl.lit(None, dtype=pl.String).alias("query_text"), pl.lit(None, dtype=pl.Float64).alias("published_at")
    )
    assert validate_observations(frame).success


def test_negative_rows() -> None:
    failure = only_failure(set_row(clean_frame(), "actual_rows", 3, -5))
    assert (failure.expectation, failure.column, failure.unexpected_count) == (BETWEEN, "actual_rows", 1)
    assert failure.unexpected_examples == ("-5",)


def test_negative_time_and_offset() -> None:
    frame = set_row(set_row(clean_frame(), "total_time_ms", 1, -0.1), "kafka_offset", 2, -1)
    result = validate_observations(frame)
    assert result.failed_names == {(BETWEEN, "total_time_ms"), (BETWEEN, "kafka_offset")}


def test_implausible_execution_timestamp() -> None:
    # Milliseconds where seconds are expected: year ~58,700.
    failure = only_failure(set_row(clean_frame(), "execution_timestamp", 0, 1_790_000_000_000.0))
    assert (failure.expectation, failure.column) == (BETWEEN, "execution_timestamp")


def test_bad_route() -> None:
    failure = only_failure(set_row(clean_frame(), "route", 4, "archive"))
    assert (failure.expectation, failure.column, failure.unexpected_examples) == (IN_SET, "route", ("archive",))


def test_bad_priority() -> None:
    failure = only_failure(set_row(clean_frame(), "priority", 4, "urgent"))
    assert (failure.expectation, failure.column) == (IN_SET, "priority")


@pytest.mark.parametrize("bad", ["ABCDEF0123456789ABCDEF0123456789", "abc", "g" * 32, "0" * 33])
def test_bad_fingerprint(bad: str) -> None:
    failure = only_failure(set_row(clean_frame(), "fingerprint", 9, bad))
    assert (failure.expectation, failure.column, failure.unexpected_examples) == (REGEX, "fingerprint", (bad,))


def test_duplicate_offsets() -> None:
    frame = clean_frame()
    duplicated = pl.concat([frame, frame.slice(10, 2)])
    failure = only_failure(duplicated)
    assert failure.expectation == UNIQUE
    assert failure.column == "kafka_topic,kafka_partition,kafka_offset"
    assert failure.unexpected_count == 4  # both copies of both duplicated records


def test_same_offset_in_another_partition_is_not_a_duplicate() -> None:
    frame = set_row(clean_frame(), "kafka_offset", 1, 100)  # row 0 has offset 100 in partition 0, row 1 partition 1
    assert validate_observations(frame).success


@pytest.mark.parametrize(
    ("column", "dtype", "observed"),
    [
        ("actual_rows", pl.Float64, "float64"),
        ("kafka_partition", pl.Int64, "int64"),
        ("execution_timestamp", pl.String, "str"),
        ("ingested_at", pl.Datetime("us"), "datetime64"),
    ],
)
def test_wrong_type(column: str, dtype: pl.DataType, observed: str) -> None:
    result = validate_observations(clean_frame().with_columns(pl.col(column).cast(dtype)))
    failed = {f.expectation: f for f in result.failed}
    assert (failed[OF_TYPE].column, failed[OF_TYPE].observed_value) == (column, observed)
    # A value check that cannot work on the wrong type may fail too, never one on another column.
    assert {f.column for f in result.failed} == {column}


def test_schema_checks_are_reused_for_a_known_good_schema_only() -> None:
    frame = clean_frame()
    validate_observations(frame)
    again = validate_observations(frame)
    assert again.schema_checks_cached and again.success
    assert again.evaluated == validate_observations(frame).evaluated
    # Values are still checked on every call.
    bad = validate_observations(set_row(frame, "route", 0, "nope"))
    assert bad.schema_checks_cached and bad.failed_names == {(IN_SET, "route")}
    # A failing schema is never remembered: it fails every time.
    wrong = frame.with_columns(pl.col("actual_rows").cast(pl.Int32))
    for _ in range(2):
        result = validate_observations(wrong)
        assert not result.schema_checks_cached
        assert result.failed_names == {(OF_TYPE, "actual_rows")}


def test_parquet_files_of_the_dataset(tmp_path: Path) -> None:
    obs = observations()
    written = parquet_sink.write_batch(tmp_path, obs, [("query-plans", p, 100, 100 + ROWS) for p in range(3)])
    assert {w.path.parent.parent.name for w in written} == {"route=baseline", "route=critical", "route=ddl"}
    result = validate_observations([w.path for w in written])
    assert result.success, result.to_markdown()
    assert result.rows == ROWS


def test_parquet_file_with_a_tampered_column(tmp_path: Path) -> None:
    written = parquet_sink.write_batch(
        tmp_path, observations(), [("query-plans", p, 100, 100 + ROWS) for p in range(3)]
    )
    victim = written[0].path
    pl.read_parquet(victim).with_columns(pl.col("kafka_offset").cast(pl.Int32)).write_parquet(victim)
    result = validate_observations([str(w.path) for w in written])
    assert result.failed_names == {(OF_TYPE, "kafka_offset")}


def test_a_single_path_string_is_refused() -> None:
    with pytest.raises(TypeError):
        validate_observations("observations/route=baseline/x.parquet")


def test_markdown_and_metadata() -> None:
    frame = set_row(set_row(clean_frame(), "actual_rows", 0, -1), "route", 1, "a|b")
    result = validate_observations(frame)
    text = result.to_markdown()
    assert text.startswith(f"**{SUITE_NAME}** FAILED")
    assert "| expect_column_values_to_be_between | actual_rows |" in text
    assert "a\\|b" in text  # table cells are escaped
    meta = result.to_metadata()
    assert meta["success"] is False
    assert meta["failed_expectations"] == 2
    failures = meta["failures"]
    assert isinstance(failures, list)
    assert {f["column"] for f in failures} == {"actual_rows", "route"}
    for value in [*meta.values(), *(v for f in failures for v in f.values())]:
        assert value is None or isinstance(value, str | int | float | bool | list)
    passed = validate_observations(clean_frame()).to_markdown()
    assert "passed" in passed and "|" not in passed
