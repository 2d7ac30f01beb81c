"""The ingest domain's Dagster definitions against the real broker, database and instance."""

import time

import dagster as dg
import psycopg

from planpipe.defs.definitions import defs
from planpipe.defs.ingest.assets import BASELINES, OBSERVATIONS, ingest_micro_batches, query_plans_topic
from planpipe.defs.ingest.checks import sla_checks
from planpipe.defs.ingest.sensors import kafka_lag_sensor
from planpipe.defs.quality.checks import drift_failed, observations_suite, schema_drift, schema_drift_job
from planpipe.defs.resources import PlanpipeResource
from planpipe.settings import Settings
from planpipe_tests.integration.workload import MALFORMED, capture_plans, create_workload, make_envelopes, publish


def test_lag_sensor_records_lag_and_launches(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    create_workload(settings.pg_dsn)
    plans = capture_plans(settings.pg_dsn)
    publish(settings, make_envelopes(plans, 300, "sensor"))

    context = dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources)
    result = kafka_lag_sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert [r.run_key for r in result.run_requests or []] == ["ingest-1"]
    assert result.cursor == "1"
    (observation,) = result.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.asset_key == query_plans_topic.key
    assert observation.metadata["total_lag"].value == 300

    with psycopg.connect(settings.pg_dsn) as conn:
        sampled = conn.execute(
            "SELECT sum(lag) FROM planpipe.lag_samples WHERE consumer_group = %s", (settings.consumer_group,)
        ).fetchone()
    assert sampled == (300,)

    # The next tick continues the run-key sequence from the cursor: keys never repeat.
    again = kafka_lag_sensor(dg.build_sensor_context(instance=dagster_instance, cursor=result.cursor,
                                                      resources=dagster_resources))  # fmt: skip
    assert isinstance(again, dg.SensorResult)
    assert [r.run_key for r in again.run_requests or []] == ["ingest-2"]


def test_sla_check_job_runs_every_check(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    create_workload(settings.pg_dsn)
    publish(settings, make_envelopes(capture_plans(settings.pg_dsn), 50, "slajob"))
    kafka_lag_sensor(dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources))
    job = defs.resolve_job_def("sla_check_job")
    result = job.execute_in_process(instance=dagster_instance, resources=dagster_resources)
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "consumer_lag_sla", "p95_latency_sla", "dlq_rate_sla", "lock_wait_sla", "ingest_progress",
    }  # fmt: skip
    lag = evaluations["consumer_lag_sla"]
    assert lag.passed  # 50 messages of lag is far below 15,000
    # measured = the worst partition's lag: 50 messages spread over the partitions
    assert 0 < lag.metadata["measured"].value <= 50.0  # type: ignore[operator]
    assert lag.metadata["threshold"].value == 15000.0


