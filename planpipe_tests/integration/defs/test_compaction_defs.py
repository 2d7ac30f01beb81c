"""The compaction job and sensor on a dataset the real engine wrote: every record still there once."""

import dagster as dg
import polars as pl
import pytest

from planpipe.defs.ingest.compaction import compaction_job, compaction_sensor
from planpipe.defs.resources import PlanpipeResource
from planpipe.ingest import compaction, parquet_sink
from planpipe.settings import Settings
from planpipe_tests.integration.workload import capture_plans, create_workload, make_envelopes, publish


def test_compaction_job_merges_what_the_engine_committed(
    settings: Settings,
    dagster_instance: dg.DagsterInstance,
    planpipe_resource: PlanpipeResource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from planpipe.ingest.engine import IngestEngine

    monkeypatch.setenv("PLANPIPE_DATA_DIR", str(settings.data_dir))  # the resource reads the environment
    monkeypatch.setattr(compaction, "MIN_FILES", 2)
    create_workload(settings.pg_dsn)
    envelopes = make_envelopes(capture_plans(settings.pg_dsn), 240, "compact")
    publish(settings, envelopes)
    engine = IngestEngine(settings, max_messages=10)  # many small batches, many small files
    try:
        assert engine.run(until_caught_up=True, max_seconds=120).caught_up
    finally:
        engine.close()
    root = settings.parquet_dir
    before = len(parquet_sink.data_files(root))
    offsets_before = sorted(parquet_sink.scan(root).select("kafka_partition", "kafka_offset").collect().rows())
    assert len(offsets_before) == len(envelopes)

    context = dg.build_sensor_context(instance=dagster_instance, resources={"planpipe": planpipe_resource})
    monkeypatch.setattr("planpipe.defs.ingest.compaction.SENSOR_SMALL_FILES", 2)
    asked = compaction_sensor(context)
    assert isinstance(asked, dg.SensorResult) and asked.run_requests  # crowded directories: a compaction is asked

    result = compaction_job.execute_in_process(instance=dagster_instance, resources={"planpipe": planpipe_resource})
    assert result.success
    after = parquet_sink.data_files(root)
    assert len(after) < before
    assert not parquet_sink.superseded(after)
    offsets_after = sorted(parquet_sink.scan(root).select("kafka_partition", "kafka_offset").collect().rows())
    assert offsets_after == offsets_before  # nothing lost, nothing twice
    # The plain glob readers (detection) see the same rows: no covered file is left behind.
    assert pl.scan_parquet(str(root / "route=*" / "date=*" / "*.parquet")).select(pl.len()).collect().item() == len(
        envelopes
    )
    observed = dagster_instance.fetch_observations(dg.AssetKey("plan_observations"), limit=1).records
    assert observed and observed[0].asset_observation is not None
    merged = observed[0].asset_observation.metadata["merged_files"].value
    assert isinstance(merged, int) and merged > 0
