"""parquet_sink on its own: a replayed batch rewrites its file, uncommitted files are discarded."""

from pathlib import Path

import pytest

from planpipe.ingest import parquet_sink
from planpipe.ingest.batch import Observations

pytestmark = pytest.mark.unit


def test_replayed_batch_rewrites_the_same_file(tmp_path: Path) -> None:
    obs = Observations(
        query_hash=["q"], cluster_id=["c"], execution_timestamp=[1_790_000_000.0], plan_text=["[]"],
        actual_rows=[1], total_time_ms=[2.0], query_type=[None], query_text=[None], trace_id=[None],
        published_at=[1_790_000_000.0], fingerprint=["f"], route=["baseline"], priority=["standard"],
        kafka_topic=["t"], kafka_partition=[0], kafka_offset=[5],
        shared_blocks=[None], temp_blocks=[None], top_rows=[None], top_loops=[None],
    )  # fmt: skip
    first = parquet_sink.write_batch(tmp_path, obs, [("t", 0, 5, 9)])
    second = parquet_sink.write_batch(tmp_path, obs, [("t", 0, 5, 9)])
    assert [f.path for f in first] == [f.path for f in second]
    assert parquet_sink.scan(tmp_path).collect().height == 1
    assert parquet_sink.discard_uncommitted(tmp_path, "t", 0, 10) == []
    assert parquet_sink.discard_uncommitted(tmp_path, "t", 0, 5) == [first[0].path]
