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
from datetime import UTC, datetime
from typing import Final

import msgspec
import psycopg

from planpipe.ingest.batch import OffsetRange, PreparedBatch
from planpipe.plans import latency

LOCK_TIMEOUT_MS: Final = 5_000
# Every table the batch writes, locked up front in one statement so the wait for a
# table lock is measured rather than hidden inside whichever statement hits it.
_TABLES: Final = (
    "planpipe.consumer_offsets, planpipe.plan_catalog, planpipe.query_catalog, "
    "planpipe.plan_baselines, planpipe.plan_rollups_hourly, planpipe.ingest_batches"
)


class StaleBatchError(RuntimeError):
    """The partition's stored offset moved on: another consumer committed these records."""


class LockWaitTimeout(RuntimeError):
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


@dataclass
class _Aggregate:
    first_seen: float
    last_seen: float
    executions: int
    time_sum: float
    time_min: float
    time_max: float
    rows_sum: int
    hist: dict[int, int]
    route: str

    def add(self, ts: float, ms: float, rows: int) -> None:
        self.first_seen = min(self.first_seen, ts)
        self.last_seen = max(self.last_seen, ts)
        self.executions += 1
        self.time_sum += ms
        self.time_min = min(self.time_min, ms)
        self.time_max = max(self.time_max, ms)
        self.rows_sum += rows
        bucket = latency.bucket_of(ms)
        self.hist[bucket] = self.hist.get(bucket, 0) + 1


def _aggregate(batch: PreparedBatch, hourly: bool) -> dict[tuple[str, ...], _Aggregate]:
    obs = batch.observations
    groups: dict[tuple[str, ...], _Aggregate] = {}
    for i in range(len(obs)):
        ts, ms, rows = obs.execution_timestamp[i], obs.total_time_ms[i], obs.actual_rows[i]
        key: tuple[str, ...] = (obs.cluster_id[i], obs.query_hash[i], obs.fingerprint[i])
        if hourly:
            key += (datetime.fromtimestamp(ts - ts % 3600, UTC).isoformat(),)
        agg = groups.get(key)
        if agg is None:
            groups[key] = _Aggregate(ts, ts, 1, ms, ms, ms, rows, {latency.bucket_of(ms): 1}, obs.route[i])
        else:
            agg.add(ts, ms, rows)
    return dict(sorted(groups.items()))  # key order = lock order


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


_json = msgspec.json.Encoder()


def _hist_json(hist: dict[int, int]) -> str:
    return _json.encode({str(k): v for k, v in hist.items()}).decode()


def _merge_stored_histograms(
    cur: psycopg.Cursor[tuple[object, ...]],
    baselines: dict[tuple[str, ...], _Aggregate],
    rollups: dict[tuple[str, ...], _Aggregate],
) -> None:
    if baselines:
        keys = list(baselines)
        rows = cur.execute(
            """SELECT b.cluster_id, b.query_hash, b.fingerprint, b.latency_hist
               FROM planpipe.plan_baselines b
               JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(c, q, f)
                 ON b.cluster_id = k.c AND b.query_hash = k.q AND b.fingerprint = k.f
               ORDER BY 1, 2, 3 FOR UPDATE OF b""",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
        ).fetchall()
        for c, q, f, stored in rows:
            agg = baselines[(str(c), str(q), str(f))]
            agg.hist = latency.merge(latency.from_json(stored), agg.hist)  # type: ignore[arg-type]
    if rollups:
        keys = list(rollups)
        rows = cur.execute(
            """SELECT r.cluster_id, r.query_hash, r.fingerprint, r.hour, r.latency_hist
               FROM planpipe.plan_rollups_hourly r
               JOIN unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[]) AS k(c, q, f, h)
                 ON r.cluster_id = k.c AND r.query_hash = k.q AND r.fingerprint = k.f AND r.hour = k.h
               ORDER BY 1, 2, 3, 4 FOR UPDATE OF r""",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
             [datetime.fromisoformat(k[3]) for k in keys]),
        ).fetchall()  # fmt: skip
        for c, q, f, hour, stored in rows:
            agg = rollups[(str(c), str(q), str(f), hour.astimezone(UTC).isoformat())]  # type: ignore[attr-defined]
            agg.hist = latency.merge(latency.from_json(stored), agg.hist)  # type: ignore[arg-type]


