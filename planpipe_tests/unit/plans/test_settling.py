"""Baselines from the settling period and multi-plan queries (planpipe.plans.settling, through
find_regressions)."""

import pytest

from planpipe.plans.detection import find_regressions
from planpipe.plans.verdicts import DetectionConfig
from planpipe_tests.unit.plans._series import END, NOW, STEP, Series

pytestmark = pytest.mark.unit


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
