"""What detection concludes about one comparison: config, thresholds, verdicts and their evidence.

Pure values (no polars, no PostgreSQL), shared by the statistical core (`detection`)
and the findings store (`findings`).
"""

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from planpipe.plans.stats import MannWhitney, SampleStats, ratio

__all__ = [
    "FINDING_KINDS",
    "REGRESSION_KINDS",
    "SEVERITY_ORDER",
    "ClusterSlowdown",
    "Comparison",
    "DetectionConfig",
    "Evidence",
    "FindingKind",
    "Kind",
    "Severity",
    "Verdict",
    "WorkSide",
    "classify",
    "finite",
    "severity_of",
]

Kind = Literal["plan_flip_regression", "plan_flip_improvement", "same_plan_slower", "environment_slowdown", "noise"]
FindingKind = Literal["plan_flip_regression", "plan_flip_improvement", "same_plan_slower", "cluster_slowdown"]
Severity = Literal["info", "medium", "high", "critical"]
Comparison = Literal["plan_flip", "same_plan"]

FINDING_KINDS: Final[tuple[FindingKind, ...]] = (
    "plan_flip_regression",
    "plan_flip_improvement",
    "same_plan_slower",
    "cluster_slowdown",
)
# Kinds that make a query slower: they feed the router's regression_candidate priority.
REGRESSION_KINDS: Final[tuple[FindingKind, ...]] = ("plan_flip_regression", "same_plan_slower")
SEVERITY_ORDER: Final[dict[str, int]] = {"critical": 0, "high": 1, "medium": 2, "info": 3}


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds. Every threshold must pass for a finding (see `classify`).

    Without `window_hours` (the default) each plan's series is split where its latency
    changed (a change point); with it, the last `window_hours` are judged against the
    rest of the lookback, as before change points.
    """

    window_hours: float | None = None
    lookback_hours: float = 168.0  # how far back executions count at all
    min_ratio: float = 1.5  # p50 ratio, new / baseline (baseline / new for an improvement)
    min_abs_ms: float = 10.0  # absolute p50 difference
    min_executions: int = 20  # on each side (and the least a change point's segments hold)
    alpha: float = 0.01
    high_ratio: float = 2.0  # severity high from this p50 ratio
    critical_ratio: float = 5.0  # severity critical from this p50 ratio ...
    critical_p95_delta_ms: float = 1000.0  # ... or when p95 grew by more than this
    # Benjamini-Hochberg across the run's comparisons (alpha bounds the expected share of false
    # findings); False applies alpha to each comparison on its own.
    fdr: bool = True
    # The accepted baseline of a query whose first plan was accepted automatically is the
    # dominant plan of its first executions: this many, or this many hours, whichever ends first.
    settling_executions: int = 30
    settling_hours: float = 1.0
    # Work (blocks, rows) within this factor on both sides counts as unchanged.
    work_tolerance: float = 1.25
    # Queries of one cluster slowing with unchanged work that make one cluster_slowdown finding.
    cluster_min_queries: int = 2
    # A finding resolves once this many executions show the query back (baseline plan, or latency).
    resolve_executions: int = 20
    clusters: tuple[str, ...] = ()  # empty: every cluster

    def __post_init__(self) -> None:
        if self.window_hours is not None and not 0 < self.window_hours < self.lookback_hours:
            raise ValueError("need 0 < window_hours < lookback_hours")
        if self.lookback_hours <= 0:
            raise ValueError("lookback_hours must be > 0")
        if self.min_ratio <= 1:
            raise ValueError("min_ratio must be > 1")
        if self.min_abs_ms < 0 or self.min_executions < 2:
            raise ValueError("min_abs_ms must be >= 0 and min_executions >= 2")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be within (0, 1)")
        if not 1 < self.high_ratio <= self.critical_ratio:
            raise ValueError("need 1 < high_ratio <= critical_ratio")
        if self.settling_executions < 1 or self.settling_hours <= 0 or self.resolve_executions < 1:
            raise ValueError("settling_executions, settling_hours and resolve_executions must be positive")
        if self.work_tolerance < 1 or self.cluster_min_queries < 1:
            raise ValueError("need work_tolerance >= 1 and cluster_min_queries >= 1")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"clusters": list(self.clusters)}


def severity_of(kind: Kind, ratio_p50: float, delta_p95_ms: float, config: DetectionConfig) -> Severity:
    """critical: ratio ≥ critical_ratio or p95 grew > critical_p95_delta_ms; high: ratio ≥ high_ratio."""
    if kind in ("plan_flip_improvement", "noise", "environment_slowdown"):
        return "info"
    if ratio_p50 >= config.critical_ratio or delta_p95_ms > config.critical_p95_delta_ms:
        return "critical"
    if ratio_p50 >= config.high_ratio:
        return "high"
    return "medium"


def classify(
    comparison: Comparison, baseline: SampleStats, new: SampleStats, p_value: float, config: DetectionConfig
) -> tuple[Kind, str]:
    """The verdict on latency alone for one comparison, with a one-line reason (work evidence
    may turn a same_plan_slower into an environment slowdown afterwards)."""
    n = config.min_executions
    if baseline.executions < n or new.executions < n:
        return "noise", f"too few executions ({baseline.executions} baseline, {new.executions} new; need {n})"
    r = ratio(new.p50_ms, baseline.p50_ms)
    delta = new.p50_ms - baseline.p50_ms
    slower = r >= config.min_ratio and delta >= config.min_abs_ms
    faster = comparison == "plan_flip" and ratio(baseline.p50_ms, new.p50_ms) >= config.min_ratio
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
    return verdict, f"p50 {baseline.p50_ms:.3f} → {new.p50_ms:.3f} ms ({speed(r)}), p = {p_value:.3g}"


def speed(r: float) -> str:
    """A p50 ratio (new / baseline) as people say it: "3.2× slower", "180× faster"."""
    if not math.isfinite(r) or r <= 0:
        return "∞× slower" if r > 0 else "∞× faster"
    if r >= 1:
        return f"{r:.3g}× slower"
    return f"{1 / r:.3g}× faster"


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON (and jsonb) has no Infinity


@dataclass(frozen=True)
class WorkSide:
    """The medians of a side's work per execution (None: its plans did not report it)."""

    blocks: float | None  # shared hit + read + temp blocks
    rows: float | None  # top node's rows × loops

    def as_dict(self) -> dict[str, float | None]:
        return {"blocks": self.blocks, "rows": self.rows}


