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

This module runs those steps in order; each step has its own module: `scan` (columns,
scope, packed keys), `settling` (the yardstick plan of each query), `screening` (what the
aggregates rule out), `judging` (exact verdicts, environment slowdowns, watched plans).
PostgreSQL comes in only in `detector` (one run end to end) and `findings` (the store).
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import polars as pl

from planpipe.plans.judging import Recent, environment, judge, raw_executions, recent_executions
from planpipe.plans.plan_key import PLAN_COLUMNS, PLAN_KEY, fill_plan_keys
from planpipe.plans.scan import (
    LOW_BITS,
    OBSERVATION_COLUMNS,
    RECENT_BIT,
    SLOTS,
    Scope,
    bucket_of,
    epoch,
    group_key,
    group_keys_of,
    query_key,
    when,
)
from planpipe.plans.screening import comparisons
from planpipe.plans.settling import Baselines, SettledBaseline, baseline_frame, settle
from planpipe.plans.verdicts import SEVERITY_ORDER, ClusterSlowdown, DetectionConfig, Verdict
from planpipe.plans.work import WORK_COLUMNS

__all__ = ["Analysis", "DetectionStats", "find_regressions"]

log = logging.getLogger(__name__)

_STREAMING_CHUNK_ROWS: Final = 20_000


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
    end = epoch(now)
    lookback_start = end - config.lookback_hours * 3600
    window_start = end - config.window_hours * 3600 if config.window_hours is not None else None
    if observations is None:
        return Analysis(now, config, [], [], DetectionStats(), [], {}, {})
    names = set(observations.collect_schema().names())
    ts, ms = pl.col("execution_timestamp"), pl.col("total_time_ms")
    scoped = observations.filter(ts >= lookback_start, ts <= end, ms.is_finite() & (ms >= 0))
    if "date" in names:
        first_day, last_day = when(lookback_start).date().isoformat(), when(end).date().isoformat()
        scoped = scoped.filter(pl.col("date").is_between(pl.lit(first_day), pl.lit(last_day)))
    if config.clusters:
        scoped = scoped.filter(pl.col("cluster_id").is_in(list(config.clusters)))
    for column in WORK_COLUMNS:  # in-memory frames without work: unknown work
        if column not in names:
            scoped = scoped.with_columns(pl.lit(None, OBSERVATION_COLUMNS[column]).alias(column))
    scoped = fill_plan_keys(scoped)  # rows written before the ingest wrote the key

    with pl.Config(streaming_chunk_size=_STREAMING_CHUNK_ROWS):
        # Pass 1: the plan groups, with their size and time span. Every pass groups by the integer
        # plan key; the three strings are read here only, and kept once per plan.
        groups = (
            scoped.group_by(PLAN_KEY)
            .agg(pl.len().alias("n"), ts.min().alias("first"), ts.max().alias("last"), pl.col(*PLAN_COLUMNS).first())
            .collect(engine="streaming")
            .drop_nulls(PLAN_KEY)  # rows without cluster, query or fingerprint belong to no plan
            .with_columns(query_key().alias("qk"), group_key().alias("gk"))
        )
        if groups.height == 0:
            return Analysis(now, config, [], [], DetectionStats(scan_seconds=time.perf_counter() - started), [], {}, {})
        collided = groups.filter(pl.col("gk").is_duplicated())
        groups = groups.filter(~pl.col("gk").is_duplicated())
        t0 = float(groups.get_column("first").min())  # type: ignore[arg-type]
        scope = Scope(end, lookback_start, window_start, t0, max((end - t0) / SLOTS, 1e-3))
        new_side = pl.lit(True) if window_start is None else ts >= window_start
        # Pass 2: latency histogram per plan and side (all executions, or the window's).
        packed = group_key() * LOW_BITS + new_side.cast(pl.UInt64) * RECENT_BIT + bucket_of()
        cells = scoped.group_by(packed.alias("key")).agg(pl.len().alias("n")).collect(engine="streaming")
        # Pass 3: executions and summed log latency per plan and time slot.
        slot = ((ts - scope.t0) / scope.slot_s).floor().clip(0, SLOTS - 1).cast(pl.UInt64)
        slots = (
            scoped.group_by((group_key() * LOW_BITS + slot).alias("key"))
            .agg(pl.len().alias("n"), ms.clip(lower_bound=1e-3).log().sum().alias("s"))
            .collect(engine="streaming")
            .select((pl.col("key") // LOW_BITS).alias("gk"), (pl.col("key") % LOW_BITS).alias("slot"), "n", "s")
            .sort("gk", "slot")
        )
        log.info(
            "detection: %d plans, %d histogram cells, %d time slots after %.1fs",
            groups.height,
            cells.height,
            slots.height,
            time.perf_counter() - started,
        )

        base = baseline_frame(baselines, auto_accepted)
        plans, settled = settle(groups, base, slots, scope, config)
        watched = _watched_keys(groups, watch)
        flips, series = comparisons(plans, cells, slots, scope, config)
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
        raw = raw_executions(scoped, wanted)

    hypotheses = int(flips.get_column("enough").sum()) + int(series.get_column("enough").sum())
    verdicts = judge(
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
    verdicts, clusters = environment(verdicts, config)
    recent = recent_executions(raw, plans, watched)
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
    )
    frame = frame.select(group_keys_of(frame).alias("gk"))
    return frame.join(groups.select("gk"), on="gk", how="semi").get_column("gk")