def _fence(cur: psycopg.Cursor[tuple[object, ...]], group: str, ranges: Sequence[OffsetRange]) -> None:
    for span in sorted(ranges, key=lambda r: (r.topic, r.partition)):
        cur.execute(
            """INSERT INTO planpipe.consumer_offsets (consumer_group, topic, partition, next_offset)
               VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING""",
            (group, span.topic, span.partition, span.first),
        )
        row = cur.execute(
            """SELECT next_offset FROM planpipe.consumer_offsets
               WHERE consumer_group = %s AND topic = %s AND partition = %s FOR UPDATE""",
            (group, span.topic, span.partition),
        ).fetchone()
        assert row is not None
        stored = int(row[0])  # type: ignore[call-overload]
        # Past the stored offset is fine (a gap of markers, aborted or compacted records);
        # before it means these records were committed already.
        if span.first < stored:
            raise StaleBatchError(
                f"{span.topic}[{span.partition}]: batch starts at {span.first}, already committed up to {stored - 1}"
            )


def _take_locks(
    cur: psycopg.Cursor[tuple[object, ...]],
    group: str,
    ranges: Sequence[OffsetRange],
    baselines: dict[tuple[str, ...], "_Aggregate"],
    rollups: dict[tuple[str, ...], "_Aggregate"],
    lock_timeout_ms: int,
) -> float:
    """Take every lock of the batch in a fixed order; returns the milliseconds it took."""
    started = time.perf_counter()
    try:
        # Stays set for the rest of the transaction: no later statement may block forever either.
        cur.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        cur.execute(f"LOCK TABLE {_TABLES} IN ROW EXCLUSIVE MODE")
        _fence(cur, group, ranges)
        if baselines:
            # One transaction-scoped advisory lock per query, taken in hash order: it
            # serialises plan_version numbering and baseline upserts of a query across
            # consumers without deadlocks.
            cur.execute(
                """SELECT count(pg_advisory_xact_lock(h)) FROM (
                       SELECT DISTINCT hashtextextended(c || chr(31) || q, 0) AS h
                       FROM unnest(%s::text[], %s::text[]) AS k(c, q) ORDER BY h) AS ordered""",
                ([k[0] for k in baselines], [k[1] for k in baselines]),
            )
        # The advisory locks make us the only planpipe writer of these queries' rows until
        # COMMIT, so histograms are merged here rather than by a per-row SQL function
        # (hist_add dominated the upserts in the benchmark profile). FOR UPDATE waits for
        # anyone else holding the rows (a plan accept/reject) and counts as lock wait.
        _merge_stored_histograms(cur, baselines, rollups)
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
    """
    ranges = list(batch.offset_ranges.values())
    baselines = _aggregate(batch, hourly=False)
    rollups = _aggregate(batch, hourly=True)
    obs = batch.observations
    with conn.transaction() as transaction, conn.cursor() as cur:
        lock_wait_ms = earlier_lock_wait_ms + _take_locks(
            cur, consumer_group, ranges, baselines, rollups, lock_timeout_ms
        )

        if new_plans:
            fps = sorted(new_plans)
            cur.execute(
                """INSERT INTO planpipe.plan_catalog (fingerprint, normalized_plan, summary, sample_plan_text)
                   SELECT * FROM unnest(%s::text[], %s::jsonb[], %s::text[], %s::text[])
                   ON CONFLICT (fingerprint) DO NOTHING""",
                (
                    fps,
                    [new_plans[f][0] for f in fps],
                    [new_plans[f][1] for f in fps],
                    [batch.new_plan_samples[f] for f in fps],
                ),
            )

        queries: dict[tuple[str, str], tuple[float, float, str | None, str | None]] = {}
        for i in range(len(obs)):
            qkey = (obs.cluster_id[i], obs.query_hash[i])
            ts = obs.execution_timestamp[i]
            seen = queries.get(qkey)
            if seen is None:
                queries[qkey] = (ts, ts, obs.query_type[i], obs.query_text[i])
            else:
                queries[qkey] = (min(seen[0], ts), max(seen[1], ts), seen[2] or obs.query_type[i],
                                 seen[3] or obs.query_text[i])  # fmt: skip
        if queries:
            qkeys = sorted(queries)
            cur.execute(
                """INSERT INTO planpipe.query_catalog AS q
                       (cluster_id, query_hash, first_seen, last_seen, query_type, query_text)
                   SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[],
                                        %s::text[], %s::text[])
                   ON CONFLICT (cluster_id, query_hash) DO UPDATE SET
                       first_seen = least(q.first_seen, excluded.first_seen),
                       last_seen = greatest(q.last_seen, excluded.last_seen),
                       query_type = coalesce(q.query_type, excluded.query_type),
                       query_text = coalesce(q.query_text, excluded.query_text)""",
                (
                    [k[0] for k in qkeys],
                    [k[1] for k in qkeys],
                    [_ts(queries[k][0]) for k in qkeys],
                    [_ts(queries[k][1]) for k in qkeys],
                    [queries[k][2] for k in qkeys],
                    [queries[k][3] for k in qkeys],
                ),
            )

        if baselines:
            keys = list(baselines)
            aggs = [baselines[k] for k in keys]
            # New plans get the next plan_version of their query; the first plan of a
            # query is accepted, later ones start as candidates (SQL Plan Management).
            cur.execute(
                """WITH incoming AS (
                       SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[],
                                            %s::timestamptz[], %s::bigint[], %s::float8[], %s::float8[],
                                            %s::float8[], %s::numeric[], %s::jsonb[])
                           AS t(cluster_id, query_hash, fingerprint, first_seen, last_seen, executions,
                                time_sum, time_min, time_max, rows_sum, hist)
                   ), numbered AS (
                       SELECT i.*,
                              coalesce((SELECT max(plan_version) FROM planpipe.plan_baselines b
                                        WHERE b.cluster_id = i.cluster_id AND b.query_hash = i.query_hash), 0)
                              + row_number() OVER (PARTITION BY i.cluster_id, i.query_hash
                                                   ORDER BY i.first_seen, i.fingerprint) AS version,
                              NOT EXISTS (SELECT 1 FROM planpipe.plan_baselines b
                                          WHERE b.cluster_id = i.cluster_id AND b.query_hash = i.query_hash)
                              AND row_number() OVER (PARTITION BY i.cluster_id, i.query_hash
                                                     ORDER BY i.first_seen, i.fingerprint) = 1 AS first_plan
                       FROM incoming i
                   )
                   INSERT INTO planpipe.plan_baselines AS b
                       (cluster_id, query_hash, fingerprint, plan_version, status, status_by, status_at,
                        first_seen, last_seen, executions, total_time_sum, total_time_min, total_time_max,
                        rows_sum, latency_hist)
                   SELECT cluster_id, query_hash, fingerprint, version,
                          CASE WHEN first_plan THEN 'accepted' ELSE 'candidate' END,
                          CASE WHEN first_plan THEN 'planpipe:first-plan' END,
                          CASE WHEN first_plan THEN now() END,
                          first_seen, last_seen, executions, time_sum, time_min, time_max, rows_sum, hist
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
                (
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [_ts(a.first_seen) for a in aggs],
                    [_ts(a.last_seen) for a in aggs],
                    [a.executions for a in aggs],
                    [a.time_sum for a in aggs],
                    [a.time_min for a in aggs],
                    [a.time_max for a in aggs],
                    [a.rows_sum for a in aggs],
                    [_hist_json(a.hist) for a in aggs],
                ),
            )

        if rollups:
            keys = list(rollups)
            aggs = [rollups[k] for k in keys]
            cur.execute(
                """INSERT INTO planpipe.plan_rollups_hourly AS r
                       (cluster_id, query_hash, fingerprint, hour, route, executions, total_time_sum,
                        rows_sum, latency_hist)
                   SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[],
                                        %s::bigint[], %s::float8[], %s::numeric[], %s::jsonb[])
                   ON CONFLICT (cluster_id, query_hash, fingerprint, hour) DO UPDATE SET
                       executions = r.executions + excluded.executions,
                       total_time_sum = r.total_time_sum + excluded.total_time_sum,
                       rows_sum = r.rows_sum + excluded.rows_sum,
                       latency_hist = excluded.latency_hist""",
                (
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [datetime.fromisoformat(k[3]) for k in keys],
                    [a.route for a in aggs],
                    [a.executions for a in aggs],
                    [a.time_sum for a in aggs],
                    [a.rows_sum for a in aggs],
                    [_hist_json(a.hist) for a in aggs],
                ),
            )

        cur.execute(
            """INSERT INTO planpipe.consumer_offsets AS o (consumer_group, topic, partition, next_offset)
               SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[])
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
