"""The observations suite (Great Expectations 1.x), kept in code, and the typed runner around it.

`validate_observations` checks one micro-batch (a polars frame) or a set of
Parquet files of the dataset against `observations_suite()`: exactly the columns
of `parquet_sink.SCHEMA` with their types, no nulls in required fields, value
ranges mirroring the envelope contract, allowed routes and priorities, the
fingerprint format and one row per Kafka record.

GX is untyped, slow to import (~5 s) and not thread-safe, so everything that
touches it sits in the few functions below the `GX boundary` line: GX is
imported on first use, one ephemeral context, data asset and suite are built
once per process and reused under a lock, and results come back as frozen
dataclasses of plain values. Everything above that line is typed and GX-free.
"""

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import polars as pl

from planpipe.contract import PRIORITIES, ROUTES
from planpipe.ingest.parquet_sink import PARTITION_COLUMNS, SCHEMA

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

SUITE_NAME: Final = "planpipe.observations"

# Never null in a written observation: the contract's required fields, what the
# engine derives (fingerprint, route, priority defaults to the key's) and the
# Kafka coordinates. query_type, query_text, trace_id and published_at may be.
REQUIRED_COLUMNS: Final = (
    "query_hash",
    "cluster_id",
    "execution_timestamp",
    "plan_text",
    "actual_rows",
    "total_time_ms",
    "fingerprint",
    "route",
    "priority",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "ingested_at",
)
UNIQUE_KEY: Final = ("kafka_topic", "kafka_partition", "kafka_offset")
FINGERPRINT_REGEX: Final = r"^[0-9a-f]{32}$"
# Plausible execution time: 2000-01-01 .. 2100-01-01 (UTC). Fixed bounds, so the
# cached suite never goes stale; the contract itself only stops at 1e11 s.
EXECUTION_TS_MIN: Final = 946_684_800.0
EXECUTION_TS_MAX: Final = 4_102_444_800.0

Plain = str | int | float | bool | None
MetadataValue = Plain | list[dict[str, Plain]]


