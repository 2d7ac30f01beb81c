"""Asset checks for the runbook's ingestion SLAs; each shows the measured value, threshold and window."""

from collections.abc import Callable

import dagster as dg
import psycopg

from planpipe.defs.ingest.assets import BASELINES, OBSERVATIONS, query_plans_topic
from planpipe.defs.resources import KafkaResource, PlanpipeResource, PostgresResource
from planpipe.ingest import sla
from planpipe.ingest.lag import LagUnavailable
from planpipe.settings import Settings


def _result(outcome: sla.SlaResult, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    metadata = {
        "measured": dg.MetadataValue.float(float(outcome.value))
        if outcome.value is not None
        else dg.MetadataValue.text("no data"),
        "threshold": dg.MetadataValue.float(float(outcome.threshold)),
        "window_seconds": dg.MetadataValue.int(outcome.window_s),
        "detail": dg.MetadataValue.text(outcome.detail),
    }
    return dg.AssetCheckResult(passed=outcome.passed, severity=severity, metadata=metadata)


def _measure(
    planpipe: PlanpipeResource,
    postgres: PostgresResource,
    measure: Callable[[psycopg.Connection[tuple[object, ...]], Settings], sla.SlaResult],
) -> sla.SlaResult:
    settings = planpipe.settings()
    with postgres.connect() as conn:
        return measure(conn, settings)


@dg.asset_check(
    asset=query_plans_topic.key, description="Lag ≤ 15,000 messages per partition, not breached for > 3 min."
)
def consumer_lag_sla(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    outcome = _measure(planpipe, postgres, lambda c, s: sla.consumer_lag(c, s.consumer_group, s.topic))
    return _result(outcome, dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=BASELINES, description="p95 publish → baseline-commit latency ≤ 1,200 ms over the last 5 min.")
def p95_latency_sla(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    outcome = _measure(planpipe, postgres, lambda c, s: sla.p95_latency(c, s.consumer_group))
    return _result(outcome, dg.AssetCheckSeverity.ERROR)


@dg.asset_check(
    asset=OBSERVATIONS,
    blocking=True,
    description="DLQ rate ≤ 0.15 % of consumed over the last 5 min; blocks downstream assets when breached.",
)
def dlq_rate_sla(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    outcome = _measure(planpipe, postgres, lambda c, s: sla.dlq_rate(c, s.consumer_group))
    return _result(outcome, dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=BASELINES, description="Baseline-store lock wait ≤ 800 ms per batch over the last 5 min.")
def lock_wait_sla(planpipe: PlanpipeResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    outcome = _measure(planpipe, postgres, lambda c, s: sla.lock_wait(c, s.consumer_group))
    return _result(outcome, dg.AssetCheckSeverity.WARN)


@dg.asset_check(
    asset=OBSERVATIONS,
    description="Ingestion makes progress: fails when there is consumer lag and no batch was committed "
    "for 60 s (counted from when lag appeared). The lag sensor replaces a stuck ingest run.",
)
def ingest_progress(
    planpipe: PlanpipeResource, postgres: PostgresResource, kafka: KafkaResource
) -> dg.AssetCheckResult:
    settings = planpipe.settings()
    try:
        lag = sum(p.lag for p in kafka.group_lag(settings, settings.consumer_group, settings.topic))
    except LagUnavailable as error:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"detail": dg.MetadataValue.text(f"cannot tell: Kafka not answering ({error})")},
        )
    with postgres.connect() as conn:
        progress = sla.group_progress(
            conn, settings.consumer_group, settings.topic, lag, stall_after_s=planpipe.ingest_stall_after_s
        )
    return dg.AssetCheckResult(
        passed=not progress.stalled,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "lag": dg.MetadataValue.int(progress.lag),
            "seconds_without_progress": dg.MetadataValue.float(round(progress.idle_s, 1)),
            "threshold": dg.MetadataValue.float(progress.stall_after_s),
            "detail": dg.MetadataValue.text(progress.detail),
        },
    )


sla_checks = [consumer_lag_sla, p95_latency_sla, dlq_rate_sla, lock_wait_sla, ingest_progress]
