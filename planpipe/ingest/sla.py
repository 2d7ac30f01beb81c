"""The runbook's ingestion SLAs, measured from what the pipeline recorded in PostgreSQL.

Each evaluation returns the measured value, the threshold and the window so the
Dagster asset checks (and operators with psql) see why something passed or failed.
"""

from dataclasses import dataclass
from typing import Final, cast

import psycopg

LAG_THRESHOLD: Final = 15_000  # messages per partition
LAG_SUSTAINED_S: Final = 180  # ... for more than 3 minutes
P95_THRESHOLD_MS: Final = 1_200.0
DLQ_RATE_THRESHOLD: Final = 0.0015  # 0.15 % of consumed
LOCK_WAIT_THRESHOLD_MS: Final = 800.0
DEFAULT_WINDOW_S: Final = 300


@dataclass(frozen=True)
class SlaResult:
    name: str
    passed: bool
    value: float | None  # None: nothing to measure in the window (passes)
    threshold: float
    window_s: int
    detail: str

    def as_metadata(self) -> dict[str, object]:
        return {
            "measured": self.value,
            "threshold": self.threshold,
            "window_seconds": self.window_s,
            "detail": self.detail,
        }


def _one(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, params: tuple[object, ...] | dict[str, object]
) -> tuple[object, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row


def consumer_lag(conn: psycopg.Connection[tuple[object, ...]], group: str, topic: str,
                 sustained_s: int = LAG_SUSTAINED_S) -> SlaResult:  # fmt: skip
    """Breach: some partition's lag stayed above 15,000 in every sample of the last 3 minutes,
    and the samples span the whole 3 minutes."""
    rows = conn.execute(
        """SELECT partition, min(lag), extract(epoch FROM max(sampled_at) - min(sampled_at)), max(lag)
           FROM planpipe.lag_samples
           WHERE consumer_group = %s AND topic = %s AND sampled_at > now() - make_interval(secs => %s)
           GROUP BY partition""",
        (group, topic, sustained_s + 30),
    ).fetchall()
    samples = cast(list[tuple[int, int, float, int]], rows)
    breaching = [(p, low) for p, low, span, _ in samples if low > LAG_THRESHOLD and float(span) >= sustained_s * 0.9]
    worst = max((hi for _, _, _, hi in samples), default=None)
    detail = (f"partitions over {LAG_THRESHOLD} for {sustained_s}s: {breaching}" if breaching
              else f"{len(rows)} partitions sampled")  # fmt: skip
    return SlaResult("consumer_lag", not breaching, worst, LAG_THRESHOLD, sustained_s, detail)


def p95_latency(
    conn: psycopg.Connection[tuple[object, ...]], group: str, window_s: int = DEFAULT_WINDOW_S
) -> SlaResult:
    """Record-weighted p95 of publish → baseline-commit latency over the batches of the window:
    each batch's p95 counts once per row it committed (nearest rank), an upper-bound-leaning
    estimate computed from one row per batch whatever the throughput."""
    value, batches = _one(
        conn,
        """WITH weighted AS (
               SELECT p95_latency_ms AS ms,
                      sum(greatest(valid, 1)) OVER (ORDER BY p95_latency_ms ROWS UNBOUNDED PRECEDING) AS below,
                      sum(greatest(valid, 1)) OVER () AS total
               FROM planpipe.ingest_batches
               WHERE consumer_group = %s AND committed_at > now() - make_interval(secs => %s)
                 AND p95_latency_ms IS NOT NULL)
           SELECT min(ms) FILTER (WHERE below >= 0.95 * total), count(*) FROM weighted""",
        (group, window_s),
    )
    measured = None if value is None else float(value)  # type: ignore[arg-type]
    passed = measured is None or measured <= P95_THRESHOLD_MS
    return SlaResult("p95_publish_to_commit", passed, measured, P95_THRESHOLD_MS, window_s,
                     f"{batches} batches, weighted by rows")  # fmt: skip


def dlq_rate(conn: psycopg.Connection[tuple[object, ...]], group: str, window_s: int = DEFAULT_WINDOW_S) -> SlaResult:
    dlq, consumed = _one(
        conn,
        """SELECT coalesce(sum(dlq), 0), coalesce(sum(consumed), 0) FROM planpipe.ingest_batches
           WHERE consumer_group = %s AND committed_at > now() - make_interval(secs => %s)""",
        (group, window_s),
    )
    dlq_n, consumed_n = int(dlq), int(consumed)  # type: ignore[call-overload]
    rate = None if consumed_n == 0 else dlq_n / consumed_n
    passed = rate is None or rate <= DLQ_RATE_THRESHOLD
    return SlaResult("dlq_rate", passed, rate, DLQ_RATE_THRESHOLD, window_s, f"{dlq_n} of {consumed_n} consumed")


def lock_wait(conn: psycopg.Connection[tuple[object, ...]], group: str, window_s: int = DEFAULT_WINDOW_S) -> SlaResult:
    worst, batches = _one(
        conn,
        """SELECT max(lock_wait_ms), count(*) FROM planpipe.ingest_batches
           WHERE consumer_group = %s AND committed_at > now() - make_interval(secs => %s)""",
        (group, window_s),
    )
    measured = None if worst is None else float(worst)  # type: ignore[arg-type]
    passed = measured is None or measured <= LOCK_WAIT_THRESHOLD_MS
    return SlaResult("lock_wait", passed, measured, LOCK_WAIT_THRESHOLD_MS, window_s, f"{batches} batches")


# -- progress watchdog ------------------------------------------------------------------
STALL_AFTER_S: Final = 60.0  # lag > 0 and no committed batch for this long: stuck


@dataclass(frozen=True)
class Progress:
    """Is ingestion making progress? The same decision for the run, the check and the sensor."""

    stalled: bool
    lag: int
    idle_s: float  # seconds without a committed batch while progress was expected
    stall_after_s: float
    detail: str

    def as_metadata(self) -> dict[str, object]:
        return {
            "stalled": self.stalled,
            "lag": self.lag,
            "idle_seconds": round(self.idle_s, 1),
            "stall_after_seconds": self.stall_after_s,
            "detail": self.detail,
        }


def ingest_progress(
    lag: int,
    *,
    now: float,
    last_commit_at: float | None,
    expected_since: float,
    stall_after_s: float = STALL_AFTER_S,
) -> Progress:
    """Stalled: there is something to ingest (`lag` > 0) and nothing was committed for longer than
    `stall_after_s`. Idle time counts from the later of the last committed batch and
    `expected_since` — when the observer started expecting progress (the run's start, or when the
    lag was last seen at 0) — so an idle pipeline that just received records is not "stuck".
    Times are epoch seconds; pure, no I/O."""
    anchor = expected_since if last_commit_at is None else max(last_commit_at, expected_since)
    idle = max(0.0, now - anchor)
    if lag <= 0:
        return Progress(False, max(0, lag), idle, stall_after_s, "caught up: nothing to ingest")
    stalled = idle > stall_after_s
    since = (
        "no batch committed yet" if last_commit_at is None else f"last batch committed {now - last_commit_at:.0f}s ago"
    )
    verdict = "STALLED" if stalled else "progressing"
    detail = f"{verdict}: lag {lag}, {since}, {idle:.0f}s without progress (limit {stall_after_s:.0f}s)"
    return Progress(stalled, lag, idle, stall_after_s, detail)


def group_progress(
    conn: psycopg.Connection[tuple[object, ...]],
    group: str,
    topic: str,
    lag: int,
    *,
    stall_after_s: float = STALL_AFTER_S,
) -> Progress:
    """`ingest_progress` for the whole consumer group, from what PostgreSQL recorded: the last
    committed batch (planpipe.ingest_batches) and the last lag sample at 0 (planpipe.lag_samples,
    written by the lag sensor). With no sample at 0 in the table, progress is expected from the
    first sample; with no samples at all, from now (nothing can be said yet)."""
    now, last_commit, last_zero, first_sample = _one(
        conn,
        """SELECT extract(epoch FROM now()),
                  (SELECT extract(epoch FROM max(committed_at)) FROM planpipe.ingest_batches
                    WHERE consumer_group = %(group)s),
                  (SELECT extract(epoch FROM max(sampled_at)) FROM (
                       SELECT sampled_at FROM planpipe.lag_samples
                       WHERE consumer_group = %(group)s AND topic = %(topic)s
                       GROUP BY sampled_at HAVING sum(lag) = 0) AS zero),
                  (SELECT extract(epoch FROM min(sampled_at)) FROM planpipe.lag_samples
                    WHERE consumer_group = %(group)s AND topic = %(topic)s)""",
        {"group": group, "topic": topic},
    )
    now_s = float(now)  # type: ignore[arg-type]
    anchor = last_zero if last_zero is not None else first_sample
    return ingest_progress(
        lag,
        now=now_s,
        last_commit_at=None if last_commit is None else float(last_commit),  # type: ignore[arg-type]
        expected_since=now_s if anchor is None else float(anchor),  # type: ignore[arg-type]
        stall_after_s=stall_after_s,
    )


TRACE_WINDOW_S: Final = 3_600  # sampled traces are sparse (1 %): a wider window than the batches'


def trace_latency(
    conn: psycopg.Connection[tuple[object, ...]], group: str, window_s: int = TRACE_WINDOW_S
) -> SlaResult:
    """The runbook's trace check: p95 of publish → commit over the sampled traces
    (`planpipe.trace_samples`, one row per sampled envelope) committed in the window."""
    value, worst, traces = _one(
        conn,
        """SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY publish_to_commit_ms), max(publish_to_commit_ms),
                  count(*)
           FROM planpipe.trace_samples
           WHERE consumer_group = %s AND committed_at > now() - make_interval(secs => %s)""",
        (group, window_s),
    )
    measured = None if value is None else float(value)  # type: ignore[arg-type]
    passed = measured is None or measured <= P95_THRESHOLD_MS
    detail = (
        f"no sampled trace committed in the last {window_s} s"
        if measured is None
        else f"p95 {measured:.0f} ms (max {float(worst):.0f} ms) over {traces} sampled traces"  # type: ignore[arg-type]
    )
    return SlaResult("trace_publish_to_commit", passed, measured, P95_THRESHOLD_MS, window_s, detail)
