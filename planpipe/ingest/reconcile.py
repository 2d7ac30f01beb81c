"""Lag reconciliation (runbook "Observability Integration & Validation").

Over a window bounded by two lag-sensor samples, what reached the topic must equal
what the group consumed plus the change in lag:

    produced (Δ high watermarks) = consumed (ingest_batches) + Δ lag + unseen offsets

where unseen offsets are those no consumer reads: the markers of the DLQ replay's
Kafka transactions (one per partition written) and the records of aborted ones
(planpipe.replay_transactions). Where capture agents report their counts, what they
captured plus what the replay republished must equal the records that reached the topic.
A non-zero divergence means records were dropped or counted twice somewhere between
capture and the baseline store.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import cast

import psycopg

from planpipe.ingest.lag import PartitionLag


@dataclass(frozen=True)
class Reconciliation:
    window_start: datetime | None
    window_end: datetime | None
    produced: int
    consumed: int
    lag_delta: int
    captured: int | None  # None when no capture agent reported counts in the window
    unseen_offsets: int = 0  # transaction markers and aborted records of DLQ replays
    replayed: int = 0  # records the DLQ replay republished to the topic
    dropped: int = 0  # captured but counted as dropped by agents (Redis TTL): a known share of the divergence

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
            "consumer_divergence": self.consumer_divergence,
            "capture_divergence": self.capture_divergence,
            "ok": self.ok,
        }


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


def record_capture_count(dsn: str, agent: str, topic: str, published: int) -> None:
    """Capture agents report how many envelopes they handed to Kafka, per hour."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO planpipe.capture_counts AS c (agent, topic, hour, published)
               VALUES (%s, %s, date_trunc('hour', now()), %s)
               ON CONFLICT (agent, topic, hour) DO UPDATE SET published = c.published + excluded.published""",
            (agent, topic, published),
        )


def reconcile(dsn: str, group: str, topic: str, window_hours: float = 1.0) -> Reconciliation:
    with psycopg.connect(dsn) as conn:
        ticks = conn.execute(
            """SELECT min(sampled_at), max(sampled_at) FROM planpipe.lag_samples
               WHERE consumer_group = %s AND topic = %s AND sampled_at > now() - make_interval(secs => %s)""",
            (group, topic, window_hours * 3600),
        ).fetchone()
        start, end = cast(tuple[datetime | None, datetime | None], ticks or (None, None))
        if start is None or end is None or start == end:
            return Reconciliation(start, end, 0, 0, 0, None)

        def totals(at: datetime) -> tuple[int, int]:
            row = conn.execute(
                """SELECT coalesce(sum(high_watermark), 0), coalesce(sum(lag), 0) FROM planpipe.lag_samples
                   WHERE consumer_group = %s AND topic = %s AND sampled_at = %s""",
                (group, topic, at),
            ).fetchone()
            return cast(tuple[int, int], row)

        high_start, lag_start = totals(start)
        high_end, lag_end = totals(end)
        consumed_row = conn.execute(
            """SELECT coalesce(sum(consumed), 0) FROM planpipe.ingest_batches
               WHERE consumer_group = %s AND committed_at > %s AND committed_at <= %s""",
            (group, start, end),
        ).fetchone()
        unseen_row = conn.execute(
            """SELECT coalesce(sum(cardinality(partitions) + CASE WHEN outcome = 'aborted' THEN records ELSE 0 END), 0),
                      coalesce(sum(records) FILTER (WHERE outcome = 'committed'), 0)
               FROM planpipe.replay_transactions
               WHERE target_topic = %s AND recorded_at > %s AND recorded_at <= %s""",
            (topic, start, end),
        ).fetchone()
        captured_row = conn.execute(
            """SELECT sum(published), coalesce(sum(dropped), 0) FROM planpipe.capture_counts
               WHERE topic = %s AND hour >= date_trunc('hour', %s::timestamptz) AND hour <= %s""",
            (topic, start, end),
        ).fetchone()
    consumed = int(cast(tuple[int], consumed_row)[0])
    captured = None if captured_row is None or captured_row[0] is None else int(cast(tuple[int], captured_row)[0])
    dropped = 0 if captured_row is None else int(captured_row[1])
    unseen, replayed = (int(v) for v in cast(tuple[int, int], unseen_row))
    return Reconciliation(
        start, end, int(high_end - high_start), consumed, int(lag_end - lag_start), captured, unseen, replayed, dropped
    )
