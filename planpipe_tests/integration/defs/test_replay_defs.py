"""DLQ sensor and replay asset against the real broker, database and Dagster instance."""

import json
import time

import dagster as dg
import msgspec
import psycopg
from confluent_kafka import Producer

from planpipe.contract import Reason, encode_envelope
from planpipe.db.migrate import migrate
from planpipe.defs.replay.assets import dlq_replay
from planpipe.defs.replay.sensors import dlq_sensor
from planpipe.defs.resources import PlanpipeResource
from planpipe.dlq import DeadLetter
from planpipe.kafka_config import producer_config
from planpipe.settings import Settings
from planpipe_tests.integration.workload import capture_plans, create_workload, make_envelopes


def test_dlq_sensor_launches_replay_and_replay_corrects(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    planpipe_resource: PlanpipeResource,
    dagster_resources: dict[str, object],
) -> None:
    migrate(settings.pg_dsn)
    create_workload(settings.pg_dsn)
    envelope = make_envelopes(capture_plans(settings.pg_dsn), 1, "replaydefs")[0]
    legacy = msgspec.json.decode(encode_envelope(envelope))
    legacy["queryHash"] = legacy.pop("query_hash")
    letters = [
        DeadLetter(msgspec.json.encode(legacy), b"standard:x", Reason.UNKNOWN_FIELD, "queryHash", "unknown", "ingest"),
        DeadLetter(b"{garbage", None, Reason.MALFORMED_JSON, None, "bad", "ingest"),
    ]
    producer = Producer(producer_config(settings))
    for letter in letters:
        producer.produce(settings.dlq_topic, value=letter.value, key=letter.key, headers=list(letter.headers()))
    assert producer.flush(30) == 0

    context = dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources)
    result = dlq_sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert [r.run_key for r in result.run_requests or []] == ["dlq-replay-2"]

    run = dg.materialize([dlq_replay], instance=dagster_instance, resources={"planpipe": planpipe_resource})
    assert run.success
    (materialization,) = run.get_asset_materialization_events()
    metadata = materialization.materialization.metadata
    assert (metadata["republished"].value, metadata["parked"].value) == (1, 1)

    again = dlq_sensor(dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources))
    assert isinstance(again, dg.SensorResult)
    assert not again.run_requests
    with psycopg.connect(settings.pg_dsn) as conn:
        parked = conn.execute(
            "SELECT count(*) FROM planpipe.dlq_parked WHERE dlq_topic = %s", (settings.dlq_topic,)
        ).fetchone()
    assert parked == (1,)


def test_a_trickle_is_batched_until_the_interval_passes(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    planpipe_resource: PlanpipeResource,
    dagster_resources: dict[str, object],
) -> None:
    batched = PlanpipeResource(**{**planpipe_resource.model_dump(), "replay_interval_s": 120.0})
    producer = Producer(producer_config(settings))
    letter = DeadLetter(b"{garbage", None, Reason.MALFORMED_JSON, None, "bad", "ingest")
    producer.produce(settings.dlq_topic, value=letter.value, headers=list(letter.headers()))
    assert producer.flush(30) == 0

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=dagster_instance, resources={**dagster_resources, "planpipe": batched}, cursor=cursor
        )
        result = dlq_sensor(context)
        assert isinstance(result, dg.SensorResult)
        return result

    first = tick(None)  # never launched: due
    assert len(first.run_requests or []) == 1
    soon = tick(first.cursor)
    assert not soon.run_requests and "batched" in str(soon.skip_reason)
    later = tick(json.dumps({"high": 0, "launched_at": time.time() - 121}))
    assert len(later.run_requests or []) == 1