def gx_type_name(dtype: pl.DataType) -> str:
    """The `type_` ExpectColumnValuesToBeOfType checks for a column of polars `dtype`.

    Frames reach GX as pandas with nullable dtypes (see `_to_pandas`), whose
    scalar types are exact: Int64 → numpy int64, Int32 → int32, String → str,
    Datetime(tz) → pandas Timestamp.
    """
    if dtype == pl.String:
        return "str"
    if dtype == pl.Float64:
        return "float64"
    if dtype == pl.Int64:
        return "int64"
    if dtype == pl.Int32:
        return "int32"
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return "Timestamp"
    raise ValueError(f"no GX type mapping for polars dtype {dtype}")


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold (or could not be evaluated: `error` says why)."""

    expectation: str
    column: str | None
    observed_value: str | None
    unexpected_count: int | None
    unexpected_examples: tuple[str, ...] = ()
    error: str | None = None

    def to_plain(self) -> dict[str, Plain]:
        return {
            "expectation": self.expectation,
            "column": self.column,
            "observed_value": self.observed_value,
            "unexpected_count": self.unexpected_count,
            "unexpected_examples": ", ".join(self.unexpected_examples) or None,
            "error": self.error,
        }


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    success: bool
    rows: int
    evaluated: int
    successful: int
    failed: tuple[FailedExpectation, ...]
    duration_ms: float

    @property
    def failed_names(self) -> set[tuple[str, str | None]]:
        """(expectation, column) of every failure: handy for assertions and alert routing."""
        return {(f.expectation, f.column) for f in self.failed}

    def to_markdown(self) -> str:
        status = "passed" if self.success else "FAILED"
        lines = [
            f"**{self.suite}** {status}: {self.successful}/{self.evaluated} expectations held "
            f"on {self.rows} rows ({self.duration_ms:.0f} ms)",
        ]
        if self.failed:
            lines += ["", "| expectation | column | observed | unexpected | examples |", "| --- | --- | --- | --- | --- |"]
            for f in self.failed:
                observed = f.error or f.observed_value or ""
                count = "" if f.unexpected_count is None else str(f.unexpected_count)
                examples = ", ".join(f.unexpected_examples)
                lines.append(
                    f"| {f.expectation} | {f.column or ''} | {_md(observed)} | {count} | {_md(examples)} |"
                )
        return "\n".join(lines)

    def to_metadata(self) -> dict[str, MetadataValue]:
        return {
            "suite": self.suite,
            "success": self.success,
            "rows": self.rows,
            "evaluated_expectations": self.evaluated,
            "successful_expectations": self.successful,
            "failed_expectations": len(self.failed),
            "validation_ms": round(self.duration_ms, 2),
            "failures": [f.to_plain() for f in self.failed],
        }


def _md(text: str, limit: int = 120) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain_str(value: object, limit: int = 200) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- inputs ----------------------------------------------------------------------------------


def read_observation_files(paths: Sequence[str | os.PathLike[str]]) -> pl.DataFrame:
    """Files of the dataset as one frame, with `route` put back from the `route=` directory.

    Files are concatenated diagonally with relaxed types, so a file missing a
    column or holding another type still shows up (as nulls, or as a type the
    suite rejects) instead of failing the read.
    """
    frames: list[pl.DataFrame] = []
    for raw in paths:
        path = Path(raw)
        frame = pl.read_parquet(path)
        hive = {
            part.split("=", 1)[0]: part.split("=", 1)[1] for part in path.parent.parts[-2:] if "=" in part
        }
        if "route" in hive and "route" not in frame.columns:
            frame = frame.with_columns(pl.lit(hive["route"], dtype=pl.String).alias("route"))
        frames.append(frame.drop([c for c in PARTITION_COLUMNS if c != "route" and c in frame.columns]))
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    ordered = [c for c in SCHEMA if any(c in f.columns for f in frames)]
    combined = pl.concat(frames, how="diagonal_relaxed")
    return combined.select(ordered + [c for c in combined.columns if c not in SCHEMA])


def validate_observations(source: pl.DataFrame | Sequence[str | os.PathLike[str]]) -> SuiteResult:
    """Run the observations suite on a micro-batch frame or on Parquet files of the dataset."""
    if isinstance(source, str):
        raise TypeError("pass a list of Parquet paths, not a single string")
    frame = source if isinstance(source, pl.DataFrame) else read_observation_files(source)
    started = time.perf_counter()
    outcomes = run_suite(frame, SUITE_NAME, observations_suite)
    duration_ms = (time.perf_counter() - started) * 1000
    return _suite_result(SUITE_NAME, frame.height, outcomes, duration_ms)


def _suite_result(name: str, rows: int, outcomes: Sequence["Outcome"], duration_ms: float) -> SuiteResult:
    failed = tuple(
        FailedExpectation(
            expectation=o.expectation,
            column=o.column,
            observed_value=_plain_str(o.observed_value),
            unexpected_count=o.unexpected_count,
            unexpected_examples=tuple(s for s in (_plain_str(v, 80) for v in o.unexpected_examples[:5]) if s),
            error=o.error,
        )
        for o in outcomes
        if not o.success
    )
    return SuiteResult(
        suite=name,
        success=not failed,
        rows=rows,
        evaluated=len(outcomes),
        successful=len(outcomes) - len(failed),
        failed=failed,
        duration_ms=duration_ms,
    )


# -- GX boundary -----------------------------------------------------------------------------
# Below: the only code that calls Great Expectations. Results leave it as `Outcome`.


@dataclass(frozen=True)
class Outcome:
    """One expectation's result, copied out of GX into plain values."""

    expectation: str
    column: str | None
    success: bool
    observed_value: object = None
    unexpected_count: int | None = None
    unexpected_examples: tuple[object, ...] = ()
    details: Mapping[str, object] = field(default_factory=dict)
    error: str | None = None


ResultFormat = Literal["BASIC", "SUMMARY", "COMPLETE"]


