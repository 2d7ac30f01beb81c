"""The one Definitions object of the code location, merged from the domain modules."""

import dagster as dg

from planpipe.defs.health.assets import kafka_cluster
from planpipe.defs.health.checks import health_check_job, health_checks, health_schedule
from planpipe.defs.health.sensors import broker_health_sensor
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
from planpipe.defs.plans.assets import plan_regressions, plan_status_job, regressions_automation
from planpipe.defs.quality.checks import (
    drift_correction_sensor,
    observations_suite,
    schema_drift,
    schema_drift_job,
    schema_drift_schedule,
)
from planpipe.defs.regions.definitions import regional_defs
from planpipe.defs.replay.assets import dlq_replay, replay_job
from planpipe.defs.replay.sensors import dlq_sensor
from planpipe.defs.resources import planpipe_resource
from planpipe.settings import load_settings
from planpipe.topology import Topology, load_topology

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

replay_defs = dg.Definitions(assets=[dlq_replay], jobs=[replay_job], sensors=[dlq_sensor])

quality_defs = dg.Definitions(
    asset_checks=[observations_suite, schema_drift],
    jobs=[schema_drift_job],
    schedules=[schema_drift_schedule],
    sensors=[drift_correction_sensor],
)

plans_defs = dg.Definitions(
    assets=[plan_regressions],
    jobs=[plan_status_job],
    sensors=[regressions_automation],
)

health_defs = dg.Definitions(
    assets=[kafka_cluster],
    asset_checks=health_checks,
    jobs=[health_check_job],
    schedules=[health_schedule],
    sensors=[broker_health_sensor],
)

# One topic asset, ingest job and lag sensor per region of PLANPIPE_TOPOLOGY_FILE (none without one,
# and none in a regional code location, which works on its PLANPIPE_REGION only).
_settings = load_settings()
region_defs = regional_defs(load_topology(_settings) if _settings.region is None else Topology())

defs = dg.Definitions.merge(
    ingest_defs,
    health_defs,
    region_defs,
    plans_defs,
    replay_defs,
    quality_defs,
    dg.Definitions(resources={"planpipe": planpipe_resource()}),
)
