"""Checks of the health domain: broker health now, and publish → commit latency of the sampled traces."""

import dagster as dg

from planpipe.defs.health.assets import KAFKA_CLUSTER
from planpipe.defs.ingest.assets import BASELINES
from planpipe.defs.resources import PlanpipeResource, PostgresResource
from planpipe.health import broker
from planpipe.health.fallback import read_mode
from planpipe.ingest import sla

BROKER_HEALTH_CHECK = "broker_health"


def health_metadata(health: broker.BrokerHealth) -> dict[str, dg.MetadataValue]:
    return {
        "brokers": dg.MetadataValue.int(health.brokers),
        "partitions": dg.MetadataValue.int(health.partitions),
        "under_replicated_partitions": dg.MetadataValue.int(health.urp),
        "offline_partitions": dg.MetadataValue.int(len(health.offline)),
        "threshold": dg.MetadataValue.int(broker.URP_THRESHOLD),
        "by_topic": dg.MetadataValue.json(health.by_topic()),
        "under_replicated": dg.MetadataValue.json(broker.describe(health.under_replicated)),
    }


def health_passed(health: broker.BrokerHealth) -> bool:
    """Passes while URP is within the runbook's 5 and no partition is offline (the sensor adds the 2 min)."""
    return health.urp <= broker.URP_THRESHOLD and not health.offline


@dg.asset_check(
    asset=KAFKA_CLUSTER,
    name=BROKER_HEALTH_CHECK,
    description="Under-replicated partitions ≤ 5 and none offline (admin API). broker_health_sensor also "
    "reports it every tick and switches the capture agents to Redis after 2 min above 5.",
)
def broker_health(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    settings = planpipe.settings()
    try:
        health = broker.measure(settings)
    except broker.HealthUnavailable as error:
        return dg.AssetCheckResult(
            passed=False, metadata={"detail": dg.MetadataValue.text(f"Kafka not answering: {error}")}
        )
    with postgres.connect(autocommit=True) as conn:
        mode = read_mode(conn, settings.kafka_bootstrap)
    metadata = health_metadata(health)
    metadata["fallback_mode"] = dg.MetadataValue.text(mode.mode.value)
    metadata["fallback_reason"] = dg.MetadataValue.text(mode.reason)
    return dg.AssetCheckResult(passed=health_passed(health), metadata=metadata)


@dg.asset_check(
    asset=BASELINES,
    description="Runbook trace sampling: p95 publish → baseline-commit of the sampled traces "
    "(PLANPIPE_TRACE_SAMPLE_PCT, default 1 %) over the last hour ≤ 1,200 ms.",
)
def trace_latency_sla(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    settings = planpipe.settings()
    with postgres.connect() as conn:
        outcome = sla.trace_latency(conn, settings.consumer_group)
    return dg.AssetCheckResult(
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "measured": dg.MetadataValue.float(outcome.value)
            if outcome.value is not None
            else dg.MetadataValue.text("no data"),
            "threshold": dg.MetadataValue.float(outcome.threshold),
            "window_seconds": dg.MetadataValue.int(outcome.window_s),
            "detail": dg.MetadataValue.text(outcome.detail),
        },
    )


health_checks = [broker_health, trace_latency_sla]
health_check_job = dg.define_asset_job(
    "health_check_job",
    selection=dg.AssetSelection.checks(*health_checks),
    description="Broker health and the trace SLA, every 5 minutes.",
)
health_schedule = dg.ScheduleDefinition(
    job=health_check_job, cron_schedule="*/5 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)
