"""Plan history per (cluster, query) and the baseline status of each plan.

Statuses follow SQL Plan Management: the first plan of a query is accepted by the
ingest, later plans start as candidates, and a person accepts or rejects them.
Several plans may stay accepted; the baseline a query is compared against is the
most recently accepted one (view `planpipe.current_baselines`). Accepting a plan
therefore makes it the baseline at once, and rejecting the baseline falls back to
the previously accepted plan, if any. Every change is recorded with who, when and
why in `plan_baselines.status_by/status_at` and the audit table
`plan_status_history`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import psycopg

from planpipe.errors import PlanpipeError
from planpipe.plans import latency
from planpipe.plans.diff import diff_plans
from planpipe.plans.findings import FINDINGS_LOCK
from planpipe.plans.normalize import PlanParseError

__all__ = [
    "LatencyWindow",
    "PlanRecord",
    "PlanStatus",
    "QueryPlans",
    "StatusChange",
    "StatusUpdate",
    "UnknownPlanError",
    "clusters_of",
    "plan_history",
    "resolve_fingerprint",
    "set_plan_status",
    "statement_text",
]

PlanStatus = Literal["accepted", "candidate", "rejected"]
_SETTABLE: Final = ("accepted", "rejected")


class UnknownPlanError(PlanpipeError, LookupError):
    """No such query, plan, or an ambiguous fingerprint prefix."""


@dataclass(frozen=True)
class LatencyWindow:
    start: datetime
    executions: int
    mean_ms: float
    p50_ms: float | None  # from the merged log-scale histogram: within 5 %
    p95_ms: float | None


@dataclass(frozen=True)
class PlanRecord:
    fingerprint: str
    plan_version: int
    status: PlanStatus
    status_by: str | None
    status_at: datetime | None
    is_baseline: bool  # the plan this query is compared against
    first_seen: datetime
    last_seen: datetime
    executions: int
    mean_ms: float
    p50_ms: float | None
    p95_ms: float | None
    summary: str
    windows: tuple[LatencyWindow, ...]
    diff_markdown: str | None  # against the baseline; None for the baseline itself
    changes: int | None  # node changes against the baseline

    def as_dict(self) -> dict[str, Any]:
        out = _plain(self)
        out["windows"] = [_plain(w) for w in self.windows]
        return out


@dataclass(frozen=True)
class StatusChange:
    id: int
    cluster_id: str
    query_hash: str
    fingerprint: str
    old_status: str
    new_status: str
    changed_by: str
    changed_at: datetime
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class StatusUpdate:
    """What `set_plan_status` did."""

    change: StatusChange
    baseline_fingerprint: str | None  # the query's baseline after the change
    resolved_findings: tuple[int, ...]  # plan-flip findings closed because their plan was accepted


@dataclass(frozen=True)
class QueryPlans:
    cluster_id: str
    query_hash: str
    query_type: str | None
    query_text: str | None
    baseline_fingerprint: str | None
    window_hours: float
    plans: tuple[PlanRecord, ...]  # by plan_version
    status_log: tuple[StatusChange, ...]  # oldest first

    def as_dict(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "query_hash": self.query_hash,
            "query_type": self.query_type,
            "query_text": self.query_text,
            "baseline_fingerprint": self.baseline_fingerprint,
            "window_hours": self.window_hours,
            "plans": [p.as_dict() for p in self.plans],
            "status_log": [c.as_dict() for c in self.status_log],
        }

    def to_markdown(self) -> str:
        lines = [f"### `{self.query_hash}` on `{self.cluster_id}`"]
        if self.query_text:
            lines += ["", f"`{(statement_text(self.query_text) or '')[:200]}`"]
        lines += [
            "",
            "p50/p95 from log-scale histograms: approximate, within 5 % (findings carry exact ones).",
            "",
            "| v | plan | status | by | at | first seen | last seen | executions | ≈p50 ms | ≈p95 ms | plan |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in self.plans:
            status = f"**{p.status} (baseline)**" if p.is_baseline else p.status
            lines.append(
                f"| {p.plan_version} | `{p.fingerprint[:12]}` | {status} | {p.status_by or ''} | {_when(p.status_at)} "
                f"| {_when(p.first_seen)} | {_when(p.last_seen)} | {p.executions} | {_ms(p.p50_ms)} | {_ms(p.p95_ms)} "
                f"| `{p.summary}` |"
            )
        for p in self.plans:
            if p.diff_markdown is not None:
                lines += [
                    "",
                    f"#### plan {p.plan_version} `{p.fingerprint[:12]}` against the baseline",
                    "",
                    p.diff_markdown,
                ]
        return "\n".join(lines)


def statement_text(text: str | None) -> str | None:
    """The statement with its constants as $n (as pg_stat_statements shows it): one text for
    every execution of the query, not the constants of the one captured first."""
    if text is None:
        return None
    try:
        from pglast.parser import ParseError, normalize

        return " ".join(normalize(text).split())
    except (ParseError, ValueError):
        return " ".join(text.split())


def _plain(obj: Any) -> dict[str, Any]:
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in ((n, getattr(obj, n)) for n in obj.__dataclass_fields__)
    }


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment is not None else ""


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


_CHANGE_COLUMNS: Final = (
    "id, cluster_id, query_hash, fingerprint, old_status, new_status, changed_by, changed_at, reason"
)


def clusters_of(dsn: str, query_hash: str) -> list[str]:
    """Clusters on which the query has plans."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT DISTINCT cluster_id FROM planpipe.plan_baselines WHERE query_hash = %s ORDER BY 1", (query_hash,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def resolve_fingerprint(dsn: str, cluster_id: str, query_hash: str, prefix: str) -> str:
    """The query's fingerprint starting with `prefix` (the CLI shows 12 characters)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT fingerprint FROM planpipe.plan_baselines
               WHERE cluster_id = %s AND query_hash = %s AND starts_with(fingerprint, %s)""",
            (cluster_id, query_hash, prefix),
        ).fetchall()
    if len(rows) != 1:
        problem = "no plan" if not rows else f"{len(rows)} plans"
        raise UnknownPlanError(f"{problem} of {cluster_id}/{query_hash} with a fingerprint starting {prefix!r}")
    return str(rows[0][0])


