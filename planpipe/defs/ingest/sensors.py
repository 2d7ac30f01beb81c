"""Sensors of the ingest domain: Kafka lag → ingest runs, and run failures surfaced."""

import json
import math

import dagster as dg
import psycopg

from planpipe.defs.ingest.assets import query_plans_topic
from planpipe.defs.ingest.jobs import INGEST_ROLE_TAG, ingest_job
from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest.lag import LagUnavailable, group_lag

# One more consumer per this much backlog, up to the configured limit.
LAG_PER_EXTRA_RUN = 20_000
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def runs_in_flight(instance: dg.DagsterInstance, job_name: str) -> int:
    return int(instance.get_runs_count(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT)))


def wanted_runs(total_lag: int, in_flight: int, limit: int) -> int:
    """How many ingest runs to launch now (pure, unit-tested)."""
    if total_lag <= 0:
        return 0
    desired = min(limit, max(1, math.ceil(total_lag / LAG_PER_EXTRA_RUN)))
    return max(0, desired - in_flight)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls consumer-group lag on query-plans; records it and launches ingest runs when there is lag.",
)
def kafka_lag_sensor(context: dg.SensorEvaluationContext, planpipe: PlanpipeResource) -> dg.SensorResult:
    settings = planpipe.settings()
    try:
        lags = group_lag(settings, settings.consumer_group, settings.topic, timeout_s=5.0)
    except LagUnavailable as error:
        return dg.SensorResult(skip_reason=f"Kafka not answering: {error}")
    total = sum(p.lag for p in lags)
    with psycopg.connect(settings.pg_dsn, autocommit=True, connect_timeout=5) as conn:
        # One statement: every partition of a tick shares one sampled_at (reconciliation relies on it).
        conn.execute(
            """INSERT INTO planpipe.lag_samples (consumer_group, topic, partition, high_watermark, committed, lag)
               SELECT %s, %s, * FROM unnest(%s::int[], %s::bigint[], %s::bigint[], %s::bigint[])
               ON CONFLICT DO NOTHING""",
            (
                settings.consumer_group,
                settings.topic,
                [p.partition for p in lags],
                [p.high for p in lags],
                [p.committed if p.committed is not None else p.low for p in lags],
                [p.lag for p in lags],
            ),
        )
    observation = dg.AssetObservation(
        asset_key=query_plans_topic.key,
        metadata={
            "total_lag": dg.MetadataValue.int(total),
            "max_partition_lag": dg.MetadataValue.int(max((p.lag for p in lags), default=0)),
            "lag_by_partition": dg.MetadataValue.json({str(p.partition): p.lag for p in lags}),
            "high_watermark_total": dg.MetadataValue.int(sum(p.high for p in lags)),
        },
    )
    launched = int(context.cursor or 0)
    in_flight = runs_in_flight(context.instance, ingest_job.name)
    to_launch = wanted_runs(total, in_flight, planpipe.max_ingest_runs)
    requests = [
        dg.RunRequest(
            run_key=f"ingest-{launched + i + 1}", tags={INGEST_ROLE_TAG: "ingest", "planpipe/lag": str(total)}
        )
        for i in range(to_launch)
    ]
    return dg.SensorResult(run_requests=requests, asset_events=[observation], cursor=str(launched + len(requests)))


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed planpipe run in planpipe.run_failures and logs it.",
)
def planpipe_run_failure_sensor(context: dg.RunFailureSensorContext, planpipe: PlanpipeResource) -> None:
    settings = planpipe.settings()
    message = context.failure_event.message or "run failed"
    context.log.error(f"run {context.dagster_run.run_id} of {context.dagster_run.job_name} failed: {message}")
    with psycopg.connect(settings.pg_dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            """INSERT INTO planpipe.run_failures (run_id, job_name, message) VALUES (%s, %s, %s)
               ON CONFLICT (run_id) DO NOTHING""",
            (context.dagster_run.run_id, context.dagster_run.job_name, json.dumps(message)[:4000]),
        )
