"""Mann-Whitney U (exact for small untied samples, else tie + continuity corrected), BH, change points.

planpipe.plans.stats computes them itself (importing scipy.stats and ruptures cost detection
more than the computations); the tests at the end check it against scipy and ruptures."""

import math
import random

import numpy as np
import numpy.typing as npt
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


# --- Against the libraries the numpy versions replace (dev dependencies: scipy, ruptures) ---


def _scipy_mwu(baseline: np.ndarray, new: np.ndarray, method: str) -> tuple[float, float]:
    from scipy import stats as sps

    result = sps.mannwhitneyu(new, baseline, alternative="two-sided", method=method)
    return float(result.statistic), float(result.pvalue)


def _samples(rng: np.random.Generator, n: int, kind: int) -> np.ndarray:
    if kind == 0:
        return rng.lognormal(0.0, 1.0, n)
    if kind == 1:
        return rng.integers(0, 6, n).astype(np.float64)  # many ties
    scale = 10.0 ** float(rng.integers(-300, 300))  # tiny or huge values, the same ranks
    return np.asarray(rng.normal(0.0, 1.0, n) * scale, dtype=np.float64)


def test_mann_whitney_exact_is_scipys_exact() -> None:
    rng = np.random.default_rng(21)
    sizes = [(n1, n2) for n1 in range(1, 9) for n2 in range(1, 9)]
    for n1, n2 in sizes:
        for _ in range(3):
            scale = 10.0 ** float(rng.integers(-300, 300))
            values = rng.permutation(np.arange(1.0, n1 + n2 + 1) * scale + rng.uniform(0, 0.5) * scale)
            baseline, new = values[:n1], values[n1:]
            result = mann_whitney_u(baseline, new)
            u, p = _scipy_mwu(baseline, new, "exact")
            assert result.method == "exact"
            assert result.u == u
            assert result.p_value == pytest.approx(p, rel=1e-12)


def test_mann_whitney_asymptotic_is_scipys_asymptotic() -> None:
    rng = np.random.default_rng(22)
    for trial in range(600):
        kind = trial % 3
        n1, n2 = int(rng.integers(1, 400)), int(rng.integers(1, 400))
        if kind != 1 and max(n1, n2) <= 8:
            n2 = 9  # untied samples this small take the exact distribution (tested above)
        shift = float(rng.choice([0.0, 0.3, 3.0]))
        baseline, new = _samples(rng, n1, kind), _samples(rng, n2, kind) + shift * (kind == 1)
        result = mann_whitney_u(baseline, new)
        u, p = _scipy_mwu(baseline, new, "asymptotic")
        assert result.method == "asymptotic"
        assert result.u == u
        assert result.p_value == pytest.approx(p, rel=1e-12, abs=1e-300)


def test_mann_whitney_edges_match_scipy() -> None:
    # (baseline, new, method scipy must have used): n = 1, equal samples, all one value,
    # ties in tiny samples (normal approximation), the size boundary of the exact method.
    rng = np.random.default_rng(23)
    untied9 = rng.permutation(np.arange(17.0))
    cases: list[tuple[npt.ArrayLike, npt.ArrayLike, str]] = [
        ([1.0], [2.0], "exact"),
        ([3.0], [1.0, 2.0, 4.0, 5.0], "exact"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "asymptotic"),  # equal samples are ties
        ([7.0] * 5, [7.0] * 3, "asymptotic"),
        ([1.0, 1.0], [2.0], "asymptotic"),
        (untied9[:8], untied9[8:16], "exact"),
        (untied9[:8], untied9[8:], "asymptotic"),  # 8 and 9: beyond the exact method here
        (np.arange(5000.0), np.arange(5000.0) + 10_000, "asymptotic"),  # p underflows
        (np.arange(960.0), np.arange(960.0) + 960, "asymptotic"),  # z = 37.9: 0, not erfc's 6e-315
        (np.arange(3000.0) * 1e-300, np.arange(3000.0) * 1e-300 + 5e-298, "asymptotic"),
    ]
    for baseline, new, method in cases:
        result = mann_whitney_u(baseline, new)
        u, p = _scipy_mwu(np.asarray(baseline), np.asarray(new), method)
        assert (result.method, result.u) == (method, u)
        assert result.p_value == pytest.approx(p, rel=1e-12, abs=1e-300)
        assert (result.p_value == 0.0) == (p == 0.0)


def test_mann_whitney_rejects_nan() -> None:
    with pytest.raises(ValueError):
        mann_whitney_u([1.0, float("nan")], [2.0])


def test_benjamini_hochberg_is_scipys() -> None:
    from scipy import stats as sps

    rng = np.random.default_rng(24)
    for trial in range(300):
        size = int(rng.integers(1, 60))
        p = rng.uniform(0, 1, size) ** float(rng.choice([1, 4, 20]))
        if trial % 3 == 0:
            p = np.round(p, 2)  # ties
        if trial % 4 == 0:
            p[rng.integers(0, size, 3)] = 0.0
        if trial % 5 == 0:
            p[rng.integers(0, size, 3)] = 1.0
        tests = size + int(rng.integers(0, 40))
        padded = np.ones(tests)
        padded[:size] = p
        expected = sps.false_discovery_control(padded, method="bh")[:size]
        assert benjamini_hochberg(p.tolist(), tests) == pytest.approx(expected.tolist(), rel=1e-15, abs=0)
    with pytest.raises(ValueError):
        benjamini_hochberg([0.5, 1.5], 2)


