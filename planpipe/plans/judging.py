"""Exact verdicts on the raw executions of the comparisons the screens left: change points,
Mann-Whitney U with Benjamini-Hochberg, work on both sides, environment slowdowns grouped per
cluster, and the latest executions of watched plans (what resolves an open finding)."""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from planpipe.plans.scan import Scope, group_key, when
from planpipe.plans.stats import MannWhitney, SampleStats, benjamini_hochberg, find_change, mann_whitney_u
from planpipe.plans.verdicts import (
    ClusterSlowdown,
    Comparison,
    DetectionConfig,
    Evidence,
    Verdict,
    WorkSide,
    classify,
    severity_of,
)

__all__ = ["Recent", "environment", "judge", "raw_executions", "recent_executions"]

_KEEP_FOR_RESOLUTION: Final = 2_000  # latest executions kept per watched plan


@dataclass(frozen=True)
class Recent:
    """The latest executions of a watched plan (an open finding's): what resolves it."""

    timestamps: npt.NDArray[np.float64]
    total_ms: npt.NDArray[np.float64]


def raw_executions(scoped: pl.LazyFrame, wanted: pl.Series) -> dict[int, pl.DataFrame]:
    """The executions of the wanted plans (plan groups), in time order, with their work per execution."""
    if wanted.len() == 0:
        return {}
    shared, temp = pl.col("shared_blocks"), pl.col("temp_blocks")
    frame = (
        scoped.with_columns(group_key().alias("gk"))
        .filter(pl.col("gk").is_in(wanted.implode()))
        .select(
            "gk",
            "execution_timestamp",
            "total_time_ms",
            pl.when(shared.is_null())  # without BUFFERS the plan reports no blocks at all
            .then(None)
            .otherwise(shared.fill_null(0) + temp.fill_null(0))
            .cast(pl.Float64)
            .alias("blocks"),
            (pl.col("top_rows") * pl.col("top_loops").fill_null(1)).alias("rows"),
        )
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


def judge(
    raw: Mapping[int, pl.DataFrame],
    flips: pl.DataFrame,
    series: pl.DataFrame,
    plans: pl.DataFrame,
    hypotheses: int,
    scope: Scope,
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
            window_start=when(float(new_ts.min())),  # type: ignore[arg-type]
            window_end=now,
            baseline_start=when(float(base_ts.min())),  # type: ignore[arg-type]
            baseline_end=when(float(base_ts.max())),  # type: ignore[arg-type]
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


def environment(verdicts: list[Verdict], config: DetectionConfig) -> tuple[list[Verdict], list[ClusterSlowdown]]:
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


def recent_executions(
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
