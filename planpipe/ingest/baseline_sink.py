"""One PostgreSQL transaction per micro-batch: catalogs, baselines, rollups, stats and offsets.

The transaction is the commit point of the whole pipeline. It first takes every
lock it needs, in a fixed order, and times that phase as the batch's lock wait:
the tables (ROW EXCLUSIVE, which waits behind `LOCK TABLE`, `ALTER TABLE`,
`VACUUM FULL`), the offset rows of the batch's partitions, one advisory lock per
query (so two consumers never deadlock), and the existing baseline and rollup
rows of the batch (which waits behind a plan accept/reject). `lock_timeout`
bounds each attempt; the engine retries and adds up the waits.

The offset fence: a batch may start at or after the stored next offset (offsets
have gaps — transaction markers, aborted transactions under read_committed,
compaction, retention), but never before it. A batch that starts before it holds
records another consumer already committed: it is stale and rolled back.
"""

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import polars as pl
import psycopg

from planpipe.errors import PlanpipeError
from planpipe.ingest.batch import OffsetRange, PreparedBatch
from planpipe.plans import latency

LOCK_TIMEOUT_MS: Final = 5_000
# Every table the batch writes, locked up front in one statement so the wait for a
# table lock is measured rather than hidden inside whichever statement hits it.
_TABLES: Final = (
    "planpipe.consumer_offsets, planpipe.plan_catalog, planpipe.query_catalog, "
    "planpipe.plan_baselines, planpipe.plan_rollups_hourly, planpipe.ingest_batches"
)


class StaleBatchError(PlanpipeError, RuntimeError):
    """The partition's stored offset moved on: another consumer committed these records."""


class LockWaitTimeout(PlanpipeError, RuntimeError):
    """`lock_timeout` expired while taking the batch's locks; the batch is retried."""

    def __init__(self, waited_ms: float, detail: str) -> None:
        super().__init__(f"lock wait exceeded {waited_ms:.0f} ms: {detail}")
        self.waited_ms = waited_ms


@dataclass(frozen=True)
class CommitResult:
    batch_id: int
    lock_wait_ms: float
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    max_latency_ms: float | None
    committed_at: float


_KEY: Final = ["cluster_id", "query_hash", "fingerprint"]


@dataclass
class _Groups:
    """The batch aggregated per key, set-based (polars), each frame sorted by key (= lock order)."""

    baselines: pl.DataFrame  # per (cluster, query, plan)
    rollups: pl.DataFrame  # per (cluster, query, plan, hour)
    queries: pl.DataFrame  # per (cluster, query)
    # Latency histograms per baseline / rollup key, merged with the stored ones under the locks.
    baseline_hists: dict[tuple[str, str, str], dict[int, int]]
    rollup_hists: dict[tuple[str, str, str, float], dict[int, int]]


def _first_text(name: str) -> pl.Expr:
    # The first non-empty value in record order, as the catalog kept it before (`a or b`).
    column = pl.col(name)
    return column.filter(column.is_not_null() & (column != "")).first()


