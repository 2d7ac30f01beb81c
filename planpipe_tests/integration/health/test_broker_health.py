"""Broker health on the real broker, the sensor's observations and check results, and the fallback mode
it hands to capture agents through PostgreSQL."""

import time
import uuid

import dagster as dg
import psycopg

from planpipe.defs.health.assets import KAFKA_CLUSTER
from planpipe.defs.health.definitions import health_defs
from planpipe.defs.health.sensors import broker_health_sensor
from planpipe.health import broker
from planpipe.health.fallback import FallbackModeReader, publish_mode, read_mode
from planpipe.settings import Settings


def test_measure_sees_every_partition_of_the_topics(settings: Settings) -> None:
    health = broker.measure(settings)
    assert health.brokers == 1
    assert health.partitions >= 2 * settings.partitions  # our topic and its DLQ at least
    assert health.urp == 0 and not health.offline  # one broker, replication factor 1: all in sync


def test_sensor_records_health_and_brings_agents_back_after_recovery(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    cluster = f"test-cluster-{uuid.uuid4().hex[:8]}"
    assert health_defs.sensors is not None and broker_health_sensor in health_defs.sensors
    # An earlier tick had switched the agents to Redis; the cluster has been healthy for 70 s.
    now = time.time()
    earlier = broker.DegradationState(
        mode=broker.FallbackMode.REDIS, healthy_since=now - 70, changed_at=now - 400, reason="URP 9 > 5"
    )
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM planpipe.kafka_fallback_mode WHERE cluster = %s", (settings.kafka_bootstrap,))
        publish_mode(conn, settings.kafka_bootstrap, broker.FallbackMode.REDIS, "URP 9 > 5")
    reader = FallbackModeReader(settings.pg_dsn, settings.kafka_bootstrap, ttl_s=0)
    assert reader() is broker.FallbackMode.REDIS

    context = dg.build_sensor_context(instance=dagster_instance, cursor=earlier.to_json(), resources=dagster_resources)
    result = broker_health_sensor(context)
    assert isinstance(result, dg.SensorResult)
    observation, evaluation = result.asset_events
    assert isinstance(observation, dg.AssetObservation) and observation.asset_key == KAFKA_CLUSTER
    assert observation.metadata["under_replicated_partitions"].value == 0
    assert observation.metadata["fallback_mode"].value == "kafka"
    assert isinstance(evaluation, dg.AssetCheckEvaluation)
    assert evaluation.passed and evaluation.check_name == "broker_health"
    state = broker.DegradationState.from_json(result.cursor)
    assert state.mode is broker.FallbackMode.KAFKA and len(state.history) == 1
    assert reader() is broker.FallbackMode.KAFKA  # what every agent now reads
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        record = read_mode(conn, settings.kafka_bootstrap)
        assert "<= 5" in record.reason
        # A cluster nobody judged yet reads as Kafka; a switch is reported once.
        assert read_mode(conn, cluster).mode is broker.FallbackMode.KAFKA
        assert publish_mode(conn, cluster, broker.FallbackMode.REDIS, "r") is True
        assert publish_mode(conn, cluster, broker.FallbackMode.REDIS, "r") is False
        conn.execute("DELETE FROM planpipe.kafka_fallback_mode WHERE cluster = %s", (cluster,))


def test_health_check_job_runs_both_checks(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    # The health domain's own definitions: other domains' sensors are not this test's business.
    job = dg.Definitions.merge(health_defs, dg.Definitions(resources=dagster_resources)).resolve_job_def(
        "health_check_job"
    )
    result = job.execute_in_process(instance=dagster_instance, resources=dagster_resources)
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"broker_health", "trace_latency_sla"}
    assert evaluations["broker_health"].passed
    # No traffic in this test's consumer group: nothing to measure, which passes.
    assert evaluations["trace_latency_sla"].metadata["measured"].value == "no data"
