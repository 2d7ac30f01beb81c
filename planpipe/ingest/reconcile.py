"""Lag reconciliation (runbook "Observability Integration & Validation").

Between two lag-sensor samples, what reached the topic must equal what the group
consumed plus the change in lag:

    produced (Δ high watermarks) = consumed (ingest_batches) + Δ lag + unseen offsets

where unseen offsets are those no consumer reads: the markers of the DLQ replay's
Kafka transactions (one per partition written) and the records of aborted ones
(planpipe.replay_transactions). Where capture agents report checkpoints, what they
captured plus what the replay republished must equal the records that reached the topic.
A non-zero divergence means records were dropped or counted twice somewhere between
capture and the baseline store.

Exact, never judging records in flight: a window is bounded only by *settled* samples.
A sample is settled when nothing moved until the next one (same end offsets, same
committed offsets: no record appended, no offset committed), no replay transaction was
recorded around it, and, if the group was behind, no batch was committed around it (a
batch is committed to PostgreSQL before its offsets reach Kafka, so one straddling the
sample would count on one side only). The agents' share is read from their checkpoints
(`planpipe.agent.counts.Checkpoint`) by offsets: an agent's count at a sample is known
when checkpoints with the same count lie at or below and at or above the sample's end
offsets. A window whose bounds are not settled yet is judged at a later run.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import psycopg

from planpipe.ingest.lag import PartitionLag

# A replay transaction or a batch of a lagging group recorded this close to a sample unsettles it
# (PostgreSQL and Kafka learn of either a moment apart).
SETTLE_GRACE = timedelta(seconds=60)


@dataclass(frozen=True)
class Reconciliation:
    window_start: datetime | None
    window_end: datetime | None
    produced: int
    consumed: int
    lag_delta: int
    captured: int | None  # None when no capture agent wrote checkpoints in the window
    unseen_offsets: int = 0  # transaction markers and aborted records of DLQ replays
    replayed: int = 0  # records the DLQ replay republished to the topic
    dropped: int = 0  # captured but counted as dropped by agents (Redis TTL): a known share of the divergence
    samples: int = 0  # lag samples in the look-back
    settled_samples: int = 0  # of those, usable as a window bound

    @property
    def settled(self) -> bool:
        """Whether there is a window to judge (two settled samples)."""
        return self.window_start is not None and self.window_end is not None and self.window_start < self.window_end

    @property
    def consumer_divergence(self) -> int:
        return self.produced - self.consumed - self.lag_delta - self.unseen_offsets

    @property
    def capture_divergence(self) -> int | None:
        if self.captured is None:
            return None
        return self.captured + self.replayed - (self.produced - self.unseen_offsets)

    @property
    def ok(self) -> bool:
        return self.consumer_divergence == 0 and (self.capture_divergence in (None, 0))

    def as_dict(self) -> dict[str, object]:
        return {
            **self.__dict__,
            "settled": self.settled,
            "consumer_divergence": self.consumer_divergence,
            "capture_divergence": self.capture_divergence,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class Sample:
    """One lag-sensor tick: end offsets and committed offsets by partition, total lag."""

    at: datetime
    high: tuple[int, ...]
    committed: tuple[int, ...]
    lag: int


@dataclass(frozen=True)
class AgentCheckpoint:
    agent: str
    taken_at: datetime
    kind: str  # 'start', 'idle', 'stop'
    high: tuple[int, ...]
    captured: int
    dropped: int


def at_or_below(a: Sequence[int], b: Sequence[int]) -> bool:
    """Every partition's offset in `a` at or below `b`'s (a partition missing is at 0)."""
    width = max(len(a), len(b))
    return all((a[p] if p < len(a) else 0) <= (b[p] if p < len(b) else 0) for p in range(width))


def count_at(checkpoints: Sequence[AgentCheckpoint], high: Sequence[int]) -> AgentCheckpoint | None:
    """The checkpoint giving one agent's counts among the records below `high`, or None when
    unknown (the agent captured something between its checkpoints around `high`). Pure."""
    below = [c for c in checkpoints if at_or_below(c.high, high)]
    above = [c for c in checkpoints if at_or_below(high, c.high)]
    for low in below:
        if any(up.captured == low.captured for up in above):
            return low
    if not checkpoints:
        return None
    last = max(checkpoints, key=lambda c: c.taken_at)
    if last.kind == "stop" and last in below:  # stopped before `high` and not started since
        return last
    first = min(checkpoints, key=lambda c: c.taken_at)
    if not below and first.kind == "start" and first in above:  # started after `high`
        return first
    return None


def quiet_after(samples: Sequence[Sample], replays: Sequence[datetime], grace: timedelta = SETTLE_GRACE) -> list[int]:
    """Indexes of samples after which nothing moved until the next sample, with no replay
    transaction recorded within `grace` before the sample or before the next one. Pure."""
    quiet = []
    for i in range(len(samples) - 1):
        sample, following = samples[i], samples[i + 1]
        if sample.high != following.high or sample.committed != following.committed:
            continue
        if any(sample.at - grace < at <= following.at for at in replays):
            continue
        quiet.append(i)
    return quiet


def record_lag_sample(dsn: str, group: str, topic: str, lags: list[PartitionLag]) -> None:
    """One lag-sensor tick: every partition's high watermark, committed offset and lag.

    One statement, so every partition of a tick shares one `sampled_at` (reconciliation pairs them)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            """INSERT INTO planpipe.lag_samples (consumer_group, topic, partition, high_watermark, committed, lag)
               SELECT %s, %s, * FROM unnest(%s::int[], %s::bigint[], %s::bigint[], %s::bigint[])
               ON CONFLICT DO NOTHING""",
            (
                group,
                topic,
                [p.partition for p in lags],
                [p.high for p in lags],
                [p.committed if p.committed is not None else p.low for p in lags],
                [p.lag for p in lags],
            ),
        )


