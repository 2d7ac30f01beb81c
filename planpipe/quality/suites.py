"""The observations suite (Great Expectations 1.x), kept in code, and the typed runner around it.

`validate_observations` checks one micro-batch (a polars frame) or Parquet files
of the dataset against the observations suite: exactly the columns of
`parquet_sink.SCHEMA` with their types, no nulls in required fields, value
ranges mirroring the envelope contract, allowed routes and priorities, the
fingerprint format and one row per Kafka record.

GX is untyped, slow to import (~5 s), not thread-safe and spends ~10 ms of pure
framework overhead per expectation, so:

* everything that touches GX sits below the `GX boundary` line; GX is imported
  on first use and results leave it as frozen dataclasses of plain values;
* one ephemeral context, pandas data source and each suite are built once per
  process and reused under a lock;
* a batch is first validated with `BOOLEAN_ONLY` (about half the cost of a
  detailed run); only the expectations that failed are re-run for details;
* the schema half of the suite (column set and types) depends on the frame's
  schema only: once a schema passed it, later frames with the same polars schema
  skip it. The value half runs on every call.
"""

import importlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import polars as pl

from planpipe.contract import PRIORITIES, ROUTES
from planpipe.ingest.parquet_sink import PARTITION_COLUMNS, SCHEMA

SUITE_NAME: Final = "planpipe.observations"

# Never null in a written observation: the contract's required fields, what the
# engine derives (fingerprint, route, priority defaults to the key's), the Kafka
# coordinates and the write stamp. query_type, query_text, trace_id and
# published_at may be null.
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
# Plausible execution time: 2000-01-01 .. 2100-01-01 UTC. Fixed bounds keep the
# cached suite from going stale; the contract itself only stops at 1e11 s.
EXECUTION_TS_MIN: Final = 946_684_800.0
EXECUTION_TS_MAX: Final = 4_102_444_800.0

Plain = str | int | float | bool | None
MetadataValue = Plain | list[dict[str, Plain]]
ResultFormat = Literal["BOOLEAN_ONLY", "BASIC", "SUMMARY", "COMPLETE"]
DType = pl.DataType | type[pl.DataType]  # what polars schemas hold: classes (pl.String) or instances


def gx_type_name(dtype: DType) -> str:
    """The `type_` that ExpectColumnValuesToBeOfType checks for a column of polars `dtype`.

    Frames reach GX as pandas with nullable dtypes (see `_to_pandas`), whose
    scalar types are exact: Int64 → numpy int64, Int32 → int32, UInt64 → uint64, Float64 →
    float64, String → str, Datetime with a time zone → pandas Timestamp.
    """
    if dtype == pl.String:
        return "str"
    if dtype == pl.Float64:
        return "float64"
    if dtype == pl.Int64:
        return "int64"
    if dtype == pl.Int32:
        return "int32"
    if dtype == pl.UInt64:
        return "uint64"
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return "Timestamp"
    raise ValueError(f"no GX type mapping for polars dtype {dtype}")


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold, or could not be evaluated (`error` says why)."""

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
    # The column-set/type half was skipped: this frame's schema already passed it.
    schema_checks_cached: bool = False

    @property
    def failed_names(self) -> set[tuple[str, str | None]]:
        """(expectation, column) of every failure."""
        return {(f.expectation, f.column) for f in self.failed}

    def to_markdown(self) -> str:
        status = "passed" if self.success else "FAILED"
        lines = [
            f"**{self.suite}** {status}: {self.successful}/{self.evaluated} expectations held "
            f"on {self.rows} rows ({self.duration_ms:.0f} ms)",
        ]
        if self.failed:
            lines += [
                "",
                "| expectation | column | observed | unexpected | examples |",
                "| --- | --- | --- | --- | --- |",
            ]
            for f in self.failed:
                observed = f.error or f.observed_value or ""
                count = "" if f.unexpected_count is None else str(f.unexpected_count)
                examples = ", ".join(f.unexpected_examples)
                lines.append(f"| {f.expectation} | {f.column or ''} | {_md(observed)} | {count} | {_md(examples)} |")
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
            "schema_checks_cached": self.schema_checks_cached,
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


# -- validation ------------------------------------------------------------------------------


def read_observation_files(paths: Sequence[str | os.PathLike[str]]) -> list[pl.DataFrame]:
    """Files of the dataset, each with `route` put back from its `route=` directory."""
    frames: list[pl.DataFrame] = []
    for raw in paths:
        path = Path(raw)
        frame = pl.read_parquet(path)
        hive = dict(part.split("=", 1) for part in path.parent.parts[-2:] if "=" in part)
        if "route" in hive and "route" not in frame.columns:
            frame = frame.with_columns(pl.lit(hive["route"], dtype=pl.String).alias("route"))
        frames.append(frame.drop([c for c in PARTITION_COLUMNS if c != "route" and c in frame.columns]))
    return frames


def _combine(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """One frame for the value checks. Relaxed, so files that drifted still combine; their
    schemas are checked one by one (see `validate_observations`)."""
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    combined = pl.concat(frames, how="diagonal_relaxed")
    ordered = [c for c in SCHEMA if c in combined.columns]
    return combined.select(ordered + [c for c in combined.columns if c not in SCHEMA])


SchemaKey = tuple[tuple[str, str], ...]
_passed_schemas: dict[SchemaKey, int] = {}  # schema → number of schema expectations it passed
_passed_lock = threading.Lock()


def _schema_key(frame: pl.DataFrame) -> SchemaKey:
    return tuple((name, str(dtype)) for name, dtype in frame.schema.items())


def _schema_outcomes(frame: pl.DataFrame) -> tuple[list["Outcome"], int]:
    """(outcomes, passes taken from the cache) of the schema expectations for `frame`'s schema."""
    key = _schema_key(frame)
    with _passed_lock:
        cached = _passed_schemas.get(key)
    if cached is not None:
        return [], cached
    # The schema half depends on dtypes only: validate an empty frame of the same schema.
    outcomes = run_suite(frame.clear(), f"{SUITE_NAME}.schema", schema_expectations)
    if all(o.success for o in outcomes):
        with _passed_lock:
            if len(_passed_schemas) >= 64:
                _passed_schemas.clear()
            _passed_schemas[key] = len(outcomes)
    return outcomes, 0


