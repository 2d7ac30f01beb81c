"""Dagster per region of the cluster topology, on the real broker, database and instance: the region's
lag sensor observes its topic and asks for its ingest job, whose run stores only that region's plans in
the region's own Parquet directory."""

import json
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg
import pytest

from planpipe.contract import Envelope, encode_envelope
from planpipe.defs.ingest.assets import ingest_micro_batches
from planpipe.defs.regions.definitions import regional_defs
from planpipe.defs.resources import REGION_TAG, PlanpipeResource
from planpipe.routing.publish import PlanPublisher
from planpipe.settings import Settings
from planpipe.stack import kafka
from planpipe.topology import load_topology
from planpipe_tests.integration.workload import capture_plans, create_workload


def test_a_regions_sensor_and_ingest_job_work_on_its_topic_only(
    settings: Settings, dagster_instance: dg.DagsterInstance, planpipe_resource: PlanpipeResource,
    dagster_resources: dict[str, object],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    topology_file = tmp_path / "topology.json"
    topology_file.write_text(json.dumps({"regions": {"eu": {"clusters": ["eu-*"]}, "us": {"clusters": ["us-*"]}}}))
    monkeypatch.setenv("PLANPIPE_TOPOLOGY_FILE", str(topology_file))
    # As in the code location: the regions' definitions beside the ingest asset their jobs select.
    defs = dg.Definitions.merge(
        regional_defs(load_topology(settings)),
        dg.Definitions(assets=[ingest_micro_batches], resources={"planpipe": planpipe_resource}),
    )
    eu = planpipe_resource.settings(region="eu")
    assert eu.topic == f"{settings.topic}.eu" and eu.consumer_group == f"{settings.consumer_group}.eu"
    kafka.ensure_topics(eu)

    create_workload(settings.pg_dsn)
    plan = next(iter(capture_plans(settings.pg_dsn).values()))
    publisher = PlanPublisher(settings)
    for i in range(24):
        envelope = Envelope(
            query_hash=f"q{i % 3}", execution_timestamp=1_790_000_000.0 + i, cluster_id="eu-1" if i % 2 else "x-1",
            plan_text=plan, actual_rows=1, total_time_ms=1.0,
        )  # fmt: skip
        publisher.submit_raw(encode_envelope(envelope))
    assert sum(publisher.close(30).published.values()) == 24

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("kafka_lag_sensor_eu")
    result = sensor(dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources))
    assert isinstance(result, dg.SensorResult)
    assert [r.run_key for r in result.run_requests or []] == ["ingest-eu-1"]
    (observation,) = result.asset_events
    assert isinstance(observation, dg.AssetObservation)
    assert observation.asset_key == dg.AssetKey(["kafka", "eu", "query_plans"])
    assert observation.metadata["total_lag"].value == 12  # the eu half only
    with psycopg.connect(settings.pg_dsn) as conn:  # the tick's lag sample, as the main lag sensor writes it
        sampled = conn.execute(
            """SELECT sum(lag), count(DISTINCT sampled_at) FROM planpipe.lag_samples
               WHERE consumer_group = %s AND topic = %s""",
            (eu.consumer_group, eu.topic),
        ).fetchone()
    assert sampled == (12, 1)

    job = repo.get_job("ingest_job_eu")
    run = job.execute_in_process(instance=dagster_instance, resources={"planpipe": planpipe_resource})
    assert run.success and run.dagster_run.tags[REGION_TAG] == "eu"
    # The resource's data directory is the stack's (shared by runs of this test): this run's files only.
    stored = pl.read_parquet(list(eu.parquet_dir.rglob(f"{eu.topic}+*.parquet")))
    assert stored.height == 12 and stored["cluster_id"].unique().to_list() == ["eu-1"]
    assert not list(eu.parquet_dir.parent.parent.rglob(f"{settings.topic}+*.parquet"))  # the base half waits
    us = repo.get_sensor_def("kafka_lag_sensor_us")
    quiet = us(dg.build_sensor_context(instance=dagster_instance, resources=dagster_resources))
    assert isinstance(quiet, dg.SensorResult) and not quiet.run_requests  # nothing of region us was captured
