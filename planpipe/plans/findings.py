"""Findings in PostgreSQL (planpipe.plan_regressions): the record, the accepted baselines
detection compares against, and what people and the router read or do with findings.

A detection run writes them (`planpipe.plans.detector`); evidence resolves them
(`planpipe.plans.lifecycle`); a person acknowledges one here or accepts a plan
(`history.set_plan_status`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import psycopg

from planpipe.errors import PlanpipeError
from planpipe.plans.verdicts import REGRESSION_KINDS, FindingKind, Severity, speed

__all__ = [
    "AUTO_ACCEPTED_BY",
    "CLUSTER_WIDE",
    "COLUMNS",
    "DETECTOR",
    "FINDINGS_LOCK",
    "SETTLER",
    "Regression",
    "RegressionNotFoundError",
    "RegressionStatus",
    "acknowledge_regression",
    "baselines_with_origin",
    "current_baselines",
    "get_regression",
    "list_regressions",
    "open_regression_candidates",
    "record_of",
]

RegressionStatus = Literal["open", "acknowledged", "resolved", "improvement"]

# Serialises writers of plan_regressions (detection runs, plan acceptance) so an
# acceptance made during a detection run can never be undone by that run.
FINDINGS_LOCK: Final = 0x706C_7265  # "plre"
DETECTOR: Final = "planpipe:detect"
SETTLER: Final = "planpipe:settling"
AUTO_ACCEPTED_BY: Final = "planpipe:first-plan"  # what the ingest records for a query's first plan
CLUSTER_WIDE: Final = "*"  # query_hash and fingerprints of a cluster_slowdown finding


class RegressionNotFoundError(PlanpipeError, LookupError):
    pass


@dataclass(frozen=True)
class Regression:
    """A stored finding (planpipe.plan_regressions)."""

    id: int
    cluster_id: str
    query_hash: str
    baseline_fingerprint: str
    new_fingerprint: str
    kind: FindingKind
    severity: Severity
    evidence: dict[str, Any]
    diff_markdown: str
    status: RegressionStatus
    first_detected: datetime
    last_detected: datetime
    detections: int
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    acknowledged_note: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None
    started_at: datetime | None = None
    remediation: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_p50(self) -> float | None:
        value = self.evidence.get("ratio_p50")
        return float(value) if isinstance(value, int | float) else None

    @property
    def speed(self) -> str:
        r = self.ratio_p50
        return speed(r) if r is not None else "-"

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.isoformat()
        return out

    def remediation_lines(self) -> list[str]:
        r = self.remediation or {}
        out = []
        for index in r.get("missing_indexes", []):
            out.append(
                f"index `{index['name']}` used by the baseline plan is not used any more: "
                f"{index.get('definition') or 'definition not captured'}"
            )
        out += [f"refresh statistics: `{s['sql']}` ({s['reason']})" for s in r.get("statistics", [])]
        hint = r.get("hint")
        if hint:
            state = "validated against the baseline plan" if hint.get("validated") else "NOT validated"
            out.append(f"force the baseline plan with pg_hint_plan ({state}): `{hint['text']}`")
        out += list(r.get("notes", []))
        return out

    def headline(self) -> str:
        if self.kind == "cluster_slowdown":
            queries = self.evidence.get("queries", [])
            return (
                f"#{self.id} {self.severity} cluster_slowdown on {self.cluster_id}: {len(queries)} queries {self.speed}"
            )
        base, new = self.evidence.get("baseline", {}), self.evidence.get("new", {})
        return (
            f"#{self.id} {self.severity} {self.kind} on {self.cluster_id}/{self.query_hash}: "
            f"p50 {base.get('p50_ms')} → {new.get('p50_ms')} ms ({self.speed}), "
            f"p = {self.evidence.get('p_value', float('nan')):.3g}"
        )

    def to_markdown(self) -> str:
        started = self.started_at.isoformat(timespec="seconds") if self.started_at else "?"
        if self.kind == "cluster_slowdown":
            rows = [
                "| query | plan | p50 before → after ms | ratio | work blocks × | rows × |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for q in self.evidence.get("queries", []):
                rows.append(
                    f"| `{q['query_hash']}` | `{q['fingerprint'][:12]}` | {q['baseline_p50_ms']} → "
                    f"{q['new_p50_ms']} | {q['ratio_p50']} | {q['work_ratio_blocks']} | {q['work_ratio_rows']} |"
                )
            return "\n".join(
                [
                    f"### #{self.id} cluster_slowdown ({self.severity}, {self.status})",
                    f"`{self.cluster_id}` — {self.speed} since {started}, same work: the machine, not the queries",
                    "",
                    *rows,
                ]
            )
        base, new = self.evidence.get("baseline", {}), self.evidence.get("new", {})
        bw, nw = base.get("work") or {}, new.get("work") or {}
        rows = [
            "| | baseline | new |",
            "| --- | --- | --- |",
            f"| plan | `{self.baseline_fingerprint[:12]}` | `{self.new_fingerprint[:12]}` |",
            f"| executions | {base.get('executions')} | {new.get('executions')} |",
            f"| p50 ms | {base.get('p50_ms')} | {new.get('p50_ms')} |",
            f"| p95 ms | {base.get('p95_ms')} | {new.get('p95_ms')} |",
            f"| blocks (median) | {bw.get('blocks')} | {nw.get('blocks')} |",
            f"| rows (median) | {bw.get('rows')} | {nw.get('rows')} |",
        ]
        remedy = self.remediation_lines()
        return "\n".join(
            [
                f"### #{self.id} {self.kind} ({self.severity}, {self.status})",
                f"`{self.cluster_id}` / `{self.query_hash}` — {self.speed} since {started}, "
                f"p = {self.evidence.get('p_value', float('nan')):.3g}",
                "",
                *rows,
                *(["", "**What to do**", "", *[f"- {line}" for line in remedy]] if remedy else []),
                "",
                self.diff_markdown,
            ]
        )


COLUMNS: Final = (
    "id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence, diff_markdown, "
    "status, first_detected, last_detected, detections, acknowledged_by, acknowledged_at, acknowledged_note, "
    "resolved_at, resolved_by, resolution, started_at, remediation"
)


def record_of(row: Sequence[Any]) -> Regression:
    return Regression(*row)


def current_baselines(conn: psycopg.Connection[Any], clusters: Sequence[str] = ()) -> dict[tuple[str, str], str]:
    """(cluster_id, query_hash) → fingerprint of the most recently accepted plan."""
    return {key: fp for key, (fp, _, _) in baselines_with_origin(conn, clusters).items()}


def baselines_with_origin(
    conn: psycopg.Connection[Any], clusters: Sequence[str] = ()
) -> dict[tuple[str, str], tuple[str, str | None, datetime]]:
    """(cluster, query) → (accepted fingerprint, who accepted it, the query's first execution)."""
    rows = conn.execute(
        """SELECT cb.cluster_id, cb.query_hash, cb.fingerprint, cb.status_by,
                  (SELECT min(b.first_seen) FROM planpipe.plan_baselines b
                   WHERE (b.cluster_id, b.query_hash) = (cb.cluster_id, cb.query_hash))
           FROM planpipe.current_baselines cb
           WHERE cardinality(%s::text[]) = 0 OR cb.cluster_id = ANY(%s::text[])""",
        (list(clusters), list(clusters)),
    ).fetchall()
    return {(str(c), str(q)): (str(f), b, first) for c, q, f, b, first in rows}


def list_regressions(
    dsn: str,
    *,
    since: datetime | None = None,
    cluster_id: str | None = None,
    status: RegressionStatus | Literal["all", "unresolved"] = "open",
    kinds: Sequence[FindingKind] = (),
    limit: int | None = None,
) -> list[Regression]:
    """Findings, most severe and most recent first. `since` filters on last_detected."""
    statuses = {"all": [], "unresolved": ["open", "acknowledged"]}.get(status, [status])
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"""SELECT {COLUMNS} FROM planpipe.plan_regressions
                WHERE (%(since)s::timestamptz IS NULL OR last_detected >= %(since)s)
                  AND (%(cluster)s::text IS NULL OR cluster_id = %(cluster)s)
                  AND (cardinality(%(statuses)s::text[]) = 0 OR status = ANY(%(statuses)s))
                  AND (cardinality(%(kinds)s::text[]) = 0 OR kind = ANY(%(kinds)s))
                ORDER BY status IN ('resolved', 'improvement'),
                         array_position(ARRAY['critical', 'high', 'medium', 'info'], severity),
                         last_detected DESC, id DESC
                LIMIT %(limit)s""",
            {"since": since, "cluster": cluster_id, "statuses": statuses, "kinds": list(kinds), "limit": limit},
        ).fetchall()
    return [record_of(row) for row in rows]


