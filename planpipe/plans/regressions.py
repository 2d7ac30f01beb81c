"""Plan-regression detection: did a query's new plan (or its data) make it slower?

For every (cluster, query) with executions in the recent window (default 24 h):

* plan flip: each plan other than the query's baseline (its most recently accepted
  plan, view `planpipe.current_baselines`) that ran in the window is compared with
  the baseline plan's executions over the whole lookback (default 7 days, recent
  window included, so a query alternating between plans is compared with what ran
  alongside it);
* same plan: the baseline plan's recent executions are compared with its own
  executions earlier in the lookback (data growth, bloat, cache misses).

A comparison becomes a finding when the ratio of medians and their absolute
difference both pass the thresholds, both sides have enough executions, and a
Mann-Whitney U test (normal approximation, tie and continuity corrected) on the
raw observations rejects "same distribution" at `alpha`. Anything else is noise.
`alpha` applies to each comparison, as specified; a run over thousands of queries
therefore flags about alpha × (comparisons near the thresholds) noise findings.
`DetectionConfig(fdr=True)` adjusts the p-values with Benjamini-Hochberg across all
comparisons of the run, which bounds the expected share of false findings instead.

Memory stays bounded however large the Parquet dataset is: only five columns are
read, with the time window pushed down to the scan (and the date partitions), and
the streaming engine reduces the whole lookback to per-(query, plan, latency
bucket) counts keyed by 64-bit hashes. Those log-scale histograms (the buckets of
`planpipe.plans.latency`) bracket each exact median, which screens out every
comparison that cannot pass the thresholds. Raw observations are collected only for
the few comparisons left, and the verdict is computed on them exactly: the
histograms never decide a finding, they only skip work that could not produce one.
"""

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import psycopg
from psycopg.types.json import Jsonb

from planpipe.plans import latency
from planpipe.plans.diff import diff_plans
from planpipe.plans.normalize import PlanParseError

__all__ = [
    "FINDING_KINDS",
    "REGRESSION_KINDS",
    "Analysis",
    "Comparison",
    "DetectionConfig",
    "DetectionResult",
    "DetectionStats",
    "Evidence",
    "FindingKind",
    "Kind",
    "MannWhitney",
    "Regression",
    "RegressionNotFoundError",
    "RegressionStatus",
    "SampleStats",
    "Severity",
    "Verdict",
    "acknowledge_regression",
    "benjamini_hochberg",
    "classify",
    "current_baselines",
    "detect_regressions",
    "find_regressions",
    "get_regression",
    "list_regressions",
    "mann_whitney_u",
    "open_regression_candidates",
    "scan_observations",
    "severity_of",
]

log = logging.getLogger(__name__)

Kind = Literal["plan_flip_regression", "plan_flip_improvement", "same_plan_slower", "noise"]
FindingKind = Literal["plan_flip_regression", "plan_flip_improvement", "same_plan_slower"]
Severity = Literal["info", "medium", "high", "critical"]
Comparison = Literal["plan_flip", "same_plan"]
RegressionStatus = Literal["open", "acknowledged", "resolved"]

FINDING_KINDS: Final[tuple[FindingKind, ...]] = ("plan_flip_regression", "plan_flip_improvement", "same_plan_slower")
# Kinds that make a query slower: they feed the router's regression_candidate priority.
REGRESSION_KINDS: Final[tuple[FindingKind, ...]] = ("plan_flip_regression", "same_plan_slower")
SEVERITY_ORDER: Final[dict[str, int]] = {"critical": 0, "high": 1, "medium": 2, "info": 3}

# Serialises writers of plan_regressions (detection runs, plan acceptance) so an
# acceptance made during a detection run can never be undone by that run.
FINDINGS_LOCK: Final = 0x706C_7265  # "plre"
DETECTOR: Final = "planpipe:detect"

OBSERVATION_COLUMNS: Final[dict[str, pl.DataType | type[pl.DataType]]] = {
    "cluster_id": pl.String,
    "query_hash": pl.String,
    "fingerprint": pl.String,
    "execution_timestamp": pl.Float64,
    "total_time_ms": pl.Float64,
}

# The streaming group-by key packs (plan group hash, recent flag, latency bucket) into
# one UInt64: a single integer key keeps the hash tables several times smaller than
# string or multi-column keys. The group hash keeps its top 53 bits; a collision
# between two plans is detected on the raw rows and never silently merges verdicts.
_LOW_BITS: Final = 2048  # 2**11: 1 bit for "recent" + 10 bits for the bucket
_RECENT_BIT: Final = 1024
assert latency.BUCKETS <= _RECENT_BIT
_EDGE_SLACK: Final = 1e-9  # float rounding at bucket edges: widen brackets a hair
_STREAMING_CHUNK_ROWS: Final = 20_000

