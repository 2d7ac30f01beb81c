"""Great Expectations in the code location: the per-micro-batch suite and the nightly schema-drift job."""

import json
from typing import Any

import dagster as dg

from planpipe.defs.ingest.assets import OBSERVATIONS
from planpipe.defs.replay.assets import replay_job
from planpipe.defs.resources import PlanpipeResource, PostgresResource
from planpipe.quality.batches import recent_batch_files
from planpipe.quality.drift import detect_drift
from planpipe.quality.suites import validate_observations

_FALLBACK_BATCHES = 20


def _metadata(values: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    converted: dict[str, dg.MetadataValue] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            converted[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            converted[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            converted[key] = dg.MetadataValue.float(value)
        elif isinstance(value, str):
            converted[key] = dg.MetadataValue.text(value)
        else:
            converted[key] = dg.MetadataValue.json(value)
    return converted


def _batch_files_of_run(context: dg.AssetCheckExecutionContext) -> list[list[str]]:
    """The Parquet files of each micro-batch this run materialized (from its own event log)."""
    batches = []
    for entry in context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is None or materialization.asset_key != OBSERVATIONS:
            continue
        files = materialization.metadata.get("parquet_files")
        if files is not None and isinstance(files.value, list):
            batches.append([str(name) for name in files.value])
    return batches


@dg.asset_check(
    asset=OBSERVATIONS,
    blocking=True,
    description="Great Expectations suite on every micro-batch of observations (columns, types, nulls, "
    "ranges, allowed values, offsets unique); blocks downstream assets on failure.",
)
def observations_suite(
    context: dg.AssetCheckExecutionContext, planpipe: PlanpipeResource, postgres: PostgresResource
) -> dg.AssetCheckResult:
    settings = planpipe.settings()
    batches = _batch_files_of_run(context)
    if not batches:  # run on its own: validate the most recent batches
        with postgres.connect() as conn:
            batches = recent_batch_files(conn, settings.consumer_group, _FALLBACK_BATCHES)
    root = settings.parquet_dir
    results = []
    for files in batches:
        paths = [root / name for name in files if (root / name).exists()]
        if paths:
            results.append(validate_observations(paths))
    failed = [r for r in results if not r.success]
    rows_total = sum(r.rows for r in results)
    metadata: dict[str, dg.MetadataValue] = {
        "batches_validated": dg.MetadataValue.int(len(results)),
        "batches_failed": dg.MetadataValue.int(len(failed)),
        "rows_validated": dg.MetadataValue.int(rows_total),
    }
    if results:
        worst = failed[0] if failed else results[-1]
        metadata["report"] = dg.MetadataValue.md(worst.to_markdown())
        metadata["mean_validation_ms"] = dg.MetadataValue.float(sum(r.duration_ms for r in results) / len(results))
    return dg.AssetCheckResult(passed=not failed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)


@dg.asset_check(
    asset=OBSERVATIONS,
    description="Envelope contract vs Parquet schema (declared and on disk) vs PostgreSQL DDL (information_schema).",
)
def schema_drift(planpipe: PlanpipeResource) -> dg.AssetCheckResult:
    report = detect_drift(planpipe.settings())
    metadata = _metadata(report.to_metadata())
    metadata["report"] = dg.MetadataValue.md(report.to_markdown())
    return dg.AssetCheckResult(passed=report.ok, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)


schema_drift_job = dg.define_asset_job(
    "schema_drift_job",
    selection=dg.AssetSelection.checks(schema_drift),
    description="Nightly schema-drift comparison; a failure launches the DLQ correction job.",
)

schema_drift_schedule = dg.ScheduleDefinition(
    job=schema_drift_job, cron_schedule="0 2 * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)


def drift_failed(instance: dg.DagsterInstance, run_id: str) -> bool:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if isinstance(data, dg.AssetCheckEvaluation) and data.check_name == "schema_drift" and not data.passed:
            return True
    return False


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[schema_drift_job],
    request_job=replay_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A failed schema-drift check drives the correction (DLQ replay) job.",
)
def drift_correction_sensor(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
    run_id = context.dagster_run.run_id
    if not drift_failed(context.instance, run_id):
        return dg.SkipReason("schema drift check passed")
    return dg.RunRequest(run_key=f"drift-correction-{run_id}", tags={"planpipe/trigger": json.dumps(run_id)})