@dataclass(frozen=True)
class Bounds:
    """The look-back's samples and, for each settled one (by index), every agent's checkpoint there."""

    samples: list[Sample]
    settled: dict[int, list[AgentCheckpoint]]
    agents: int  # agents whose checkpoints count in the look-back

    def latest(self) -> datetime | None:
        return self.samples[max(self.settled)].at if self.settled else None


def settled_bounds(
    conn: psycopg.Connection[tuple[Any, ...]], group: str, topic: str, lookback: timedelta,
    grace: timedelta = SETTLE_GRACE,
) -> Bounds:  # fmt: skip
    rows = conn.execute(
        """SELECT sampled_at, array_agg(high_watermark ORDER BY partition),
                  array_agg(committed ORDER BY partition), sum(lag)
           FROM planpipe.lag_samples
           WHERE consumer_group = %s AND topic = %s AND sampled_at > now() - %s
           GROUP BY sampled_at ORDER BY sampled_at""",
        (group, topic, lookback),
    ).fetchall()
    samples = [Sample(at, tuple(high), tuple(committed), int(lag)) for at, high, committed, lag in rows]
    if len(samples) < 2:
        return Bounds(samples, {}, 0)
    replays = [
        row[0]
        for row in conn.execute(
            """SELECT recorded_at FROM planpipe.replay_transactions
               WHERE target_topic = %s AND recorded_at > %s AND recorded_at <= %s""",
            (topic, samples[0].at - grace, samples[-1].at),
        )
    ]
    quiet = [
        i
        for i in quiet_after(samples, replays, grace)
        if samples[i].lag == 0 or not _batch_between(conn, group, samples[i].at - grace, samples[i + 1].at)
    ]
    agents = _checkpoints(conn, topic, since=samples[0].at - grace)
    settled: dict[int, list[AgentCheckpoint]] = {}
    for i in quiet:
        found = [count_at(of_agent, samples[i].high) for of_agent in agents.values()]
        if all(c is not None for c in found):
            settled[i] = cast(list[AgentCheckpoint], found)
    return Bounds(samples, settled, len(agents))