_ROLE_RECENT: Final = 0  # a plan's executions in the window
_ROLE_BEFORE: Final = 1  # the baseline plan's executions before the window
_ROLE_LOOKBACK: Final = 2  # the baseline plan's executions over the whole lookback


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds and windows. Every threshold must pass for a finding (see `classify`)."""

    window_hours: float = 24.0  # "recent": the executions being judged
    lookback_hours: float = 168.0  # baseline side: how far back the accepted plan's executions count
    min_ratio: float = 1.5  # p50 ratio, new / baseline (baseline / new for an improvement)
    min_abs_ms: float = 10.0  # absolute p50 difference
    min_executions: int = 20  # on each side
    alpha: float = 0.01  # Mann-Whitney U two-sided p-value must be below this
    high_ratio: float = 2.0  # severity high from this p50 ratio
    critical_ratio: float = 5.0  # severity critical from this p50 ratio ...
    critical_p95_delta_ms: float = 1000.0  # ... or when p95 grew by more than this
    # Benjamini-Hochberg across the run's comparisons: alpha then bounds the expected share
    # of false findings instead of each comparison's false-positive rate.
    fdr: bool = False
    clusters: tuple[str, ...] = ()  # empty: every cluster

    def __post_init__(self) -> None:
        if not 0 < self.window_hours < self.lookback_hours:
            raise ValueError("need 0 < window_hours < lookback_hours")
        if self.min_ratio <= 1:
            raise ValueError("min_ratio must be > 1")
        if self.min_abs_ms < 0 or self.min_executions < 2:
            raise ValueError("min_abs_ms must be >= 0 and min_executions >= 2")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be within (0, 1)")
        if not 1 < self.high_ratio <= self.critical_ratio:
            raise ValueError("need 1 < high_ratio <= critical_ratio")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"clusters": list(self.clusters)}


# --- statistics -------------------------------------------------------------------


@dataclass(frozen=True)
class MannWhitney:
    """Two-sided Mann-Whitney U test of `new` against `baseline`.

    `u` counts the (baseline, new) pairs where the new execution was slower, ties
    counting one half; `effect` = u / (n_baseline · n_new) is the probability that a
    new execution is slower than a baseline one (0.5: no difference).
    """

    u: float
    z: float
    p_value: float
    effect: float


def _average_ranks(values: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
    """1-based ranks with ties sharing their average rank, and Σ(t³ - t) over tie groups."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    group = np.cumsum(starts) - 1
    sizes = np.bincount(group).astype(np.float64)
    last_rank = np.cumsum(sizes)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = (last_rank - (sizes - 1) / 2)[group]
    return ranks, float(np.sum(sizes**3 - sizes))


