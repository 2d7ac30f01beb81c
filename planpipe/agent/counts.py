"""Capture counts per agent, topic and hour, reported to `planpipe.capture_counts`.

The lag-reconciliation check compares what agents captured with what reached
the topic (the runbook's silent-drop check). The agent keeps exact totals in
its state database (counted in the transaction that commits each batch) and
reports them as absolute values, so a report repeated after a crash never
counts anything twice.

Hourly counts cannot be set against a window of lag samples: records reach the topic
before they are counted, counts reach PostgreSQL up to a report interval later, and an
hour does not start at a sample. So the agent also writes checkpoints (`Checkpoint`): its
cumulative counts together with the topics' end offsets, read while nothing of its own
is in flight. Reconciliation matches them to lag samples by offsets, not by time.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from planpipe.agent.state import CountRow, Offsets

_UPSERT = """
INSERT INTO planpipe.capture_counts AS c (agent, topic, hour, published, dropped)
VALUES (%s, %s, to_timestamp(%s), %s, %s)
ON CONFLICT (agent, topic, hour) DO UPDATE SET published = excluded.published, dropped = excluded.dropped
"""


def report_counts(dsn: str, agent: str, rows: Sequence[CountRow]) -> None:
    if not rows:
        return
    conn: psycopg.Connection[tuple[Any, ...]]
    with psycopg.connect(dsn, connect_timeout=5) as conn, conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(_UPSERT, [(agent, r.topic, r.hour, r.captured, r.dropped) for r in rows])


_CHECKPOINT = """
INSERT INTO planpipe.capture_checkpoints (agent, topic, kind, high_watermarks, captured, dropped)
VALUES (%s, %s, %s, %s, %s, %s)
"""


@dataclass(frozen=True)
class Checkpoint:
    """Taken while nothing of the agent was in flight: of the records below `high_watermarks`
    (by partition), exactly `captured` are this agent's (see sql/021_capture_checkpoints.sql)."""

    topic: str
    kind: str  # 'start' (before producing), 'idle', 'stop' (after its last record)
    high_watermarks: tuple[int, ...]
    captured: int
    dropped: int


def checkpoints_of(kind: str, offsets: Offsets, totals: Mapping[str, tuple[int, int]]) -> list[Checkpoint]:
    """One checkpoint per topic whose end offsets were read (pure)."""
    return [
        Checkpoint(topic, kind, tuple(by_partition[p] for p in sorted(by_partition)), *totals.get(topic, (0, 0)))
        for topic, by_partition in offsets.items()
    ]


def report_checkpoints(dsn: str, agent: str, checkpoints: Sequence[Checkpoint]) -> None:
    if not checkpoints:
        return
    conn: psycopg.Connection[tuple[Any, ...]]
    with psycopg.connect(dsn, connect_timeout=5) as conn, conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(
            _CHECKPOINT,
            [(agent, c.topic, c.kind, list(c.high_watermarks), c.captured, c.dropped) for c in checkpoints],
        )
