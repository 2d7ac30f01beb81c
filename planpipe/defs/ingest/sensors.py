"""Sensors of the ingest domain: Kafka lag → ingest runs, and run failures surfaced."""

import math
import time
from dataclasses import dataclass

import dagster as dg

from planpipe.defs.ingest.assets import OBSERVATIONS, ingest_micro_batches, query_plans_topic
from planpipe.defs.ingest.jobs import INGEST_ROLE_TAG, ingest_job
from planpipe.defs.ingest.runtime import STANDING_TAG, ingest_client_id, replace_after_s
from planpipe.defs.resources import KafkaResource, PlanpipeResource, PostgresResource
from planpipe.health.run_failures import record_run_failure
from planpipe.ingest.lag import LagUnavailable, PartitionLag
from planpipe.ingest.reconcile import record_lag_sample
from planpipe.ingest.sla import Progress, ingest_progress
from planpipe.settings import Settings

REPLACES_TAG = "planpipe/replaces"

# One more consumer per this much backlog, up to the configured limit.
LAG_PER_EXTRA_RUN = 20_000
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


# An ingest run about to reach its `ingest_max_seconds` is replaced this long before it ends,
# so its successor is consuming (and shares the partitions) before it leaves: no gap in ingestion.
HANDOVER_S = 60.0


def runs_in_flight(
    instance: dg.DagsterInstance, job_name: str, *, max_seconds: float | None = None
) -> list[dg.DagsterRun]:
    """Runs of the job queued or running that consume or will: not those whose ingest step is over
    (only their asset checks are left) nor those within HANDOVER_S of `max_seconds`."""
    runs = instance.get_runs(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT))
    if max_seconds is None:
        return list(runs)
    now = time.time()
    return [
        run
        for run in runs
        if still_consuming(
            _ingest_step_span(instance, run.run_id) if run.status == dg.DagsterRunStatus.STARTED else StepSpan(),
            now=now,
            max_seconds=max_seconds,
        )
    ]


@dataclass(frozen=True)
class StepSpan:
    """When a run's ingest step started (None: not yet) and whether it has ended."""

    started: float | None = None
    ended: bool = False


def still_consuming(span: StepSpan, *, now: float, max_seconds: float) -> bool:
    """Whether a run counts as a consumer for the lag sensor (pure, unit-tested). A run busy with its
    checks after the step has closed its consumer: counting it would leave new records waiting for a
    run until its checks end (minutes on a loaded machine)."""
    if span.ended:
        return False
    handover_s = min(HANDOVER_S, max_seconds / 4)  # short test runs must not look retiring from the start
    return span.started is None or now - span.started < max_seconds - handover_s


def wanted_runs(total_lag: int, in_flight: int, limit: int) -> int:
    """How many ingest runs to launch now for the backlog (pure, unit-tested)."""
    if total_lag <= 0:
        return 0
    desired = min(limit, max(1, math.ceil(total_lag / LAG_PER_EXTRA_RUN)))
    return max(0, desired - in_flight)


def runs_to_launch(
    total_lag: int, in_flight: int, standing_in_flight: int, *, limit: int, minimum: int
) -> tuple[int, int]:
    """(standing, for backlog): runs to launch so that `minimum` standing runs consume at all times
    and the backlog gets its share, never more than max(limit, minimum) in flight (pure)."""
    standing = max(0, minimum - standing_in_flight)
    total = max(standing, wanted_runs(total_lag, in_flight, limit))
    total = min(total, max(0, max(limit, minimum) - in_flight))
    standing = min(standing, total)
    return standing, total - standing


@dataclass(frozen=True)
class StuckRun:
    run_id: str
    progress: Progress


def _last_batch_at(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """When the run last recorded a committed micro-batch (a `plan_observations` materialization)."""
    connection = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=20, ascending=False
    )
    for record in connection.records:
        materialization = record.event_log_entry.asset_materialization
        if materialization is not None and materialization.asset_key == OBSERVATIONS:
            return float(record.event_log_entry.timestamp)
    return None


def _ingest_step_span(instance: dg.DagsterInstance, run_id: str) -> StepSpan:
    step_key = ingest_micro_batches.op.name
    events = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    started = None
    for record in instance.get_records_for_run(run_id, of_type=events).records:
        entry = record.event_log_entry
        if entry.step_key != step_key:
            continue
        if entry.dagster_event_type == dg.DagsterEventType.STEP_START:
            started = float(entry.timestamp)
        else:
            return StepSpan(started, ended=True)
    return StepSpan(started)


