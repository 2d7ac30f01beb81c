"""Retention per route (routing guide: critical 7 days, baseline 30 days; DDL as baseline).

Parquet partitions are whole `route=…/date=…` directories, so expiry removes a
directory at a time. In PostgreSQL the hourly rollups carry their route and
expire with it; ingestion stats expire after the longest retention. Baselines
and catalogs are the long-term memory of which plans a query has had and are
kept (their executions and latency summaries stay valid).
"""

import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg

from planpipe.messaging.routes import RETENTION_DAYS

CHECKPOINT_DAYS = 7  # capture agents' checkpoints (lag reconciliation), each agent's latest kept


@dataclass(frozen=True)
class RetentionReport:
    parquet_partitions_removed: list[str]
    rollup_rows_deleted: int
    batch_rows_deleted: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def expired_partitions(root: Path, today: date) -> list[Path]:
    expired: list[Path] = []
    for route, days in RETENTION_DAYS.items():
        cutoff = today - timedelta(days=days)
        for directory in sorted((root / f"route={route}").glob("date=*")):
            try:
                day = date.fromisoformat(directory.name.removeprefix("date="))
            except ValueError:
                continue
            if day < cutoff:
                expired.append(directory)
    return expired


def apply_retention(root: Path, dsn: str, now: datetime | None = None) -> RetentionReport:
    moment = now or datetime.now(UTC)
    removed = expired_partitions(root, moment.date())
    for directory in removed:
        shutil.rmtree(directory)
    rollups = 0
    with psycopg.connect(dsn) as conn:
        for route, days in RETENTION_DAYS.items():
            cursor = conn.execute(
                "DELETE FROM planpipe.plan_rollups_hourly WHERE route = %s AND hour < %s",
                (route, moment - timedelta(days=days)),
            )
            rollups += cursor.rowcount
        batches = conn.execute(
            "DELETE FROM planpipe.ingest_batches WHERE committed_at < %s",
            (moment - timedelta(days=max(RETENTION_DAYS.values())),),
        ).rowcount
        # Sampled traces feed a one-hour check; a week keeps them for incident reconstruction.
        conn.execute("DELETE FROM planpipe.trace_samples WHERE committed_at < %s", (moment - timedelta(days=7),))
        # Reconciliation looks back an hour; an agent's latest checkpoint still holds while it idles.
        conn.execute(
            """DELETE FROM planpipe.capture_checkpoints c WHERE taken_at < %s AND taken_at < (
                   SELECT max(taken_at) FROM planpipe.capture_checkpoints l
                   WHERE l.agent = c.agent AND l.topic = c.topic)""",
            (moment - timedelta(days=CHECKPOINT_DAYS),),
        )
    return RetentionReport([str(p.relative_to(root)) for p in removed], rollups, batches)