def _aggregate(batch: PreparedBatch) -> _Groups:
    obs = batch.observations
    bucket_of = latency.bucket_of
    frame = pl.DataFrame(
        {
            "cluster_id": obs.cluster_id,
            "query_hash": obs.query_hash,
            "fingerprint": obs.fingerprint,
            "ts": obs.execution_timestamp,
            "ms": obs.total_time_ms,
            "rows": obs.actual_rows,
            "route": obs.route,
            "query_type": obs.query_type,
            "query_text": obs.query_text,
            "bucket": [bucket_of(ms) for ms in obs.total_time_ms],
        },
        schema=_FRAME_SCHEMA,
    ).with_columns(hour=pl.col("ts") - pl.col("ts") % 3600)
    # Int128: a sum of int64 row counts may exceed int64 (the column is numeric).
    rows_sum = pl.col("rows").cast(pl.Int128).sum().alias("rows_sum")
    baselines = (
        frame.group_by(_KEY)
        .agg(
            pl.col("ts").min().alias("first_seen"),
            pl.col("ts").max().alias("last_seen"),
            pl.len().alias("executions"),
            pl.col("ms").sum().alias("time_sum"),
            pl.col("ms").min().alias("time_min"),
            pl.col("ms").max().alias("time_max"),
            rows_sum,
        )
        .sort(_KEY)
    )
    rollups = (
        frame.group_by([*_KEY, "hour"], maintain_order=True)
        .agg(pl.col("route").first(), pl.len().alias("executions"), pl.col("ms").sum().alias("time_sum"), rows_sum)
        .sort([*_KEY, "hour"])
    )
    queries = (
        frame.group_by(["cluster_id", "query_hash"], maintain_order=True)
        .agg(
            pl.col("ts").min().alias("first_seen"),
            pl.col("ts").max().alias("last_seen"),
            _first_text("query_type"),
            _first_text("query_text"),
        )
        .sort(["cluster_id", "query_hash"])
    )
    baseline_hists: dict[tuple[str, str, str], dict[int, int]] = {}
    for c, q, f, bucket, count in frame.group_by([*_KEY, "bucket"]).len().iter_rows():
        baseline_hists.setdefault((c, q, f), {})[bucket] = count
    rollup_hists: dict[tuple[str, str, str, float], dict[int, int]] = {}
    for c, q, f, hour, bucket, count in frame.group_by([*_KEY, "hour", "bucket"]).len().iter_rows():
        rollup_hists.setdefault((c, q, f, hour), {})[bucket] = count
    return _Groups(baselines, rollups, queries, baseline_hists, rollup_hists)


_FRAME_SCHEMA: Final = {
    "cluster_id": pl.String,
    "query_hash": pl.String,
    "fingerprint": pl.String,
    "ts": pl.Float64,
    "ms": pl.Float64,
    "rows": pl.Int64,
    "route": pl.String,
    "query_type": pl.String,
    "query_text": pl.String,
    "bucket": pl.Int32,
}

_json = msgspec.json.Encoder()


def _hist_json(hist: dict[int, int]) -> str:
    return _json.encode({str(k): v for k, v in hist.items()}).decode()


def _merge_stored_histograms(cur: psycopg.Cursor[tuple[object, ...]], groups: _Groups) -> None:
    """Read (FOR UPDATE) the stored histograms of the batch's keys and add the batch's counts to them."""
    if groups.baselines.height:
        b = groups.baselines
        rows = cur.execute(
            """SELECT b.cluster_id, b.query_hash, b.fingerprint, b.latency_hist
               FROM planpipe.plan_baselines b
               JOIN unnest(%b::text[], %b::text[], %b::text[]) AS k(c, q, f)
                 ON b.cluster_id = k.c AND b.query_hash = k.q AND b.fingerprint = k.f
               ORDER BY 1, 2, 3 FOR UPDATE OF b""",
            (b["cluster_id"].to_list(), b["query_hash"].to_list(), b["fingerprint"].to_list()),
        ).fetchall()
        for c, q, f, stored in rows:
            key = (str(c), str(q), str(f))
            groups.baseline_hists[key] = latency.merge(latency.from_json(stored), groups.baseline_hists[key])  # type: ignore[arg-type]
    if groups.rollups.height:
        r = groups.rollups
        rows = cur.execute(
            """SELECT r.cluster_id, r.query_hash, r.fingerprint, extract(epoch FROM r.hour)::float8, r.latency_hist
               FROM planpipe.plan_rollups_hourly r
               JOIN unnest(%b::text[], %b::text[], %b::text[], %b::float8[]) AS k(c, q, f, h)
                 ON r.cluster_id = k.c AND r.query_hash = k.q AND r.fingerprint = k.f AND r.hour = to_timestamp(k.h)
               ORDER BY 1, 2, 3, 4 FOR UPDATE OF r""",
            (r["cluster_id"].to_list(), r["query_hash"].to_list(), r["fingerprint"].to_list(), r["hour"].to_list()),
        ).fetchall()
        for c, q, f, hour, stored in rows:
            rkey = (str(c), str(q), str(f), float(hour))  # type: ignore[arg-type]
            groups.rollup_hists[rkey] = latency.merge(latency.from_json(stored), groups.rollup_hists[rkey])  # type: ignore[arg-type]


