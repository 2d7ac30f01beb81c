"""Compaction of the observations dataset: hourly, and sooner when a directory fills with small files."""

import time

import dagster as dg

from planpipe.defs.ingest.assets import OBSERVATIONS
from planpipe.defs.ingest.jobs import INGEST_ROLE_TAG
from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest.compaction import committed_offsets, compact, small_file_counts

# The sensor asks for a compaction once a route/date directory holds this many small files.
SENSOR_SMALL_FILES = 256


@dg.op(description="Merge committed small Parquet files per route/date/partition into large ones (offset-range named).")
def compact_observations_op(context: dg.OpExecutionContext, planpipe: PlanpipeResource) -> None:
    settings = planpipe.settings()
    started = time.monotonic()
    report = compact(settings.parquet_dir, committed_offsets(settings.pg_dsn, settings.consumer_group))
    metadata: dict[str, dg.RawMetadataValue] = {key: value for key, value in report.as_dict().items()
                                                if not isinstance(value, list)}  # fmt: skip
    metadata["skipped_overlaps"] = len(report.skipped_overlaps)
    metadata["seconds"] = round(time.monotonic() - started, 2)
    context.log_event(dg.AssetObservation(asset_key=OBSERVATIONS, metadata=metadata))
    context.log.info(f"compaction: {report.as_dict()}")


@dg.job(
    description="Compaction of the observations dataset (Parquet): fewer, larger files for readers.",
    tags={INGEST_ROLE_TAG: "maintenance"},
)
def compaction_job() -> None:
    compact_observations_op()


compaction_schedule = dg.ScheduleDefinition(
    job=compaction_job, cron_schedule="23 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)


@dg.sensor(
    # By name: a sensor holding an op job is re-created when the definitions merge, which warns (beta `owners`).
    job_name="compaction_job",
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Requests a compaction when a route/date directory holds {SENSOR_SMALL_FILES}+ small files "
    "and no compaction is running.",
)
def compaction_sensor(context: dg.SensorEvaluationContext, planpipe: PlanpipeResource) -> dg.SensorResult:
    counts = small_file_counts(planpipe.settings().parquet_dir)
    crowded = {directory: n for directory, n in counts.items() if n >= SENSOR_SMALL_FILES}
    if not crowded:
        return dg.SensorResult(skip_reason=f"no directory with {SENSOR_SMALL_FILES}+ small files")
    running = context.instance.get_runs(
        dg.RunsFilter(
            job_name=compaction_job.name,
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        )
    )
    if running:
        return dg.SensorResult(skip_reason="a compaction is already running")
    key = "compaction-" + "-".join(f"{d}:{n}" for d, n in sorted(crowded.items()))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, tags={"planpipe/small_files": str(sum(crowded.values()))})]
    )