class _Engine:
    """One ephemeral GX context with a pandas data source; suites registered by key."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.lock = threading.Lock()
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = self.context.data_sources.add_pandas(name="planpipe")
        asset = source.add_dataframe_asset(name="frame")
        self.batch_definition = asset.add_batch_definition_whole_dataframe(name="whole")
        self.suites: dict[str, gx.ExpectationSuite] = {}

    def suite(self, key: str, build: Callable[[], "gx.ExpectationSuite"]) -> "gx.ExpectationSuite":
        with self.lock:
            found = self.suites.get(key)
            if found is None:
                found = self.suites[key] = build()
            return found


@cache
def _engine() -> _Engine:
    return _Engine()


def observations_suite() -> "gx.ExpectationSuite":
    """The observations suite: built from `parquet_sink.SCHEMA` and the contract's constants."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=SUITE_NAME)
    add = suite.add_expectation
    add(gxe.ExpectTableColumnsToMatchSet(column_set=list(SCHEMA), exact_match=True))
    for column, dtype in SCHEMA.items():
        add(gxe.ExpectColumnValuesToBeOfType(column=column, type_=gx_type_name(dtype)))
    for column in REQUIRED_COLUMNS:
        add(gxe.ExpectColumnValuesToNotBeNull(column=column))
    add(gxe.ExpectColumnValuesToBeBetween(column="actual_rows", min_value=0, max_value=2**63 - 1))
    add(gxe.ExpectColumnValuesToBeBetween(column="total_time_ms", min_value=0, max_value=1e12))
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="execution_timestamp", min_value=EXECUTION_TS_MIN, max_value=EXECUTION_TS_MAX
        )
    )
    add(gxe.ExpectColumnValuesToBeBetween(column="published_at", min_value=0, max_value=1e11))
    add(gxe.ExpectColumnValuesToBeBetween(column="kafka_offset", min_value=0))
    add(gxe.ExpectColumnValuesToBeBetween(column="kafka_partition", min_value=0))
    add(gxe.ExpectColumnValuesToBeInSet(column="route", value_set=list(ROUTES)))
    add(gxe.ExpectColumnValuesToBeInSet(column="priority", value_set=list(PRIORITIES)))
    add(gxe.ExpectColumnValuesToMatchRegex(column="fingerprint", regex=FINGERPRINT_REGEX))
    for column in ("query_hash", "cluster_id"):
        add(gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=256))
    add(gxe.ExpectColumnValueLengthsToBeBetween(column="plan_text", min_value=1))
    add(gxe.ExpectColumnValueLengthsToBeBetween(column="query_type", max_value=32))
    add(gxe.ExpectColumnValueLengthsToBeBetween(column="trace_id", max_value=128))
    add(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(UNIQUE_KEY)))
    return suite


def _arrow_to_pandas_dtype(arrow_type: Any) -> Any:
    """Nullable pandas dtypes, so an Int64 column with a null stays int64 rather than float64."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_int64(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_int32(arrow_type):
        return pd.Int32Dtype()
    if pa.types.is_float64(arrow_type):
        return pd.Float64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pd.StringDtype()
    return None


def _to_pandas(frame: pl.DataFrame) -> "pd.DataFrame":
    table = frame.to_arrow()
    result: pd.DataFrame = table.to_pandas(types_mapper=_arrow_to_pandas_dtype)
    return result


def run_suite(
    frame: pl.DataFrame,
    key: str,
    build: Callable[[], "gx.ExpectationSuite"],
    result_format: ResultFormat = "SUMMARY",
) -> list[Outcome]:
    """Validate `frame` against the suite cached under `key` (built by `build()` on first use)."""
    engine = _engine()
    suite = engine.suite(key, build)
    data = _to_pandas(frame)
    with engine.lock:
        batch = engine.batch_definition.get_batch(batch_parameters={"dataframe": data})
        validation = batch.validate(suite, result_format=result_format)
    return [_outcome(r) for r in validation.results]


def _outcome(result: Any) -> Outcome:
    config = result.expectation_config
    kwargs: Mapping[str, Any] = config.kwargs
    column = kwargs.get("column")
    if column is None and "column_list" in kwargs:
        column = ",".join(kwargs["column_list"])
    body: Mapping[str, Any] = result.result or {}
    info = result.exception_info or {}
    error: str | None = None
    if isinstance(info, Mapping) and info.get("raised_exception"):
        error = str(info.get("exception_message") or "expectation raised an exception")
    elif isinstance(info, Mapping):
        # Several expectations on one batch: {expectation id: {raised_exception, ...}}.
        for nested in info.values():
            if isinstance(nested, Mapping) and nested.get("raised_exception"):
                error = str(nested.get("exception_message") or "expectation raised an exception")
                break
    unexpected = body.get("unexpected_list")
    if unexpected is None:
        unexpected = body.get("partial_unexpected_list") or ()
    count = body.get("unexpected_count")
    return Outcome(
        expectation=str(config.type),
        column=None if column is None else str(column),
        success=bool(result.success),
        observed_value=body.get("observed_value"),
        unexpected_count=None if count is None else int(count),
        unexpected_examples=tuple(unexpected),
        details=dict(body.get("details") or {}),
        error=error,
    )
