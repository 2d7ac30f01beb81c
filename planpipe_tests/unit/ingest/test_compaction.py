"""Compaction merges committed small files exactly once, leaves in-flight ones, and survives a crash."""

import os
from pathlib import Path

import polars as pl

from planpipe.ingest import compaction, parquet_sink
from planpipe.ingest.batch import Observations
from planpipe.plans.plan_key import PLAN_KEY, plan_key

TOPIC = "query-plans"


def _observations(offsets: range, partition: int) -> Observations:
    n = len(offsets)
    return Observations(
        query_hash=["q"] * n, cluster_id=["c"] * n, execution_timestamp=[1_790_000_000.0] * n,
        plan_text=["[]"] * n, actual_rows=[1] * n, total_time_ms=[2.0] * n, query_type=[None] * n,
        query_text=[None] * n, trace_id=[None] * n, published_at=[1_790_000_000.0] * n, fingerprint=["f"] * n,
        route=["baseline"] * n, priority=["standard"] * n, kafka_topic=[TOPIC] * n, kafka_partition=[partition] * n,
        kafka_offset=list(offsets), shared_blocks=[None] * n, temp_blocks=[None] * n, top_rows=[None] * n,
        top_loops=[None] * n,
    )  # fmt: skip


def _write_batches(root: Path, partition: int, batches: int, size: int = 10) -> None:
    for b in range(batches):
        offsets = range(b * size, (b + 1) * size)
        parquet_sink.write_batch(root, _observations(offsets, partition), [(TOPIC, partition, offsets[0], offsets[-1])])


def _offsets(root: Path) -> list[tuple[int, int]]:
    frame = parquet_sink.scan(root).select("kafka_partition", "kafka_offset").collect()
    return sorted(frame.rows())


def test_committed_small_files_merge_once_and_in_flight_files_stay(tmp_path: Path) -> None:
    _write_batches(tmp_path, 0, 12)  # offsets 0..119 in 12 files
    _write_batches(tmp_path, 1, 3)  # too few files to be worth a merge
    # Partition 0 committed up to offset 99: files 100..109 and 110..119 may be in flight.
    report = compaction.compact(tmp_path, {(TOPIC, 0): 100, (TOPIC, 1): 30}, min_files=4)
    names = sorted(f.path.name for f in parquet_sink.data_files(tmp_path))
    assert parquet_sink.file_name(TOPIC, 0, 0, 99) in names
    assert parquet_sink.file_name(TOPIC, 0, 100, 109) in names and parquet_sink.file_name(TOPIC, 0, 110, 119) in names
    assert len(names) == 3 + 3
    assert (report.merged_files, report.written_files, report.rows) == (10, 1, 100)
    assert _offsets(tmp_path) == sorted([(0, o) for o in range(120)] + [(1, o) for o in range(30)])
    merged = pl.read_parquet(next(p for p in tmp_path.rglob("*+00000000000000000000-00000000000000000099.parquet")))
    assert merged["kafka_offset"].to_list() == list(range(100))
    assert merged.columns == [name for name in parquet_sink.SCHEMA if name not in parquet_sink.PARTITION_COLUMNS]


def test_a_crash_between_rename_and_unlink_counts_nothing_twice(tmp_path: Path) -> None:
    _write_batches(tmp_path, 0, 4)
    sources = sorted(p for p in tmp_path.rglob("*.parquet"))
    copies = {p: p.read_bytes() for p in sources}
    compaction.compact(tmp_path, {(TOPIC, 0): 40}, min_files=2)
    for path, content in copies.items():  # as if the merge died right after renaming its file in
        path.write_bytes(content)
    assert len(list(tmp_path.rglob("*.parquet"))) == 5
    assert _offsets(tmp_path) == [(0, o) for o in range(40)]  # readers skip the covered sources
    report = compaction.compact(tmp_path, {(TOPIC, 0): 40}, min_files=2)
    assert report.removed_superseded == 4
    assert [f.path.name for f in parquet_sink.data_files(tmp_path)] == [parquet_sink.file_name(TOPIC, 0, 0, 39)]


def test_overlapping_files_are_left_for_a_person(tmp_path: Path) -> None:
    _write_batches(tmp_path, 0, 3)
    parquet_sink.write_batch(tmp_path, _observations(range(5, 15), 0), [(TOPIC, 0, 5, 14)])
    report = compaction.compact(tmp_path, {(TOPIC, 0): 30}, min_files=2)
    assert report.written_files == 0 and len(report.skipped_overlaps) == 1
    assert len(parquet_sink.data_files(tmp_path)) == 4


def test_abandoned_staging_files_are_removed(tmp_path: Path) -> None:
    _write_batches(tmp_path, 0, 1)
    directory = next(tmp_path.rglob("*.parquet")).parent
    old, young = directory / "a.parquet.compacting", directory / "b.parquet.compacting"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    os.utime(old, (1.0, 1.0))
    compaction.compact(tmp_path, {})
    assert not old.exists() and young.exists()
    assert compaction.small_file_counts(tmp_path) == {str(directory.relative_to(tmp_path)): 1}


def test_files_written_before_the_plan_key_get_it_when_merged(tmp_path: Path) -> None:
    _write_batches(tmp_path, 0, 4)
    for path in sorted(tmp_path.rglob("*.parquet"))[:2]:  # as written before the column existed
        pl.read_parquet(path).drop(PLAN_KEY).write_parquet(path)
    compaction.compact(tmp_path, {(TOPIC, 0): 40}, min_files=2)
    (merged,) = tmp_path.rglob("*.parquet")
    frame = pl.read_parquet(merged)
    assert frame["kafka_offset"].to_list() == list(range(40))
    assert frame[PLAN_KEY].to_list() == [plan_key("c", "q", "f")] * 40
