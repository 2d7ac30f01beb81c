"""The consumer-loop base: delivery tracking and the no-assignment grace."""

from types import SimpleNamespace
from typing import Any

import pytest

from planpipe.messaging.consumer import ConsumerLoop, Deliveries, assignment_grace_s

pytestmark = pytest.mark.unit


def _message(topic: str, partition: int) -> Any:
    return SimpleNamespace(topic=lambda: topic, partition=lambda: partition)


def test_deliveries_count_acks_and_partitions_and_keep_errors() -> None:
    deliveries = Deliveries()
    deliveries(None, _message("t", 1))
    deliveries(None, _message("t", 3))
    deliveries("broker down", _message("t", 2))  # type: ignore[arg-type]
    assert (deliveries.records, deliveries.partitions) == (2, {1, 3})
    assert deliveries.errors == ["t[2]: broker down"]


class _Unassigned(ConsumerLoop):
    def __init__(self, min_idle_polls: int) -> None:
        self._consumer = SimpleNamespace(assignment=lambda: [])  # type: ignore[assignment]
        self._assignment_grace_s = assignment_grace_s({"session.timeout.ms": 10_000})
        self._min_idle_polls = min_idle_polls
        self._next_offsets = {}
        self._warn = lambda key, message: None


@pytest.mark.parametrize(
    ("min_idle_polls", "waited_s", "idle_polls", "expected"),
    [(0, 24.0, 0, False), (0, 26.0, 0, True), (3, 26.0, 2, False), (3, 26.0, 3, True)],
)
def test_no_assignment_is_caught_up_only_after_the_session_grace(
    min_idle_polls: int, waited_s: float, idle_polls: int, expected: bool
) -> None:
    loop = _Unassigned(min_idle_polls)
    assert loop._caught_up(waited_s=waited_s, idle_polls=idle_polls) is expected
    assert loop.lag() == {}
