"""Screens on the streaming passes' aggregates: which plan flips (latency histograms) and
which plan series (time slots) could pass the thresholds, so only those are read raw."""

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from planpipe.plans import latency
from planpipe.plans.scan import LOW_BITS, RECENT_BIT, Scope
from planpipe.plans.verdicts import DetectionConfig

__all__ = ["comparisons"]

_EDGE_SLACK: Final = 1e-9  # float rounding at bucket edges: widen brackets a hair


def _lower_edges(buckets: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    edges = latency.BASE_MS * np.power(latency.GROWTH, buckets.astype(np.float64) - 1) * (1 - _EDGE_SLACK)
    return np.where(buckets == 0, 0.0, edges)


def _upper_edges(buckets: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    edges = latency.BASE_MS * np.power(latency.GROWTH, buckets.astype(np.float64)) * (1 + _EDGE_SLACK)
    return np.where(buckets >= latency.BUCKETS - 1, np.inf, edges)


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


def comparisons(
    plans: pl.DataFrame, cells: pl.DataFrame, slots: pl.DataFrame, scope: Scope, config: DetectionConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Plan flips (judged from the histograms) and plan series (judged from the time slots),
    each with whether it has enough executions and could pass the thresholds."""
    m = config.min_executions
    # Plan flips: a later plan against the baseline plan's executions over the lookback.
    ordered = cells.sort("key")
    keys = ordered.get_column("key").to_numpy()
    counts = ordered.get_column("n").to_numpy().astype(np.int64)
    gks, is_new, buckets = keys // LOW_BITS, (keys // RECENT_BIT) % 2 == 1, keys % RECENT_BIT
    new_rows = is_new
    merged, inverse = np.unique(gks * RECENT_BIT + buckets, return_inverse=True)
    merged_counts = np.bincount(inverse, weights=counts, minlength=len(merged)).astype(np.int64)
    new_side = _brackets(gks[new_rows], buckets[new_rows], counts[new_rows]).rename(
        {"gk": "new_gk", "n": "n_new", "lo": "lo_new", "hi": "hi_new"}
    )
    base_side = _brackets(merged // RECENT_BIT, merged % RECENT_BIT, merged_counts).rename(
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
