"""Mann-Whitney U (scipy: exact for small untied samples, else tie + continuity corrected), BH, change points."""

import math
import random

import numpy as np
import pytest

from planpipe.plans.stats import SampleStats, benjamini_hochberg, mann_whitney_u

pytestmark = pytest.mark.unit


def test_scipy_documentation_example() -> None:
    # scipy.stats.mannwhitneyu docs: males vs females; small untied samples use the exact
    # distribution → statistic 17.0, pvalue 0.1111 (asymptotic would give 0.11134688653314041).
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    result = mann_whitney_u(females, males)
    assert result.u == 17.0
    assert result.p_value == pytest.approx(1 / 9, rel=1e-12) and result.method == "exact"
    assert result.z > 0  # the "new" sample (males) tends to be larger
    assert result.effect == pytest.approx(17 / 20)


def test_hand_computed_example_with_ties() -> None:
    # Combined, sorted: 1 2 2 2 3 3 4 5 6 — the three 2s share rank 3, the two 3s rank 5.5.
    # Rank sum of `new` = 3 + 5.5 + 8 + 9 = 25.5, U = 25.5 - 4·5/2 = 15.5, mean = 4·5/2 = 10.
    # Tie term Σ(t³ - t) = (27 - 3) + (8 - 2) = 30; var = 20/12 · (10 - 30/(9·8)).
    baseline, new = [1, 2, 2, 3, 4], [2, 3, 5, 6]
    variance = 20 / 12 * (10 - 30 / 72)
    z = (15.5 - 10 - 0.5) / math.sqrt(variance)
    result = mann_whitney_u(baseline, new)
    assert result.u == 15.5
    assert result.z == pytest.approx(z, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-12)
    assert result.p_value == pytest.approx(0.2109, abs=1e-4)


def test_swapping_the_samples_mirrors_u_and_z_and_keeps_p() -> None:
    a, b = [3.1, 4.0, 4.0, 7.5, 9.0, 1.2], [5.5, 6.0, 4.0, 12.0]
    forward, backward = mann_whitney_u(a, b), mann_whitney_u(b, a)
    assert forward.u + backward.u == len(a) * len(b)
    assert forward.z == pytest.approx(-backward.z)
    assert forward.p_value == pytest.approx(backward.p_value)


def test_u_counts_pairs_with_ties_as_halves() -> None:
    rng = random.Random(5)
    for _ in range(50):
        x = [rng.randint(0, 8) for _ in range(rng.randint(1, 30))]
        y = [rng.randint(0, 8) for _ in range(rng.randint(1, 30))]
        pairs = sum((yv > xv) + 0.5 * (yv == xv) for xv in x for yv in y)
        assert mann_whitney_u(x, y).u == pairs


def test_identical_or_all_tied_samples_give_no_evidence() -> None:
    same = mann_whitney_u([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert same.p_value == 1.0 and same.z == 0.0
    tied = mann_whitney_u([5.0] * 30, [5.0] * 20)
    assert (tied.p_value, tied.z, tied.effect) == (1.0, 0.0, 0.5)


def test_clear_shift_is_significant_and_pure_noise_is_not() -> None:
    rng = np.random.default_rng(11)
    base = rng.lognormal(np.log(5), 0.3, 200)
    assert mann_whitney_u(base, rng.lognormal(np.log(20), 0.3, 50)).p_value < 1e-20
    p_values = [mann_whitney_u(rng.lognormal(0, 0.5, 60), rng.lognormal(0, 0.5, 40)).p_value for _ in range(400)]
    # Under the null hypothesis p is ~uniform: about 1 % fall below 0.01.
    assert sum(p < 0.01 for p in p_values) <= 12
    assert 0.35 < float(np.mean(p_values)) < 0.65


def test_extreme_separation_underflows_to_zero_not_nan() -> None:
    result = mann_whitney_u(np.arange(5000.0), np.arange(5000.0) + 10_000)
    assert result.p_value == 0.0 or result.p_value < 1e-300
    assert result.effect == 1.0


def test_empty_sample_is_an_error() -> None:
    with pytest.raises(ValueError):
        mann_whitney_u([], [1.0])


def test_sample_stats() -> None:
    stats = SampleStats.of(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert (stats.executions, stats.p50_ms, stats.mean_ms) == (5, 3.0, 22.0)
    assert stats.p95_ms == pytest.approx(4 + 0.8 * 96)  # linear interpolation


def test_benjamini_hochberg_matches_r_p_adjust() -> None:
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "BH") → 0.02 0.04 0.04 0.02
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005], 4) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Six more hypotheses that were never tested (p = 1) scale every adjustment by 10/4.
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005], 10) == pytest.approx([0.05, 0.1, 0.1, 0.05])
    assert benjamini_hochberg([0.5, 0.9], 2) == pytest.approx([0.9, 0.9])
    assert benjamini_hochberg([], 5) == []


def test_change_point_finds_where_a_slowdown_started_and_ignores_noise() -> None:
    from planpipe.plans.stats import find_change

    rng = np.random.default_rng(7)
    for sigma in (0.1, 0.4, 0.8):
        before, after = rng.normal(0, sigma, 3000), rng.normal(np.log(3), sigma, 40)
        change = find_change(np.r_[before, after], min_size=20)
        assert change is not None and abs(change.index - 3000) <= 10
        assert find_change(rng.normal(0, sigma, 5000), min_size=20) is None
    # Two steps up: the slowdown started at the first one.
    steps = np.r_[rng.normal(0, 0.2, 100), rng.normal(0.6, 0.2, 100), rng.normal(1.2, 0.2, 100)]
    change = find_change(steps, min_size=20)
    assert change is not None and abs(change.index - 100) <= 5 and len(change.breakpoints) == 2
    # Slow for a while, then back: the current level is the return, not the slowdown.
    back = np.r_[rng.normal(0, 0.1, 100), rng.normal(1.3, 0.1, 60), rng.normal(0, 0.1, 40)]
    change = find_change(back, min_size=20)
    assert change is not None and abs(change.index - 160) <= 3
    # Too short to hold two segments of min_size.
    assert find_change(np.r_[np.zeros(10), np.ones(10)], min_size=20) is None


def test_benjamini_hochberg_is_scipys_with_unlisted_hypotheses_at_one() -> None:
    adjusted = benjamini_hochberg([0.001, 0.02, 0.04], tests=10)
    assert adjusted == pytest.approx([0.01, 0.1, 0.1333333], rel=1e-6)
    assert benjamini_hochberg([], tests=5) == []
