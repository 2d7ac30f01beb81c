"""The statistics detection relies on: samples, Mann-Whitney U, Benjamini-Hochberg and change points.

Each numerical piece is a small numpy version of what a well-kept library computes, and is
tested against that library (planpipe_tests/unit/plans/test_stats.py; scipy and ruptures are
test dependencies only):

- `mann_whitney_u`: scipy's `mannwhitneyu`, two-sided: `method="exact"` (the exact null
  distribution of U) for small untied samples, else `method="asymptotic"` (normal
  approximation, tie- and continuity-corrected);
- `benjamini_hochberg`: scipy's `false_discovery_control(method="bh")`;
- `optimal_partition`: ruptures' `KernelCPD(kernel="linear")` PELT with a penalty (the l2
  cost of shifts in mean), pruning included.

Why hand-written (issue 11: "a hand-written piece only where a measurement shows it must
be"): importing the libraries was most of what detection's time had grown by on the 10 M-
observation bench (bench/DETECT.md). After numpy and polars, `import scipy.stats` took
0.52-0.58 s and +63 MB of RSS, `import ruptures` (which imports scipy.stats, scipy.spatial
and scipy.signal) 0.58-0.61 s and +69 MB; what detection computed with them took 0.15-0.2 s
(275 change-point searches, 24 tests, one adjustment). Without them detection's CPU time and
memory in use are back to the version before issue 11's. The rest here is the glue: which series, which
penalty, which side of a change is "before".
"""

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChangePoint",
    "MannWhitney",
    "SampleStats",
    "benjamini_hochberg",
    "find_change",
    "mann_whitney_u",
    "optimal_partition",
    "ratio",
]

# Change points are searched on at most this many points: longer series are averaged in blocks
# of consecutive executions first (a shift in level survives block means, noise shrinks).
_MAX_POINTS: Final = 1_000
# The exact null distribution of U when both samples are this small and untied (scipy's
# "auto" takes it as soon as one sample is); the normal approximation otherwise.
_EXACT_MAX: Final = 8


@dataclass(frozen=True)
class MannWhitney:
    """Two-sided Mann-Whitney U test of `new` against `baseline`.

    `u` counts the (baseline, new) pairs where the new execution was slower, ties
    counting one half; `effect` = u / (n_baseline · n_new) is the probability that a
    new execution is slower than a baseline one (0.5: no difference). `z` is the
    normal score of u (continuity corrected; 0 when every value is tied).
    """

    u: float
    z: float
    p_value: float
    effect: float
    method: str = "asymptotic"


