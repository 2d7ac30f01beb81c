"""Retention in PostgreSQL on the real database: what expires and what must stay."""

from pathlib import Path

import psycopg

from planpipe.db.migrate import migrate
from planpipe.ingest.retention import CHECKPOINT_DAYS, apply_retention
from planpipe.settings import Settings


def test_retention_prunes_old_checkpoints_but_keeps_each_agents_latest(settings: Settings, tmp_path: Path) -> None:
    migrate(settings.pg_dsn)
    old = f"{CHECKPOINT_DAYS + 3} days"
    rows = [("idle-agent", f"{CHECKPOINT_DAYS + 2} days", 7), ("busy-agent", old, 1), ("busy-agent", "1 hour", 2)]
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        for agent, age, count in [("idle-agent", old, 5), *rows]:
            conn.execute(
                """INSERT INTO planpipe.capture_checkpoints (agent, topic, taken_at, kind, high_watermarks, captured,
                   dropped) VALUES (%s, %s, now() - %s::interval, 'idle', '{1}', %s, 0)""",
                (agent, settings.topic, age, count),
            )
        apply_retention(tmp_path, settings.pg_dsn)
        kept = conn.execute(
            "SELECT agent, captured FROM planpipe.capture_checkpoints WHERE topic = %s ORDER BY agent, captured",
            (settings.topic,),
        ).fetchall()
    # The idle agent's latest still holds (nothing moved since); the busy agent's old one goes.
    assert kept == [("busy-agent", 2), ("idle-agent", 7)]