def validate_observations(source: pl.DataFrame | Sequence[str | os.PathLike[str]]) -> SuiteResult:
    """Run the observations suite on a micro-batch frame or on Parquet files of the dataset.

    For files, the schema expectations run once per distinct file schema (so one
    file with a drifted type is not hidden by the others) and the value
    expectations run on all rows together (so duplicates across files count).
    """
    if isinstance(source, str | os.PathLike):
        raise TypeError("pass a list of Parquet paths, not a single path")
    frames = [source] if isinstance(source, pl.DataFrame) else read_observation_files(source)
    started = time.perf_counter()
    combined = frames[0] if len(frames) == 1 else _combine(frames)
    by_schema = {_schema_key(f): f for f in frames} or {_schema_key(combined): combined}
    outcomes: list[Outcome] = []
    seen: set[tuple[str, str | None, str]] = set()
    schema_count, all_cached = 0, True
    for frame in by_schema.values():
        schema_outcomes, cached = _schema_outcomes(frame)
        schema_count = max(schema_count, cached, len(schema_outcomes))
        all_cached = all_cached and cached > 0
        for o in schema_outcomes:
            if (identity := (o.expectation, o.column, repr(o.observed_value))) not in seen:
                seen.add(identity)
                outcomes.append(o)
    value_outcomes = run_suite(combined, f"{SUITE_NAME}.values", value_expectations)
    outcomes += value_outcomes
    duration_ms = (time.perf_counter() - started) * 1000
    failed = tuple(_failed(o) for o in outcomes if not o.success)
    evaluated = schema_count + len(value_outcomes)
    return SuiteResult(
        suite=SUITE_NAME,
        success=not failed,
        rows=combined.height,
        evaluated=evaluated,
        successful=evaluated - len({(f.expectation, f.column) for f in failed}),
        failed=failed,
        duration_ms=duration_ms,
        schema_checks_cached=all_cached,
    )


def _failed(o: "Outcome") -> FailedExpectation:
    observed = _plain_str(o.observed_value)
    count = o.unexpected_count
    examples = tuple(s for s in (_plain_str(v, 80) for v in o.unexpected_examples[:5]) if s)
    mismatched = o.details.get("mismatched")
    if isinstance(mismatched, Mapping):  # ExpectTableColumnsToMatchSet
        missing = sorted(str(c) for c in mismatched.get("missing") or ())
        unexpected = sorted(str(c) for c in mismatched.get("unexpected") or ())
        observed = f"missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'}"
        count = len(missing) + len(unexpected)
        examples = (*missing, *unexpected)
    return FailedExpectation(
        expectation=o.expectation,
        column=o.column,
        observed_value=observed,
        unexpected_count=count,
        unexpected_examples=examples,
        error=o.error,
    )


# -- GX boundary -----------------------------------------------------------------------------
# The only code that calls Great Expectations. Results leave it as `Outcome`s.


@dataclass(frozen=True)
class Outcome:
    """One expectation's result, copied out of GX into plain values."""

    expectation: str
    column: str | None
    success: bool
    observed_value: object = None
    unexpected_count: int | None = None
    unexpected_examples: tuple[object, ...] = ()
    result: Mapping[str, object] = field(default_factory=dict)  # GX's whole `result` dict
    error: str | None = None

    @property
    def details(self) -> Mapping[str, object]:
        details = self.result.get("details")
        return details if isinstance(details, Mapping) else {}


def schema_expectations() -> list[Any]:
    """Column set and column types: the part that depends on the frame's schema only."""
    gxe = gx_expectations()
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(SCHEMA), exact_match=True),
        *(gxe.ExpectColumnValuesToBeOfType(column=c, type_=gx_type_name(t)) for c, t in SCHEMA.items()),
    ]


