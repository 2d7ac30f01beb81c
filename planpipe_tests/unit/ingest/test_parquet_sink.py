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


def test_a_batch_is_split_into_one_file_per_route_date_and_partition(tmp_path: Path) -> None:
    day = 86_400.0
    rows = [  # (route, day offset, partition, offset): two routes, two UTC dates, two partitions
        ("baseline", 0.0, 0, 10), ("critical", 0.0, 0, 11), ("baseline", 1.0, 0, 12), ("baseline", 0.0, 1, 40),
        ("baseline", 0.0, 0, 13), ("baseline", 1.0 - 1e-3, 1, 41),
    ]  # fmt: skip
    n = len(rows)
    obs = Observations(
        query_hash=[f"q{i}" for i in range(n)], cluster_id=["c"] * n,
        execution_timestamp=[1_790_121_600.0 + d * day for _, d, _, _ in rows], plan_text=[f"[{i}]" for i in range(n)],
        actual_rows=[1] * n, total_time_ms=[2.0] * n, query_type=[None] * n, query_text=[None] * n,
        trace_id=[None] * n, published_at=[1_790_000_000.0] * n, fingerprint=["f"] * n,
        route=[r for r, _, _, _ in rows], priority=["standard"] * n, kafka_topic=["t"] * n,
        kafka_partition=[p for _, _, p, _ in rows], kafka_offset=[o for _, _, _, o in rows],
        shared_blocks=[None] * n, temp_blocks=[None] * n, top_rows=[None] * n, top_loops=[None] * n,
    )  # fmt: skip
    files = parquet_sink.write_batch(tmp_path, obs, [("t", 0, 10, 13), ("t", 1, 40, 41)])
    layout = {str(f.path.relative_to(tmp_path)): f.rows for f in files}
    assert layout == {
        "route=baseline/date=2026-09-23/" + parquet_sink.file_name("t", 0, 10, 13): 2,
        "route=critical/date=2026-09-23/" + parquet_sink.file_name("t", 0, 10, 13): 1,
        "route=baseline/date=2026-09-24/" + parquet_sink.file_name("t", 0, 10, 13): 1,
        "route=baseline/date=2026-09-23/" + parquet_sink.file_name("t", 1, 40, 41): 2,
    }
    stored = parquet_sink.scan(tmp_path).collect().sort("kafka_offset")
    assert stored["kafka_offset"].to_list() == sorted(o for _, _, _, o in rows)
    assert stored["plan_text"].to_list() == [f"[{i}]" for i in sorted(range(n), key=lambda i: rows[i][3])]
    assert stored["plan_key"].null_count() == 0 and not list(tmp_path.rglob("*.tmp"))
