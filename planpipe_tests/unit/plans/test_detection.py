"""The statistical core on synthetic observations: no PostgreSQL, no Kafka."""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from planpipe.plans.detection import find_regressions
from planpipe.plans.plan_key import PLAN_KEY, plan_keys
from planpipe.plans.scan import scan_observations
from planpipe.plans.stats import SampleStats, mann_whitney_u
from planpipe.plans.verdicts import Comparison, DetectionConfig, Verdict, classify

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
END = NOW.timestamp()
HOUR = 3600.0
COLUMNS = ["cluster_id", "query_hash", "fingerprint", "execution_timestamp", "total_time_ms"]


class Obs:
    def __init__(self, seed: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        self.parts: list[pl.DataFrame] = []

    def add(self, cluster: str, query: str, fp: str, n: int, *, recent: bool, median: float,
            sigma: float = 0.3, hours: tuple[float, float] | None = None) -> None:  # fmt: skip
        lo, hi = hours or ((0.0, 23.0) if recent else (30.0, 150.0))
        ts = END - self.rng.uniform(lo * HOUR, hi * HOUR, n)
        ms = self.rng.lognormal(np.log(median), sigma, n) if sigma else np.full(n, median)
        self.parts.append(
            pl.DataFrame(
                {
                    "cluster_id": [cluster] * n,
                    "query_hash": [query] * n,
                    "fingerprint": [fp] * n,
                    "execution_timestamp": ts,
                    "total_time_ms": ms,
                }
            )
        )

    def frame(self) -> pl.DataFrame:
        return pl.concat(self.parts)


def keys(verdicts: list[Verdict]) -> set[tuple[str, str, str, str]]:
    return {(v.cluster_id, v.query_hash, v.new_fingerprint, v.kind) for v in verdicts if v.kind != "noise"}


@pytest.fixture
def planted() -> tuple[pl.DataFrame, dict[tuple[str, str], str]]:
    o = Obs()
    o.add("c1", "flip", "A", 200, recent=False, median=5)
    o.add("c1", "flip", "B", 60, recent=True, median=40)
    o.add("c1", "faster", "A2", 200, recent=False, median=60)
    o.add("c1", "faster", "B2", 60, recent=True, median=4)
    o.add("c1", "growth", "A3", 200, recent=False, median=20)
    o.add("c1", "growth", "A3", 60, recent=True, median=70)
    o.add("c1", "noise", "A4", 200, recent=False, median=20, sigma=0.6)
    o.add("c1", "noise", "A4", 60, recent=True, median=22, sigma=0.6)
    o.add("c1", "few", "A5", 200, recent=False, median=5)
    o.add("c1", "few", "B5", 12, recent=True, median=50)
    o.add("c1", "orphan", "X", 100, recent=True, median=50)  # no accepted plan
    o.add("c2", "flip", "A", 200, recent=False, median=5)  # same query hash, other cluster: unchanged
    o.add("c2", "flip", "A", 60, recent=True, median=5)
    baselines = {("c1", q): fp for q, fp in [("flip", "A"), ("faster", "A2"), ("growth", "A3"), ("noise", "A4"),
                                             ("few", "A5")]}  # fmt: skip
    baselines[("c2", "flip")] = "A"
    return o.frame(), baselines


def test_planted_findings(planted: tuple[pl.DataFrame, dict[tuple[str, str], str]]) -> None:
    frame, baselines = planted
    analysis = find_regressions(frame.lazy(), baselines, DetectionConfig(), now=NOW)
    assert keys(analysis.verdicts) == {
        ("c1", "flip", "B", "plan_flip_regression"),
        ("c1", "faster", "B2", "plan_flip_improvement"),
        ("c1", "growth", "A3", "same_plan_slower"),
    }
    by_query = {v.query_hash: v for v in analysis.findings}
    flip = by_query["flip"]
    assert (flip.baseline_fingerprint, flip.severity) == ("A", "critical")  # 8x
    assert flip.evidence.baseline.executions == 200 and flip.evidence.new.executions == 60
    assert flip.evidence.ratio_p50 == pytest.approx(8, rel=0.2)
    assert flip.evidence.test.p_value < 1e-20
    growth = by_query["growth"]
    assert growth.baseline_fingerprint == growth.new_fingerprint == "A3"
    assert growth.evidence.comparison == "same_plan" and growth.severity == "high"
    assert growth.evidence.baseline_end < growth.evidence.window_start  # history only, before the change point
    assert growth.evidence.split == "change_point"
    assert by_query["faster"].severity == "info"

    stats = analysis.stats
    assert stats.observations == frame.height
    assert stats.queries_without_baseline == 1
    assert stats.too_few_executions >= 1  # "few": 12 new executions
    assert stats.hash_collisions == 0
    evidence = flip.evidence.as_dict()
    assert set(evidence) >= {"baseline", "new", "ratio_p50", "p_value", "u", "z", "effect", "delta_p95_ms"}
    assert evidence["new"]["executions"] == 60


def test_fdr_adjusts_p_values_across_the_run(planted: tuple[pl.DataFrame, dict[tuple[str, str], str]]) -> None:
    frame, baselines = planted
    plain = find_regressions(frame.lazy(), baselines, DetectionConfig(fdr=False), now=NOW)
    adjusted = find_regressions(frame.lazy(), baselines, DetectionConfig(), now=NOW)
    assert keys(adjusted.verdicts) == keys(plain.verdicts)  # these are far from the threshold
    assert all(v.evidence.p_adjusted is None for v in plain.verdicts)
    for v in adjusted.verdicts:
        assert v.evidence.p_adjusted is not None and v.evidence.p_adjusted >= v.evidence.test.p_value
        assert v.evidence.as_dict()["p_adjusted"] == v.evidence.p_adjusted


def test_baselines_as_a_frame_and_cluster_scope(planted: tuple[pl.DataFrame, dict[tuple[str, str], str]]) -> None:
    frame, baselines = planted
    as_frame = pl.DataFrame(
        [(c, q, f) for (c, q), f in baselines.items()], schema=["cluster_id", "query_hash", "fingerprint"], orient="row"
    )
    everything = find_regressions(frame.lazy(), as_frame, DetectionConfig(), now=NOW)
    assert keys(everything.verdicts) == keys(
        find_regressions(frame.lazy(), baselines, DetectionConfig(), now=NOW).verdicts
    )
    only_c2 = find_regressions(frame.lazy(), baselines, DetectionConfig(clusters=("c2",)), now=NOW)
    assert keys(only_c2.verdicts) == set()
    assert only_c2.stats.observations == 260


def test_the_baseline_is_the_one_given(planted: tuple[pl.DataFrame, dict[tuple[str, str], str]]) -> None:
    frame, baselines = planted
    # Accepting B makes it the baseline: A has no recent executions, so nothing is compared.
    analysis = find_regressions(frame.lazy(), baselines | {("c1", "flip"): "B"}, DetectionConfig(), now=NOW)
    assert ("c1", "flip") not in {(v.cluster_id, v.query_hash) for v in analysis.findings}


def test_only_the_windows_count() -> None:
    o = Obs()
    o.add("c", "q", "A", 100, recent=False, median=5, hours=(30, 130))
    o.add("c", "q", "A", 100, recent=False, median=500, hours=(170, 400))  # older than the lookback
    o.add("c", "q", "B", 50, recent=False, median=50, hours=(-30, -1))  # in the future of `now`
    o.add("c", "q", "B", 50, recent=False, median=50, hours=(25, 28))  # B ran, but before the window
    analysis = find_regressions(o.frame().lazy(), {("c", "q"): "A"}, DetectionConfig(window_hours=24), now=NOW)
    assert analysis.verdicts == [] and analysis.stats.observations == 150
    # A later `now` puts B's future executions in the window.
    later = datetime.fromtimestamp(END + 30 * HOUR, UTC)
    found = find_regressions(o.frame().lazy(), {("c", "q"): "A"}, DetectionConfig(window_hours=24), now=later)
    assert keys(found.verdicts) == {("c", "q", "B", "plan_flip_regression")}
    assert found.findings[0].evidence.baseline.executions == 100


def test_window_and_thresholds_come_from_the_config() -> None:
    o = Obs()
    o.add("c", "q", "A", 100, recent=False, median=5)
    o.add("c", "q", "B", 40, recent=True, median=12, hours=(30, 40))
    day = DetectionConfig(window_hours=24)
    assert find_regressions(o.frame().lazy(), {("c", "q"): "A"}, day, now=NOW).verdicts == []
    config = DetectionConfig(window_hours=48, min_abs_ms=5)
    assert keys(find_regressions(o.frame().lazy(), {("c", "q"): "A"}, config, now=NOW).verdicts) == {
        ("c", "q", "B", "plan_flip_regression")
    }


Key = tuple[str, str, str, str]


def brute_force(frame: pl.DataFrame, baselines: dict[tuple[str, str], str], config: DetectionConfig) -> set[Key]:
    """Every comparison tested exactly, no screening."""
    assert config.window_hours is not None, "brute force compares fixed windows"
    window, lookback = END - config.window_hours * HOUR, END - config.lookback_hours * HOUR
    ts = pl.col("execution_timestamp")
    frame = frame.filter(ts >= lookback, ts <= END)
    found: set[Key] = set()
    for (cluster, query), accepted in baselines.items():
        rows = frame.filter(pl.col("cluster_id") == cluster, pl.col("query_hash") == query)
        for fp in rows.filter(ts >= window).get_column("fingerprint").unique():
            new = rows.filter(pl.col("fingerprint") == fp, ts >= window).get_column("total_time_ms").to_numpy()
            base_rows = rows.filter(pl.col("fingerprint") == accepted)
            comparison: Comparison = "same_plan" if fp == accepted else "plan_flip"
            if fp == accepted:
                base_rows = base_rows.filter(ts < window)
            base = base_rows.get_column("total_time_ms").to_numpy()
            if len(base) == 0:
                continue
            p_value = mann_whitney_u(base, new).p_value
            kind, _ = classify(comparison, SampleStats.of(base), SampleStats.of(new), p_value, config)
            if kind != "noise":
                found.add((cluster, query, fp, kind))
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_screening_never_drops_a_finding(seed: int) -> None:
    """Near-threshold data: the histogram screen must agree with testing everything exactly."""
    rng = np.random.default_rng(seed)
    o = Obs(seed)
    baselines = {}
    for i in range(150):
        query, median = f"q{i}", float(rng.choice([0.004, 0.5, 4, 15, 30, 120]) * rng.uniform(0.8, 1.25))
        baselines[("c", query)] = "A"
        sigma = float(rng.choice([0.0, 0.05, 0.3, 0.6]))
        o.add("c", query, "A", int(rng.integers(5, 90)), recent=False, median=median, sigma=sigma)
        ratio = float(rng.choice([rng.uniform(0.3, 3.0), rng.uniform(1.35, 1.65), 1 / rng.uniform(1.35, 1.65)]))
        o.add("c", query, "A" if i % 3 == 0 else "B", int(rng.integers(5, 60)), recent=True, median=median * ratio,
              sigma=sigma)  # fmt: skip
        if i % 5 == 0:
            o.add("c", query, "A", int(rng.integers(5, 40)), recent=True, median=median, sigma=sigma)
    frame = o.frame().with_columns(pl.col("total_time_ms").round(3))  # ties, as real timings have
    config = DetectionConfig(window_hours=24, fdr=False, min_abs_ms=1.0 if seed == 3 else 10.0)
    analysis = find_regressions(frame.lazy(), baselines, config, now=NOW)
    assert keys(analysis.verdicts) == brute_force(frame, baselines, config)
    assert analysis.stats.screened_out > 0  # the screen did work
    assert analysis.stats.tested < analysis.stats.comparisons


def write_dataset(frame: pl.DataFrame, root: Path) -> None:
    """Laid out as the ingest writes it; the files of every other date have no plan_key column,
    as files written before it existed."""
    dated = frame.with_columns(
        pl.from_epoch("execution_timestamp", time_unit="s").dt.date().cast(pl.String).alias("date"),
        pl.lit("x" * 50).alias("plan_text"),  # present in real files, never read
    )
    for i, ((date,), part) in enumerate(sorted(dated.group_by(["date"]), key=lambda g: str(g[0][0]))):
        directory = root / "route=baseline" / f"date={date}"
        directory.mkdir(parents=True, exist_ok=True)
        stored = part.drop("date").with_columns(plan_keys(part)) if i % 2 else part.drop("date")
        stored.write_parquet(directory / "t+0+00000000000000000000-00000000000000000001.parquet")


def test_parquet_dataset_gives_the_same_verdicts(
    tmp_path: Path, planted: tuple[pl.DataFrame, dict[tuple[str, str], str]]
) -> None:
    frame, baselines = planted
    assert scan_observations(tmp_path) is None
    assert find_regressions(None, baselines, DetectionConfig(), now=NOW).verdicts == []
    write_dataset(frame, tmp_path)
    scanned = scan_observations(tmp_path)
    assert scanned is not None
    assert "plan_text" not in scanned.collect_schema().names()
    key = pl.col(PLAN_KEY)
    with_and_without = scanned.select(key.is_null().any().alias("without"), key.is_not_null().any().alias("with"))
    assert with_and_without.collect().row(0) == (True, True)  # detection fills the key in where it is missing
    in_memory = find_regressions(frame.lazy(), baselines, DetectionConfig(), now=NOW)
    from_files = find_regressions(scanned, baselines, DetectionConfig(), now=NOW)
    assert keys(from_files.verdicts) == keys(in_memory.verdicts) != set()
    assert from_files.stats.observations == in_memory.stats.observations
    assert [v.evidence.test for v in from_files.verdicts] == [v.evidence.test for v in in_memory.verdicts]