def _work_ratio(new: float | None, base: float | None) -> float | None:
    if new is None or base is None:
        return None
    return ratio(new + 1, base + 1)  # +1: a 0-block plan is not infinitely cheaper


@dataclass(frozen=True)
class Evidence:
    comparison: Comparison
    baseline: SampleStats
    new: SampleStats
    test: MannWhitney
    alpha: float
    window_start: datetime  # the new side's executions: [window_start, window_end]
    window_end: datetime
    baseline_start: datetime  # the baseline side: [baseline_start, baseline_end]
    baseline_end: datetime
    p_adjusted: float | None = None  # Benjamini-Hochberg, when the config asks for it
    split: Literal["change_point", "window", "plan"] = "change_point"
    work_baseline: WorkSide = field(default=WorkSide(None, None))
    work_new: WorkSide = field(default=WorkSide(None, None))

    @property
    def ratio_p50(self) -> float:
        return ratio(self.new.p50_ms, self.baseline.p50_ms)

    @property
    def ratio_p95(self) -> float:
        return ratio(self.new.p95_ms, self.baseline.p95_ms)

    @property
    def delta_p50_ms(self) -> float:
        return self.new.p50_ms - self.baseline.p50_ms

    @property
    def delta_p95_ms(self) -> float:
        return self.new.p95_ms - self.baseline.p95_ms

    @property
    def work_ratio_blocks(self) -> float | None:
        return _work_ratio(self.work_new.blocks, self.work_baseline.blocks)

    @property
    def work_ratio_rows(self) -> float | None:
        return _work_ratio(self.work_new.rows, self.work_baseline.rows)

    def work_unchanged(self, tolerance: float) -> bool | None:
        """True when every known work measure stayed within `tolerance`; None when none is known."""
        ratios = [r for r in (self.work_ratio_blocks, self.work_ratio_rows) if r is not None]
        if not ratios:
            return None
        return all(1 / tolerance <= r <= tolerance for r in ratios)

    def as_dict(self) -> dict[str, Any]:
        def side(stats: SampleStats, start: datetime, end: datetime, work: WorkSide) -> dict[str, Any]:
            return {
                "executions": stats.executions,
                "p50_ms": round(stats.p50_ms, 4),
                "p95_ms": round(stats.p95_ms, 4),
                "mean_ms": round(stats.mean_ms, 4),
                "from": start.isoformat(),
                "to": end.isoformat(),
                "work": work.as_dict(),
            }

        def rounded(value: float | None) -> float | None:
            return None if value is None else finite(round(value, 4))

        return {
            "comparison": self.comparison,
            "split": self.split,
            "started": self.window_start.isoformat(),
            "baseline": side(self.baseline, self.baseline_start, self.baseline_end, self.work_baseline),
            "new": side(self.new, self.window_start, self.window_end, self.work_new),
            "ratio_p50": finite(round(self.ratio_p50, 4)),
            "ratio_p95": finite(round(self.ratio_p95, 4)),
            "speed": speed(self.ratio_p50),
            "delta_p50_ms": round(self.delta_p50_ms, 4),
            "delta_p95_ms": round(self.delta_p95_ms, 4),
            "work_ratio_blocks": rounded(self.work_ratio_blocks),
            "work_ratio_rows": rounded(self.work_ratio_rows),
            "test": f"mann-whitney-u (two-sided, {self.test.method})",
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
    new_fingerprint: str  # the plan's own fingerprint for same_plan comparisons
    kind: Kind
    severity: Severity
    reason: str
    evidence: Evidence


@dataclass(frozen=True)
class ClusterSlowdown:
    """Several queries of one cluster slower at the same time with unchanged work: the machine, not them."""

    cluster_id: str
    started: datetime
    ratio_p50: float  # median over the affected queries
    affected: tuple[Verdict, ...]  # their environment_slowdown verdicts

    def as_dict(self) -> dict[str, Any]:
        return {
            "comparison": "cluster",
            "started": self.started.isoformat(),
            "ratio_p50": finite(round(self.ratio_p50, 4)),
            "speed": speed(self.ratio_p50),
            "queries": [
                {
                    "query_hash": v.query_hash,
                    "fingerprint": v.new_fingerprint,
                    "ratio_p50": finite(round(v.evidence.ratio_p50, 4)),
                    "baseline_p50_ms": round(v.evidence.baseline.p50_ms, 4),
                    "new_p50_ms": round(v.evidence.new.p50_ms, 4),
                    "work_ratio_blocks": v.evidence.work_ratio_blocks,
                    "work_ratio_rows": v.evidence.work_ratio_rows,
                    "started": v.evidence.window_start.isoformat(),
                }
                for v in self.affected
            ],
        }
