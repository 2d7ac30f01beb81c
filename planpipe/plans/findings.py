"""Findings in PostgreSQL (planpipe.plan_regressions): one detection run end to end, and the
findings' lifecycle.

A finding is updated in place while it is unresolved. It resolves only on evidence: the
query back on its baseline plan, or its latency back, for `resolve_executions`
executions (or a person accepting the new plan, see `history.set_plan_status`). Neither
a detection run's cluster filter nor a window ever resolves a finding: a plan that did
not run is no evidence. Improvements are closed as `improvement` when detected: they are
worth knowing, not acting on.
"""

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import polars as pl
import psycopg
from psycopg.types.json import Jsonb

from planpipe.plans.detection import Analysis, DetectionStats, SettledBaseline, find_regressions, scan_observations
from planpipe.plans.diff import diff_plans
from planpipe.plans.normalize import PlanParseError
from planpipe.plans.remediation import captured_index_definitions, remediation_for
from planpipe.plans.stats import ratio
from planpipe.plans.verdicts import (
    FINDING_KINDS,
    REGRESSION_KINDS,
    SEVERITY_ORDER,
    ClusterSlowdown,
    DetectionConfig,
    FindingKind,
    Severity,
    Verdict,
    speed,
)

__all__ = [
    "AUTO_ACCEPTED_BY",
    "DETECTOR",
    "FINDINGS_LOCK",
    "DetectionResult",
    "Regression",
    "RegressionNotFoundError",
    "RegressionStatus",
    "acknowledge_regression",
    "current_baselines",
    "detect_regressions",
    "get_regression",
    "list_regressions",
    "open_regression_candidates",
]

log = logging.getLogger(__name__)

RegressionStatus = Literal["open", "acknowledged", "resolved", "improvement"]

# Serialises writers of plan_regressions (detection runs, plan acceptance) so an
# acceptance made during a detection run can never be undone by that run.
FINDINGS_LOCK: Final = 0x706C_7265  # "plre"
DETECTOR: Final = "planpipe:detect"
SETTLER: Final = "planpipe:settling"
AUTO_ACCEPTED_BY: Final = "planpipe:first-plan"  # what the ingest records for a query's first plan
CLUSTER_WIDE: Final = "*"  # query_hash and fingerprints of a cluster_slowdown finding


class RegressionNotFoundError(LookupError):
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


_COLUMNS: Final = (
    "id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence, diff_markdown, "
    "status, first_detected, last_detected, detections, acknowledged_by, acknowledged_at, acknowledged_note, "
    "resolved_at, resolved_by, resolution, started_at, remediation"
)


def _record(row: Sequence[Any]) -> Regression:
    return Regression(*row)


def current_baselines(conn: psycopg.Connection[Any], clusters: Sequence[str] = ()) -> dict[tuple[str, str], str]:
    """(cluster_id, query_hash) → fingerprint of the most recently accepted plan."""
    return {key: fp for key, (fp, _, _) in _baselines_with_origin(conn, clusters).items()}


def _baselines_with_origin(
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


def _diff_markdown(verdict: Verdict, texts: Mapping[str, str]) -> str:
    if verdict.kind == "same_plan_slower":
        return f"Same plan `{verdict.new_fingerprint[:12]}` as the baseline: no plan change. {verdict.reason}."
    before, after = texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint)
    if before is None or after is None:
        return "Plan diff unavailable: plan text missing from plan_catalog."
    try:
        return diff_plans(before, after).to_markdown()
    except PlanParseError as error:
        return f"Plan diff unavailable: {error}"


