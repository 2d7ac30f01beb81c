"""Capture counts per agent, topic and hour, reported to `planpipe.capture_counts`.

The lag-reconciliation check compares what agents captured with what reached
the topic (the runbook's silent-drop check). The agent keeps exact totals in
its state database (counted in the transaction that commits each batch) and
reports them as absolute values, so a report repeated after a crash never
counts anything twice.
"""

from collections.abc import Sequence
from typing import Any

import psycopg

from planpipe.agent.state import CountRow

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
