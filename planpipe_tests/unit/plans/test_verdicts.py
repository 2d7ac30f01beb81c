"""Verdicts and severities, table-driven."""

import pytest

from planpipe.plans.stats import SampleStats
from planpipe.plans.verdicts import Comparison, DetectionConfig, Kind, classify, severity_of

pytestmark = pytest.mark.unit

CONFIG = DetectionConfig()


def side(p50: float, n: int = 100, p95: float | None = None) -> SampleStats:
    return SampleStats(executions=n, p50_ms=p50, p95_ms=p95 if p95 is not None else p50 * 1.5, mean_ms=p50)


CASES: list[tuple[str, Comparison, SampleStats, SampleStats, float, Kind]] = [
    ("flip 8x slower", "plan_flip", side(5), side(40), 1e-12, "plan_flip_regression"),
    ("flip at both thresholds exactly", "plan_flip", side(20), side(30), 1e-6, "plan_flip_regression"),
    ("flip ratio just below 1.5", "plan_flip", side(20), side(29.9), 1e-9, "noise"),
    ("flip ratio ok, abs difference below 10 ms", "plan_flip", side(5), side(14.9), 1e-9, "noise"),
    ("flip 10x faster", "plan_flip", side(50), side(5), 1e-12, "plan_flip_improvement"),
    ("flip faster but under 10 ms saved", "plan_flip", side(12), side(3), 1e-12, "noise"),
    ("flip slightly faster", "plan_flip", side(50), side(40), 1e-12, "noise"),
    ("flip big but not significant", "plan_flip", side(5), side(40), 0.02, "noise"),
    ("flip with p exactly alpha", "plan_flip", side(5), side(40), 0.01, "noise"),
    ("flip with 19 new executions", "plan_flip", side(5), side(40, n=19), 1e-12, "noise"),
    ("flip with 19 baseline executions", "plan_flip", side(5, n=19), side(40), 1e-12, "noise"),
    ("flip from a 0 ms baseline", "plan_flip", side(0.0), side(15), 1e-12, "plan_flip_regression"),
    ("same plan 3x slower", "same_plan", side(20), side(60), 1e-12, "same_plan_slower"),
    ("same plan faster is not a finding", "same_plan", side(60), side(20), 1e-12, "noise"),
    ("same plan under thresholds", "same_plan", side(20), side(25), 1e-12, "noise"),
]


@pytest.mark.parametrize(
    ("comparison", "baseline", "new", "p_value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_classify(
    comparison: Comparison, baseline: SampleStats, new: SampleStats, p_value: float, expected: Kind
) -> None:
    kind, reason = classify(comparison, baseline, new, p_value, CONFIG)
    assert kind == expected, reason
    assert reason


def test_noise_reasons_say_why() -> None:
    assert "too few" in classify("plan_flip", side(5), side(40, n=3), 1e-9, CONFIG)[1]
    assert "not significant" in classify("plan_flip", side(5), side(40), 0.5, CONFIG)[1]
    assert "below the thresholds" in classify("plan_flip", side(5), side(6), 1e-9, CONFIG)[1]


def test_thresholds_are_configurable() -> None:
    strict = DetectionConfig(min_ratio=3.0, min_abs_ms=50.0, min_executions=200, alpha=0.001)
    assert classify("plan_flip", side(20, n=300), side(50, n=300), 1e-9, strict)[0] == "noise"  # 2.5x
    assert classify("plan_flip", side(20, n=300), side(80, n=300), 1e-9, strict)[0] == "plan_flip_regression"
    assert classify("plan_flip", side(20, n=300), side(80, n=300), 0.005, strict)[0] == "noise"


SEVERITIES: list[tuple[Kind, float, float, str]] = [
    ("plan_flip_regression", 5.0, 0.0, "critical"),
    ("plan_flip_regression", 1.6, 1000.5, "critical"),  # p95 grew by more than a second
    ("plan_flip_regression", 1.6, 1000.0, "medium"),
    ("same_plan_slower", 4.99, 10.0, "high"),
    ("plan_flip_regression", 2.0, 10.0, "high"),
    ("plan_flip_regression", 1.99, 10.0, "medium"),
    ("plan_flip_improvement", 0.1, -500.0, "info"),
    ("noise", 9.0, 5000.0, "info"),
]


@pytest.mark.parametrize(("kind", "ratio", "delta_p95", "expected"), SEVERITIES)
def test_severity(kind: Kind, ratio: float, delta_p95: float, expected: str) -> None:
    assert severity_of(kind, ratio, delta_p95, CONFIG) == expected


@pytest.mark.parametrize(
    "bad",
    [
        {"window_hours": 0},
        {"window_hours": 200, "lookback_hours": 100},
        {"min_ratio": 1.0},
        {"min_executions": 1},
        {"alpha": 0},
        {"high_ratio": 6.0, "critical_ratio": 5.0},
    ],
)
def test_config_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DetectionConfig(**bad)  # type: ignore[arg-type]