@dataclass(frozen=True)
class DetectionResult:
    """One detection run: its findings as stored, what it resolved, and its statistics."""

    now: datetime
    config: DetectionConfig
    findings: list[Regression]
    resolved: list[Regression]
    stats: DetectionStats
    elapsed_s: float
    settled: list[SettledBaseline] = field(default_factory=list)

    @property
    def regressions(self) -> list[Regression]:
        return [f for f in self.findings if f.kind in REGRESSION_KINDS]

    @property
    def improvements(self) -> list[Regression]:
        return [f for f in self.findings if f.kind == "plan_flip_improvement"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(FINDING_KINDS, 0)
        for finding in self.findings:
            counts[finding.kind] += 1
        return counts

    def to_markdown(self) -> str:
        s = self.stats
        split = f"window {self.config.window_hours:g} h" if self.config.window_hours is not None else "change points"
        test = "Benjamini-Hochberg" if self.config.fdr else "per-comparison alpha"
        lines = [
            f"**{len(self.regressions)} regression(s), {len(self.improvements)} improvement(s), "
            f"{self.counts()['cluster_slowdown']} cluster slowdown(s), {len(self.resolved)} resolved** — {split}, "
            f"{test}, lookback {self.config.lookback_hours:g} h ending {self.now.isoformat(timespec='seconds')}",
            "",
            f"{s.observations:,} observations, {s.plans:,} plans, {s.comparisons:,} comparisons: "
            f"{s.too_few_executions:,} with too few executions, {s.screened_out:,} screened out, "
            f"{s.tested:,} tested exactly ({s.noise:,} noise, {s.environment_slowdowns:,} environment); "
            f"{s.multi_plan_queries:,} multi-plan queries, {s.settled_baselines:,} baselines settled, "
            f"{s.queries_without_baseline:,} queries without an accepted plan.",
        ]
        if self.findings:
            lines += [
                "",
                "| id | severity | kind | status | cluster | query | started | p50 base → new ms | change | p-value |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for f in self.findings:
                base, new = f.evidence.get("baseline", {}), f.evidence.get("new", {})
                started = f.started_at.isoformat(timespec="seconds") if f.started_at else ""
                p = f.evidence.get("p_value")
                lines.append(
                    f"| {f.id} | {f.severity} | {f.kind} | {f.status} | `{f.cluster_id}` | `{f.query_hash}` | "
                    f"{started} | {base.get('p50_ms', '')} → {new.get('p50_ms', '')} | {f.speed} | "
                    f"{'' if p is None else f'{p:.3g}'} |"
                )
            lines += ["", *[f"{f.to_markdown()}\n" for f in self.findings]]
        if self.resolved:
            lines += ["", "Resolved:"]
            lines += [f"- #{r.id} {r.kind} `{r.query_hash}`: {r.resolution}" for r in self.resolved]
        return "\n".join(lines)

    def metadata(self) -> dict[str, str | int | float]:
        """Plain values for Dagster metadata (wrap `report` as markdown)."""
        return {
            **{f"findings_{kind}": count for kind, count in self.counts().items()},
            "auto_resolved": len(self.resolved),
            "observations": self.stats.observations,
            "comparisons": self.stats.comparisons,
            "tested": self.stats.tested,
            "environment_slowdowns": self.stats.environment_slowdowns,
            "settled_baselines": self.stats.settled_baselines,
            "split": "change_point" if self.config.window_hours is None else f"window {self.config.window_hours:g} h",
            "elapsed_s": round(self.elapsed_s, 3),
            "report": self.to_markdown(),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "config": self.config.as_dict(),
            "findings": [f.as_dict() for f in self.findings],
            "resolved": [r.as_dict() for r in self.resolved],
            "settled": [s.__dict__ for s in self.settled],
            "stats": self.stats.as_dict(),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _unresolved(conn: psycopg.Connection[Any], clusters: Sequence[str]) -> list[tuple[Any, ...]]:
    return conn.execute(
        """SELECT id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, evidence
           FROM planpipe.plan_regressions
           WHERE status IN ('open', 'acknowledged')
             AND (cardinality(%s::text[]) = 0 OR cluster_id = ANY(%s::text[]))
           ORDER BY id""",
        (list(clusters), list(clusters)),
    ).fetchall()


def _watch(rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    keys: list[tuple[str, str, str]] = []
    for _, cluster, query, base_fp, new_fp, kind, evidence in rows:
        if kind == "cluster_slowdown":
            keys += [(cluster, q["query_hash"], q["fingerprint"]) for q in evidence.get("queries", [])]
        else:
            keys += [(cluster, query, base_fp), (cluster, query, new_fp)]
    return keys


def detect_regressions(
    dsn: str,
    parquet_root: Path,
    *,
    config: DetectionConfig | None = None,
    now: datetime | None = None,
) -> DetectionResult:
    """Recompute findings over the dataset, upsert them into plan_regressions, settle
    automatic baselines and resolve the unresolved findings (in scope) that evidence closes."""
    started = time.perf_counter()
    config = config or DetectionConfig()
    moment = now or datetime.now(UTC)
    with psycopg.connect(dsn) as conn:
        origins = _baselines_with_origin(conn, config.clusters)
        watched = _watch(_unresolved(conn, config.clusters))
    baselines = {key: fp for key, (fp, _, _) in origins.items()}
    # Settling needs the query's first executions in sight: an automatic baseline older than the
    # lookback stays (the plan dominating the lookback may be the regression itself).
    horizon = moment - timedelta(hours=config.lookback_hours)
    auto = [key for key, (_, by, first) in origins.items() if by == AUTO_ACCEPTED_BY and first >= horizon]
    analysis = find_regressions(
        scan_observations(parquet_root), baselines, config, now=moment, auto_accepted=auto, watch=watched
    )
    found = analysis.findings
    with psycopg.connect(dsn) as conn:
        fingerprints = sorted({v.baseline_fingerprint for v in found} | {v.new_fingerprint for v in found})
        texts: dict[str, str] = dict(
            conn.execute(
                "SELECT fingerprint, sample_plan_text FROM planpipe.plan_catalog WHERE fingerprint = ANY(%s)",
                (fingerprints,),
            ).fetchall()
        )
        diffs = {id(v): _diff_markdown(v, texts) for v in found}
        remedies = {id(v): _remedy(v, texts, parquet_root) for v in found}
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINDINGS_LOCK,))
            settled = _persist_settled(conn, analysis.settled)
            # Re-read under the lock: a plan accepted while we computed changes the comparison.
            current = current_baselines(conn, config.clusters)
            statuses = _plan_statuses(conn, found)
            findings = [
                _upsert(
                    conn,
                    v,
                    diffs[id(v)],
                    remedies[id(v)],
                    statuses.get((v.cluster_id, v.query_hash, v.new_fingerprint)),
                )
                for v in found
                if current.get((v.cluster_id, v.query_hash)) == v.baseline_fingerprint
                or (v.evidence.comparison == "same_plan" and (v.cluster_id, v.query_hash) in current)
            ]
            findings += [_upsert_cluster(conn, c) for c in analysis.clusters]
            resolved = _resolve(conn, analysis, current, {f.id for f in findings})
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.cluster_id, f.query_hash))
    elapsed = time.perf_counter() - started
    log.info("detection: %d findings, %d resolved in %.1fs", len(findings), len(resolved), elapsed)
    return DetectionResult(moment, config, findings, resolved, analysis.stats, elapsed, settled)


