"""broker_health_sensor: cluster health as observations and check results, and the agents' fallback mode."""

import dagster as dg

from planpipe.defs.health.assets import KAFKA_CLUSTER
from planpipe.defs.health.checks import BROKER_HEALTH_CHECK, health_metadata, health_passed
from planpipe.defs.resources import PlanpipeResource, PostgresResource
from planpipe.health import broker
from planpipe.health.fallback import publish_mode


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reads under-replicated and offline partitions from the admin API every 30 s, records them on "
    "kafka/cluster, and switches the capture agents to the Redis fallback when UnderReplicatedPartitions > 5 "
    "for > 2 min (back to Kafka after 1 min within the threshold).",
)
def broker_health_sensor(
    context: dg.SensorEvaluationContext, planpipe: PlanpipeResource, postgres: PostgresResource
) -> dg.SensorResult:
    settings = planpipe.settings()
    state = broker.DegradationState.from_json(context.cursor)
    try:
        health = broker.measure(settings)
    except broker.HealthUnavailable as error:
        # An unreachable cluster is the agents' own call (their spool, then Redis past its limit).
        return dg.SensorResult(skip_reason=f"Kafka not answering: {error}", cursor=context.cursor)
    new = broker.next_state(state, health)
    with postgres.connect(autocommit=True, timeout_s=5) as conn:
        changed = publish_mode(conn, settings.kafka_bootstrap, new.mode, new.reason or "healthy")
    if changed and new.mode is broker.FallbackMode.REDIS:
        context.log.warning(f"capture agents switched to the Redis fallback: {new.reason}")
    elif changed and state.mode is broker.FallbackMode.REDIS:
        context.log.info(f"capture agents back on Kafka: {new.reason}")
    metadata = health_metadata(health)
    metadata["fallback_mode"] = dg.MetadataValue.text(new.mode.value)
    breached_for = 0.0 if new.breached_since is None else health.measured_at - new.breached_since
    metadata["breached_for_seconds"] = dg.MetadataValue.float(round(breached_for, 1))
    evaluation = dg.AssetCheckEvaluation(
        asset_key=KAFKA_CLUSTER,
        check_name=BROKER_HEALTH_CHECK,
        passed=health_passed(health),
        # A sustained breach (agents on Redis) is an error; a passing blip a warning.
        severity=dg.AssetCheckSeverity.ERROR if new.mode is broker.FallbackMode.REDIS else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )
    return dg.SensorResult(
        asset_events=[dg.AssetObservation(asset_key=KAFKA_CLUSTER, metadata=metadata), evaluation],
        cursor=new.to_json(),
    )