def set_plan_status(
    dsn: str,
    cluster_id: str,
    query_hash: str,
    fingerprint: str,
    status: Literal["accepted", "rejected"],
    *,
    by: str,
    reason: str | None = None,
) -> StatusUpdate:
    """Accept or reject one plan of a query, recording who, when and why.

    Accepting makes the plan the query's baseline (even when it was accepted before:
    re-accepting an older plan switches back to it) and resolves the open plan-flip
    findings about it: a person judged it good. Rejecting keeps findings open; when it
    rejects the baseline, the previously accepted plan (if any) becomes the baseline.
    """
    if status not in _SETTABLE:
        raise ValueError(f"status must be one of {_SETTABLE}, got {status!r}")
    who = by.strip()
    if not who:
        raise ValueError("a status change needs a name (by)")
    with psycopg.connect(dsn) as conn, conn.transaction():
        # Same lock as detection's write step: a run in flight cannot re-open what this closes.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINDINGS_LOCK,))
        row = conn.execute(
            """SELECT status FROM planpipe.plan_baselines
               WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s FOR UPDATE""",
            (cluster_id, query_hash, fingerprint),
        ).fetchone()
        if row is None:
            raise UnknownPlanError(f"no plan {fingerprint} of query {query_hash} on cluster {cluster_id}")
        old_status = str(row[0])
        # clock_timestamp, not now(): two changes in one transaction must still order.
        conn.execute(
            """UPDATE planpipe.plan_baselines SET status = %s, status_by = %s, status_at = clock_timestamp()
               WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
            (status, who, cluster_id, query_hash, fingerprint),
        )
        logged = conn.execute(
            f"""INSERT INTO planpipe.plan_status_history
                    (cluster_id, query_hash, fingerprint, old_status, new_status, changed_by, changed_at, reason)
                SELECT cluster_id, query_hash, fingerprint, %s, status, status_by, status_at, %s
                FROM planpipe.plan_baselines
                WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s
                RETURNING {_CHANGE_COLUMNS}""",
            (old_status, reason, cluster_id, query_hash, fingerprint),
        ).fetchone()
        assert logged is not None
        resolved: list[int] = []
        if status == "accepted":
            note = f"plan accepted as the baseline by {who}" + (f": {reason}" if reason else "")
            resolved = [
                int(r[0])
                for r in conn.execute(
                    """UPDATE planpipe.plan_regressions
                       SET status = 'resolved', resolved_at = now(), resolved_by = %s, resolution = %s
                       WHERE cluster_id = %s AND query_hash = %s AND new_fingerprint = %s
                         AND kind IN ('plan_flip_regression', 'plan_flip_improvement') AND status <> 'resolved'
                       RETURNING id""",
                    (who, note, cluster_id, query_hash, fingerprint),
                ).fetchall()
            ]
        baseline = conn.execute(
            "SELECT fingerprint FROM planpipe.current_baselines WHERE cluster_id = %s AND query_hash = %s",
            (cluster_id, query_hash),
        ).fetchone()
    return StatusUpdate(
        change=StatusChange(*logged),
        baseline_fingerprint=str(baseline[0]) if baseline is not None else None,
        resolved_findings=tuple(resolved),
    )


def plan_history(
    dsn: str,
    query_hash: str,
    *,
    cluster_id: str | None = None,
    window_hours: float = 24.0,
    lookback_hours: float = 168.0,
    now: datetime | None = None,
    with_diffs: bool = True,
) -> list[QueryPlans]:
    """Every plan of the query (one entry per cluster), with statuses, all-time
    executions and p50/p95, latency per window over the lookback (hourly rollups
    merged into `window_hours` windows aligned on the epoch) and, for each plan
    other than the baseline, the node-level diff against the baseline."""
    if window_hours <= 0 or lookback_hours <= 0:
        raise ValueError("window_hours and lookback_hours must be > 0")
    end = now or datetime.now(UTC)
    since = end - timedelta(hours=lookback_hours)
    with psycopg.connect(dsn) as conn:
        plans = conn.execute(
            """SELECT b.cluster_id, b.fingerprint, b.plan_version, b.status, b.status_by, b.status_at, b.first_seen,
                      b.last_seen, b.executions, b.total_time_sum, b.latency_hist, c.summary, c.sample_plan_text,
                      cb.fingerprint IS NOT NULL AS is_baseline
               FROM planpipe.plan_baselines b
               JOIN planpipe.plan_catalog c USING (fingerprint)
               LEFT JOIN planpipe.current_baselines cb
                      ON (cb.cluster_id, cb.query_hash, cb.fingerprint) = (b.cluster_id, b.query_hash, b.fingerprint)
               WHERE b.query_hash = %(q)s AND (%(c)s::text IS NULL OR b.cluster_id = %(c)s)
               ORDER BY b.cluster_id, b.plan_version""",
            {"q": query_hash, "c": cluster_id},
        ).fetchall()
        rollups = conn.execute(
            """SELECT cluster_id, fingerprint, hour, executions, total_time_sum, latency_hist
               FROM planpipe.plan_rollups_hourly
               WHERE query_hash = %(q)s AND (%(c)s::text IS NULL OR cluster_id = %(c)s)
                 AND hour >= %(since)s AND hour <= %(end)s
               ORDER BY hour""",
            {"q": query_hash, "c": cluster_id, "since": since, "end": end},
        ).fetchall()
        queries = conn.execute(
            """SELECT cluster_id, query_type, query_text FROM planpipe.query_catalog
               WHERE query_hash = %(q)s AND (%(c)s::text IS NULL OR cluster_id = %(c)s)""",
            {"q": query_hash, "c": cluster_id},
        ).fetchall()
        changes = conn.execute(
            f"""SELECT {_CHANGE_COLUMNS} FROM planpipe.plan_status_history
                WHERE query_hash = %(q)s AND (%(c)s::text IS NULL OR cluster_id = %(c)s)
                ORDER BY changed_at, id""",
            {"q": query_hash, "c": cluster_id},
        ).fetchall()

    windows = _windows(rollups, window_hours)
    catalog = {str(c): (t, x) for c, t, x in queries}
    out: list[QueryPlans] = []
    for cluster in dict.fromkeys(str(row[0]) for row in plans):
        rows = [row for row in plans if row[0] == cluster]
        baseline = next((row for row in rows if row[13]), None)
        records = []
        for row in rows:
            (
                _,
                fp,
                version,
                status,
                status_by,
                status_at,
                first,
                last,
                n,
                time_sum,
                hist_json,
                summary,
                text,
                is_base,
            ) = row
            hist = latency.from_json(hist_json)
            diff_md: str | None = None
            changed: int | None = None
            if with_diffs and not is_base and baseline is not None:
                diff_md, changed = _diff(str(baseline[12]), str(text))
            records.append(
                PlanRecord(
                    fingerprint=fp,
                    plan_version=int(version),
                    status=status,
                    status_by=status_by,
                    status_at=status_at,
                    is_baseline=bool(is_base),
                    first_seen=first,
                    last_seen=last,
                    executions=int(n),
                    mean_ms=float(time_sum) / n if n else 0.0,
                    p50_ms=latency.quantile(hist, 0.5),
                    p95_ms=latency.quantile(hist, 0.95),
                    summary=str(summary),
                    windows=tuple(windows.get((cluster, fp), ())),
                    diff_markdown=diff_md,
                    changes=changed,
                )
            )
        query_type, query_text = catalog.get(cluster, (None, None))
        out.append(
            QueryPlans(
                cluster_id=cluster,
                query_hash=query_hash,
                query_type=query_type,
                query_text=statement_text(query_text),  # constants as $n, as for every execution
                baseline_fingerprint=str(baseline[1]) if baseline is not None else None,
                window_hours=window_hours,
                plans=tuple(records),
                status_log=tuple(StatusChange(*c) for c in changes if c[1] == cluster),
            )
        )
    return out


def _diff(baseline_text: str, new_text: str) -> tuple[str, int | None]:
    try:
        diff = diff_plans(baseline_text, new_text)
    except PlanParseError as error:
        return f"Plan diff unavailable: {error}", None
    return diff.to_markdown(), len(diff.changes)


def _windows(rows: Sequence[Sequence[Any]], window_hours: float) -> dict[tuple[str, str], list[LatencyWindow]]:
    width = window_hours * 3600
    merged: dict[tuple[str, str], dict[float, tuple[int, float, latency.Histogram]]] = {}
    for cluster, fp, hour, executions, time_sum, hist_json in rows:
        start = hour.timestamp() // width * width
        per_plan = merged.setdefault((str(cluster), str(fp)), {})
        n, total, hist = per_plan.get(start, (0, 0.0, {}))
        per_plan[start] = (
            n + int(executions),
            total + float(time_sum),
            latency.merge(hist, latency.from_json(hist_json)),
        )
    return {
        key: [
            LatencyWindow(
                start=datetime.fromtimestamp(start, UTC),
                executions=n,
                mean_ms=total / n if n else 0.0,
                p50_ms=latency.quantile(hist, 0.5),
                p95_ms=latency.quantile(hist, 0.95),
            )
            for start, (n, total, hist) in sorted(per_plan.items())
        ]
        for key, per_plan in merged.items()
    }
