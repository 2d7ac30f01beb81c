"""Lag reconciliation's pure parts: which samples are settled, an agent's count at a sample, the verdict."""

from datetime import UTC, datetime, timedelta

from planpipe.agent.counts import checkpoints_of
from planpipe.ingest.reconcile import AgentCheckpoint, Reconciliation, Sample, at_or_below, count_at, quiet_after

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sample(seconds: float, high: tuple[int, ...], committed: tuple[int, ...]) -> Sample:
    return Sample(at(seconds), high, committed, sum(h - c for h, c in zip(high, committed, strict=True)))


def checkpoint(seconds: float, high: tuple[int, ...], captured: int, kind: str = "idle") -> AgentCheckpoint:
    return AgentCheckpoint("a", at(seconds), kind, high, captured, 0)


def test_a_sample_is_settled_when_nothing_moved_until_the_next_and_no_replay_was_near() -> None:
    samples = [
        sample(0, (5, 5), (5, 5)),
        sample(15, (5, 5), (5, 5)),  # quiet since the first
        sample(30, (6, 5), (5, 5)),  # a record appended
        sample(45, (6, 5), (6, 5)),  # committed: the consumer moved
        sample(60, (6, 5), (6, 5)),
        sample(75, (6, 5), (6, 5)),
    ]
    assert quiet_after(samples, replays=[]) == [0, 3, 4]
    # A replay transaction recorded within the grace before a sample (or before the next) unsettles it.
    assert quiet_after(samples, replays=[at(50)], grace=timedelta(seconds=10)) == [0, 4]
    assert quiet_after(samples, replays=[at(50)], grace=timedelta(seconds=60)) == [0]
    assert quiet_after(samples[:1], replays=[]) == []  # the last sample has no successor yet


def test_offsets_compare_by_partition_with_missing_partitions_at_zero() -> None:
    assert at_or_below((1, 2), (1, 2)) and at_or_below((1, 2), (3, 2)) and at_or_below((1,), (1, 0))
    assert not at_or_below((1, 3), (3, 2)) and not at_or_below((1, 1), (1,))


def test_an_agents_count_at_a_sample_needs_equal_counts_at_or_around_its_offsets() -> None:
    history = [
        checkpoint(0, (0, 0), 0, "start"),
        checkpoint(10, (4, 4), 8),
        checkpoint(20, (6, 4), 8),  # another producer appended 2: the agent captured nothing
        checkpoint(30, (9, 7), 13),
    ]
    assert count_at(history, (4, 4)) == history[1]  # at a checkpoint
    assert count_at(history, (5, 4)) == history[1]  # between two with the same count
    assert count_at(history, (7, 5)) is None  # between 8 and 13: the agent was publishing
    assert count_at(history, (9, 9)) is None  # past its last checkpoint, still running
    assert count_at([*history, checkpoint(40, (9, 7), 13, "stop")], (12, 9)) is not None  # stopped since
    late_starter = [checkpoint(50, (9, 7), 3, "start")]
    assert count_at(late_starter, (4, 4)) == late_starter[0]  # before it started: its count then
    assert count_at([checkpoint(50, (9, 7), 3)], (4, 4)) is None  # an idle one is no evidence of before
    assert count_at([], (1, 1)) is None


def test_checkpoints_of_every_topic_read_with_the_agents_totals() -> None:
    made = checkpoints_of("idle", {"t": {1: 7, 0: 3}, "t.dlq": {0: 2}}, {"t": (9, 1)})
    assert [(c.topic, c.high_watermarks, c.captured, c.dropped) for c in made] == [
        ("t", (3, 7), 9, 1),
        ("t.dlq", (2,), 0, 0),
    ]


def test_the_verdict_fails_on_either_divergence_and_passes_when_nothing_is_settled() -> None:
    exact = Reconciliation(at(0), at(60), produced=52, consumed=50, lag_delta=0, captured=48, unseen_offsets=2,
                           replayed=2)  # fmt: skip
    assert exact.settled and exact.ok
    lost_before_the_topic = Reconciliation(at(0), at(60), 50, 50, 0, captured=51)
    assert lost_before_the_topic.capture_divergence == 1 and not lost_before_the_topic.ok
    not_consumed = Reconciliation(at(0), at(60), 50, 49, 0, captured=None)
    assert not_consumed.consumer_divergence == 1 and not not_consumed.ok
    unsettled = Reconciliation(None, None, 0, 0, 0, None, samples=5, settled_samples=1)
    assert not unsettled.settled and unsettled.ok and unsettled.as_dict()["settled"] is False
