"""Broker health from cluster metadata, and the runbook's URP > 5 for > 2 min rule."""

from dataclasses import dataclass, field

from planpipe.health.broker import (
    BrokerHealth,
    DegradationState,
    FallbackMode,
    PartitionState,
    health_from_metadata,
    next_state,
)


@dataclass
class _Partition:
    leader: int
    replicas: list[int]
    isrs: list[int]


@dataclass
class _Topic:
    partitions: dict[int, _Partition] = field(default_factory=dict)


def _health(at: float, urp: int, offline: int = 0) -> BrokerHealth:
    under = tuple(PartitionState("query-plans", i, 1, 3, 1) for i in range(urp))
    down = tuple(PartitionState("query-plans", i, -1, 3, 0) for i in range(offline))
    return BrokerHealth(at, 3, 48, under, down)


def test_metadata_counts_under_replicated_and_offline_partitions() -> None:
    topics = {
        "query-plans": _Topic(
            {
                0: _Partition(1, [1, 2, 3], [1, 2, 3]),
                1: _Partition(2, [1, 2, 3], [2]),
                2: _Partition(-1, [1, 2, 3], []),
            }
        ),
        "__consumer_offsets": _Topic({0: _Partition(3, [3, 1], [3])}),
    }
    health = health_from_metadata(topics, brokers=3, measured_at=10.0)
    assert health.partitions == 4
    assert health.urp == 3  # the offline one is under-replicated too
    assert [(p.topic, p.partition) for p in health.offline] == [("query-plans", 2)]
    assert health.by_topic() == {
        "__consumer_offsets": {"under_replicated": 1, "offline": 0},
        "query-plans": {"under_replicated": 2, "offline": 1},
    }


def test_switches_to_redis_only_after_urp_above_five_for_more_than_two_minutes() -> None:
    state = DegradationState()
    for t in (0, 60, 120):
        state = next_state(state, _health(t, urp=6))
        assert state.mode is FallbackMode.KAFKA, t  # exactly 2 min is not "more than"
    state = next_state(state, _health(121, urp=6))
    assert state.mode is FallbackMode.REDIS
    assert state.changed_at == 121
    assert "UnderReplicatedPartitions 6 > 5" in state.reason


def test_five_partitions_or_an_interruption_never_switches() -> None:
    state = DegradationState()
    for t in range(0, 600, 30):
        state = next_state(state, _health(t, urp=5))
    assert state.mode is FallbackMode.KAFKA
    state = DegradationState()
    for t, urp in ((0, 9), (100, 9), (110, 0), (200, 9), (310, 9)):
        state = next_state(state, _health(t, urp))
    assert state.mode is FallbackMode.KAFKA  # the breach restarted at 200
    assert state.breached_since == 200


def test_returns_to_kafka_after_a_minute_of_health() -> None:
    state = DegradationState()
    for t in (0, 130):
        state = next_state(state, _health(t, urp=10))
    assert state.mode is FallbackMode.REDIS
    state = next_state(state, _health(140, urp=0))
    state = next_state(state, _health(170, urp=8))  # flaps: the healthy minute starts over
    state = next_state(state, _health(180, urp=0))
    state = next_state(state, _health(230, urp=0))
    assert state.mode is FallbackMode.REDIS
    state = next_state(state, _health(240, urp=0))
    assert state.mode is FallbackMode.KAFKA
    assert state.changed_at == 240


def test_state_round_trips_through_the_cursor_and_bad_cursors_start_afresh() -> None:
    state = DegradationState()
    for t in (0, 130):
        state = next_state(state, _health(t, urp=10, offline=2))
    again = DegradationState.from_json(state.to_json())
    assert again == state
    assert again.history[-1] == (130, 10, 2)
    assert DegradationState.from_json("not json") == DegradationState()
    assert DegradationState.from_json(None) == DegradationState()