def _remedy(verdict: Verdict, texts: Mapping[str, str], parquet_root: Path) -> dict[str, Any]:
    """Remediation from the catalog's plan texts; an index definition the catalog's sample lacks
    (sampled before capture recorded definitions) is read from the baseline plan's last captured
    text, in the one date partition of its last execution."""
    remedy = remediation_for(verdict.kind, texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint))
    if not any(index.get("definition") is None for index in remedy.missing_indexes):
        return remedy.as_dict()
    latest = _latest_plan_text(parquet_root, verdict, verdict.evidence.baseline_end)
    if latest is None:
        return remedy.as_dict()
    definitions = captured_index_definitions(latest)
    return remediation_for(
        verdict.kind, texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint), definitions
    ).as_dict()


def _latest_plan_text(parquet_root: Path, verdict: Verdict, when: datetime) -> str | None:
    files = list(parquet_root.glob(f"route=*/date={when.astimezone(UTC).date().isoformat()}/*.parquet"))
    if not files:
        return None
    try:
        rows = (
            pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore",
                            schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String,
                                    "execution_timestamp": pl.Float64, "plan_text": pl.String})
            .filter(pl.col("cluster_id") == verdict.cluster_id, pl.col("query_hash") == verdict.query_hash,
                    pl.col("fingerprint") == verdict.baseline_fingerprint)
            .sort("execution_timestamp", descending=True)
            .head(1)
            .select("plan_text")
            .collect()
        )  # fmt: skip
    except (pl.exceptions.PolarsError, OSError) as error:
        log.warning("detection: could not read the baseline plan text for its index definitions: %s", error)
        return None
    return str(rows.item()) if rows.height else None


