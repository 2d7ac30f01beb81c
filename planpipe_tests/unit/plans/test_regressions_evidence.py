"""The statistical core's evidence beyond time: work, clusters, settling periods, multi-plan queries."""

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from planpipe.plans.detection import find_regressions
from planpipe.plans.verdicts import DetectionConfig

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
END = NOW.timestamp()
STEP = 60.0


class Series:
    """Executions in time order: each `add` continues where the query's previous one stopped."""

    def __init__(self, seed: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.rows: list[dict[str, object]] = []
        self.clock: dict[tuple[str, str], float] = {}

    def add(self, cluster: str, query: str, fp: str, n: int, median: float, blocks: float | None = 100.0,
            start: float | None = None) -> float:  # fmt: skip
        t = start if start is not None else self.clock.get((cluster, query), END - 2 * 86400)
        first = t
        for ms in self.rng.lognormal(np.log(median), 0.1, n):
            known = blocks is not None
            self.rows.append({"cluster_id": cluster, "query_hash": query, "fingerprint": fp, "execution_timestamp": t,
                              "total_time_ms": float(ms), "shared_blocks": None if blocks is None else int(blocks),
                              "temp_blocks": 0, "top_rows": 10.0 if known else None, "top_loops": 1})  # fmt: skip
            t += STEP
        self.clock[(cluster, query)] = t
        return first

    def frame(self) -> pl.LazyFrame:
        return pl.DataFrame(self.rows, schema={
            "cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String,
            "execution_timestamp": pl.Float64, "total_time_ms": pl.Float64, "shared_blocks": pl.Int64,
            "temp_blocks": pl.Int64, "top_rows": pl.Float64, "top_loops": pl.Int64}).lazy()  # fmt: skip


def test_slower_with_the_same_work_is_the_machine_and_more_work_is_the_query() -> None:
    s = Series()
    for q in ("h1", "h2", "h3"):  # a busy machine: 2.5× slower, same work
        s.add("c1", q, f"P{q}", 100, 30)
        s.add("c1", q, f"P{q}", 40, 75)
    s.add("c1", "grow", "G", 100, 20, blocks=100)  # data growth: 3.5× slower, 4× the blocks
    started = s.add("c1", "grow", "G", 40, 70, blocks=400)
    s.add("c1", "lock", "L", 100, 20)  # same work, but far beyond the cluster's shift
    s.add("c1", "lock", "L", 40, 400)
    s.add("c2", "h1", "Ph1", 140, 30)  # the same query on another cluster: unchanged
    baselines = {(c, q): fp for c, q, fp in {(r["cluster_id"], r["query_hash"], r["fingerprint"]) for r in s.rows}}
    analysis = find_regressions(s.frame(), baselines, DetectionConfig(), now=NOW)  # type: ignore[arg-type]
    found = {(v.cluster_id, v.query_hash): v for v in analysis.findings}
    assert set(found) == {("c1", "grow"), ("c1", "lock")}
    grow = found[("c1", "grow")]
    assert grow.kind == "same_plan_slower" and "data growth" in grow.reason
    assert grow.evidence.work_ratio_blocks == pytest.approx(401 / 101)
    assert abs(grow.evidence.window_start.timestamp() - started) <= 2 * STEP  # the change point
    assert "beyond its cluster's shift" in found[("c1", "lock")].reason
    [cluster] = analysis.clusters
    assert cluster.cluster_id == "c1" and {v.query_hash for v in cluster.affected} == {"h1", "h2", "h3", "lock"}
    assert cluster.ratio_p50 == pytest.approx(2.5, rel=0.15)
    assert analysis.stats.environment_slowdowns == 3


def test_unknown_work_cannot_clear_a_query() -> None:
    s = Series()
    s.add("c", "q", "A", 100, 20, blocks=None)
    s.add("c", "q", "A", 40, 70, blocks=None)
    analysis = find_regressions(s.frame(), {("c", "q"): "A"}, DetectionConfig(), now=NOW)
    assert [v.kind for v in analysis.findings] == ["same_plan_slower"]


def test_a_one_off_first_plan_is_replaced_by_the_settling_periods_dominant_plan() -> None:
    s = Series()
    s.add("c", "q", "ONEOFF", 1, 60)
    s.add("c", "q", "USUAL", 100, 1)
    config = DetectionConfig()
    automatic = find_regressions(s.frame(), {("c", "q"): "ONEOFF"}, config, now=NOW, auto_accepted=[("c", "q")])
    assert [(x.fingerprint, x.replaced) for x in automatic.settled] == [("USUAL", "ONEOFF")]
    assert automatic.findings == [] and automatic.baselines == {("c", "q"): "USUAL"}
    # Accepted by a person: the choice stands, and the usual plan is a flip (an improvement).
    chosen = find_regressions(s.frame(), {("c", "q"): "ONEOFF"}, config, now=NOW)
    assert chosen.settled == [] and chosen.baselines == {("c", "q"): "ONEOFF"}


def test_plans_alternating_from_the_start_are_compared_each_with_itself() -> None:
    s = Series()
    t = END - 86400
    for i in range(120):  # two plans picked by constants, alternating before and after
        s.add("c", "q", "SEQ" if i % 2 else "IDX", 1, 40 if i % 2 else 1, start=t + i * STEP)
    analysis = find_regressions(s.frame(), {("c", "q"): "IDX"}, DetectionConfig(), now=NOW, auto_accepted=[("c", "q")])
    assert analysis.findings == [] and analysis.settled == []  # a tie keeps the first plan
    assert analysis.stats.multi_plan_queries == 1
    # A new plan after the settling period is a flip.
    s.add("c", "q", "NEW", 40, 200, start=t + 130 * STEP)
    flipped = find_regressions(s.frame(), {("c", "q"): "IDX"}, DetectionConfig(), now=NOW, auto_accepted=[("c", "q")])
    assert [(v.new_fingerprint, v.kind) for v in flipped.findings] == [("NEW", "plan_flip_regression")]


def test_a_flip_that_went_back_to_the_baseline_is_over() -> None:
    s = Series()
    s.add("c", "q", "A", 100, 5)
    s.add("c", "q", "B", 40, 50)
    s.add("c", "q", "A", 19, 5)
    config = DetectionConfig()
    assert [v.kind for v in find_regressions(s.frame(), {("c", "q"): "A"}, config, now=NOW).findings] == [
        "plan_flip_regression"
    ]
    s.add("c", "q", "A", 1, 5)  # the 20th execution back on the baseline plan
    assert find_regressions(s.frame(), {("c", "q"): "A"}, config, now=NOW).findings == []
