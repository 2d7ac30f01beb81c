"""How many ingest runs the lag sensor launches: backlog share, standing minimum, the limit."""

import pytest

from planpipe.defs.ingest.sensors import runs_to_launch, wanted_runs

pytestmark = pytest.mark.unit


def test_wanted_runs_respects_the_limit() -> None:
    assert wanted_runs(0, 0, 2) == 0
    assert wanted_runs(10, 0, 2) == 1
    assert wanted_runs(10, 1, 2) == 0
    assert wanted_runs(50_000, 0, 2) == 2
    assert wanted_runs(50_000, 2, 2) == 0


def test_a_standing_run_is_launched_without_lag() -> None:
    assert runs_to_launch(0, 0, 0, limit=2, minimum=1) == (1, 0)
    assert runs_to_launch(0, 1, 1, limit=2, minimum=1) == (0, 0)
    assert runs_to_launch(0, 0, 0, limit=2, minimum=0) == (0, 0)


def test_a_backlog_run_does_not_stand_in_for_the_standing_one() -> None:
    # one backlog run in flight, no standing run: the standing one is launched (it outlives the backlog)
    assert runs_to_launch(10, 1, 0, limit=2, minimum=1) == (1, 0)
    # a big backlog: the standing run plus one for the backlog, up to the limit
    assert runs_to_launch(50_000, 0, 0, limit=2, minimum=1) == (1, 1)
    assert runs_to_launch(50_000, 1, 1, limit=2, minimum=1) == (0, 1)
    assert runs_to_launch(50_000, 2, 1, limit=2, minimum=1) == (0, 0)


def test_the_minimum_may_exceed_the_limit_but_nothing_else_does() -> None:
    assert runs_to_launch(0, 0, 0, limit=1, minimum=2) == (2, 0)
    assert runs_to_launch(50_000, 2, 2, limit=1, minimum=2) == (0, 0)
