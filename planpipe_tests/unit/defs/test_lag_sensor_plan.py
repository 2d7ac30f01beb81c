"""How many ingest runs the lag sensor launches: backlog share, standing minimum, the limit."""

import pytest

from planpipe.defs.ingest.sensors import StepSpan, runs_to_launch, still_consuming, wanted_runs

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


def test_a_run_past_its_ingest_step_is_no_consumer() -> None:
    now = 10_000.0
    # Queued or starting (no step yet) and consuming runs count; one whose step ended (checks left) does not.
    assert still_consuming(StepSpan(), now=now, max_seconds=1800)
    assert still_consuming(StepSpan(started=now - 60), now=now, max_seconds=1800)
    assert not still_consuming(StepSpan(started=now - 60, ended=True), now=now, max_seconds=1800)
    # Within HANDOVER_S (60 s) of its end a run is retiring: its successor is launched before it leaves.
    assert not still_consuming(StepSpan(started=now - 1750), now=now, max_seconds=1800)
    # Short runs hand over in their last quarter, not from the start.
    assert still_consuming(StepSpan(started=now - 40), now=now, max_seconds=60)
    assert not still_consuming(StepSpan(started=now - 50), now=now, max_seconds=60)