def get_regression(dsn: str, finding_id: int) -> Regression:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT {COLUMNS} FROM planpipe.plan_regressions WHERE id = %s", (finding_id,)).fetchone()
    if row is None:
        raise RegressionNotFoundError(f"no finding #{finding_id}")
    return record_of(row)


def acknowledge_regression(dsn: str, finding_id: int, *, by: str, note: str | None = None) -> Regression:
    """Mark an open finding as seen. Detection keeps updating its evidence (it stays one
    finding) and still resolves it when the evidence says so; a resolved finding or an
    improvement cannot be acknowledged."""
    if not by.strip():
        raise ValueError("acknowledging needs a name (by)")
    with psycopg.connect(dsn) as conn, conn.transaction():
        row = conn.execute(
            "SELECT status FROM planpipe.plan_regressions WHERE id = %s FOR UPDATE", (finding_id,)
        ).fetchone()
        if row is None:
            raise RegressionNotFoundError(f"no finding #{finding_id}")
        if row[0] in ("resolved", "improvement"):
            raise ValueError(f"finding #{finding_id} is already closed ({row[0]})")
        updated = conn.execute(
            f"""UPDATE planpipe.plan_regressions
                SET status = 'acknowledged', acknowledged_by = %s, acknowledged_at = now(), acknowledged_note = %s
                WHERE id = %s RETURNING {COLUMNS}""",
            (by.strip(), note, finding_id),
        ).fetchone()
    assert updated is not None
    return record_of(updated)


def open_regression_candidates(dsn: str, *, cluster_id: str | None = None) -> set[str]:
    """Query hashes with an open (unacknowledged, unresolved) regression: the router gives
    them priority regression_candidate. Cheap (partial index); callers cache it briefly.

    The router's set spans every cluster: query identifiers (PostgreSQL 18 jumbles
    relations by name) are the same for the same query on every cluster and schema.
    `cluster_id` narrows it to the findings of one cluster."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT DISTINCT query_hash FROM planpipe.plan_regressions
               WHERE status = 'open' AND kind = ANY(%s) AND (%s::text IS NULL OR cluster_id = %s)""",
            (list(REGRESSION_KINDS), cluster_id, cluster_id),
        ).fetchall()
    return {str(row[0]) for row in rows}