def _fence(cur: psycopg.Cursor[tuple[object, ...]], group: str, ranges: Sequence[OffsetRange]) -> None:
    """Lock the offset rows of the batch's partitions (two statements whatever their number)."""
    spans = sorted(ranges, key=lambda r: (r.topic, r.partition))
    topics, partitions = [r.topic for r in spans], [r.partition for r in spans]
    cur.execute(
        """INSERT INTO planpipe.consumer_offsets (consumer_group, topic, partition, next_offset)
           SELECT %s, * FROM unnest(%b::text[], %b::int[], %b::bigint[]) ON CONFLICT DO NOTHING""",
        (group, topics, partitions, [r.first for r in spans]),
    )
    rows = cur.execute(
        """SELECT o.topic, o.partition, o.next_offset FROM planpipe.consumer_offsets o
           JOIN unnest(%b::text[], %b::int[]) AS k(t, p) ON o.topic = k.t AND o.partition = k.p
           WHERE o.consumer_group = %s ORDER BY o.topic, o.partition FOR UPDATE OF o""",
        (topics, partitions, group),
    ).fetchall()
    stored = {(str(t), int(p)): int(n) for t, p, n in rows}  # type: ignore[call-overload]
    for span in spans:
        # Past the stored offset is fine (a gap of markers, aborted or compacted records);
        # before it means these records were committed already.
        if span.first < stored[(span.topic, span.partition)]:
            raise StaleBatchError(
                f"{span.topic}[{span.partition}]: batch starts at {span.first}, "
                f"already committed up to {stored[(span.topic, span.partition)] - 1}"
            )


def _take_locks(
    cur: psycopg.Cursor[tuple[object, ...]],
    group: str,
    ranges: Sequence[OffsetRange],
    groups: _Groups,
    lock_timeout_ms: int,
) -> float:
    """Take every lock of the batch in a fixed order; returns the milliseconds it took."""
    started = time.perf_counter()
    try:
        # Stays set for the rest of the transaction: no later statement may block forever either.
        cur.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        cur.execute(f"LOCK TABLE {_TABLES} IN ROW EXCLUSIVE MODE")
        _fence(cur, group, ranges)
        if groups.queries.height:
            # One transaction-scoped advisory lock per query, taken in hash order: it
            # serialises plan_version numbering and baseline upserts of a query across
            # consumers without deadlocks.
            cur.execute(
                """SELECT count(pg_advisory_xact_lock(h)) FROM (
                       SELECT DISTINCT hashtextextended(c || chr(31) || q, 0) AS h
                       FROM unnest(%b::text[], %b::text[]) AS k(c, q) ORDER BY h) AS ordered""",
                (groups.queries["cluster_id"].to_list(), groups.queries["query_hash"].to_list()),
            )
        # The advisory locks make us the only planpipe writer of these queries' rows until
        # COMMIT, so histograms are merged here rather than by a per-row SQL function
        # (hist_add dominated the upserts in the benchmark profile). FOR UPDATE waits for
        # anyone else holding the rows (a plan accept/reject) and counts as lock wait.
        _merge_stored_histograms(cur, groups)
    except psycopg.errors.LockNotAvailable as error:
        raise LockWaitTimeout((time.perf_counter() - started) * 1000, str(error).strip()) from error
    return (time.perf_counter() - started) * 1000