def _consuming_since(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """When the run's ingest step started, if it is still consuming (None: not started or done —
    a run busy with its asset checks after the step is not stuck)."""
    span = _ingest_step_span(instance, run_id)
    return None if span.ended else span.started


def stuck_runs(
    instance: dg.DagsterInstance,
    settings: Settings,
    kafka: KafkaResource,
    lags: list[PartitionLag],
    stall_after_s: float,
) -> list[StuckRun]:
    """Ingest runs whose ingest step is consuming, with lag on their partitions and no committed batch
    for `replace_after_s(stall_after_s)` (counted from the step's start at the earliest): stalled,
    and given the time to say so themselves."""
    runs = instance.get_runs(dg.RunsFilter(job_name=ingest_job.name, statuses=[dg.DagsterRunStatus.STARTED]))
    if not runs:
        return []
    try:
        held = kafka.group_assignments(settings, settings.consumer_group, settings.topic)
    except LagUnavailable:
        held = {}
    lag_of = {p.partition: p.lag for p in lags}
    total = sum(lag_of.values())
    now = time.time()
    stuck = []
    for run in runs:
        started = _consuming_since(instance, run.run_id)
        if started is None:
            continue
        partitions = held.get(ingest_client_id(run.run_id))
        # Not (yet, or no longer) a member of the group: the group's lag is what it should work on.
        lag = total if partitions is None else sum(lag_of.get(p, 0) for p in partitions)
        progress = ingest_progress(
            lag, now=now, last_commit_at=_last_batch_at(instance, run.run_id), expected_since=started,
            stall_after_s=stall_after_s,
        )  # fmt: skip
        if progress.stalled and progress.idle_s > replace_after_s(stall_after_s):
            stuck.append(StuckRun(run.run_id, progress))
    return stuck


def replace_stuck_runs(context: dg.SensorEvaluationContext, stuck: list[StuckRun]) -> list[str]:
    """Terminate stuck runs (they stop between batches and end CANCELED); returns those asked to stop."""
    replaced = []
    for item in stuck:
        context.log.warning(f"ingest run {item.run_id} is stuck, replacing it: {item.progress.detail}")
        try:
            asked = context.instance.run_launcher.terminate(item.run_id)
        except Exception as error:
            context.log.error(f"could not terminate stuck run {item.run_id}: {error}")
            continue
        if asked:
            replaced.append(item.run_id)
    return replaced


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls consumer-group lag on query-plans; records it, keeps PLANPIPE_MIN_INGEST_RUNS standing "
    "ingest runs consuming, launches more when there is lag, and replaces an ingest run that has lag but "
    "committed no batch for 60 s.",
)
def kafka_lag_sensor(
    context: dg.SensorEvaluationContext, planpipe: PlanpipeResource, kafka: KafkaResource
) -> dg.SensorResult:
    settings = planpipe.settings()
    try:
        lags = kafka.group_lag(settings, settings.consumer_group, settings.topic)
    except LagUnavailable as error:
        return dg.SensorResult(skip_reason=f"Kafka not answering: {error}")
    total = sum(p.lag for p in lags)
    record_lag_sample(settings.pg_dsn, settings.consumer_group, settings.topic, lags)
    launched = int(context.cursor or 0)
    stuck = stuck_runs(context.instance, settings, kafka, lags, planpipe.ingest_stall_after_s) if total else []
    replaced = replace_stuck_runs(context, stuck)
    # Terminated runs are CANCELING now: no longer counted in flight, so replacements are launched.
    in_flight = runs_in_flight(context.instance, ingest_job.name, max_seconds=planpipe.ingest_max_seconds)
    standing, for_backlog = runs_to_launch(
        total, len(in_flight), sum(1 for run in in_flight if run.tags.get(STANDING_TAG) == "true"),
        limit=planpipe.max_ingest_runs, minimum=planpipe.min_ingest_runs,
    )  # fmt: skip
    tags = {INGEST_ROLE_TAG: "ingest", "planpipe/lag": str(total)}
    if replaced:
        tags[REPLACES_TAG] = ",".join(replaced)
    requests = [
        dg.RunRequest(
            run_key=f"ingest-{launched + i + 1}", tags={**tags, STANDING_TAG: "true"} if i < standing else tags
        )
        for i in range(standing + for_backlog)
    ]
    observation = dg.AssetObservation(
        asset_key=query_plans_topic.key,
        metadata={
            "total_lag": dg.MetadataValue.int(total),
            "max_partition_lag": dg.MetadataValue.int(max((p.lag for p in lags), default=0)),
            "lag_by_partition": dg.MetadataValue.json({str(p.partition): p.lag for p in lags}),
            "high_watermark_total": dg.MetadataValue.int(sum(p.high for p in lags)),
            "stuck_runs_replaced": dg.MetadataValue.json(replaced),
        },
    )
    return dg.SensorResult(run_requests=requests, asset_events=[observation], cursor=str(launched + len(requests)))


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed planpipe run in planpipe.run_failures and logs it.",
)
def planpipe_run_failure_sensor(context: dg.RunFailureSensorContext, postgres: PostgresResource) -> None:
    run = context.dagster_run
    message = context.failure_event.message or "run failed"
    context.log.error(f"run {run.run_id} of {run.job_name} failed: {message}")
    with postgres.connect(autocommit=True, timeout_s=5) as conn:
        record_run_failure(conn, run.run_id, run.job_name, message)
