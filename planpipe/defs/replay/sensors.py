"""New messages on query-plans.dlq launch the replay job."""

import json
import time
from typing import Final

import dagster as dg

from planpipe.defs.ingest.assets import dlq_topic
from planpipe.defs.ingest.sensors import runs_in_flight
from planpipe.defs.replay.assets import replay_job
from planpipe.defs.resources import KafkaResource, PlanpipeResource
from planpipe.ingest.lag import LagUnavailable

REPLAY_AT_ONCE: Final = 500


@dg.sensor(
    job=replay_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the DLQ replay when query-plans.dlq has messages the replay group has not processed: "
    "at once for 500 or more, otherwise at most every PLANPIPE_REPLAY_INTERVAL_S.",
)
def dlq_sensor(
    context: dg.SensorEvaluationContext, planpipe: PlanpipeResource, kafka: KafkaResource
) -> dg.SensorResult:
    settings = planpipe.settings()
    try:
        lags = kafka.group_lag(settings, settings.replay_group, settings.dlq_topic)
    except LagUnavailable as error:
        return dg.SensorResult(skip_reason=f"Kafka not answering: {error}")
    pending = sum(p.lag for p in lags)
    high = sum(p.high for p in lags)
    observation = dg.AssetObservation(
        asset_key=dlq_topic.key,
        metadata={"unreplayed": dg.MetadataValue.int(pending), "messages_total": dg.MetadataValue.int(high)},
    )
    if pending == 0 or runs_in_flight(context.instance, replay_job.name):
        return dg.SensorResult(asset_events=[observation], skip_reason=None if pending else "DLQ fully replayed")
    last_launch = _last_launch(context.cursor)
    if not replay_due(pending, time.time() - last_launch, planpipe.replay_interval_s):
        return dg.SensorResult(asset_events=[observation], skip_reason=f"{pending} pending; next replay batched")
    # Keyed by the DLQ's end offset: the same backlog never launches two replays.
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dlq-replay-{high}", tags={"planpipe/dlq_pending": str(pending)})],
        asset_events=[observation],
        cursor=json.dumps({"high": high, "launched_at": time.time()}),
    )


def replay_due(pending: int, since_last_s: float, interval_s: float) -> bool:
    """Replay a large backlog at once, a trickle at most every `interval_s`: each replay is a run
    (a process start-up that competes with ingestion for CPU), and nothing waits on a replay."""
    return pending >= REPLAY_AT_ONCE or since_last_s >= interval_s


def _last_launch(cursor: str | None) -> float:
    try:
        return float(json.loads(cursor or "{}").get("launched_at", 0.0))
    except (ValueError, AttributeError):
        return 0.0