def commit_batch(
    conn: psycopg.Connection[tuple[object, ...]],
    consumer_group: str,
    batch: PreparedBatch,
    new_plans: dict[str, tuple[str, str]],
    parquet_files: Sequence[str],
    started_at: float,
    *,
    earlier_lock_wait_ms: float = 0.0,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    dry_run: bool = False,
) -> CommitResult:
    """Upsert everything for the batch and advance the offsets, atomically.

    `new_plans`: fingerprint → (normalized plan JSON, one-line summary) for
    fingerprints not yet known to this process. `earlier_lock_wait_ms`: what earlier
    attempts of this batch waited before their `lock_timeout`, so the recorded lock
    wait is the batch's whole wait. `dry_run`: do everything, then roll back (used to
    find which records a sink rejects).

    Set-based: the batch is aggregated per key first (`_aggregate`), then each table
    gets one statement over arrays; timestamps travel as epoch seconds.
    """
    ranges = list(batch.offset_ranges.values())
    groups = _aggregate(batch)
    obs = batch.observations
    with conn.transaction() as transaction, conn.cursor() as cur:
        lock_wait_ms = earlier_lock_wait_ms + _take_locks(cur, consumer_group, ranges, groups, lock_timeout_ms)

        if new_plans:
            fps = sorted(new_plans)
            cur.execute(
                """INSERT INTO planpipe.plan_catalog (fingerprint, normalized_plan, summary, sample_plan_text)
                   SELECT * FROM unnest(%b::text[], %b::jsonb[], %b::text[], %b::text[])
                   ON CONFLICT (fingerprint) DO NOTHING""",
                (
                    fps,
                    [new_plans[f][0] for f in fps],
                    [new_plans[f][1] for f in fps],
                    [batch.new_plan_samples[f] for f in fps],
                ),
            )

        q = groups.queries
        if q.height:
            cur.execute(
                """INSERT INTO planpipe.query_catalog AS q
                       (cluster_id, query_hash, first_seen, last_seen, query_type, query_text)
                   SELECT c, h, to_timestamp(f), to_timestamp(l), t, x
                   FROM unnest(%b::text[], %b::text[], %b::float8[], %b::float8[], %b::text[], %b::text[])
                       AS k(c, h, f, l, t, x)
                   ON CONFLICT (cluster_id, query_hash) DO UPDATE SET
                       first_seen = least(q.first_seen, excluded.first_seen),
                       last_seen = greatest(q.last_seen, excluded.last_seen),
                       query_type = coalesce(q.query_type, excluded.query_type),
                       query_text = coalesce(q.query_text, excluded.query_text)""",
                [q[name].to_list() for name in q.columns],
            )

        b = groups.baselines
        if b.height:
            hists = [
                _hist_json(groups.baseline_hists[key])
                for key in zip(b["cluster_id"], b["query_hash"], b["fingerprint"], strict=True)
            ]
            # New plans get the next plan_version of their query; the first plan of a query is
            # accepted, later ones start as candidates (SQL Plan Management). Both come from one
            # lookup of the query's highest version (an index probe per query, never a table scan).
            cur.execute(
                """WITH incoming AS (
                       SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[],
                                            %b::bigint[], %b::float8[], %b::float8[], %b::float8[], %b::numeric[],
                                            %b::jsonb[])
                           AS t(cluster_id, query_hash, fingerprint, first_seen, last_seen, executions,
                                time_sum, time_min, time_max, rows_sum, hist)
                   ), numbered AS (
                       SELECT i.*,
                              coalesce(v.top, 0) + row_number() OVER (PARTITION BY i.cluster_id, i.query_hash
                                                                     ORDER BY i.first_seen, i.fingerprint) AS version
                       FROM incoming i
                       LEFT JOIN LATERAL (SELECT max(plan_version) AS top FROM planpipe.plan_baselines b
                                          WHERE b.cluster_id = i.cluster_id AND b.query_hash = i.query_hash) v ON true
                   )
                   INSERT INTO planpipe.plan_baselines AS b
                       (cluster_id, query_hash, fingerprint, plan_version, status, status_by, status_at,
                        first_seen, last_seen, executions, total_time_sum, total_time_min, total_time_max,
                        rows_sum, latency_hist)
                   SELECT cluster_id, query_hash, fingerprint, version,
                          CASE WHEN version = 1 THEN 'accepted' ELSE 'candidate' END,
                          CASE WHEN version = 1 THEN 'planpipe:first-plan' END,
                          CASE WHEN version = 1 THEN now() END,
                          to_timestamp(first_seen), to_timestamp(last_seen), executions, time_sum, time_min,
                          time_max, rows_sum, hist
                   FROM numbered
                   ORDER BY cluster_id, query_hash, fingerprint
                   ON CONFLICT (cluster_id, query_hash, fingerprint) DO UPDATE SET
                       first_seen = least(b.first_seen, excluded.first_seen),
                       last_seen = greatest(b.last_seen, excluded.last_seen),
                       executions = b.executions + excluded.executions,
                       total_time_sum = b.total_time_sum + excluded.total_time_sum,
                       total_time_min = least(b.total_time_min, excluded.total_time_min),
                       total_time_max = greatest(b.total_time_max, excluded.total_time_max),
                       rows_sum = b.rows_sum + excluded.rows_sum,
                       latency_hist = excluded.latency_hist""",
                [*(b[name].to_list() for name in b.columns), hists],
            )

        r = groups.rollups
        if r.height:
            hists = [
                _hist_json(groups.rollup_hists[key])
                for key in zip(r["cluster_id"], r["query_hash"], r["fingerprint"], r["hour"], strict=True)
            ]
            cur.execute(
                """INSERT INTO planpipe.plan_rollups_hourly AS r
                       (cluster_id, query_hash, fingerprint, hour, route, executions, total_time_sum,
                        rows_sum, latency_hist)
                   SELECT c, q, f, to_timestamp(h), route, n, t, rs, hist
                   FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::text[],
                               %b::bigint[], %b::float8[], %b::numeric[], %b::jsonb[])
                       AS k(c, q, f, h, route, n, t, rs, hist)
                   ON CONFLICT (cluster_id, query_hash, fingerprint, hour) DO UPDATE SET
                       executions = r.executions + excluded.executions,
                       total_time_sum = r.total_time_sum + excluded.total_time_sum,
                       rows_sum = r.rows_sum + excluded.rows_sum,
                       latency_hist = excluded.latency_hist""",
                [*(r[name].to_list() for name in r.columns), hists],
            )

        cur.execute(
            """INSERT INTO planpipe.consumer_offsets AS o (consumer_group, topic, partition, next_offset)
               SELECT %s, * FROM unnest(%b::text[], %b::int[], %b::bigint[])
               ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                   SET next_offset = excluded.next_offset, updated_at = now()""",
            (consumer_group, [r.topic for r in ranges], [r.partition for r in ranges], [r.last + 1 for r in ranges]),
        )

        # Latency is publish → this commit; measured as late as possible before COMMIT.
        committed_at = time.time()
        lat = sorted(max(0.0, (committed_at - p) * 1000) for p in obs.published_at)
        p50, p95, pmax = _pct(lat, 0.50), _pct(lat, 0.95), (lat[-1] if lat else None)
        row = cur.execute(
            """INSERT INTO planpipe.ingest_batches
                   (consumer_group, offset_ranges, consumed, valid, dlq, dropped_low, p50_latency_ms,
                    p95_latency_ms, max_latency_ms, lock_wait_ms, duration_ms, parquet_files)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING batch_id""",
            (
                consumer_group,
                json.dumps([r.as_dict() for r in ranges]),
                batch.consumed,
                len(obs),
                len(batch.dead_letters),
                batch.dropped_low,
                p50,
                p95,
                pmax,
                lock_wait_ms,
                (committed_at - started_at) * 1000,
                json.dumps(list(parquet_files)),
            ),
        ).fetchone()
        assert row is not None
        if dry_run:
            raise psycopg.Rollback(transaction)
    return CommitResult(int(row[0]), lock_wait_ms, p50, p95, pmax, committed_at)  # type: ignore[call-overload]


def _pct(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def stored_offsets(conn: psycopg.Connection[tuple[object, ...]], consumer_group: str, topic: str) -> dict[int, int]:
    rows = conn.execute(
        "SELECT partition, next_offset FROM planpipe.consumer_offsets WHERE consumer_group = %s AND topic = %s",
        (consumer_group, topic),
    ).fetchall()
    return {int(p): int(o) for p, o in rows}  # type: ignore[call-overload]