def _persist_settled(conn: psycopg.Connection[Any], settled: Sequence[SettledBaseline]) -> list[SettledBaseline]:
    """Accept each settling period's dominant plan in place of the automatic first plan
    (recorded in plan_status_history), unless someone changed the baseline meanwhile."""
    done = []
    for s in settled:
        row = conn.execute(
            """SELECT fingerprint, status_by FROM planpipe.current_baselines
               WHERE cluster_id = %s AND query_hash = %s""",
            (s.cluster_id, s.query_hash),
        ).fetchone()
        if row is None or row[0] != s.replaced or row[1] != AUTO_ACCEPTED_BY:
            continue
        why = (
            f"dominant plan of the settling period ({s.executions} of {s.settling_executions} executions); "
            f"the first plan {s.replaced[:12]} was a minority"
        )
        for fp, status in ((s.replaced, "candidate"), (s.fingerprint, "accepted")):
            conn.execute(
                """INSERT INTO planpipe.plan_status_history
                       (cluster_id, query_hash, fingerprint, old_status, new_status, changed_by, changed_at, reason)
                   SELECT cluster_id, query_hash, fingerprint, status, %s, %s, clock_timestamp(), %s
                   FROM planpipe.plan_baselines WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
                (status, SETTLER, why, s.cluster_id, s.query_hash, fp),
            )
            conn.execute(
                """UPDATE planpipe.plan_baselines SET status = %s, status_by = %s, status_at = clock_timestamp()
                   WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
                (status, SETTLER, s.cluster_id, s.query_hash, fp),
            )
        done.append(s)
    return done


def _plan_statuses(conn: psycopg.Connection[Any], verdicts: Sequence[Verdict]) -> dict[tuple[str, str, str], str]:
    if not verdicts:
        return {}
    rows = conn.execute(
        """SELECT b.cluster_id, b.query_hash, b.fingerprint, b.status
           FROM planpipe.plan_baselines b
           JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(c, q, f)
             ON (b.cluster_id, b.query_hash, b.fingerprint) = (k.c, k.q, k.f)""",
        (
            [v.cluster_id for v in verdicts],
            [v.query_hash for v in verdicts],
            [v.new_fingerprint for v in verdicts],
        ),
    ).fetchall()
    return {(str(c), str(q), str(f)): str(s) for c, q, f, s in rows}


_UPSERT: Final = f"""INSERT INTO planpipe.plan_regressions AS r
        (cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence, diff_markdown,
         status, started_at, remediation)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (cluster_id, query_hash, new_fingerprint, kind) WHERE status <> 'resolved'
    DO UPDATE SET baseline_fingerprint = excluded.baseline_fingerprint, severity = excluded.severity,
                  evidence = excluded.evidence, diff_markdown = excluded.diff_markdown,
                  started_at = excluded.started_at, remediation = excluded.remediation,
                  last_detected = now(), detections = r.detections + 1
    RETURNING {_COLUMNS}"""


def _upsert(
    conn: psycopg.Connection[Any], verdict: Verdict, diff: str, remediation: dict[str, Any], new_status: str | None
) -> Regression:
    evidence = verdict.evidence.as_dict() | {"new_plan_status": new_status, "reason": verdict.reason}
    status = "improvement" if verdict.kind == "plan_flip_improvement" else "open"
    row = conn.execute(
        _UPSERT,
        (
            verdict.cluster_id,
            verdict.query_hash,
            verdict.baseline_fingerprint,
            verdict.new_fingerprint,
            verdict.kind,
            verdict.severity,
            Jsonb(evidence),
            diff,
            status,
            verdict.evidence.window_start,
            Jsonb(remediation),
        ),
    ).fetchone()
    assert row is not None
    return _record(row)


