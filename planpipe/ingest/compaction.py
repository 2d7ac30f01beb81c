"""Compaction of the observations dataset: the ingest's many small files become a few large ones.

The hot path writes one file per (route, date, partition) and batch, fast (zstd level 1);
a day of live traffic leaves thousands of them. Compaction merges, per route/date
directory and topic partition, runs of small files into one file named by the offset
range it covers, at a higher zstd level. It is safe alongside the ingest, replays and
readers because:

* only committed offsets are merged: a file whose range reaches the group's stored next
  offset may belong to a batch still in flight (or one that crashed before its commit,
  which `discard_uncommitted` will remove), so it is left alone;
* offsets never move between files of a run: the merged file holds exactly the rows of its
  sources (checked) and is named by their combined range, so a replayed batch — always at
  or past the stored offset — never collides with it;
* the merged file is written aside, fsynced and renamed in before any source is unlinked:
  a crash at any point leaves either the sources or the merged file covering them (the
  covered leftovers are removed by the next run), never a gap;
* readers that list files with `parquet_sink.live_files` skip a file another one covers,
  so the instant both exist counts nothing twice.
"""

import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import polars as pl
import psycopg

from planpipe.ingest import parquet_sink
from planpipe.ingest.parquet_sink import PARTITION_COLUMNS, SCHEMA, DataFile
from planpipe.plans.plan_key import fill_plan_keys

logger = logging.getLogger("planpipe.compaction")

COMPACT_ZSTD_LEVEL: Final = 9
# A merged file grows to about this many bytes of source files; larger files are left alone.
TARGET_FILE_BYTES: Final = 128 * 1024 * 1024
# A directory's partition is compacted once it has this many small files.
MIN_FILES: Final = 8
# A staging file this old belongs to a compaction that died.
STAGING_ABANDONED_S: Final = 3600.0


@dataclass
class CompactionReport:
    merged_files: int = 0
    written_files: int = 0
    removed_superseded: int = 0
    rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skipped_overlaps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def committed_offsets(pg_dsn: str, consumer_group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) → the group's stored next offset: everything below it is committed."""
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT topic, partition, next_offset FROM planpipe.consumer_offsets WHERE consumer_group = %s",
            (consumer_group,),
        ).fetchall()
    return {(str(t), int(p)): int(n) for t, p, n in rows}


def plan_runs(
    files: Sequence[DataFile],
    committed: Mapping[tuple[str, int], int],
    *,
    min_files: int = MIN_FILES,
    target_bytes: int = TARGET_FILE_BYTES,
    sizes: Mapping[Path, int] | None = None,
) -> tuple[list[list[DataFile]], list[str]]:
    """Runs of committed small files to merge (each sorted by offset), and the groups skipped
    because their files overlap (a sign of duplicates that needs a person, not a merge)."""
    size_of = sizes if sizes is not None else {f.path: f.path.stat().st_size for f in files}
    groups: dict[tuple[Path, str, int], list[DataFile]] = {}
    for f in files:
        if f.last < committed.get((f.topic, f.partition), 0) and size_of[f.path] < target_bytes // 4:
            groups.setdefault(f.group, []).append(f)
    runs: list[list[DataFile]] = []
    skipped: list[str] = []
    for (directory, topic, partition), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda f: f.first)
        if any(a.last >= b.first for a, b in itertools.pairwise(members)):
            skipped.append(f"{directory}/{topic}+{partition}")
            continue
        run: list[DataFile] = []
        run_bytes = 0
        for f in members:
            if run and run_bytes + size_of[f.path] > target_bytes:
                runs.append(run)
                run, run_bytes = [], 0
            run.append(f)
            run_bytes += size_of[f.path]
        runs.append(run)
    return [r for r in runs if len(r) >= min_files], skipped


def merge(run: Sequence[DataFile]) -> tuple[Path, int]:
    """Merge one run into a file named by its offset range; returns (path, rows). Sources go last."""
    first, last = run[0], run[-1]
    target = first.path.parent / parquet_sink.file_name(first.topic, first.partition, first.first, last.last)
    staging = target.with_name(target.name + ".compacting")
    columns = {name: dtype for name, dtype in SCHEMA.items() if name not in PARTITION_COLUMNS}
    # Streaming: memory stays bounded whatever the run's size. Files written before a column
    # existed (the work columns) read it as null.
    frame = pl.scan_parquet(
        [str(f.path) for f in run],
        schema=columns,
        hive_partitioning=False,
        missing_columns="insert",
        extra_columns="ignore",
    )
    frame = fill_plan_keys(frame)  # files written before the plan key existed
    frame.sink_parquet(staging, compression="zstd", compression_level=COMPACT_ZSTD_LEVEL, statistics=True)
    rows = pl.scan_parquet(staging).select(pl.len()).collect().item()
    sources = pl.scan_parquet(
        [str(f.path) for f in run], hive_partitioning=False, missing_columns="insert", extra_columns="ignore"
    )  # their columns may differ: files written before a column existed
    expected = sources.select(pl.len()).collect().item()
    if rows != expected:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"compaction of {target.name}: wrote {rows} rows of {expected}; sources kept")
    with staging.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, target)
    parquet_sink.fsync_dir(target.parent)
    for f in run:
        f.path.unlink(missing_ok=True)
    parquet_sink.fsync_dir(target.parent)
    return target, int(rows)


def compact(
    root: Path,
    committed: Mapping[tuple[str, int], int],
    *,
    min_files: int | None = None,
    target_bytes: int = TARGET_FILE_BYTES,
) -> CompactionReport:
    """Remove superseded files, then merge each run of `min_files` (default MIN_FILES) or more
    committed small files."""
    min_files = MIN_FILES if min_files is None else min_files
    report = CompactionReport()
    if not root.exists():
        return report
    for leftover in root.glob("route=*/date=*/*.compacting"):
        # A run that died mid-merge; its sources are intact. Young ones may be a live run's.
        if time.time() - leftover.stat().st_mtime > STAGING_ABANDONED_S:
            leftover.unlink(missing_ok=True)
    files = parquet_sink.data_files(root)
    for stale in parquet_sink.superseded(files):
        stale.path.unlink(missing_ok=True)
        report.removed_superseded += 1
    files = parquet_sink.data_files(root)
    sizes = {f.path: f.path.stat().st_size for f in files}
    runs, report.skipped_overlaps = plan_runs(files, committed, min_files=min_files, target_bytes=target_bytes,
                                              sizes=sizes)  # fmt: skip
    for skipped in report.skipped_overlaps:
        logger.warning("compaction skipped %s: files with overlapping offset ranges", skipped)
    for run in runs:
        target, rows = merge(run)
        report.merged_files += len(run)
        report.written_files += 1
        report.rows += rows
        report.bytes_before += sum(sizes[f.path] for f in run)
        report.bytes_after += target.stat().st_size
    return report


def small_file_counts(root: Path, target_bytes: int = TARGET_FILE_BYTES) -> dict[str, int]:
    """Small files per route/date directory (what the compaction sensor watches)."""
    counts: dict[str, int] = {}
    if not root.exists():
        return counts
    for f in parquet_sink.data_files(root):
        try:
            small = f.path.stat().st_size < target_bytes // 4
        except FileNotFoundError:  # removed meanwhile (retention, compaction)
            continue
        if small:
            key = str(f.path.parent.relative_to(root))
            counts[key] = counts.get(key, 0) + 1
    return counts