def latest_settled(dsn: str, group: str, topic: str, window_hours: float = 1.0) -> datetime | None:
    """When the latest settled sample of the look-back was taken (a window can end there)."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return settled_bounds(conn, group, topic, timedelta(hours=window_hours)).latest()


def reconcile(
    dsn: str, group: str, topic: str, window_hours: float = 1.0, grace: timedelta = SETTLE_GRACE
) -> Reconciliation:
    """Reconcile the widest window between settled samples of the last `window_hours`."""
    with psycopg.connect(dsn) as conn:
        bounds = settled_bounds(conn, group, topic, timedelta(hours=window_hours), grace)
        samples, counts = bounds.samples, bounds.settled
        usable = sorted(counts)
        if len(usable) < 2:
            return Reconciliation(None, None, 0, 0, 0, None, samples=len(samples), settled_samples=len(usable))
        first, last = samples[usable[0]], samples[usable[-1]]
        consumed_row = conn.execute(
            """SELECT coalesce(sum(consumed), 0) FROM planpipe.ingest_batches
               WHERE consumer_group = %s AND committed_at > %s AND committed_at <= %s""",
            (group, first.at, last.at),
        ).fetchone()
        unseen_row = conn.execute(
            """SELECT coalesce(sum(cardinality(partitions) + CASE WHEN outcome = 'aborted' THEN records ELSE 0 END), 0),
                      coalesce(sum(records) FILTER (WHERE outcome = 'committed'), 0)
               FROM planpipe.replay_transactions
               WHERE target_topic = %s AND recorded_at > %s AND recorded_at <= %s""",
            (topic, first.at, last.at),
        ).fetchone()
    consumed = int(cast(tuple[int], consumed_row)[0])
    unseen, replayed = (int(v) for v in cast(tuple[int, int], unseen_row))
    at_start, at_end = counts[usable[0]], counts[usable[-1]]
    captured = sum(c.captured for c in at_end) - sum(c.captured for c in at_start) if bounds.agents else None
    dropped = sum(c.dropped for c in at_end) - sum(c.dropped for c in at_start)
    return Reconciliation(
        first.at, last.at, sum(last.high) - sum(first.high), consumed, last.lag - first.lag, captured,
        unseen, replayed, dropped, samples=len(samples), settled_samples=len(usable),
    )  # fmt: skip


def _batch_between(conn: psycopg.Connection[tuple[object, ...]], group: str, after: datetime, until: datetime) -> bool:
    row = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM planpipe.ingest_batches
                          WHERE consumer_group = %s AND committed_at > %s AND committed_at <= %s)""",
        (group, after, until),
    ).fetchone()
    return bool(row and row[0])


def _checkpoints(
    conn: psycopg.Connection[tuple[object, ...]], topic: str, *, since: datetime
) -> dict[str, list[AgentCheckpoint]]:
    """Checkpoints of the agents that wrote one since `since`, with each one's last before it
    (an idle agent on a quiet topic writes none: that one still holds)."""
    rows = conn.execute(
        """SELECT agent, taken_at, kind, high_watermarks, captured, dropped
           FROM planpipe.capture_checkpoints c
           WHERE topic = %(topic)s
             AND agent IN (SELECT agent FROM planpipe.capture_checkpoints
                           WHERE topic = %(topic)s AND taken_at > %(since)s)
             AND (taken_at > %(since)s OR taken_at = (
                   SELECT max(taken_at) FROM planpipe.capture_checkpoints p
                   WHERE p.agent = c.agent AND p.topic = c.topic AND p.taken_at <= %(since)s))
           ORDER BY agent, taken_at""",
        {"topic": topic, "since": since},
    ).fetchall()
    found: dict[str, list[AgentCheckpoint]] = {}
    for agent, taken_at, kind, high, captured, dropped in rows:
        checkpoint = AgentCheckpoint(
            str(agent), cast(datetime, taken_at), str(kind), tuple(cast(list[int], high)),
            int(cast(int, captured)), int(cast(int, dropped)),
        )  # fmt: skip
        found.setdefault(checkpoint.agent, []).append(checkpoint)
    return found