def _upsert_cluster(conn: psycopg.Connection[Any], slowdown: ClusterSlowdown) -> Regression:
    queries = ", ".join(f"`{v.query_hash}`" for v in slowdown.affected)
    text = (
        f"{len(slowdown.affected)} queries of `{slowdown.cluster_id}` slowed together ({speed(slowdown.ratio_p50)}, "
        f"median) with unchanged work: {queries}. Look at the machine (CPU, I/O, memory pressure), not the plans."
    )
    remediation = {"notes": ["check the host's load (CPU, I/O, memory) and neighbours around the start time"]}
    row = conn.execute(
        _UPSERT,
        (
            slowdown.cluster_id,
            CLUSTER_WIDE,
            CLUSTER_WIDE,
            CLUSTER_WIDE,
            "cluster_slowdown",
            "medium",
            Jsonb(slowdown.as_dict()),
            text,
            "open",
            slowdown.started,
            Jsonb(remediation),
        ),
    ).fetchone()
    assert row is not None
    return _record(row)


def _back_on_baseline(analysis: Analysis, cluster: str, query: str, base_fp: str, new_fp: str) -> str | None:
    n = analysis.config.resolve_executions
    base = analysis.recent.get((cluster, query, base_fp))
    new = analysis.recent.get((cluster, query, new_fp))
    if base is None:
        return None
    last_new = float(new.timestamps.max()) if new is not None and len(new.timestamps) else -np.inf
    since = int((base.timestamps > last_new).sum())
    if since >= n:
        return f"back on the baseline plan {base_fp[:12]} for {since} executions"
    return None


def _latency_back(analysis: Analysis, cluster: str, query: str, fp: str, baseline_p50: float | None) -> str | None:
    config = analysis.config
    recent = analysis.recent.get((cluster, query, fp))
    if recent is None or baseline_p50 is None or len(recent.total_ms) < config.resolve_executions:
        return None
    p50 = float(np.median(recent.total_ms[-config.resolve_executions :]))
    if ratio(p50, baseline_p50) < config.min_ratio or p50 - baseline_p50 < config.min_abs_ms:
        return (
            f"latency back: p50 {p50:.3f} ms over the last {config.resolve_executions} executions "
            f"(baseline {baseline_p50:.3f} ms)"
        )
    return None


def _resolve(
    conn: psycopg.Connection[Any], analysis: Analysis, current: Mapping[tuple[str, str], str], detected: set[int]
) -> list[Regression]:
    resolved: list[Regression] = []
    for finding_id, cluster, query, base_fp, new_fp, kind, evidence in _unresolved(conn, analysis.config.clusters):
        if finding_id in detected:
            continue
        reason: str | None = None
        if kind == "cluster_slowdown":
            queries = evidence.get("queries", [])
            backs = [
                _latency_back(analysis, cluster, q["query_hash"], q["fingerprint"], q.get("baseline_p50_ms"))
                for q in queries
            ]
            if queries and all(backs):
                reason = f"every affected query is back ({len(queries)})"
        elif kind == "same_plan_slower":
            baseline_p50 = (evidence.get("baseline") or {}).get("p50_ms")
            reason = _latency_back(analysis, cluster, query, new_fp, baseline_p50)
        else:
            accepted = current.get((cluster, query))
            if accepted is not None and accepted != base_fp:
                reason = f"the baseline changed to plan {accepted[:12]}"
            else:
                reason = _back_on_baseline(analysis, cluster, query, base_fp, new_fp)
        if reason is None:
            continue  # no evidence either way: a plan that did not run proves nothing
        row = conn.execute(
            f"""UPDATE planpipe.plan_regressions
                SET status = 'resolved', resolved_at = now(), resolved_by = %s, resolution = %s
                WHERE id = %s RETURNING {_COLUMNS}""",
            (DETECTOR, reason, finding_id),
        ).fetchone()
        assert row is not None
        resolved.append(_record(row))
    return resolved


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
            f"""SELECT {_COLUMNS} FROM planpipe.plan_regressions
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
    return [_record(row) for row in rows]


def get_regression(dsn: str, finding_id: int) -> Regression:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM planpipe.plan_regressions WHERE id = %s", (finding_id,)).fetchone()
    if row is None:
        raise RegressionNotFoundError(f"no finding #{finding_id}")
    return _record(row)


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
                WHERE id = %s RETURNING {_COLUMNS}""",
            (by.strip(), note, finding_id),
        ).fetchone()
    assert updated is not None
    return _record(updated)


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