def mann_whitney_u(baseline: npt.ArrayLike, new: npt.ArrayLike) -> MannWhitney:
    """The two-sided test; the exact distribution of U when both samples are small and untied."""
    x = np.asarray(baseline, dtype=np.float64)
    y = np.asarray(new, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("samples must not contain NaN")
    both = np.concatenate([x, y])
    if np.all(both == both[0]):  # every value tied: no evidence of any difference
        return MannWhitney(u=n1 * n2 / 2, z=0.0, p_value=1.0, effect=0.5)
    sorted_x = np.sort(x)
    below = np.searchsorted(sorted_x, y, side="left")
    equal = np.searchsorted(sorted_x, y, side="right") - below
    u = float(below.sum()) + 0.5 * float(equal.sum())  # U of `new`: pairs where new > baseline (+ ½ ties)
    counts = np.unique(both, return_counts=True)[1]
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    mean = n1 * n2 / 2
    z = math.copysign(max(abs(u - mean) - 0.5, 0.0) / math.sqrt(variance), u - mean) if variance > 0 else 0.0
    if max(n1, n2) <= _EXACT_MAX and len(counts) == n:
        method = "exact"
        p = 2.0 * float(_u_null_cdf(n1, n2)[int(min(u, n1 * n2 - u))])
    else:
        method = "asymptotic"
        p = 2.0 * _normal_sf((max(u, n1 * n2 - u) - mean - 0.5) / math.sqrt(variance))
    return MannWhitney(u=u, z=z, p_value=min(1.0, p), effect=u / (n1 * n2), method=method)


def _u_null_cdf(n1: int, n2: int) -> npt.NDArray[np.float64]:
    """P(U <= k), k = 0 … n1·n2, for untied samples of sizes n1 and n2 under the null hypothesis.

    The number of orderings with U = k counts exactly (int64: fine while C(n1 + n2, n1) <
    2^63, far beyond the sizes this is used for): with i values of one sample and j of the
    other, the largest value is either from the first (it beats all j others: U += j) or
    not, so f(i, j) = q^j · f(i-1, j) + f(i, j-1) as polynomials in q."""
    if n1 + n2 > 60:
        raise ValueError("exact distribution of U only for n1 + n2 <= 60")
    previous = [np.ones(1, dtype=np.int64) for _ in range(n2 + 1)]  # f(0, j) = 1
    for i in range(1, n1 + 1):
        current = [np.ones(1, dtype=np.int64)]  # f(i, 0) = 1
        for j in range(1, n2 + 1):
            f = np.zeros(i * j + 1, dtype=np.int64)
            f[j : j + len(previous[j])] += previous[j]
            f[: len(current[j - 1])] += current[j - 1]
            current.append(f)
        previous = current
    return np.cumsum(previous[n2] / float(math.comb(n1 + n2, n1)))  # as scipy sums its pmf


_SQRT1_2: Final = 0.7071067811865476
_MAXLOG: Final = 709.782712893384  # erfc(x) underflows to 0 past x² > this (as cephes, scipy's ndtr)


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z: scipy's `ndtr(-z)` (cephes), from math's erf/erfc."""
    x = -z * _SQRT1_2
    a = abs(x)
    if a < _SQRT1_2:
        return 0.5 + 0.5 * math.erf(x)
    tail = 0.0 if a * a > _MAXLOG else 0.5 * math.erfc(a)
    return 1.0 - tail if x > 0 else tail


def benjamini_hochberg(p_values: list[float], tests: int) -> list[float]:
    """Adjusted p-values (Benjamini-Hochberg, as scipy's `false_discovery_control`) for
    `p_values` out of `tests` hypotheses; the hypotheses not listed count as p = 1,
    which never changes the others."""
    if not p_values:
        return []
    m = max(tests, len(p_values))
    padded = np.ones(m, dtype=np.float64)
    padded[: len(p_values)] = p_values
    if not np.all((padded >= 0) & (padded <= 1)):
        raise ValueError("p-values must lie between 0 and 1")
    order = np.argsort(padded)
    adjusted = padded[order] * (m / np.arange(1, m + 1, dtype=np.float64))
    # The step-up: an adjusted p-value is never above a larger p-value's adjustment.
    np.minimum.accumulate(adjusted[::-1], out=adjusted[::-1])
    restored = np.empty(m, dtype=np.float64)
    restored[order] = adjusted
    return [float(v) for v in np.clip(restored[: len(p_values)], 0.0, 1.0)]


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


def ratio(new: float, baseline: float) -> float:
    if baseline > 0:
        return new / baseline
    return math.inf if new > 0 else 1.0


@dataclass(frozen=True)
class ChangePoint:
    """Where the series' current level began: `index` is the first execution of it."""

    index: int
    breakpoints: tuple[int, ...]  # every change found (indexes of first executions), oldest first


def _noise_variance(series: npt.NDArray[np.float64]) -> float:
    """Robust variance of the noise around the levels: MAD of first differences (a shift
    moves one difference, not the median of them)."""
    if len(series) < 3:
        return float(np.var(series)) or 1e-12
    mad = float(np.median(np.abs(np.diff(series))))
    sigma = mad / (0.6745 * math.sqrt(2))
    return max(sigma * sigma, 1e-12)


def find_change(
    log_ms: npt.NDArray[np.float64], min_size: int, penalty: float = 3.0, min_shift: float = 0.2
) -> ChangePoint | None:
    """The start of the series' current level, if its level changed.

    Optimal segmentation (`optimal_partition`: PELT on the l2 cost of shifts in mean)
    of the log-latency series in execution order, penalised by
    `penalty` · σ² · ln n (σ² the noise variance: BIC-like, so noise alone rarely buys
    a breakpoint). Segments hold at least `min_size`
    executions. The current level is the last segment; it started at the last
    breakpoint whose later segments all sit on the same side of the earlier level:
    a slowdown that came in two steps starts at the first step. A current level within
    `min_shift` (log units) of the first one is a return: it starts at the last
    breakpoint. The caller decides with a test whether the change matters.
    """
    n = len(log_ms)
    if n < 2 * min_size:
        return None
    block = max(1, math.ceil(n / _MAX_POINTS))
    usable = n - n % block if n % block else n
    # Block means of consecutive executions (the oldest remainder folded into the first block).
    head = n - usable
    series = log_ms[head:].reshape(-1, block).mean(axis=1) if block > 1 else log_ms
    if head:
        series[0] = float(np.mean(log_ms[: head + block]))
    points = len(series)
    min_points = max(1, math.ceil(min_size / block))
    if points < 2 * min_points:
        return None
    pen = penalty * _noise_variance(series) * math.log(points)
    ends = optimal_partition(series, pen, min_points)[:-1]  # the last segment ends with the series
    if not ends:
        return None
    starts = [0, *ends]
    levels = [float(np.median(series[a:b])) for a, b in zip(starts, [*ends, points], strict=True)]
    # The current level started where the series last crossed from the first level's side.
    first, current = levels[0], levels[-1]
    direction = 1.0 if current > first else -1.0
    k = len(levels) - 1
    while k > 1 and abs(current - first) >= min_shift and (levels[k - 1] - first) * direction > 0:
        k -= 1
    index = head + starts[k] * block if starts[k] else 0
    return ChangePoint(index=index, breakpoints=tuple(head + s * block for s in ends))


def optimal_partition(signal: npt.NDArray[np.float64], penalty: float, min_size: int) -> list[int]:
    """Ends of the segments of `signal` minimising Σ (squared deviations from the segment's
    mean) + `penalty` per segment, each segment at least `min_size` long, the last end
    being len(signal): ruptures' `KernelCPD(kernel="linear", min_size).fit(signal).predict(pen=penalty)`.

    PELT as ruptures' C loop (ekcpd_pelt_compute) runs it, pruning included: the oldest
    candidate start is dropped while it costs at least the best total so far, so a start
    can be dropped that an end less than `min_size` later would have taken. The costs come
    from prefix sums of the centred signal instead of ruptures' running sums; where two
    totals agree to rounding the two may choose differently (ruptures' own rounding finds
    breakpoints in a constant signal under a tiny penalty; this does not). Vectorised over
    blocks of `min_size` ends (rows) and their candidate starts (columns): every start an
    end in [t0, t0 + min_size) may take lies before t0, so the totals it needs are known.
    A smaller `min_size` gets blocks of `_MIN_BLOCK` ends, whose starts inside the block
    are tried end by end (`_Walk`).
    """
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    n, m = len(x), int(min_size)
    if m < 1 or n < 2 * m:
        raise ValueError(f"cannot split {n} points into segments of at least {min_size}")
    centred = x - x.mean()
    sums = np.concatenate(([0.0], np.cumsum(centred)))  # Σ x[:t]
    squares = np.concatenate(([0.0], np.cumsum(centred * centred)))  # Σ x²[:t]
    index = np.arange(n + 1, dtype=np.float64)
    best = np.zeros(n + 1)  # least penalised cost of x[:t]
    path = np.zeros(n + 1, dtype=np.int64)  # where its last segment starts
    ends = np.arange(1, 2 * m)  # before 2·min_size: one segment
    best[ends] = squares[ends] - sums[ends] ** 2 / ends + penalty
    block = m if m >= _MIN_BLOCK // 2 else _MIN_BLOCK
    # Row j, column i of the last m - 1 starts before a block: start > end - m (not a candidate) iff i >= j.
    corner = np.triu(np.ones((block, m - 1), dtype=bool))
    walk = _Walk(sums.tolist(), squares.tolist(), (best - squares).tolist(), best, path, penalty, m)
    s_min = 0  # the oldest candidate start (pruning moves it forward only)
    t0 = 2 * m
    while t0 <= n:
        t1 = min(t0 + block, n + 1)
        rows, lo = t1 - t0, s_min
        gain = sums[t0:t1, None] - sums[None, lo:t0]
        gain *= gain
        gain /= index[t0:t1, None] - index[None, lo:t0]  # (Σ segment)² / length
        totals = (best[lo:t0] - squares[lo:t0])[None, :] + squares[t0:t1, None]
        totals -= gain  # best[s] + cost(s, t) for the starts before the block: ruptures' M_pruning
        np.copyto(totals[:, t0 - lo - m + 1 :], np.inf, where=corner[:rows])  # start > end - m
        if lo == 0:
            totals[:, 1:m] = np.inf  # a first segment shorter than m
        choice = np.argmin(totals, axis=1)  # the first least: ruptures replaces only on "<"
        least = totals[np.arange(rows), choice] + penalty
        if rows <= m and (totals[:, 0] < least).all():  # no start inside the block, none pruned
            best[t0:t1] = least
            path[t0:t1] = choice + lo
            walk.below[t0:t1] = (least - squares[t0:t1]).tolist()
        else:
            s_min = walk.through(totals, choice, lo, t0, s_min)
        t0 = t1
    found = [n]
    while found[-1] > 0:
        found.append(int(path[found[-1]]))
    return found[-2::-1]


# Ends per vectorised step when min_size is below half this (the starts inside a step are then
# tried one by one): fewer ends per step cost more in numpy calls than the starts inside cost.
_MIN_BLOCK: Final = 16


@dataclass
class _Walk:
    """`optimal_partition` end by end through one block: the starts inside the block (when
    min_size is smaller than it) and PELT's pruning, which moves the oldest candidate start
    to the first one (0, then m, m+1, …) that still beats the best total, or to end - m + 1."""

    sums: list[float]
    squares: list[float]
    below: list[float]  # best[s] - squares[s]
    best: npt.NDArray[np.float64]
    path: npt.NDArray[np.int64]
    penalty: float
    m: int

    def through(
        self, totals: npt.NDArray[np.float64], choice: npt.NDArray[np.int64], lo: int, t0: int, s_min: int
    ) -> int:
        """Ends t0 … t0 + len(totals) - 1, given the totals of the starts before t0 (rows: ends,
        columns: starts from lo; each row's first least in `choice`). Returns the oldest
        candidate start after the block."""
        m = self.m
        for j in range(len(totals)):
            t = t0 + j
            least, start = math.inf, -1
            if s_min < t0:  # the starts before the block, from the oldest candidate on
                k = s_min - lo
                c = int(choice[j])
                if c < k:  # its best start was pruned earlier in this block
                    c = k + int(np.argmin(totals[j, k:]))
                least, start = float(totals[j, c]), c + lo
            first = max(t0, s_min)
            inside = []  # the totals of starts first … t - m, inside the block
            sum_t, squares_t = self.sums[t], self.squares[t]
            for s in range(first, t - m + 1):
                d = sum_t - self.sums[s]
                total = (self.below[s] + squares_t) - d * d / (t - s)
                inside.append(total)
                if total < least:
                    least, start = total, s
            least += self.penalty
            self.best[t], self.path[t], self.below[t] = least, start, least - squares_t
            # Pruning: the oldest candidate moves to the first start that beats the best total
            # (non-candidates before the block are inf and never do), or to t - m + 1.
            if s_min < t0:
                k = s_min - lo
                if totals[j, k] < least:
                    continue
                ahead = np.flatnonzero(totals[j, k:] < least)
                if len(ahead):
                    s_min = lo + k + int(ahead[0])
                    continue
            beating = (s for s, total in zip(range(first, t - m + 1), inside, strict=True) if total < least)
            s_min = next(beating, t - m + 1)
        return s_min
