"""The statistical core of plan-regression detection (no PostgreSQL): did a query's new
plan, its data or its machine make it slower, and since when?

For every (cluster, query) with executions in the lookback (default 7 days):

* baseline: the accepted plan; when it was accepted automatically (the ingest accepts a
  query's first plan), the dominant plan of the query's settling period (its first
  `settling_executions` executions or `settling_hours`, whichever ends first) instead;
  a one-off first plan never becomes the yardstick. Plans seen during the settling
  period besides the baseline are the query's alternatives (a plan that depends on
  constants): each is judged against its own history, never as a flip;
* plan flip: each later plan is compared with the baseline plan's executions;
* same plan: each baseline or alternative plan's latency series (in execution order)
  is split where its level changed (PELT on log latency, see
  `stats.find_change`); the current level is compared with what came before it. With
  `window_hours` the split is the window's start instead.

A comparison becomes a finding when the ratio of medians and their absolute difference
pass the thresholds, both sides have enough executions, and a Mann-Whitney U test
rejects "same distribution" after Benjamini-Hochberg across the run (or at `alpha`
per comparison). A same-plan slowdown whose work (blocks, rows: `planpipe.plans.work`)
did not change is an environment slowdown, not a query regression; several in one
cluster make one cluster_slowdown, and a query is flagged then only if it slowed well
beyond its cluster's shift.

Memory stays bounded however large the dataset is: only the needed columns are read,
the lookback is pushed down to the scan and the date partitions, and streaming
group-bys reduce it to per-plan counts, latency histograms and per-plan time slots.
The histograms bracket each exact median, which screens out plan flips that cannot
pass the thresholds; the time slots screen out series whose level never moved. Raw
observations are collected only for the comparisons left, and verdicts are computed
on them exactly.
"""

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from planpipe.ingest.parquet_sink import live_files
from planpipe.plans import latency
from planpipe.plans.stats import MannWhitney, SampleStats, benjamini_hochberg, find_change, mann_whitney_u
from planpipe.plans.verdicts import (
    SEVERITY_ORDER,
    ClusterSlowdown,
    Comparison,
    DetectionConfig,
    Evidence,
    Verdict,
    WorkSide,
    classify,
    severity_of,
)
from planpipe.plans.work import WORK_COLUMNS

__all__ = ["Analysis", "DetectionStats", "SettledBaseline", "find_regressions", "scan_observations"]

log = logging.getLogger(__name__)

OBSERVATION_COLUMNS: Final[dict[str, pl.DataType | type[pl.DataType]]] = {
    "cluster_id": pl.String,
    "query_hash": pl.String,
    "fingerprint": pl.String,
    "execution_timestamp": pl.Float64,
    "total_time_ms": pl.Float64,
    "shared_blocks": pl.Int64,
    "temp_blocks": pl.Int64,
    "top_rows": pl.Float64,
    "top_loops": pl.Int64,
}

# Streaming group-by keys pack (plan group hash, low bits) into one UInt64: a single integer
# key keeps the hash tables several times smaller than string or multi-column keys. The group
# hash keeps its top 53 bits; a collision between two plans is detected and never merges verdicts.
_LOW_BITS: Final = 2048
_RECENT_BIT: Final = 1024  # histogram keys: 1 bit for "new side" + 10 bits for the bucket
_SLOTS: Final = 64  # time slots per plan over [first execution, now] (screening and settling)
assert latency.BUCKETS <= _RECENT_BIT
_EDGE_SLACK: Final = 1e-9  # float rounding at bucket edges: widen brackets a hair
_STREAMING_CHUNK_ROWS: Final = 20_000
_KEEP_FOR_RESOLUTION: Final = 2_000  # latest executions kept per watched plan


def scan_observations(root: Path) -> pl.LazyFrame | None:
    """The observations dataset reduced to the columns detection reads (never plan_text);
    None while the dataset holds no file yet. Files written before the work columns
    existed read as null work; files that compaction already merged into another are
    skipped (`parquet_sink.live_files`), so no execution counts twice."""
    files = live_files(root) if root.exists() else []
    if not files:
        return None
    return pl.scan_parquet(
        [str(f) for f in files],
        hive_partitioning=True,
        hive_schema={"route": pl.String, "date": pl.String},
        schema=OBSERVATION_COLUMNS,
        extra_columns="ignore",
        missing_columns="insert",
    )


