"""Exact verdicts beyond time (planpipe.plans.judging, through find_regressions): work on both
sides, environment slowdowns, a flip that is over."""

import pytest

from planpipe.plans.detection import find_regressions
from planpipe.plans.verdicts import DetectionConfig
from planpipe_tests.unit.plans._series import NOW, STEP, Series

pytestmark = pytest.mark.unit


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