def _ruptures_ends(signal: np.ndarray, penalty: float, min_size: int) -> list[int]:
    import ruptures

    algo = ruptures.KernelCPD(kernel="linear", min_size=min_size).fit(signal.reshape(-1, 1))
    return [int(end) for end in algo.predict(pen=penalty)]


def test_optimal_partition_is_ruptures_pelt() -> None:
    from planpipe.plans.stats import optimal_partition

    rng = np.random.default_rng(25)
    for trial in range(1200):
        n = int(rng.integers(2, 300))
        min_size = int(rng.integers(1, n // 2 + 1))
        kind = trial % 4
        if kind == 0:  # noise
            signal = rng.normal(0, 1, n)
        elif kind == 1:  # levels, each held a while, with noise
            levels = rng.normal(0, 2, int(rng.integers(1, 8)))
            signal = np.repeat(levels, -(-n // len(levels)))[:n] + rng.normal(0, 0.4, n)
        elif kind == 2:  # noiseless levels
            signal = np.repeat(rng.normal(0, 1, 5), -(-n // 5))[:n]
        else:  # tiny or huge magnitudes
            signal = rng.normal(float(rng.normal(0, 3)), 1, n) * 10.0 ** float(rng.integers(-12, 12))
        penalty = float(10.0 ** rng.uniform(-2, 2)) * float(np.var(signal) or 1.0)
        assert optimal_partition(signal, penalty, min_size) == _ruptures_ends(signal, penalty, min_size), trial


def test_optimal_partition_on_tied_values_is_as_good_as_ruptures() -> None:
    # Integer-valued series have segmentations whose totals are equal: there the two may pick
    # different ones (ruptures' choice is its rounding), never a worse one.
    from planpipe.plans.stats import optimal_partition

    def total(signal: np.ndarray, ends: list[int], penalty: float) -> float:
        bounds = zip([0, *ends[:-1]], ends, strict=True)
        return sum(float(((signal[a:b] - signal[a:b].mean()) ** 2).sum()) for a, b in bounds) + penalty * len(ends)

    rng = np.random.default_rng(28)
    differ = 0
    for _ in range(600):
        n = int(rng.integers(2, 200))
        min_size = int(rng.integers(1, n // 2 + 1))
        signal = rng.integers(0, 3, n).astype(np.float64)
        penalty = float(10.0 ** rng.uniform(-2, 1))
        ours, theirs = optimal_partition(signal, penalty, min_size), _ruptures_ends(signal, penalty, min_size)
        if ours != theirs:
            differ += 1
            assert total(signal, ours, penalty) == pytest.approx(total(signal, theirs, penalty), rel=1e-12)
    assert differ < 60  # ties are the exception even here


def test_optimal_partition_edges_match_ruptures() -> None:
    from planpipe.plans.stats import optimal_partition

    rng = np.random.default_rng(26)
    n, m = 300, 20
    cases = []
    for at in (m, m + 1, n // 2, n - m - 1, n - m):  # one change, at the first to the last allowed index
        cases.append((np.r_[rng.normal(0, 0.3, at), rng.normal(2, 0.3, n - at)], m))
    cases.append((rng.normal(0, 0.3, n), m))  # no change
    cases.append((rng.normal(0, 0.3, 2 * m), m))  # just long enough for two segments
    cases.append((np.r_[rng.normal(0, 0.3, m), rng.normal(3, 0.3, m)], m))
    cases.append((rng.normal(0, 1, 1000), 1))  # the longest series, the smallest segments
    cases.append((np.r_[rng.normal(0, 0.2, 600), rng.normal(1, 0.2, 400)], 10))
    for signal, min_size in cases:
        penalty = 3 * 0.09 * math.log(len(signal))
        assert optimal_partition(signal, penalty, min_size) == _ruptures_ends(signal, penalty, min_size)
    found = optimal_partition(cases[0][0], 3 * 0.09 * math.log(n), m)
    assert found == [m, n]  # the change at the first allowed index is found
    with pytest.raises(ValueError):
        optimal_partition(np.zeros(10), 1.0, 6)


def test_optimal_partition_finds_nothing_in_a_constant_series() -> None:
    # Every segmentation costs exactly 0; ruptures' rounding can still buy breakpoints with
    # the tiny penalty a constant series gets (e.g. 300 × log(2000 ms)), this does not.
    from planpipe.plans.stats import find_change, optimal_partition

    for value in (math.log(5), math.log(2000), math.log(0.05), 12.3456):
        for n in (40, 300, 1000):
            assert optimal_partition(np.full(n, value), 3e-12 * math.log(n), 20) == [n]
            assert find_change(np.full(n, value), 20) is None


def test_find_change_is_what_it_was_with_ruptures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The glue around the partition (block means, penalty, which level is current) unchanged."""
    import planpipe.plans.stats as stats_module

    rng = np.random.default_rng(27)
    series = []
    for _ in range(40):
        n, at = int(rng.integers(40, 4000)), float(rng.uniform(0.1, 0.95))
        before, after = rng.normal(0, 0.3, int(n * at)), rng.normal(float(rng.choice([0, 0.5, 1.5])), 0.3, n)
        series.append(np.r_[before, after[: n - len(before)]])
    ours = [stats_module.find_change(s.copy(), min_size=20) for s in series]
    monkeypatch.setattr(stats_module, "optimal_partition", _ruptures_ends)
    theirs = [stats_module.find_change(s.copy(), min_size=20) for s in series]
    assert ours == theirs
    assert sum(c is not None for c in ours) >= 10  # the comparison saw changes, not only None
