"""When the DLQ sensor launches a replay: a backlog at once, a trickle at most every interval."""

import pytest

from planpipe.defs.replay.sensors import replay_due

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pending", "since_s", "due"), [(1, 0, False), (1, 119, False), (1, 120, True), (500, 0, True), (499, 5, False)]
)
def test_replay_due(pending: int, since_s: float, due: bool) -> None:
    assert replay_due(pending, since_s, 120.0) is due
