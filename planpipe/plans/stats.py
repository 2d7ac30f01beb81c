"""The statistics detection relies on: samples, Mann-Whitney U, Benjamini-Hochberg and change points.

Well-kept libraries do the work: `scipy.stats.mannwhitneyu` (its exact distribution for
small samples without ties, the tie- and continuity-corrected normal approximation
otherwise), `scipy.stats.false_discovery_control` and `ruptures` (PELT on an l2 /
linear-kernel cost) for change points. What is written here is the glue: which series,
which penalty, which side of a change is "before".
"""

import importlib
import math
import threading
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

# scipy.stats and ruptures (which imports scipy.stats) are imported where they are used:
# loading them costs ~75 MB of resident memory, which at module import would sit under
# detection's streaming passes and add to their peak (measured on the 10 M bench).

__all__ = [
    "ChangePoint",
    "MannWhitney",
    "SampleStats",
    "benjamini_hochberg",
    "find_change",
    "mann_whitney_u",
    "preload",
    "ratio",
]


def preload() -> threading.Thread:
    """Import scipy.stats and ruptures in a background thread (~0.6 s, mostly scipy.stats): started
    once the streaming passes are done, the import overlaps the polars work that follows them
    (which releases the GIL) instead of adding to the exact stage. A later import waits for it."""
    thread = threading.Thread(
        target=lambda: [importlib.import_module(m) for m in ("scipy.stats", "ruptures")],
        name="planpipe-preload-stats",
        daemon=True,
    )
    thread.start()
    return thread


# Binary segmentation on at most this many points: longer series are averaged in blocks
# of consecutive executions first (a shift in level survives block means, noise shrinks).
_MAX_POINTS: Final = 1_000
_EXACT_MAX: Final = 8  # scipy's exact method for samples this small (without ties), as its "auto"


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
    """scipy's two-sided test; its "exact" method when both samples are small and untied."""
    x = np.asarray(baseline, dtype=np.float64)
    y = np.asarray(new, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    both = np.concatenate([x, y])
    if np.all(both == both[0]):  # every value tied: no evidence of any difference
        return MannWhitney(u=n1 * n2 / 2, z=0.0, p_value=1.0, effect=0.5)
    tied = len(np.unique(both)) < len(both)
    method = "exact" if max(n1, n2) <= _EXACT_MAX and not tied else "asymptotic"
    from scipy import stats as sps

    result = sps.mannwhitneyu(y, x, alternative="two-sided", method=method)
    u = float(result.statistic)  # U of `new`: pairs where new > baseline (+ ½ ties)
    n = n1 + n2
    _, counts = np.unique(both, return_counts=True)
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    mean = n1 * n2 / 2
    z = math.copysign(max(abs(u - mean) - 0.5, 0.0) / math.sqrt(variance), u - mean) if variance > 0 else 0.0
    return MannWhitney(u=u, z=z, p_value=min(1.0, float(result.pvalue)), effect=u / (n1 * n2), method=method)


def benjamini_hochberg(p_values: list[float], tests: int) -> list[float]:
    """Adjusted p-values (scipy's `false_discovery_control`, Benjamini-Hochberg) for
    `p_values` out of `tests` hypotheses; the hypotheses not listed count as p = 1,
    which never changes the others."""
    if not p_values:
        return []
    m = max(tests, len(p_values))
    padded = np.ones(m, dtype=np.float64)
    padded[: len(p_values)] = p_values
    from scipy import stats as sps

    adjusted = sps.false_discovery_control(padded, method="bh")
    return [float(v) for v in adjusted[: len(p_values)]]


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

    Optimal segmentation (ruptures KernelCPD: PELT with a linear kernel, i.e. the l2
    cost of shifts in mean) of the log-latency series in execution order, penalised by
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
    # PELT with a linear kernel is the l2 cost (shifts in mean) solved exactly, in ruptures' C code:
    # ~50× faster than binary segmentation here (0.6 ms vs 19 ms at 500 points).
    import ruptures

    algo = ruptures.KernelCPD(kernel="linear", min_size=min_points).fit(series.reshape(-1, 1))
    ends = [int(b) for b in algo.predict(pen=pen)][:-1]  # ruptures ends with len(series)
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
