"""Scheduled maintenance of the ingest domain: retention cleanup and lag reconciliation."""

import dagster as dg

from planpipe.defs.ingest.assets import query_plans_topic
from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest.reconcile import reconcile
from planpipe.ingest.retention import apply_retention


@dg.op(description="Delete Parquet partitions and rollups past their route's retention (critical 7 d, baseline 30 d).")
def apply_retention_op(context: dg.OpExecutionContext, planpipe: PlanpipeResource) -> None:
    settings = planpipe.settings()
    report = apply_retention(settings.parquet_dir, settings.pg_dsn)
    context.log.info(f"retention: {report.as_dict()}")


@dg.job(
    description="Retention cleanup of the Parquet dataset and PostgreSQL rollups.",
    tags={"planpipe/role": "maintenance"},
)
def retention_job() -> None:
    apply_retention_op()


@dg.asset_check(
    asset=query_plans_topic.key,
    description="Produced = consumed + Δlag (and captured = produced where agents write checkpoints) over the "
    "widest window of the last hour bounded by settled lag samples; records in flight are never judged.",
)
def lag_reconciliation(planpipe: PlanpipeResource) -> dg.AssetCheckResult:
    settings = planpipe.settings()
    outcome = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic)
    return dg.AssetCheckResult(
        passed=outcome.ok,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={key: dg.MetadataValue.text(str(value)) for key, value in outcome.as_dict().items()},
    )


reconciliation_job = dg.define_asset_job(
    "lag_reconciliation_job",
    selection=dg.AssetSelection.checks(lag_reconciliation),
    description="Hourly: captured vs produced vs consumed counts; a divergence is reported.",
)

maintenance_schedules = [
    dg.ScheduleDefinition(
        job=retention_job, cron_schedule="30 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING
    ),
    dg.ScheduleDefinition(
        job=reconciliation_job, cron_schedule="7 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
    ),
]
