"""The ingest domain's definitions: topics, the micro-batch asset and its SLA checks, lag-driven runs,
maintenance (retention, reconciliation, compaction)."""

import dagster as dg

from planpipe.defs.ingest.assets import dlq_topic, ingest_micro_batches, query_plans_topic
from planpipe.defs.ingest.checks import sla_checks
from planpipe.defs.ingest.compaction import compaction_job, compaction_schedule, compaction_sensor
from planpipe.defs.ingest.jobs import ingest_job
from planpipe.defs.ingest.maintenance import (
    lag_reconciliation,
    maintenance_schedules,
    reconciliation_job,
    retention_job,
)
from planpipe.defs.ingest.sensors import kafka_lag_sensor, planpipe_run_failure_sensor

sla_check_job = dg.define_asset_job(
    "sla_check_job",
    selection=dg.AssetSelection.checks(*sla_checks),
    description="Evaluates the ingestion SLA checks on their own (scheduled every 5 minutes).",
)

ingest_defs = dg.Definitions(
    assets=[query_plans_topic, dlq_topic, ingest_micro_batches],
    asset_checks=[*sla_checks, lag_reconciliation],
    jobs=[ingest_job, sla_check_job, retention_job, reconciliation_job, compaction_job],
    sensors=[kafka_lag_sensor, planpipe_run_failure_sensor, compaction_sensor],
    schedules=[
        dg.ScheduleDefinition(
            job=sla_check_job, cron_schedule="*/5 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
        ),
        *maintenance_schedules,
        compaction_schedule,
    ],
)