def mann_whitney_u(baseline: npt.ArrayLike, new: npt.ArrayLike) -> MannWhitney:
    """Normal approximation with tie correction and continuity correction (as scipy's
    `mannwhitneyu(..., method="asymptotic")`); scipy is not a dependency."""
    x = np.asarray(baseline, dtype=np.float64)
    y = np.asarray(new, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    ranks, ties = _average_ranks(np.concatenate([x, y]))
    u = float(ranks[n1:].sum()) - n2 * (n2 + 1) / 2
    n = n1 + n2
    mean = n1 * n2 / 2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:  # every value tied: no evidence of any difference
        return MannWhitney(u=u, z=0.0, p_value=1.0, effect=u / (n1 * n2))
    distance = max(abs(u - mean) - 0.5, 0.0)
    z = math.copysign(distance / math.sqrt(variance), u - mean)
    p_value = min(1.0, math.erfc(abs(z) / math.sqrt(2)))
    return MannWhitney(u=u, z=z, p_value=p_value, effect=u / (n1 * n2))


@dataclass(frozen=True)
class SampleStats:
    executions: int
    p50_ms: float
    p95_ms: float
    mean_ms: float

    @classmethod
    def of(cls, values: npt.NDArray[np.float64]) -> "SampleStats":
        if len(values) == 0:
            raise ValueError("empty sample")
        p50, p95 = np.quantile(values, [0.5, 0.95])
        return cls(len(values), float(p50), float(p95), float(values.mean()))


def _ratio(new: float, baseline: float) -> float:
    if baseline > 0:
        return new / baseline
    return math.inf if new > 0 else 1.0


def severity_of(kind: Kind, ratio_p50: float, delta_p95_ms: float, config: DetectionConfig) -> Severity:
    """critical: ratio ≥ critical_ratio or p95 grew > critical_p95_delta_ms; high: ratio ≥ high_ratio."""
    if kind == "plan_flip_improvement" or kind == "noise":
        return "info"
    if ratio_p50 >= config.critical_ratio or delta_p95_ms > config.critical_p95_delta_ms:
        return "critical"
    if ratio_p50 >= config.high_ratio:
        return "high"
    return "medium"


def classify(
    comparison: Comparison, baseline: SampleStats, new: SampleStats, p_value: float, config: DetectionConfig
) -> tuple[Kind, str]:
    """The verdict for one comparison, with a one-line reason."""
    n = config.min_executions
    if baseline.executions < n or new.executions < n:
        return "noise", f"too few executions ({baseline.executions} baseline, {new.executions} new; need {n})"
    ratio = _ratio(new.p50_ms, baseline.p50_ms)
    delta = new.p50_ms - baseline.p50_ms
    slower = ratio >= config.min_ratio and delta >= config.min_abs_ms
    faster = comparison == "plan_flip" and _ratio(baseline.p50_ms, new.p50_ms) >= config.min_ratio
    faster = faster and -delta >= config.min_abs_ms
    if not (slower or faster):
        return "noise", f"p50 {baseline.p50_ms:.3f} → {new.p50_ms:.3f} ms is below the thresholds"
    if p_value >= config.alpha:
        return "noise", f"not significant (p = {p_value:.3g} ≥ {config.alpha})"
    verdict: Kind
    if comparison == "same_plan":
        verdict = "same_plan_slower"
    else:
        verdict = "plan_flip_regression" if slower else "plan_flip_improvement"
    return verdict, f"p50 {baseline.p50_ms:.3f} → {new.p50_ms:.3f} ms ({ratio:.2f}×), p = {p_value:.3g}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON (and jsonb) has no Infinity


@dataclass(frozen=True)
class Evidence:
    comparison: Comparison
    baseline: SampleStats
    new: SampleStats
    test: MannWhitney
    alpha: float
    window_start: datetime  # the new side's executions: [window_start, window_end]
    window_end: datetime
    baseline_start: datetime  # the baseline side: [baseline_start, baseline_end)
    baseline_end: datetime
    p_adjusted: float | None = None  # Benjamini-Hochberg, when the config asks for it

    @property
    def ratio_p50(self) -> float:
        return _ratio(self.new.p50_ms, self.baseline.p50_ms)

    @property
    def ratio_p95(self) -> float:
        return _ratio(self.new.p95_ms, self.baseline.p95_ms)

    @property
    def delta_p50_ms(self) -> float:
        return self.new.p50_ms - self.baseline.p50_ms

    @property
    def delta_p95_ms(self) -> float:
        return self.new.p95_ms - self.baseline.p95_ms

    def as_dict(self) -> dict[str, Any]:
        def side(stats: SampleStats, start: datetime, end: datetime) -> dict[str, Any]:
            return {
                "executions": stats.executions,
                "p50_ms": round(stats.p50_ms, 4),
                "p95_ms": round(stats.p95_ms, 4),
                "mean_ms": round(stats.mean_ms, 4),
                "from": start.isoformat(),
                "to": end.isoformat(),
            }

        return {
            "comparison": self.comparison,
            "baseline": side(self.baseline, self.baseline_start, self.baseline_end),
            "new": side(self.new, self.window_start, self.window_end),
            "ratio_p50": _finite(round(self.ratio_p50, 4)),
            "ratio_p95": _finite(round(self.ratio_p95, 4)),
            "delta_p50_ms": round(self.delta_p50_ms, 4),
            "delta_p95_ms": round(self.delta_p95_ms, 4),
            "test": "mann-whitney-u (two-sided, normal approximation, tie + continuity corrected)",
            "u": self.test.u,
            "z": round(self.test.z, 4),
            "p_value": self.test.p_value,
            "p_adjusted": self.p_adjusted,
            "effect": round(self.test.effect, 4),
            "alpha": self.alpha,
        }


@dataclass(frozen=True)
class Verdict:
    cluster_id: str
    query_hash: str
    baseline_fingerprint: str
    new_fingerprint: str  # the baseline's own fingerprint for same_plan comparisons
    kind: Kind
    severity: Severity
    reason: str
    evidence: Evidence


# --- the statistical core (no PostgreSQL) ------------------------------------------


def scan_observations(root: Path) -> pl.LazyFrame | None:
    """The observations dataset reduced to the columns detection reads (never plan_text);
    None while the dataset holds no file yet."""
    if next(root.glob("route=*/date=*/*.parquet"), None) is None:
        return None
    return pl.scan_parquet(
        str(root / "route=*" / "date=*" / "*.parquet"),
        hive_partitioning=True,
        hive_schema={"route": pl.String, "date": pl.String},
        schema=OBSERVATION_COLUMNS,
        extra_columns="ignore",
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


def _baseline_frame(baselines: Mapping[tuple[str, str], str] | pl.DataFrame) -> pl.DataFrame:
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
    return frame.select(_query_key().alias("qk"), _group_key().alias("base_gk"))


@dataclass(frozen=True)
class DetectionStats:
    observations: int = 0  # in the lookback and scope
    plans: int = 0  # (cluster, query, plan) groups in the lookback
    queries_recent: int = 0  # queries with executions in the window
    queries_without_baseline: int = 0  # ... of which have no accepted plan
    comparisons: int = 0  # plan-flip + same-plan comparisons with a baseline
    too_few_executions: int = 0
    screened_out: int = 0  # the histogram brackets prove they cannot pass the thresholds
    tested: int = 0  # compared exactly on raw observations
    noise: int = 0  # tested, not a finding
    hash_collisions: int = 0
    scan_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Analysis:
    """What `find_regressions` saw: the exactly tested comparisons and the per-plan counts."""

    now: datetime
    config: DetectionConfig
    verdicts: list[Verdict]
    stats: DetectionStats
    counts: pl.DataFrame = field(repr=False)  # gk, n_recent, n_before: executions per plan group

    @property
    def findings(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind != "noise"]

    def executions(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(cluster, query, fingerprint) → (executions in the window, before it within the lookback)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        frame = pl.DataFrame(
            {"cluster_id": [k[0] for k in wanted], "query_hash": [k[1] for k in wanted],
             "fingerprint": [k[2] for k in wanted]},
            schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String},
        ).with_columns(gk=_group_key())  # fmt: skip
        joined = frame.join(self.counts, on="gk", how="left").fill_null(0)
        return {
            (c, q, f): (int(r), int(b))
            for c, q, f, r, b in joined.select("cluster_id", "query_hash", "fingerprint", "n_recent", "n_before").rows()
        }


def _brackets(
    segments: npt.NDArray[np.uint64], buckets: npt.NDArray[np.uint64], counts: npt.NDArray[np.int64], role: int
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
        {
            "gk": segments[starts],
            "role": np.full(len(starts), role, dtype=np.int8),
            "n": totals,
            "lo": _lower_edges(buckets[first]),
            "hi": _upper_edges(buckets[last]),
        }
    )


def find_regressions(
    observations: pl.LazyFrame | None,
    baselines: Mapping[tuple[str, str], str] | pl.DataFrame,
    config: DetectionConfig,
    *,
    now: datetime,
) -> Analysis:
    """The statistical core, callable without PostgreSQL.

    `observations`: a lazy frame with cluster_id, query_hash, fingerprint,
    execution_timestamp (epoch s) and total_time_ms (e.g. `scan_observations`);
    an optional hive `date` column (YYYY-MM-DD) prunes whole partitions.
    `baselines`: (cluster_id, query_hash) → the accepted fingerprint to compare
    against, or a frame with those three columns.
    """
    started = time.perf_counter()
    end = _epoch(now)
    window_start = end - config.window_hours * 3600
    lookback_start = end - config.lookback_hours * 3600
    empty_counts = pl.DataFrame(schema={"gk": pl.UInt64, "n_recent": pl.UInt32, "n_before": pl.UInt32})
    if observations is None:
        return Analysis(now, config, [], DetectionStats(), empty_counts)

    ts, ms = pl.col("execution_timestamp"), pl.col("total_time_ms")
    scoped = observations.filter(ts >= lookback_start, ts <= end, ms.is_finite() & (ms >= 0))
    if "date" in observations.collect_schema().names():
        first_day = datetime.fromtimestamp(lookback_start, UTC).date().isoformat()
        last_day = datetime.fromtimestamp(end, UTC).date().isoformat()
        scoped = scoped.filter(pl.col("date").is_between(pl.lit(first_day), pl.lit(last_day)))
    if config.clusters:
        scoped = scoped.filter(pl.col("cluster_id").is_in(list(config.clusters)))
    recent = ts >= window_start

    # Smaller morsels than the default keep the streaming engine's buffers small; these
    # passes are dominated by hashing strings, not by per-morsel overhead.
    with pl.Config(streaming_chunk_size=_STREAMING_CHUNK_ROWS):
        # Pass 1a: which plan group belongs to which query, and how often each ran.
        counts_long = (
            scoped.group_by(_query_key().alias("qk"), _group_key().alias("gk"), recent.alias("recent"))
            .agg(pl.len().alias("n"))
            .collect(engine="streaming")
        )
        # Pass 1b: latency histogram per plan group and side, under a single packed integer key.
        packed = _group_key() * _LOW_BITS + recent.cast(pl.UInt64) * _RECENT_BIT + _bucket()
        cells = scoped.group_by(packed.alias("key")).agg(pl.len().alias("n")).collect(engine="streaming")
        log.info("detection: %d plan groups, %d histogram cells after %.1fs", counts_long.height, cells.height,
                 time.perf_counter() - started)  # fmt: skip

        groups = counts_long.group_by("gk").agg(
            pl.col("qk").first(),
            pl.col("qk").n_unique().alias("queries"),
            pl.col("n").filter(pl.col("recent")).sum().alias("n_recent"),
            pl.col("n").filter(~pl.col("recent")).sum().alias("n_before"),
        )
        collisions = groups.filter(pl.col("queries") > 1).height
        groups = groups.filter(pl.col("queries") == 1).drop("queries")
        base = _baseline_frame(baselines)
        with_base = groups.join(base, on="qk", how="inner").with_columns(is_base=pl.col("gk") == pl.col("base_gk"))
        recent_queries = groups.filter(pl.col("n_recent") > 0).get_column("qk").unique()
        comparisons = _screen(with_base, cells, config)
        candidates = comparisons.filter("candidate")
        verdicts: list[Verdict] = []
        if candidates.height:
            verdicts, raw_collisions = _test_candidates(
                scoped, candidates, comparisons.filter("enough").height, config,
                now=now, window_start=window_start, lookback_start=lookback_start,
            )  # fmt: skip
            collisions += raw_collisions

    enough = comparisons.get_column("enough")
    stats = DetectionStats(
        observations=int(counts_long.get_column("n").sum()),
        plans=groups.height,
        queries_recent=recent_queries.len(),
        queries_without_baseline=int((~recent_queries.is_in(base.get_column("qk").implode())).sum()),
        comparisons=comparisons.height,
        too_few_executions=int((~enough).sum()),
        screened_out=int((enough & ~comparisons.get_column("candidate")).sum()),
        tested=len(verdicts),
        noise=sum(1 for v in verdicts if v.kind == "noise"),
        hash_collisions=collisions,
        scan_seconds=round(time.perf_counter() - started, 3),
    )
    if collisions:
        log.warning("detection: %d plan-group hash collisions; those plans were skipped", collisions)
    counts = groups.select("gk", pl.col("n_recent").cast(pl.UInt32), pl.col("n_before").cast(pl.UInt32))
    return Analysis(now, config, verdicts, stats, counts)


def _screen(with_base: pl.DataFrame, cells: pl.DataFrame, config: DetectionConfig) -> pl.DataFrame:
    """Every comparison (new_gk, base_gk, role, comparison) with its sizes and whether it
    has enough executions and could pass the thresholds, judged from the histograms."""
    ordered = cells.sort("key")
    keys = ordered.get_column("key").to_numpy()
    counts = ordered.get_column("n").to_numpy().astype(np.int64)
    gks, is_recent, buckets = keys // _LOW_BITS, (keys // _RECENT_BIT) % 2 == 1, keys % _RECENT_BIT
    compared = np.isin(gks, with_base.get_column("gk").to_numpy())
    of_base = np.isin(gks, with_base.filter("is_base").get_column("gk").to_numpy())
    recent_rows, before_rows = compared & is_recent, of_base & ~is_recent
    # The baseline plan's lookback sample: both sides merged bucket by bucket.
    merged, inverse = np.unique(gks[of_base] * _RECENT_BIT + buckets[of_base], return_inverse=True)
    merged_counts = np.bincount(inverse, weights=counts[of_base], minlength=len(merged)).astype(np.int64)
    brackets = pl.concat(
        [
            _brackets(gks[recent_rows], buckets[recent_rows], counts[recent_rows], _ROLE_RECENT),
            _brackets(gks[before_rows], buckets[before_rows], counts[before_rows], _ROLE_BEFORE),
            _brackets(merged // _RECENT_BIT, merged % _RECENT_BIT, merged_counts, _ROLE_LOOKBACK),
        ]
    )
    new_side = brackets.filter(pl.col("role") == _ROLE_RECENT).select(
        pl.col("gk").alias("new_gk"), pl.col("n").alias("n_new"), pl.col("lo").alias("lo_new"),
        pl.col("hi").alias("hi_new"),
    )  # fmt: skip
    base_side = brackets.rename({"gk": "base_gk", "n": "n_base", "lo": "lo_base", "hi": "hi_base"})
    is_base = pl.col("is_base")
    pairs = with_base.filter(pl.col("n_recent") > 0).select(
        pl.col("gk").alias("new_gk"),
        "base_gk",
        pl.when(is_base).then(pl.lit(_ROLE_BEFORE, pl.Int8)).otherwise(pl.lit(_ROLE_LOOKBACK, pl.Int8)).alias("role"),
        pl.when(is_base).then(pl.lit("same_plan")).otherwise(pl.lit("plan_flip")).alias("comparison"),
    )
    comparisons = (
        pairs.join(new_side, on="new_gk", how="left")
        .join(base_side, on=["base_gk", "role"], how="left")
        .with_columns(pl.col("n_new", "n_base").fill_null(0))
    )
    enough = (pl.col("n_new") >= config.min_executions) & (pl.col("n_base") >= config.min_executions)
    # Could the exact medians pass the thresholds? Compare the extremes of both brackets.
    hi_new, lo_new, hi_base, lo_base = pl.col("hi_new"), pl.col("lo_new"), pl.col("hi_base"), pl.col("lo_base")
    maybe_slower = (hi_new >= config.min_ratio * lo_base) & (hi_new - lo_base >= config.min_abs_ms)
    maybe_faster = (pl.col("comparison") == "plan_flip") & (hi_base >= config.min_ratio * lo_new)
    maybe_faster = maybe_faster & (hi_base - lo_new >= config.min_abs_ms)
    return comparisons.with_columns(enough=enough, candidate=(enough & (maybe_slower | maybe_faster)).fill_null(False))


def benjamini_hochberg(p_values: Sequence[float], tests: int) -> list[float]:
    """Adjusted p-values (step-up, Benjamini-Hochberg 1995) for `p_values` out of `tests`
    hypotheses; the hypotheses not listed count as p = 1, which never changes the others."""
    if not p_values:
        return []
    m = max(tests, len(p_values))
    order = np.argsort(np.asarray(p_values), kind="mergesort")
    ranked = np.asarray(p_values, dtype=np.float64)[order] * m / np.arange(1, len(p_values) + 1)
    adjusted_sorted = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    adjusted = np.empty(len(p_values), dtype=np.float64)
    adjusted[order] = adjusted_sorted
    return [float(x) for x in adjusted]


def _test_candidates(
    scoped: pl.LazyFrame,
    candidates: pl.DataFrame,
    tests: int,
    config: DetectionConfig,
    *,
    now: datetime,
    window_start: float,
    lookback_start: float,
) -> tuple[list[Verdict], int]:
    """Pass 2: raw observations of the candidate plans only, and the exact verdicts."""
    wanted = pl.concat([candidates.get_column("new_gk"), candidates.get_column("base_gk")]).unique()
    raw = (
        scoped.select(
            _group_key().alias("gk"),
            "cluster_id",
            "query_hash",
            "fingerprint",
            (pl.col("execution_timestamp") >= window_start).alias("recent"),
            "total_time_ms",
        )
        .filter(pl.col("gk").is_in(wanted.implode()))
        .collect(engine="streaming")
    )
    names: dict[int, tuple[str, str, str]] = {}
    collided: set[int] = set()
    values: dict[tuple[int, int], npt.NDArray[np.float64]] = {}
    for (gk_value,), part in raw.partition_by("gk", as_dict=True).items():
        gk = int(gk_value)
        identity = part.select("cluster_id", "query_hash", "fingerprint").unique()
        if identity.height != 1:
            collided.add(gk)
            continue
        c, q, f = identity.row(0)
        names[gk] = (str(c), str(q), str(f))
        is_recent = part.get_column("recent").to_numpy()
        ms = part.get_column("total_time_ms").to_numpy().astype(np.float64, copy=False)
        values[(gk, _ROLE_RECENT)] = ms[is_recent]
        values[(gk, _ROLE_BEFORE)] = ms[~is_recent]
        values[(gk, _ROLE_LOOKBACK)] = ms

    tested: list[tuple[int, int, int, Comparison, SampleStats, SampleStats, MannWhitney]] = []
    for new_gk, base_gk, role, comparison in candidates.select("new_gk", "base_gk", "role", "comparison").rows():
        if new_gk not in names or base_gk not in names:
            continue
        new_values, base_values = values[(new_gk, _ROLE_RECENT)], values[(base_gk, role)]
        if len(new_values) and len(base_values):
            test = mann_whitney_u(base_values, new_values)
            tested.append((new_gk, base_gk, role, comparison, SampleStats.of(base_values),
                           SampleStats.of(new_values), test))  # fmt: skip
    # Every comparison with enough executions is a hypothesis, screened out or not.
    adjusted = benjamini_hochberg([t[6].p_value for t in tested], tests) if config.fdr else [None] * len(tested)

    window = datetime.fromtimestamp(window_start, UTC)
    verdicts: list[Verdict] = []
    for (new_gk, base_gk, role, comparison, base_stats, new_stats, test), p_adjusted in zip(
        tested, adjusted, strict=True
    ):
        decisive = test.p_value if p_adjusted is None else p_adjusted
        kind, reason = classify(comparison, base_stats, new_stats, decisive, config)
        evidence = Evidence(
            comparison=comparison,
            baseline=base_stats,
            new=new_stats,
            test=test,
            alpha=config.alpha,
            window_start=window,
            window_end=now,
            baseline_start=datetime.fromtimestamp(lookback_start, UTC),
            baseline_end=window if role == _ROLE_BEFORE else now,
            p_adjusted=p_adjusted,
        )
        cluster_id, query_hash, new_fp = names[new_gk]
        verdicts.append(
            Verdict(
                cluster_id=cluster_id,
                query_hash=query_hash,
                baseline_fingerprint=names[base_gk][2],
                new_fingerprint=new_fp,
                kind=kind,
                severity=severity_of(kind, evidence.ratio_p50, evidence.delta_p95_ms, config),
                reason=reason,
                evidence=evidence,
            )
        )
    verdicts.sort(key=lambda v: (v.kind == "noise", SEVERITY_ORDER[v.severity], -v.evidence.ratio_p50))
    return verdicts, len(collided)


# --- findings in PostgreSQL ------------------------------------------------------


class RegressionNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class Regression:
    """A stored finding (planpipe.plan_regressions)."""

    id: int
    cluster_id: str
    query_hash: str
    baseline_fingerprint: str
    new_fingerprint: str
    kind: FindingKind
    severity: Severity
    evidence: dict[str, Any]
    diff_markdown: str
    status: RegressionStatus
    first_detected: datetime
    last_detected: datetime
    detections: int
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    acknowledged_note: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None

    @property
    def ratio_p50(self) -> float | None:
        value = self.evidence.get("ratio_p50")
        return float(value) if isinstance(value, int | float) else None

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.isoformat()
        return out

    def headline(self) -> str:
        base, new = self.evidence.get("baseline", {}), self.evidence.get("new", {})
        ratio = self.ratio_p50
        return (
            f"#{self.id} {self.severity} {self.kind} on {self.cluster_id}/{self.query_hash}: "
            f"p50 {base.get('p50_ms')} → {new.get('p50_ms')} ms"
            f"{f' ({ratio:.2f}×)' if ratio is not None else ''}, p = {self.evidence.get('p_value', float('nan')):.3g}"
        )

    def to_markdown(self) -> str:
        base, new = self.evidence.get("baseline", {}), self.evidence.get("new", {})
        rows = [
            "| | baseline | new |",
            "| --- | --- | --- |",
            f"| plan | `{self.baseline_fingerprint[:12]}` | `{self.new_fingerprint[:12]}` |",
            f"| executions | {base.get('executions')} | {new.get('executions')} |",
            f"| p50 ms | {base.get('p50_ms')} | {new.get('p50_ms')} |",
            f"| p95 ms | {base.get('p95_ms')} | {new.get('p95_ms')} |",
        ]
        return "\n".join(
            [
                f"### #{self.id} {self.kind} ({self.severity}, {self.status})",
                f"`{self.cluster_id}` / `{self.query_hash}` — ratio p50 {self.evidence.get('ratio_p50')}, "
                f"p = {self.evidence.get('p_value', float('nan')):.3g}",
                "",
                *rows,
                "",
                self.diff_markdown,
            ]
        )


_COLUMNS: Final = (
    "id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence, diff_markdown, "
    "status, first_detected, last_detected, detections, acknowledged_by, acknowledged_at, acknowledged_note, "
    "resolved_at, resolved_by, resolution"
)


def _record(row: Sequence[Any]) -> Regression:
    return Regression(*row)


def current_baselines(conn: psycopg.Connection[Any], clusters: Sequence[str] = ()) -> dict[tuple[str, str], str]:
    """(cluster_id, query_hash) → fingerprint of the most recently accepted plan."""
    rows = conn.execute(
        """SELECT cluster_id, query_hash, fingerprint FROM planpipe.current_baselines
           WHERE cardinality(%s::text[]) = 0 OR cluster_id = ANY(%s::text[])""",
        (list(clusters), list(clusters)),
    ).fetchall()
    return {(str(c), str(q)): str(f) for c, q, f in rows}


def _diff_markdown(verdict: Verdict, texts: Mapping[str, str]) -> str:
    if verdict.kind == "same_plan_slower":
        return (
            f"Same plan `{verdict.new_fingerprint[:12]}` as the baseline: no plan change. "
            "Its latency grew against its own history (data growth, bloat or cache behaviour)."
        )
    before, after = texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint)
    if before is None or after is None:
        return "Plan diff unavailable: plan text missing from plan_catalog."
    try:
        return diff_plans(before, after).to_markdown()
    except PlanParseError as error:
        return f"Plan diff unavailable: {error}"


@dataclass(frozen=True)
class DetectionResult:
    """One detection run: its findings as stored, what it auto-resolved, and its statistics."""

    now: datetime
    config: DetectionConfig
    findings: list[Regression]
    resolved: list[Regression]
    stats: DetectionStats
    elapsed_s: float

    @property
    def regressions(self) -> list[Regression]:
        return [f for f in self.findings if f.kind in REGRESSION_KINDS]

    @property
    def improvements(self) -> list[Regression]:
        return [f for f in self.findings if f.kind == "plan_flip_improvement"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(FINDING_KINDS, 0)
        for finding in self.findings:
            counts[finding.kind] += 1
        return counts

    def to_markdown(self) -> str:
        s = self.stats
        lines = [
            f"**{len(self.regressions)} regression(s), {len(self.improvements)} improvement(s), "
            f"{len(self.resolved)} auto-resolved** — window {self.config.window_hours:g} h ending "
            f"{self.now.isoformat(timespec='seconds')}, lookback {self.config.lookback_hours:g} h",
            "",
            f"{s.observations:,} observations, {s.plans:,} plans, {s.comparisons:,} comparisons: "
            f"{s.too_few_executions:,} with too few executions, {s.screened_out:,} screened out, "
            f"{s.tested:,} tested exactly ({s.noise:,} noise); "
            f"{s.queries_without_baseline:,} recent queries without an accepted plan.",
        ]
        if self.findings:
            lines += [
                "",
                "| id | severity | kind | cluster | query | p50 base → new ms | ratio | n base / new | p-value |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for f in self.findings:
                base, new = f.evidence["baseline"], f.evidence["new"]
                lines.append(
                    f"| {f.id} | {f.severity} | {f.kind} | `{f.cluster_id}` | `{f.query_hash}` | "
                    f"{base['p50_ms']} → {new['p50_ms']} | {f.evidence['ratio_p50']} | "
                    f"{base['executions']} / {new['executions']} | {f.evidence['p_value']:.3g} |"
                )
            lines += ["", *[f"{f.to_markdown()}\n" for f in self.findings]]
        if self.resolved:
            lines += ["", "Auto-resolved:"]
            lines += [f"- #{r.id} {r.kind} `{r.query_hash}`: {r.resolution}" for r in self.resolved]
        return "\n".join(lines)

    def metadata(self) -> dict[str, str | int | float]:
        """Plain values for Dagster metadata (wrap `report` as markdown)."""
        return {
            **{f"findings_{kind}": count for kind, count in self.counts().items()},
            "auto_resolved": len(self.resolved),
            "observations": self.stats.observations,
            "comparisons": self.stats.comparisons,
            "tested": self.stats.tested,
            "window_hours": self.config.window_hours,
            "elapsed_s": round(self.elapsed_s, 3),
            "report": self.to_markdown(),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "config": self.config.as_dict(),
            "findings": [f.as_dict() for f in self.findings],
            "resolved": [r.as_dict() for r in self.resolved],
            "stats": self.stats.as_dict(),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def detect_regressions(
    dsn: str,
    parquet_root: Path,
    *,
    config: DetectionConfig = DetectionConfig(),  # frozen: a shared default is safe
    now: datetime | None = None,
) -> DetectionResult:
    """Recompute findings over the dataset, upsert them into plan_regressions and
    auto-resolve unresolved ones (in scope) whose condition no longer holds."""
    started = time.perf_counter()
    moment = now or datetime.now(UTC)
    with psycopg.connect(dsn) as conn:
        baselines = current_baselines(conn, config.clusters)
    analysis = find_regressions(scan_observations(parquet_root), baselines, config, now=moment)
    if not analysis.stats.observations:
        log.warning("detection: no observations in the lookback under %s; no finding is auto-resolved", parquet_root)
    found = analysis.findings
    with psycopg.connect(dsn) as conn:
        fingerprints = sorted({v.baseline_fingerprint for v in found} | {v.new_fingerprint for v in found})
        texts: dict[str, str] = dict(
            conn.execute(
                "SELECT fingerprint, sample_plan_text FROM planpipe.plan_catalog WHERE fingerprint = ANY(%s)",
                (fingerprints,),
            ).fetchall()
        )
        diffs = {id(v): _diff_markdown(v, texts) for v in found}
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINDINGS_LOCK,))
            # Re-read under the lock: a plan accepted while we computed changes the comparison.
            baselines = current_baselines(conn, config.clusters)
            statuses = _plan_statuses(conn, found)
            findings = [
                _upsert(conn, v, diffs[id(v)], statuses.get((v.cluster_id, v.query_hash, v.new_fingerprint)))
                for v in found
                if baselines.get((v.cluster_id, v.query_hash)) == v.baseline_fingerprint
            ]
            # No observation at all in the lookback says more about the dataset path than
            # about the queries: resolving every finding then would be wrong.
            resolved = (
                _resolve_stale(conn, analysis, baselines, {f.id for f in findings})
                if analysis.stats.observations
                else []
            )
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.cluster_id, f.query_hash))
    elapsed = time.perf_counter() - started
    log.info("detection: %d findings, %d auto-resolved in %.1fs", len(findings), len(resolved), elapsed)
    return DetectionResult(moment, config, findings, resolved, analysis.stats, elapsed)


def _plan_statuses(conn: psycopg.Connection[Any], verdicts: Sequence[Verdict]) -> dict[tuple[str, str, str], str]:
    if not verdicts:
        return {}
    rows = conn.execute(
        """SELECT b.cluster_id, b.query_hash, b.fingerprint, b.status
           FROM planpipe.plan_baselines b
           JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(c, q, f)
             ON (b.cluster_id, b.query_hash, b.fingerprint) = (k.c, k.q, k.f)""",
        (
            [v.cluster_id for v in verdicts],
            [v.query_hash for v in verdicts],
            [v.new_fingerprint for v in verdicts],
        ),
    ).fetchall()
    return {(str(c), str(q), str(f)): str(s) for c, q, f, s in rows}


def _upsert(conn: psycopg.Connection[Any], verdict: Verdict, diff: str, new_status: str | None) -> Regression:
    evidence = verdict.evidence.as_dict() | {"new_plan_status": new_status, "reason": verdict.reason}
    row = conn.execute(
        f"""INSERT INTO planpipe.plan_regressions AS r
                (cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence,
                 diff_markdown)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (cluster_id, query_hash, new_fingerprint, kind) WHERE status <> 'resolved'
            DO UPDATE SET baseline_fingerprint = excluded.baseline_fingerprint, severity = excluded.severity,
                          evidence = excluded.evidence, diff_markdown = excluded.diff_markdown,
                          last_detected = now(), detections = r.detections + 1
            RETURNING {_COLUMNS}""",
        (
            verdict.cluster_id,
            verdict.query_hash,
            verdict.baseline_fingerprint,
            verdict.new_fingerprint,
            verdict.kind,
            verdict.severity,
            Jsonb(evidence),
            diff,
        ),
    ).fetchone()
    assert row is not None
    return _record(row)


def _resolve_stale(
    conn: psycopg.Connection[Any],
    analysis: Analysis,
    baselines: Mapping[tuple[str, str], str],
    current: set[int],
) -> list[Regression]:
    clusters = list(analysis.config.clusters)
    rows = conn.execute(
        """SELECT id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind
           FROM planpipe.plan_regressions
           WHERE status <> 'resolved' AND NOT (id = ANY(%s::bigint[]))
             AND (cardinality(%s::text[]) = 0 OR cluster_id = ANY(%s::text[]))
           ORDER BY id FOR UPDATE""",
        (sorted(current), clusters, clusters),
    ).fetchall()
    if not rows:
        return []
    keys = [(str(c), str(q), str(f)) for _, c, q, b, f, _ in rows] + [
        (str(c), str(q), str(b)) for _, c, q, b, _, _ in rows
    ]
    executions = analysis.executions(keys)
    tested = {(v.cluster_id, v.query_hash, v.new_fingerprint, v.evidence.comparison): v for v in analysis.verdicts}
    config = analysis.config
    resolved: list[Regression] = []
    for finding_id, cluster_id, query_hash, base_fp, new_fp, kind in rows:
        accepted = baselines.get((cluster_id, query_hash))
        same_plan = kind == "same_plan_slower"
        new_recent, _ = executions.get((cluster_id, query_hash, new_fp), (0, 0))
        base_recent, base_before = executions.get((cluster_id, query_hash, base_fp), (0, 0))
        base_n = base_before if same_plan else base_recent + base_before
        reason: str | None
        if accepted is None:
            reason = "the query has no accepted plan any more"
        elif accepted != (new_fp if same_plan else base_fp):
            reason = f"the baseline changed to plan {accepted[:12]}"
        elif new_recent == 0:
            reason = f"plan {new_fp[:12]} did not run in the last {config.window_hours:g} h"
        elif new_recent >= config.min_executions and base_n >= config.min_executions:
            verdict = tested.get((cluster_id, query_hash, new_fp, "same_plan" if same_plan else "plan_flip"))
            why = verdict.reason if verdict is not None else "the difference is below the thresholds"
            reason = f"the condition no longer holds: {why}"
        else:
            reason = None  # still running, too few executions to tell: keep it open
        if reason is None:
            continue
        row = conn.execute(
            f"""UPDATE planpipe.plan_regressions
                SET status = 'resolved', resolved_at = now(), resolved_by = %s, resolution = %s
                WHERE id = %s RETURNING {_COLUMNS}""",
            (DETECTOR, reason, finding_id),
        ).fetchone()
        assert row is not None
        resolved.append(_record(row))
    return resolved


def list_regressions(
    dsn: str,
    *,
    since: datetime | None = None,
    cluster_id: str | None = None,
    status: RegressionStatus | Literal["all", "unresolved"] = "open",
    kinds: Sequence[FindingKind] = (),
    limit: int | None = None,
) -> list[Regression]:
    """Findings, most severe and most recent first. `since` filters on last_detected."""
    statuses = {"all": [], "unresolved": ["open", "acknowledged"]}.get(status, [status])
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"""SELECT {_COLUMNS} FROM planpipe.plan_regressions
                WHERE (%(since)s::timestamptz IS NULL OR last_detected >= %(since)s)
                  AND (%(cluster)s::text IS NULL OR cluster_id = %(cluster)s)
                  AND (cardinality(%(statuses)s::text[]) = 0 OR status = ANY(%(statuses)s))
                  AND (cardinality(%(kinds)s::text[]) = 0 OR kind = ANY(%(kinds)s))
                ORDER BY status = 'resolved',
                         array_position(ARRAY['critical', 'high', 'medium', 'info'], severity),
                         last_detected DESC, id DESC
                LIMIT %(limit)s""",
            {"since": since, "cluster": cluster_id, "statuses": statuses, "kinds": list(kinds), "limit": limit},
        ).fetchall()
    return [_record(row) for row in rows]


