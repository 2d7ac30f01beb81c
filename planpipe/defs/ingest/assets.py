"""Assets and lineage: query-plans topic → observations → baselines/rollups → regressions; DLQ → replay.

An ingest run is long-lived: one Dagster run per micro-batch would cost seconds of
process start-up and could never meet the 1,200 ms p95, so a run consumes
micro-batches until caught up and idle for `ingest_idle_s` (a standing run, kept by the lag sensor even
without lag, until `ingest_max_seconds`) and records one materialization of `plan_observations` per micro-batch.
"""

import signal

import dagster as dg

from planpipe.defs.ingest.runtime import (
    STANDING_TAG,
    CancelWatch,
    GracefulStop,
    ProgressWatchdog,
    ingest_client_id,
    watchdog_interval_s,
)
from planpipe.defs.resources import REGION_TAG, PlanpipeResource
from planpipe.ingest.engine import BatchReport, IngestEngine, RunSummary
from planpipe.ingest.sla import Progress

KAFKA_GROUP = "kafka"
STORE_GROUP = "baseline_store"

query_plans_topic = dg.AssetSpec(
    key=["kafka", "query_plans"],
    description="Kafka topic `query-plans`: envelopes keyed `{priority}:{query_hash}`, zstd, 7-day retention.",
    group_name=KAFKA_GROUP,
    kinds={"kafka"},
    deps=[dg.AssetKey(["kafka", "dlq_replay"])],
)
dlq_topic = dg.AssetSpec(
    key=["kafka", "query_plans_dlq"],
    description="Dead-letter topic `query-plans.dlq`: original bytes, reason and source coordinates in headers.",
    group_name=KAFKA_GROUP,
    kinds={"kafka"},
)

OBSERVATIONS = dg.AssetKey("plan_observations")
BASELINES = dg.AssetKey("plan_baselines")
ROLLUPS = dg.AssetKey("plan_rollups_hourly")