def _query_key() -> pl.Expr:
    return pl.struct("cluster_id", "query_hash").hash()


def _group_key() -> pl.Expr:
    return pl.struct("cluster_id", "query_hash", "fingerprint").hash() // _LOW_BITS


def _bucket() -> pl.Expr:
    # Same buckets as latency.bucket_of: [BASE·G^(b-1), BASE·G^b), bucket 0 below BASE.
    ms = pl.col("total_time_ms")
    raw = ((ms / latency.BASE_MS).log() / math.log(latency.GROWTH)).floor() + 1
    return pl.when(ms < latency.BASE_MS).then(0).otherwise(raw.clip(upper_bound=latency.BUCKETS - 1)).cast(pl.UInt64)


def _lower_edges(buckets: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    edges = latency.BASE_MS * np.power(latency.GROWTH, buckets.astype(np.float64) - 1) * (1 - _EDGE_SLACK)
    return np.where(buckets == 0, 0.0, edges)


def _upper_edges(buckets: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    edges = latency.BASE_MS * np.power(latency.GROWTH, buckets.astype(np.float64)) * (1 + _EDGE_SLACK)
    return np.where(buckets >= latency.BUCKETS - 1, np.inf, edges)


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return moment.timestamp()


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


Baselines = Mapping[tuple[str, str], str] | pl.DataFrame


def _baseline_frame(baselines: Baselines, auto_accepted: Iterable[tuple[str, str]]) -> pl.DataFrame:
    """(cluster, query) → accepted fingerprint, and whether that plan was accepted automatically."""
    if isinstance(baselines, pl.DataFrame):
        frame = baselines.select(pl.col("cluster_id", "query_hash", "fingerprint").cast(pl.String))
    else:
        keys = list(baselines)
        frame = pl.DataFrame(
            {
                "cluster_id": [k[0] for k in keys],
                "query_hash": [k[1] for k in keys],
                "fingerprint": [baselines[k] for k in keys],
            },
            schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String},
        )
    auto = set(auto_accepted)
    flags = [(c, q) in auto for c, q in frame.select("cluster_id", "query_hash").rows()] if auto else None
    return frame.select(
        _query_key().alias("qk"),
        _group_key().alias("accepted_gk"),
        pl.Series("auto", flags if flags is not None else [False] * frame.height, dtype=pl.Boolean),
    )


@dataclass(frozen=True)
class DetectionStats:
    observations: int = 0  # in the lookback and scope
    plans: int = 0  # (cluster, query, plan) groups in the lookback
    queries: int = 0
    queries_without_baseline: int = 0
    multi_plan_queries: int = 0  # queries with alternatives (plans seen in the settling period)
    settled_baselines: int = 0  # automatic baselines replaced by their settling period's dominant plan
    comparisons: int = 0  # plan flips + plan series with a baseline
    too_few_executions: int = 0
    screened_out: int = 0  # the histograms or time slots prove they cannot pass the thresholds
    tested: int = 0  # compared exactly on raw observations
    noise: int = 0  # tested, not a finding
    environment_slowdowns: int = 0  # slower with unchanged work
    hash_collisions: int = 0
    scan_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class SettledBaseline:
    """An automatic baseline that its settling period replaced."""

    cluster_id: str
    query_hash: str
    fingerprint: str  # the settling period's dominant plan
    replaced: str  # the automatically accepted first plan
    executions: int  # of the dominant plan in the settling period
    settling_executions: int  # of the query in the settling period


@dataclass(frozen=True)
class Recent:
    """The latest executions of a watched plan (an open finding's): what resolves it."""

    timestamps: npt.NDArray[np.float64]
    total_ms: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Analysis:
    """What `find_regressions` saw."""

    now: datetime
    config: DetectionConfig
    verdicts: list[Verdict]
    clusters: list[ClusterSlowdown]
    stats: DetectionStats
    settled: list[SettledBaseline]
    baselines: dict[tuple[str, str], str]  # the baselines used (settled ones included)
    recent: dict[tuple[str, str, str], Recent] = field(repr=False)  # watched plans' latest executions

    @property
    def findings(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind not in ("noise", "environment_slowdown")]


def _brackets(
    segments: npt.NDArray[np.uint64], buckets: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64]
) -> pl.DataFrame:
    """Per segment (one plan group's histogram, rows sorted by segment then bucket): its
    size n and a range [lo, hi] that surely holds the exact median.

    The median lies between the order statistics k_lo = ⌊(n+1)/2⌋ and k_hi = ⌊n/2⌋+1
    (equal for odd n), each inside the bucket where the running count first reaches
    its rank. Counts are ≥ 1, so the running count over all segments is increasing and
    one searchsorted finds those buckets for every segment at once.
    """
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]]) if len(segments) else np.zeros(0, np.int64)
    totals = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, np.int64)
    running = np.cumsum(counts)
    offset = running[starts] - counts[starts]
    first = np.searchsorted(running, offset + (totals + 1) // 2, side="left")
    last = np.searchsorted(running, offset + totals // 2 + 1, side="left")
    return pl.DataFrame(
        {"gk": segments[starts], "n": totals, "lo": _lower_edges(buckets[first]), "hi": _upper_edges(buckets[last])},
        schema={"gk": pl.UInt64, "n": pl.Int64, "lo": pl.Float64, "hi": pl.Float64},
    )


@dataclass
class _Scope:
    end: float
    lookback_start: float
    window_start: float | None
    t0: float  # first execution in scope
    slot_s: float

    def slot_of(self, epoch: float) -> int:
        return min(_SLOTS - 1, max(0, int((epoch - self.t0) / self.slot_s)))

    def slot_start(self, slot: int) -> float:
        return self.t0 + slot * self.slot_s


def find_regressions(
    observations: pl.LazyFrame | None,
    baselines: Baselines,
    config: DetectionConfig,
    *,
    now: datetime,
    auto_accepted: Iterable[tuple[str, str]] = (),
    watch: Iterable[tuple[str, str, str]] = (),
) -> Analysis:
    """The statistical core, callable without PostgreSQL.

    `observations`: a lazy frame with cluster_id, query_hash, fingerprint,
    execution_timestamp (epoch s), total_time_ms and optionally the work columns
    (e.g. `scan_observations`); an optional hive `date` column prunes partitions.
    `baselines`: (cluster_id, query_hash) → the accepted fingerprint, or a frame with
    those three columns. `auto_accepted`: the queries whose accepted plan was chosen
    automatically (settling may replace it). `watch`: plans of open findings, whose
    latest executions are kept in `Analysis.recent` to judge whether they resolved.
    """
    started = time.perf_counter()
    end = _epoch(now)
    lookback_start = end - config.lookback_hours * 3600
    window_start = end - config.window_hours * 3600 if config.window_hours is not None else None
    if observations is None:
        return Analysis(now, config, [], [], DetectionStats(), [], {}, {})
    names = set(observations.collect_schema().names())
    ts, ms = pl.col("execution_timestamp"), pl.col("total_time_ms")
    scoped = observations.filter(ts >= lookback_start, ts <= end, ms.is_finite() & (ms >= 0))
    if "date" in names:
        first_day, last_day = _when(lookback_start).date().isoformat(), _when(end).date().isoformat()
        scoped = scoped.filter(pl.col("date").is_between(pl.lit(first_day), pl.lit(last_day)))
    if config.clusters:
        scoped = scoped.filter(pl.col("cluster_id").is_in(list(config.clusters)))
    for column in WORK_COLUMNS:  # in-memory frames without work: unknown work
        if column not in names:
            scoped = scoped.with_columns(pl.lit(None, OBSERVATION_COLUMNS[column]).alias(column))

    with pl.Config(streaming_chunk_size=_STREAMING_CHUNK_ROWS):
        # Pass 1: the plan groups, with their size and time span.
        groups = (
            scoped.group_by("cluster_id", "query_hash", "fingerprint")
            .agg(pl.len().alias("n"), ts.min().alias("first"), ts.max().alias("last"))
            .collect(engine="streaming")
            .with_columns(_query_key().alias("qk"), _group_key().alias("gk"))
        )
        if groups.height == 0:
            return Analysis(now, config, [], [], DetectionStats(scan_seconds=time.perf_counter() - started), [], {}, {})
        collided = groups.filter(pl.col("gk").is_duplicated())
        groups = groups.filter(~pl.col("gk").is_duplicated())
        t0 = float(groups.get_column("first").min())  # type: ignore[arg-type]
        scope = _Scope(end, lookback_start, window_start, t0, max((end - t0) / _SLOTS, 1e-3))
        new_side = pl.lit(True) if window_start is None else ts >= window_start
        # Pass 2: latency histogram per plan and side (all executions, or the window's).
        packed = _group_key() * _LOW_BITS + new_side.cast(pl.UInt64) * _RECENT_BIT + _bucket()
        cells = scoped.group_by(packed.alias("key")).agg(pl.len().alias("n")).collect(engine="streaming")
        # Pass 3: executions and summed log latency per plan and time slot.
        slot = ((ts - scope.t0) / scope.slot_s).floor().clip(0, _SLOTS - 1).cast(pl.UInt64)
        slots = (
            scoped.group_by((_group_key() * _LOW_BITS + slot).alias("key"))
            .agg(pl.len().alias("n"), ms.clip(lower_bound=1e-3).log().sum().alias("s"))
            .collect(engine="streaming")
            .select((pl.col("key") // _LOW_BITS).alias("gk"), (pl.col("key") % _LOW_BITS).alias("slot"), "n", "s")
            .sort("gk", "slot")
        )
        log.info(
            "detection: %d plans, %d histogram cells, %d time slots after %.1fs",
            groups.height,
            cells.height,
            slots.height,
            time.perf_counter() - started,
        )

        base = _baseline_frame(baselines, auto_accepted)
        plans, settled = _settle(groups, base, slots, scope, config)
        watched = _watched_keys(groups, watch)
        flips, series = _comparisons(plans, cells, slots, scope, config)
        flip_candidates = flips.filter("candidate")
        series_candidates = series.filter(pl.col("candidate") | pl.col("gk").is_in(watched.implode()))
        wanted = pl.concat(
            [
                flip_candidates.get_column("new_gk"),
                flip_candidates.get_column("base_gk"),
                series_candidates.get_column("gk"),
                watched,
            ]
        ).unique()
        raw = _raw(scoped, wanted)

    hypotheses = int(flips.get_column("enough").sum()) + int(series.get_column("enough").sum())
    verdicts = _judge(
        raw,
        flip_candidates,
        series_candidates.filter("enough"),
        plans,
        hypotheses,
        scope,
        config,
        now,
        watched={int(g) for g in watched.to_list()},
    )
    verdicts, clusters = _environment(verdicts, config)
    recent = _recent(raw, plans, watched)
    verdicts.sort(
        key=lambda v: (v.kind in ("noise", "environment_slowdown"), SEVERITY_ORDER[v.severity], -v.evidence.ratio_p50)
    )
    names_of = {
        int(g): (str(c), str(q), str(f))
        for g, c, q, f in plans.select("gk", "cluster_id", "query_hash", "fingerprint").rows()
    }
    used = {
        names_of[int(g)][:2]: names_of[int(g)][2]
        for g in plans.filter(pl.col("gk") == pl.col("base_gk")).get_column("gk")
    }
    enough_flips, enough_series = flips.get_column("enough"), series.get_column("enough")
    stats = DetectionStats(
        observations=int(groups.get_column("n").sum()),
        plans=groups.height,
        queries=groups.get_column("qk").n_unique(),
        queries_without_baseline=groups.filter(~pl.col("qk").is_in(base.get_column("qk").implode()))
        .get_column("qk")
        .n_unique(),
        multi_plan_queries=plans.filter("alternative").get_column("qk").n_unique(),
        settled_baselines=len(settled),
        comparisons=flips.height + series.height,
        too_few_executions=int((~enough_flips).sum()) + int((~enough_series).sum()),
        screened_out=int((enough_flips & ~flips.get_column("candidate")).sum())
        + int((enough_series & ~series.get_column("candidate")).sum()),
        tested=len(verdicts),
        noise=sum(1 for v in verdicts if v.kind == "noise"),
        environment_slowdowns=sum(1 for v in verdicts if v.kind == "environment_slowdown"),
        hash_collisions=collided.height,
        scan_seconds=round(time.perf_counter() - started, 3),
    )
    if collided.height:
        log.warning("detection: %d plan-group hash collisions; those plans were skipped", collided.height)
    return Analysis(now, config, verdicts, clusters, stats, settled, used, recent)


def _settle(
    groups: pl.DataFrame, base: pl.DataFrame, slots: pl.DataFrame, scope: _Scope, config: DetectionConfig
) -> tuple[pl.DataFrame, list[SettledBaseline]]:
    """Each plan with its query's baseline plan (`base_gk`) and whether it is an alternative.

    The settling period of a query: its first time slots up to `settling_executions`
    executions or `settling_hours` after its first execution, whichever ends first.
    """
    with_query = slots.join(groups.select("gk", "qk"), on="gk", how="inner")
    per_slot = with_query.group_by("qk", "slot").agg(pl.col("n").sum()).sort("qk", "slot")
    first_slot = per_slot.group_by("qk").agg(pl.col("slot").min().alias("first_slot"))
    hours_slots = math.ceil(config.settling_hours * 3600 / scope.slot_s)
    by_count = pl.col("slot").filter(pl.col("cum") >= config.settling_executions).min()
    by_time = pl.col("first_slot").first() + hours_slots
    settle = (
        per_slot.join(first_slot, on="qk")
        .with_columns(pl.col("n").cum_sum().over("qk").alias("cum"))
        .group_by("qk")
        .agg(
            pl.min_horizontal(by_count.fill_null(by_time), by_time).alias("settle_slot"),
            ((pl.col("cum").max() >= config.settling_executions) | (by_time < scope.slot_of(scope.end))).alias(
                "settled"
            ),
        )
    )
    in_period = (
        with_query.join(settle, on="qk")
        .filter(pl.col("slot") <= pl.col("settle_slot"))
        .group_by("qk", "gk")
        .agg(pl.col("n").sum().alias("n_settling"))
    )
    total = in_period.group_by("qk").agg(pl.col("n_settling").sum().alias("settling_total"))
    dominant = in_period.sort("n_settling", "gk", descending=[True, False]).group_by("qk").first()
    queries = (
        base.join(settle, on="qk", how="inner")
        .join(
            dominant.select("qk", pl.col("gk").alias("dominant_gk"), pl.col("n_settling").alias("dominant_n")),
            on="qk",
            how="left",
        )
        .join(total, on="qk", how="left")
        .join(
            in_period.select("qk", pl.col("gk").alias("accepted_gk"), pl.col("n_settling").alias("accepted_n")),
            on=["qk", "accepted_gk"],
            how="left",
        )
        .with_columns(
            # Replaced only by a plan that ran more often than the first one: a tie keeps it.
            base_gk=pl.when(
                pl.col("auto")
                & pl.col("settled")
                & pl.col("dominant_gk").is_not_null()
                & (pl.col("dominant_n") > pl.col("accepted_n").fill_null(0))
            )
            .then(pl.col("dominant_gk"))
            .otherwise(pl.col("accepted_gk"))
        )
    )
    plans = (
        groups.join(queries.select("qk", "base_gk", "accepted_gk", "settle_slot"), on="qk", how="inner")
        .join(in_period.select("gk", "n_settling"), on="gk", how="left")
        .with_columns(
            alternative=(pl.col("gk") != pl.col("base_gk")) & pl.col("n_settling").is_not_null(),
        )
    )
    names = {
        int(g): (str(c), str(q), str(f))
        for g, c, q, f in groups.select("gk", "cluster_id", "query_hash", "fingerprint").rows()
    }
    settled = []
    for base_gk, accepted_gk, dominant_n, total_n in (
        queries.filter(pl.col("base_gk") != pl.col("accepted_gk"))
        .select("base_gk", "accepted_gk", "dominant_n", "settling_total")
        .rows()
    ):
        if int(base_gk) in names and int(accepted_gk) in names:
            c, q, fp = names[int(base_gk)]
            settled.append(SettledBaseline(c, q, fp, names[int(accepted_gk)][2], int(dominant_n), int(total_n)))
    return plans, settled


def _watched_keys(groups: pl.DataFrame, watch: Iterable[tuple[str, str, str]]) -> pl.Series:
    wanted = list(dict.fromkeys(watch))
    if not wanted:
        return pl.Series("gk", [], dtype=pl.UInt64)
    frame = pl.DataFrame(
        {
            "cluster_id": [k[0] for k in wanted],
            "query_hash": [k[1] for k in wanted],
            "fingerprint": [k[2] for k in wanted],
        },
        schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String},
    ).select(_group_key().alias("gk"))
    return frame.join(groups.select("gk"), on="gk", how="semi").get_column("gk")


def _comparisons(
    plans: pl.DataFrame, cells: pl.DataFrame, slots: pl.DataFrame, scope: _Scope, config: DetectionConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Plan flips (judged from the histograms) and plan series (judged from the time slots),
    each with whether it has enough executions and could pass the thresholds."""
    m = config.min_executions
    # Plan flips: a later plan against the baseline plan's executions over the lookback.
    ordered = cells.sort("key")
    keys = ordered.get_column("key").to_numpy()
    counts = ordered.get_column("n").to_numpy().astype(np.int64)
    gks, is_new, buckets = keys // _LOW_BITS, (keys // _RECENT_BIT) % 2 == 1, keys % _RECENT_BIT
    new_rows = is_new
    merged, inverse = np.unique(gks * _RECENT_BIT + buckets, return_inverse=True)
    merged_counts = np.bincount(inverse, weights=counts, minlength=len(merged)).astype(np.int64)
    new_side = _brackets(gks[new_rows], buckets[new_rows], counts[new_rows]).rename(
        {"gk": "new_gk", "n": "n_new", "lo": "lo_new", "hi": "hi_new"}
    )
    base_side = _brackets(merged // _RECENT_BIT, merged % _RECENT_BIT, merged_counts).rename(
        {"gk": "base_gk", "n": "n_base", "lo": "lo_base", "hi": "hi_base"}
    )
    flips = (
        plans.filter((pl.col("gk") != pl.col("base_gk")) & ~pl.col("alternative"))
        .select(pl.col("gk").alias("new_gk"), "base_gk")
        .join(new_side, on="new_gk", how="inner")
        .join(base_side, on="base_gk", how="left")
        .with_columns(pl.col("n_new", "n_base").fill_null(0))
    )
    hi_new, lo_new, hi_base, lo_base = pl.col("hi_new"), pl.col("lo_new"), pl.col("hi_base"), pl.col("lo_base")
    maybe_slower = (hi_new >= config.min_ratio * lo_base) & (hi_new - lo_base >= config.min_abs_ms)
    maybe_faster = (hi_base >= config.min_ratio * lo_new) & (hi_base - lo_new >= config.min_abs_ms)
    enough = (pl.col("n_new") >= m) & (pl.col("n_base") >= m)
    flips = flips.with_columns(enough=enough, candidate=(enough & (maybe_slower | maybe_faster)).fill_null(False))

    # Plan series: every split between time slots with m executions on each side; a series is a
    # candidate when some split shows the later side's geometric mean clearly above the earlier's.
    # Lenient (half the thresholds): the exact change point and test decide on raw executions.
    in_series = plans.filter((pl.col("gk") == pl.col("base_gk")) | pl.col("alternative")).select("gk")
    cum_n, cum_s = pl.col("n").cum_sum().over("gk"), pl.col("s").cum_sum().over("gk")
    tot_n, tot_s = pl.col("n").sum().over("gk"), pl.col("s").sum().over("gk")
    splits = slots.join(in_series, on="gk", how="semi").with_columns(
        n_before=cum_n, s_before=cum_s, n_after=tot_n - cum_n, s_after=tot_s - cum_s, total=tot_n
    )
    if scope.window_start is not None:  # the split is the window's start
        first_new = scope.slot_of(scope.window_start)
        last_before = pl.col("slot").filter(pl.col("slot") < first_new).max().over("gk")
        splits = splits.filter(pl.col("slot") == last_before)
    mean_before = pl.col("s_before") / pl.col("n_before")
    mean_after = pl.col("s_after") / pl.col("n_after")
    valid = (pl.col("n_before") >= m) & (pl.col("n_after") >= m)
    shifted = (mean_after - mean_before >= 0.5 * math.log(config.min_ratio)) & (
        mean_after.exp() - mean_before.exp() >= 0.5 * config.min_abs_ms
    )
    series = (
        splits.group_by("gk")
        .agg((valid & shifted).any().alias("candidate"), pl.col("total").first())
        .join(in_series, on="gk", how="right")
        .with_columns(pl.col("candidate").fill_null(False), pl.col("total").fill_null(0))
        .with_columns(enough=pl.col("total") >= 2 * m)
    )
    return flips, series


def _raw(scoped: pl.LazyFrame, wanted: pl.Series) -> dict[int, pl.DataFrame]:
    """The executions of the wanted plans, in time order, with their work per execution."""
    if wanted.len() == 0:
        return {}
    shared, temp = pl.col("shared_blocks"), pl.col("temp_blocks")
    frame = (
        scoped.select(
            _group_key().alias("gk"),
            "execution_timestamp",
            "total_time_ms",
            pl.when(shared.is_null())  # without BUFFERS the plan reports no blocks at all
            .then(None)
            .otherwise(shared.fill_null(0) + temp.fill_null(0))
            .cast(pl.Float64)
            .alias("blocks"),
            (pl.col("top_rows") * pl.col("top_loops").fill_null(1)).alias("rows"),
        )
        .filter(pl.col("gk").is_in(wanted.implode()))
        .collect(engine="streaming")
        .sort("gk", "execution_timestamp")
    )
    return {int(gk): part for (gk,), part in frame.partition_by("gk", as_dict=True).items()}


def _work(part: pl.DataFrame) -> WorkSide:
    blocks, rows = part.get_column("blocks").drop_nulls(), part.get_column("rows").drop_nulls()
    return WorkSide(
        blocks=float(blocks.median()) if blocks.len() else None,  # type: ignore[arg-type]
        rows=float(rows.median()) if rows.len() else None,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class _Tested:
    new_gk: int
    base_gk: int
    comparison: Comparison
    split: str
    base: pl.DataFrame
    new: pl.DataFrame
    test: MannWhitney


def _judge(
    raw: Mapping[int, pl.DataFrame],
    flips: pl.DataFrame,
    series: pl.DataFrame,
    plans: pl.DataFrame,
    hypotheses: int,
    scope: _Scope,
    config: DetectionConfig,
    now: datetime,
    watched: set[int],
) -> list[Verdict]:
    """Exact verdicts on raw executions: flips as they are, series split at their change point
    (a watched series, an open finding's, always gets its verdict: it may show the return)."""
    tested: list[_Tested] = []
    for new_gk, base_gk in flips.select("new_gk", "base_gk").rows():
        new, base = raw.get(int(new_gk)), raw.get(int(base_gk))
        if new is None or base is None:
            continue
        if scope.window_start is not None:
            new = new.filter(pl.col("execution_timestamp") >= scope.window_start)
        last_new = new.get_column("execution_timestamp").max() if new.height else None
        if (
            last_new is not None
            and (base.get_column("execution_timestamp") > last_new).sum() >= config.resolve_executions
        ):
            continue  # the query is back on its baseline plan: the flip is over
        if new.height and base.height:
            test = mann_whitney_u(
                base.get_column("total_time_ms").to_numpy(), new.get_column("total_time_ms").to_numpy()
            )
            tested.append(_Tested(int(new_gk), int(base_gk), "plan_flip", "plan", base, new, test))
    for (series_gk,) in series.select("gk").rows():
        gk = int(series_gk)
        part = raw.get(gk)
        if part is None:
            continue
        timings = part.get_column("total_time_ms").to_numpy()
        if scope.window_start is not None:
            index = int(np.searchsorted(part.get_column("execution_timestamp").to_numpy(), scope.window_start))
            split = "window"
        else:
            log_ms = np.log(np.maximum(timings, 1e-3))
            if gk not in watched and not _may_shift(log_ms, config):
                continue
            change = find_change(log_ms, config.min_executions, min_shift=0.5 * math.log(config.min_ratio))
            if change is None:
                continue
            index, split = change.index, "change_point"
        if min(index, len(timings) - index) < config.min_executions:
            continue
        test = mann_whitney_u(timings[:index], timings[index:])
        tested.append(_Tested(int(gk), int(gk), "same_plan", split, part[:index], part[index:], test))

    adjusted: list[float | None] = (
        list(benjamini_hochberg([t.test.p_value for t in tested], hypotheses)) if config.fdr else [None] * len(tested)
    )
    names = {
        int(g): (str(c), str(q), str(f))
        for g, c, q, f in plans.select("gk", "cluster_id", "query_hash", "fingerprint").rows()
    }
    verdicts: list[Verdict] = []
    for t, p_adjusted in zip(tested, adjusted, strict=True):
        base_ms = t.base.get_column("total_time_ms").to_numpy()
        new_ms = t.new.get_column("total_time_ms").to_numpy()
        base_stats, new_stats = SampleStats.of(base_ms), SampleStats.of(new_ms)
        decisive = t.test.p_value if p_adjusted is None else p_adjusted
        kind, reason = classify(t.comparison, base_stats, new_stats, decisive, config)
        new_ts, base_ts = t.new.get_column("execution_timestamp"), t.base.get_column("execution_timestamp")
        evidence = Evidence(
            comparison=t.comparison,
            baseline=base_stats,
            new=new_stats,
            test=t.test,
            alpha=config.alpha,
            window_start=_when(float(new_ts.min())),  # type: ignore[arg-type]
            window_end=now,
            baseline_start=_when(float(base_ts.min())),  # type: ignore[arg-type]
            baseline_end=_when(float(base_ts.max())),  # type: ignore[arg-type]
            p_adjusted=p_adjusted,
            split=t.split,  # type: ignore[arg-type]
            work_baseline=_work(t.base),
            work_new=_work(t.new),
        )
        if kind == "same_plan_slower" and evidence.work_unchanged(config.work_tolerance):
            kind = "environment_slowdown"
            reason += (
                f"; work unchanged (blocks ×{_fmt(evidence.work_ratio_blocks)}, rows "
                f"×{_fmt(evidence.work_ratio_rows)}): the environment, not the query"
            )
        elif kind == "same_plan_slower" and evidence.work_unchanged(config.work_tolerance) is False:
            reason += (
                f"; more work on the same plan (blocks ×{_fmt(evidence.work_ratio_blocks)}, rows "
                f"×{_fmt(evidence.work_ratio_rows)}): data growth or bloat"
            )
        cluster_id, query_hash, new_fp = names[t.new_gk]
        verdicts.append(
            Verdict(
                cluster_id=cluster_id,
                query_hash=query_hash,
                baseline_fingerprint=names[t.base_gk][2],
                new_fingerprint=new_fp,
                kind=kind,
                severity=severity_of(kind, evidence.ratio_p50, evidence.delta_p95_ms, config),
                reason=reason,
                evidence=evidence,
            )
        )
    return verdicts


def _may_shift(log_ms: npt.NDArray[np.float64], config: DetectionConfig) -> bool:
    """The slot screen again on the raw series (every split, O(n)): could any split with enough
    executions on both sides rise by half the thresholds? Spares change-point searches on the
    noisy series the coarser slots let through (measured: most of the exact stage at 10 M)."""
    m, n = config.min_executions, len(log_ms)
    if n < 2 * m:
        return False
    cum = np.cumsum(log_ms)
    k = np.arange(m, n - m + 1)
    before = cum[k - 1] / k
    after = (cum[-1] - cum[k - 1]) / (n - k)
    rise = (after - before >= 0.5 * math.log(config.min_ratio)) & (
        np.exp(after) - np.exp(before) >= 0.5 * config.min_abs_ms
    )
    return bool(rise.any())


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _environment(verdicts: list[Verdict], config: DetectionConfig) -> tuple[list[Verdict], list[ClusterSlowdown]]:
    """Environment slowdowns grouped per cluster; a query far beyond its cluster's shift is flagged."""
    by_cluster: dict[str, list[Verdict]] = {}
    for v in verdicts:
        if v.kind == "environment_slowdown":
            by_cluster.setdefault(v.cluster_id, []).append(v)
    clusters: list[ClusterSlowdown] = []
    beyond: dict[int, Verdict] = {}
    for cluster_id, affected in sorted(by_cluster.items()):
        if len(affected) < config.cluster_min_queries:
            continue
        shift = float(np.median([v.evidence.ratio_p50 for v in affected]))
        starts = sorted(v.evidence.window_start for v in affected)
        clusters.append(ClusterSlowdown(cluster_id, starts[len(starts) // 2], shift, tuple(affected)))
        for v in affected:
            if v.evidence.ratio_p50 >= shift * config.min_ratio:
                beyond[id(v)] = replace(
                    v,
                    kind="same_plan_slower",
                    severity=severity_of("same_plan_slower", v.evidence.ratio_p50, v.evidence.delta_p95_ms, config),
                    reason=f"{v.reason}; slowed {v.evidence.ratio_p50 / shift:.2f}× beyond its cluster's shift",
                )
    return [beyond.get(id(v), v) for v in verdicts], clusters


def _recent(
    raw: Mapping[int, pl.DataFrame], plans: pl.DataFrame, watched: pl.Series
) -> dict[tuple[str, str, str], Recent]:
    names = {
        int(g): (str(c), str(q), str(f))
        for g, c, q, f in plans.select("gk", "cluster_id", "query_hash", "fingerprint").rows()
    }
    out: dict[tuple[str, str, str], Recent] = {}
    for gk in watched.to_list():
        part = raw.get(int(gk))
        if part is None or int(gk) not in names:
            continue
        tail = part.tail(_KEEP_FOR_RESOLUTION)
        out[names[int(gk)]] = Recent(
            tail.get_column("execution_timestamp").to_numpy(), tail.get_column("total_time_ms").to_numpy()
        )
    return out