def get_regression(dsn: str, finding_id: int) -> Regression:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM planpipe.plan_regressions WHERE id = %s", (finding_id,)).fetchone()
    if row is None:
        raise RegressionNotFoundError(f"no finding #{finding_id}")
    return _record(row)


def acknowledge_regression(dsn: str, finding_id: int, *, by: str, note: str | None = None) -> Regression:
    """Mark an open finding as seen. Detection keeps updating its evidence (it stays one
    finding) and still resolves it when the condition goes away; a resolved finding
    cannot be acknowledged."""
    if not by.strip():
        raise ValueError("acknowledging needs a name (by)")
    with psycopg.connect(dsn) as conn, conn.transaction():
        row = conn.execute(
            "SELECT status FROM planpipe.plan_regressions WHERE id = %s FOR UPDATE", (finding_id,)
        ).fetchone()
        if row is None:
            raise RegressionNotFoundError(f"no finding #{finding_id}")
        if row[0] == "resolved":
            raise ValueError(f"finding #{finding_id} is already resolved")
        updated = conn.execute(
            f"""UPDATE planpipe.plan_regressions
                SET status = 'acknowledged', acknowledged_by = %s, acknowledged_at = now(), acknowledged_note = %s
                WHERE id = %s RETURNING {_COLUMNS}""",
            (by.strip(), note, finding_id),
        ).fetchone()
    assert updated is not None
    return _record(updated)


def open_regression_candidates(dsn: str, *, cluster_id: str | None = None) -> set[str]:
    """Query hashes with an open (unacknowledged, unresolved) regression: the router gives
    them priority regression_candidate. Cheap (partial index); callers cache it briefly.

    The router's set spans every cluster: query identifiers (PostgreSQL 18 jumbles
    relations by name) are the same for the same query on every cluster and schema.
    `cluster_id` narrows it to the findings of one cluster."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT DISTINCT query_hash FROM planpipe.plan_regressions
               WHERE status = 'open' AND kind = ANY(%s) AND (%s::text IS NULL OR cluster_id = %s)""",
            (list(REGRESSION_KINDS), cluster_id, cluster_id),
        ).fetchall()
    return {str(row[0]) for row in rows}
