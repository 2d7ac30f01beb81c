"""New messages on query-plans.dlq launch the replay job."""

import dagster as dg

from planpipe.defs.ingest.assets import dlq_topic
from planpipe.defs.ingest.sensors import runs_in_flight
from planpipe.defs.replay.assets import replay_job
from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest.lag import LagUnavailable, group_lag


@dg.sensor(
    job=replay_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the DLQ replay when query-plans.dlq has messages the replay group has not processed.",
)
def dlq_sensor(context: dg.SensorEvaluationContext, planpipe: PlanpipeResource) -> dg.SensorResult:
    settings = planpipe.settings()
    try:
        lags = group_lag(settings, settings.replay_group, settings.dlq_topic, timeout_s=5.0)
    except LagUnavailable as error:
        return dg.SensorResult(skip_reason=f"Kafka not answering: {error}")
    pending = sum(p.lag for p in lags)
    high = sum(p.high for p in lags)
    observation = dg.AssetObservation(
        asset_key=dlq_topic.key,
        metadata={"unreplayed": dg.MetadataValue.int(pending), "messages_total": dg.MetadataValue.int(high)},
    )
    if pending == 0 or runs_in_flight(context.instance, replay_job.name) > 0:
        return dg.SensorResult(asset_events=[observation], skip_reason=None if pending else "DLQ fully replayed")
    # Keyed by the DLQ's end offset: the same backlog never launches two replays.
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dlq-replay-{high}", tags={"planpipe/dlq_pending": str(pending)})],
        asset_events=[observation],
        cursor=str(high),
    )
