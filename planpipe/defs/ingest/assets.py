"""Assets and lineage: query-plans topic → observations → baselines/rollups → regressions; DLQ → replay.

An ingest run is long-lived: one Dagster run per micro-batch would cost seconds of
process start-up and could never meet the 1,200 ms p95, so a run consumes
micro-batches until caught up (or `ingest_max_seconds`) and records one
materialization of `plan_observations` per micro-batch.
"""

import dagster as dg

from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest.engine import BatchReport, IngestEngine

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
def ingest_micro_batches(context: dg.AssetExecutionContext, planpipe: PlanpipeResource):  # type: ignore[no-untyped-def]
    settings = planpipe.settings()

    def record(report: BatchReport) -> None:
        context.log_event(dg.AssetMaterialization(asset_key=OBSERVATIONS, metadata=_batch_metadata(report)))

    engine = IngestEngine(settings, on_batch=record, client_id=f"dagster-{context.run.run_id[:8]}")
    try:
        summary = engine.run(until_caught_up=True, max_seconds=planpipe.ingest_max_seconds)
    finally:
        engine.close()
    context.log.info(f"ingest run summary: {summary.as_dict()}")
    totals = {
        "batches": dg.MetadataValue.int(summary.batches),
        "rows": dg.MetadataValue.int(summary.valid),
        "dlq": dg.MetadataValue.int(summary.dlq),
        "dropped_low_priority": dg.MetadataValue.int(summary.dropped_low),
        "max_p95_publish_to_commit_ms": dg.MetadataValue.float(summary.max_p95_latency_ms),
        "max_lock_wait_ms": dg.MetadataValue.float(summary.max_lock_wait_ms),
        "caught_up": dg.MetadataValue.bool(summary.caught_up),
        "seconds": dg.MetadataValue.float(summary.seconds),
    }
    yield dg.MaterializeResult(asset_key=OBSERVATIONS, metadata=totals)
    yield dg.MaterializeResult(asset_key=BASELINES, metadata=totals)
    yield dg.MaterializeResult(asset_key=ROLLUPS, metadata={"batches": dg.MetadataValue.int(summary.batches)})