def test_ingest_asset_materializes_per_batch_and_checks_run(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    create_workload(settings.pg_dsn)
    plans = capture_plans(settings.pg_dsn)
    envelopes = make_envelopes(plans, 1200, "asset")
    publish(settings, envelopes, MALFORMED[:1])
    result = dg.materialize(
        [ingest_micro_batches, *sla_checks, observations_suite],
        instance=dagster_instance,
        resources=dagster_resources,
        selection=dg.AssetSelection.assets(ingest_micro_batches),
    )
    assert result.success
    observations = [m for m in result.get_asset_materialization_events() if m.asset_key == OBSERVATIONS]
    per_batch = [m for m in observations if "batch_id" in m.materialization.metadata]
    assert len(per_batch) >= 2  # 1201 records: batches start at 500 and grow under lag (adaptive batches)
    assert sum(m.materialization.metadata["rows"].value for m in per_batch) == len(envelopes)  # type: ignore[misc]
    assert any(m.asset_key == BASELINES for m in result.get_asset_materialization_events())
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {"p95_latency_sla", "dlq_rate_sla", "lock_wait_sla"} <= set(evaluations)
    # one malformed record in 1201 is 0.083 % — under the 0.15 % SLA
    assert evaluations["dlq_rate_sla"].passed
    assert evaluations["dlq_rate_sla"].metadata["threshold"].value == 0.0015
    suite = evaluations["observations_suite"]
    assert suite.passed
    assert suite.metadata["batches_validated"].value == len(per_batch)
    assert suite.metadata["rows_validated"].value == len(envelopes)


def test_lag_reconciliation_balances_after_ingest(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    from planpipe.ingest.engine import IngestEngine
    from planpipe.ingest.reconcile import reconcile

    create_workload(settings.pg_dsn)
    plans = capture_plans(settings.pg_dsn)
    publish(settings, make_envelopes(plans, 200, "recon"))

    def tick() -> None:
        context = dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources)
        kafka_lag_sensor(context)

    tick()
    tick()  # nothing moved since the first: a settled bound
    publish(settings, make_envelopes(plans, 100, "recon", seed=9))  # produced inside the window
    engine = IngestEngine(settings)
    try:
        assert engine.run(until_caught_up=True, max_seconds=120).caught_up
    finally:
        engine.close()
    tick()
    tick()
    outcome = reconcile(settings.pg_dsn, settings.consumer_group, settings.topic)
    assert outcome.settled and (outcome.samples, outcome.settled_samples) == (4, 2), outcome.as_dict()
    assert (outcome.produced, outcome.consumed, outcome.lag_delta) == (100, 300, -200)
    assert outcome.consumer_divergence == 0 and outcome.ok


def test_schema_drift_job_passes_on_the_real_schema(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    result = dg.materialize(
        [ingest_micro_batches, schema_drift],
        instance=dagster_instance,
        resources=dagster_resources,
        selection=dg.AssetSelection.checks(schema_drift),
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "schema_drift" and evaluation.passed
    assert not drift_failed(dagster_instance, result.run_id)
    assert schema_drift_job.name == "schema_drift_job"


def test_plan_regressions_asset_and_status_job(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    from planpipe.db.migrate import migrate
    from planpipe.defs.plans.assets import plan_regressions, plan_status_job
    from planpipe.ingest.engine import IngestEngine

    migrate(settings.pg_dsn)
    create_workload(settings.pg_dsn)
    envelopes = make_envelopes(capture_plans(settings.pg_dsn), 60, "regdefs")
    publish(settings, envelopes)
    engine = IngestEngine(settings)
    try:
        engine.run(until_caught_up=True, max_seconds=60)
    finally:
        engine.close()
    result = dg.materialize([plan_regressions], instance=dagster_instance, resources=dagster_resources)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert "report" in event.materialization.metadata
    assert "comparisons" in event.materialization.metadata

    envelope = envelopes[0]
    from planpipe.plans.fingerprint import fingerprint

    run = plan_status_job.execute_in_process(
        instance=dagster_instance,
        resources=dagster_resources,
        run_config={"ops": {"set_plan_status_op": {"config": {
            "cluster_id": envelope.cluster_id, "query_hash": envelope.query_hash,
            "fingerprint": fingerprint(envelope.plan_text), "status": "rejected", "by": "alice",
            "reason": "test"}}}},
    )  # fmt: skip
    assert run.success
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT status, status_by FROM planpipe.plan_baselines WHERE cluster_id = %s AND query_hash = %s",
            (envelope.cluster_id, envelope.query_hash),
        ).fetchone()
    assert row == ("rejected", "alice")


def test_ingest_progress_check_fails_on_lag_without_commits_and_passes_after_ingest(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    dagster_resources: dict[str, object],
) -> None:
    from planpipe.defs.ingest.checks import ingest_progress
    from planpipe.ingest.engine import IngestEngine

    create_workload(settings.pg_dsn)
    publish(settings, make_envelopes(capture_plans(settings.pg_dsn), 120, "progress"))
    check_job = dg.define_asset_job("progress_check", selection=dg.AssetSelection.checks(ingest_progress))
    job_defs = dg.Definitions(
        assets=[ingest_micro_batches], asset_checks=[ingest_progress], jobs=[check_job],
        resources=dagster_resources,
    )  # fmt: skip

    def evaluate() -> dg.AssetCheckEvaluation:
        result = job_defs.resolve_job_def("progress_check").execute_in_process(instance=dagster_instance)
        assert result.success
        (evaluation,) = result.get_asset_check_evaluations()
        return evaluation

    # The lag sensor saw this lag 2 minutes ago and nothing has been committed since.
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO planpipe.lag_samples (consumer_group, topic, partition, high_watermark, committed, lag,
                                                 sampled_at)
               VALUES (%s, %s, 0, 120, 0, 120, now() - interval '2 minutes')""",
            (settings.consumer_group, settings.topic),
        )
    stuck = evaluate()
    assert not stuck.passed
    assert stuck.metadata["lag"].value == 120
    assert stuck.metadata["seconds_without_progress"].value >= 119  # type: ignore[operator]
    assert "STALLED" in str(stuck.metadata["detail"].value)

    engine = IngestEngine(settings)
    try:
        assert engine.run(until_caught_up=True, max_seconds=120).caught_up
    finally:
        engine.close()
    caught_up = evaluate()
    assert caught_up.passed
    assert caught_up.metadata["lag"].value == 0


def test_graceful_stop_turns_sigterm_into_a_clean_end_between_batches(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    planpipe_resource: PlanpipeResource,
    dagster_resources: dict[str, object],
) -> None:
    """SIGTERM to the process running the ingest asset: the batch in flight commits, the run
    is not a failure, and what is committed is exactly what the store's offsets say."""
    import os
    import signal
    import threading

    create_workload(settings.pg_dsn)
    # Enough that the batches in the engine when the signal lands (one written, the next decoded) are not all.
    publish(settings, make_envelopes(capture_plans(settings.pg_dsn), 8000, "sigterm"))
    slow = PlanpipeResource(**{**planpipe_resource.model_dump(), "ingest_max_seconds": 120})

    def first_batch_committed() -> bool:
        with psycopg.connect(settings.pg_dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM planpipe.ingest_batches WHERE consumer_group = %s", (settings.consumer_group,)
            ).fetchone()
        return bool(row and row[0])

    def terminate_after_first_batch() -> None:
        deadline = time.monotonic() + 60
        while not first_batch_committed() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_first_batch, daemon=True)
    killer.start()
    started = time.monotonic()
    result = dg.materialize(
        [ingest_micro_batches], instance=dagster_instance, resources={**dagster_resources, "planpipe": slow},
        selection=dg.AssetSelection.assets(ingest_micro_batches), tags={"test": "sigterm"},
    )  # fmt: skip
    killer.join(5)
    assert result.success
    assert time.monotonic() - started < 60
    totals = next(
        m.materialization.metadata
        for m in result.get_asset_materialization_events()
        if m.asset_key == OBSERVATIONS and "stopped_by_signal" in m.materialization.metadata
    )
    assert totals["stopped_by_signal"].value is True
    assert totals["caught_up"].value is False  # it stopped on the signal, not because it ran out of work
    with psycopg.connect(settings.pg_dsn) as conn:
        batches = conn.execute(
            "SELECT count(*), coalesce(sum(consumed), 0) FROM planpipe.ingest_batches WHERE consumer_group = %s",
            (settings.consumer_group,),
        ).fetchone()
    assert batches is not None
    assert batches[0] == totals["batches"].value
    assert 0 < int(batches[1]) < 8000
    # The run was told it is stopping: it is CANCELING (ends CANCELED) or already SUCCESS, never FAILURE.
    run = dagster_instance.get_run_by_id(result.run_id)
    assert run is not None and run.status != dg.DagsterRunStatus.FAILURE