def value_expectations() -> list[Any]:
    """Nulls, ranges, allowed values, formats and uniqueness: checked on every batch."""
    gxe = gx_expectations()
    between = gxe.ExpectColumnValuesToBeBetween
    lengths = gxe.ExpectColumnValueLengthsToBeBetween
    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS),
        between(column="actual_rows", min_value=0, max_value=2**63 - 1),
        between(column="total_time_ms", min_value=0, max_value=1e12),
        between(column="execution_timestamp", min_value=EXECUTION_TS_MIN, max_value=EXECUTION_TS_MAX),
        between(column="published_at", min_value=0, max_value=1e11),
        between(column="kafka_partition", min_value=0),
        between(column="kafka_offset", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="route", value_set=list(ROUTES)),
        gxe.ExpectColumnValuesToBeInSet(column="priority", value_set=list(PRIORITIES)),
        gxe.ExpectColumnValuesToMatchRegex(column="fingerprint", regex=FINGERPRINT_REGEX),
        lengths(column="query_hash", min_value=1, max_value=256),
        lengths(column="cluster_id", min_value=1, max_value=256),
        lengths(column="plan_text", min_value=1),
        lengths(column="query_type", max_value=32),
        lengths(column="trace_id", max_value=128),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=list(UNIQUE_KEY)),
    ]


def observations_suite() -> Any:
    """The whole observations suite as one `gx.ExpectationSuite` (a fresh object per call)."""
    import great_expectations as gx

    return gx.ExpectationSuite(name=SUITE_NAME, expectations=[*schema_expectations(), *value_expectations()])


def gx_expectations() -> Any:
    """`great_expectations.expectations`, imported on first use (GX exports its classes untyped)."""
    import great_expectations.expectations

    return great_expectations.expectations


class _Engine:
    """One ephemeral GX context with a pandas data source; suites are cached by name."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.lock = threading.RLock()
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = self.context.data_sources.add_pandas(name="planpipe")
        self.batch_definition = source.add_dataframe_asset(name="frame").add_batch_definition_whole_dataframe(
            name="whole"
        )
        self.suites: dict[str, Any] = {}

    def suite(self, name: str, build: Callable[[], Sequence[Any]]) -> Any:
        import great_expectations as gx

        found = self.suites.get(name)
        if found is None:
            found = self.suites[name] = gx.ExpectationSuite(name=name, expectations=list(build()))
        return found


_engine_lock = threading.Lock()
_engines: list[_Engine] = []  # at most one per process


def _engine() -> _Engine:
    with _engine_lock:  # two threads on a cold start must not build two contexts
        if not _engines:
            _engines.append(_Engine())
        return _engines[0]


def run_suite(
    frame: pl.DataFrame,
    name: str,
    build: Callable[[], Sequence[Any]],
    *,
    result_format: ResultFormat = "BASIC",
    fast_first: bool = True,
) -> list[Outcome]:
    """Validate `frame` with the suite cached as `name` (made from `build()` on first use).

    With `fast_first`, the suite runs with BOOLEAN_ONLY and only failed
    expectations are validated again with `result_format` for their details.
    """
    data = _to_pandas(frame)
    engine = _engine()
    with engine.lock:
        suite = engine.suite(name, build)
        batch = engine.batch_definition.get_batch(batch_parameters={"dataframe": data})
        validation = batch.validate(suite, result_format="BOOLEAN_ONLY" if fast_first else result_format)
        results = list(validation.results)
        if fast_first and not validation.success:
            for i, result in enumerate(results):
                if not result.success and not _raised(result):
                    expectation = result.expectation_config.to_domain_obj()
                    results[i] = batch.validate(expectation, result_format=result_format)
    outcomes = [_outcome(r) for r in results]
    # GX reports an expectation on an absent column as a bare failure or an
    # IndexError; say what happened instead.
    return [
        replace(o, error=f"column {o.column!r} is missing")
        if o.column is not None and "," not in o.column and o.column not in frame.columns
        else o
        for o in outcomes
    ]


def _arrow_to_pandas_dtype(arrow_type: Any) -> Any:
    """Nullable pandas dtypes: an Int64 column with a null stays int64 rather than float64."""
    import pyarrow as pa

    pd: Any = importlib.import_module("pandas")  # no stubs for pandas here; GX brings it in

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


def _to_pandas(frame: pl.DataFrame) -> Any:
    return frame.to_arrow().to_pandas(types_mapper=_arrow_to_pandas_dtype)


def _raised(result: Any) -> bool:
    info = result.exception_info or {}
    return bool(isinstance(info, Mapping) and info.get("raised_exception"))


def _outcome(result: Any) -> Outcome:
    config = result.expectation_config
    kwargs: Mapping[str, Any] = config.kwargs
    column = kwargs.get("column")
    if column is None and "column_list" in kwargs:
        column = ",".join(kwargs["column_list"])
    body: Mapping[str, Any] = result.result or {}
    error: str | None = None
    if _raised(result):
        error = str(result.exception_info.get("exception_message") or "the expectation raised an exception")
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
        result=dict(body),
        error=error,
    )