def _batch_metadata(report: BatchReport) -> dict[str, dg.MetadataValue]:
    return {
        "batch_id": dg.MetadataValue.int(report.batch_id),
        "offset_ranges": dg.MetadataValue.json(report.offset_ranges),
        "rows": dg.MetadataValue.int(report.valid),
        "consumed": dg.MetadataValue.int(report.consumed),
        "dlq": dg.MetadataValue.int(report.dlq),
        "dropped_low_priority": dg.MetadataValue.int(report.dropped_low),
        "p95_publish_to_commit_ms": dg.MetadataValue.float(report.p95_latency_ms or 0.0),
        "lock_wait_ms": dg.MetadataValue.float(report.lock_wait_ms),
        "duration_ms": dg.MetadataValue.float(report.duration_ms),
        "breaker_open": dg.MetadataValue.bool(report.breaker_open),
        "parquet_files": dg.MetadataValue.json(report.parquet_files),
    }


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            OBSERVATIONS,
            description="Every plan observation, Parquet partitioned by route= and date=, one file per offset range.",
            deps=[query_plans_topic.key],
            kinds={"parquet", "polars"},
            group_name=STORE_GROUP,
        ),
        dg.AssetSpec(
            BASELINES,
            description="Per (cluster, query, plan) baselines with first/last seen, executions and latency sketch.",
            deps=[OBSERVATIONS],
            kinds={"postgres"},
            group_name=STORE_GROUP,
        ),
        dg.AssetSpec(
            ROLLUPS,
            description="Hourly rollups per (cluster, query, plan), expired with their route's retention.",
            deps=[OBSERVATIONS],
            kinds={"postgres"},
            group_name=STORE_GROUP,
        ),
    ],
    can_subset=False,
)
def ingest_micro_batches(
    context: dg.AssetExecutionContext, planpipe: PlanpipeResource
) -> tuple[dg.MaterializeResult[None], dg.MaterializeResult[None], dg.MaterializeResult[None]]:
    settings = planpipe.settings(region=context.run.tags.get(REGION_TAG))  # a region's run: its topics
    client_id = ingest_client_id(context.run.run_id)

    def report_progress(progress: Progress) -> None:
        message = f"ingest progress: {progress.detail}"
        if progress.stalled:
            context.log.warning(message)
        else:
            context.log.info(message)
        context.log_event(dg.AssetObservation(asset_key=OBSERVATIONS, metadata=_progress_metadata(progress)))

    watchdog = ProgressWatchdog(
        settings, client_id, report_progress, interval_s=watchdog_interval_s(planpipe.ingest_stall_after_s),
        stall_after_s=planpipe.ingest_stall_after_s,
    )  # fmt: skip

    def record(report: BatchReport) -> None:
        watchdog.committed()
        context.log_event(dg.AssetMaterialization(asset_key=OBSERVATIONS, metadata=_batch_metadata(report)))

    # Signals before the engine exists keep Dagster's behaviour (interrupt); from here until the
    # function returns they end the loop between batches. One return, no yields: an interrupt
    # that arrives while Dagster handles our results cannot fail a step that already finished.
    def canceling() -> bool:
        run = context.instance.get_run_by_id(context.run.run_id)
        return run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)

    engine = IngestEngine(settings, on_batch=record, client_id=client_id)
    with GracefulStop(engine.stop) as stop, CancelWatch(canceling, engine.stop) as cancel:
        summary: RunSummary | None = None
        with watchdog:
            try:
                standing = context.run.tags.get(STANDING_TAG) == "true"
                summary = engine.run(
                    until_caught_up=not standing, max_seconds=planpipe.ingest_max_seconds, idle_s=planpipe.ingest_idle_s
                )
            except Exception as error:
                if not (stop.requested or cancel.requested):
                    raise
                # Asked to stop while a batch was being retried: the batch is abandoned whole
                # (nothing of it is committed; the next run consumes it again).
                context.log.warning(f"ingest run stopped with its batch in flight abandoned: {error!r}")
            finally:
                engine.close()
        if stop.requested or cancel.requested:
            _end_canceled(context, signal_name=stop.signal)
        summary = summary or RunSummary()
        context.log.info(f"ingest run summary: {summary.as_dict()}")
        totals = {
            "batches": dg.MetadataValue.int(summary.batches),
            "rows": dg.MetadataValue.int(summary.valid),
            "dlq": dg.MetadataValue.int(summary.dlq),
            "dropped_low_priority": dg.MetadataValue.int(summary.dropped_low),
            "max_p95_publish_to_commit_ms": dg.MetadataValue.float(summary.max_p95_latency_ms),
            "max_lock_wait_ms": dg.MetadataValue.float(summary.max_lock_wait_ms),
            "caught_up": dg.MetadataValue.bool(summary.caught_up),
            "stopped_by_signal": dg.MetadataValue.bool(stop.requested),
            "stopped_by_cancel_request": dg.MetadataValue.bool(cancel.requested and not stop.requested),
            "stalled_checks": dg.MetadataValue.int(watchdog.stalled_checks),
            "max_seconds_without_progress": dg.MetadataValue.float(round(watchdog.max_idle_s, 1)),
            "seconds": dg.MetadataValue.float(summary.seconds),
        }
        return (
            dg.MaterializeResult(asset_key=OBSERVATIONS, metadata=totals),
            dg.MaterializeResult(asset_key=BASELINES, metadata=totals),
            dg.MaterializeResult(asset_key=ROLLUPS, metadata={"batches": dg.MetadataValue.int(summary.batches)}),
        )


def _progress_metadata(progress: Progress) -> dict[str, dg.MetadataValue]:
    return {
        "ingest_progress": dg.MetadataValue.text("stalled" if progress.stalled else "progressing"),
        "lag": dg.MetadataValue.int(progress.lag),
        "seconds_without_progress": dg.MetadataValue.float(round(progress.idle_s, 1)),
        "stall_after_seconds": dg.MetadataValue.float(progress.stall_after_s),
        "detail": dg.MetadataValue.text(progress.detail),
    }


def _end_canceled(context: dg.AssetExecutionContext, signal_name: int | None) -> None:
    """A stop by signal ends the run CANCELED, never FAILURE.

    Dagster treats an interrupted run as canceled only when its status is CANCELING (set by
    a termination from the UI/launcher); a bare SIGTERM/SIGINT (process manager, Ctrl-C on
    `planpipe dev`) would otherwise be recorded as an unexpected failure.
    """
    run = context.instance.get_run_by_id(context.run.run_id)
    name = signal.Signals(signal_name).name if signal_name is not None else "the run's cancel request"
    context.log.info(f"ingest run stopped cleanly on {name}: the last batch committed, the consumer left the group")
    if run is not None and run.status not in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED):
        context.instance.report_run_canceling(run, message=f"ingest run stopped on {name}")
